//! Real kubectl against an apiserver: one runner for the cluster, the
//! kproxy API tests and kcontrol's own tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::netns::Netns;

/// How to run kubectl: which binary, which kubeconfig, optionally inside a
/// network namespace (where the apiserver listens on loopback) and with a
/// cache dir of its own (so discovery caches of parallel tests never mix).
#[derive(Clone, Debug)]
pub struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    netns: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
}

impl Kubectl {
    /// `kubectl` from the PATH with `kubeconfig`.
    pub fn new(kubeconfig: &Path) -> Kubectl {
        Kubectl {
            bin: "kubectl".into(),
            kubeconfig: kubeconfig.to_path_buf(),
            netns: None,
            cache_dir: None,
        }
    }

    /// Another kubectl binary (e.g. a versioned one).
    pub fn bin(mut self, bin: &Path) -> Kubectl {
        self.bin = bin.to_path_buf();
        self
    }

    /// Runs kubectl in `ns` (`nsenter --net`: only the network namespace
    /// changes).
    pub fn in_netns(self, ns: &Netns) -> Kubectl {
        self.in_netns_path(&ns.path())
    }

    /// [`Kubectl::in_netns`] by the namespace's handle (`/var/run/netns/N`).
    pub fn in_netns_path(mut self, ns: &Path) -> Kubectl {
        self.netns = Some(ns.to_path_buf());
        self
    }

    /// `--cache-dir DIR`.
    pub fn cache_dir(mut self, dir: &Path) -> Kubectl {
        self.cache_dir = Some(dir.to_path_buf());
        self
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The command up to the kubectl arguments, for callers that stream
    /// its output (`get -w`).
    pub fn command(&self) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        if let Some(dir) = &self.cache_dir {
            cmd.arg("--cache-dir").arg(dir);
        }
        cmd
    }

    /// Runs `kubectl ARGS` with `stdin` and returns its output whatever
    /// the exit status.
    pub fn output(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let mut cmd = self.command();
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("run {}", self.bin.display()))?;
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(text.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// `kubectl ARGS`: its stdout, or an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        self.run_stdin(args, None)
    }

    /// `kubectl ARGS` with `stdin` (e.g. `apply -f -`).
    pub fn run_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let out = self.output(args, stdin)?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl get ARGS -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Result<Value> {
        let mut full = vec!["get"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&self.run(&full)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(cmd: &Command) -> Vec<String> {
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn command_enters_the_namespace_and_keeps_its_cache() {
        let k = Kubectl::new(Path::new("/d/kubeconfig.yaml"))
            .bin(Path::new("/opt/kubectl.1.27"))
            .in_netns_path(Path::new("/var/run/netns/kpt-1-0-cnode"))
            .cache_dir(Path::new("/d/cache"));
        assert_eq!(
            argv(&k.command()),
            [
                "nsenter",
                "--net=/var/run/netns/kpt-1-0-cnode",
                "/opt/kubectl.1.27",
                "--kubeconfig",
                "/d/kubeconfig.yaml",
                "--cache-dir",
                "/d/cache",
            ]
        );
        let plain = Kubectl::new(Path::new("k.yaml"));
        assert_eq!(
            argv(&plain.command()),
            ["kubectl", "--kubeconfig", "k.yaml"]
        );
    }
}
