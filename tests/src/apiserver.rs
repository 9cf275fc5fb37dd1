//! A real `kcontrol apiserver` inside the node namespace (so kproxy reaches
//! it on the namespace's loopback), and real `kubectl` against it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use testbed::Kubectl;

use crate::netns::{NETNS_DIR, Netns};

/// The `kcontrol` binary: env KCONTROL_BIN (set by `cargo xtask test`).
pub fn kcontrol_bin() -> PathBuf {
    match std::env::var_os("KCONTROL_BIN") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "KCONTROL_BIN is not set: run the suite with `cargo xtask test`, or set it to a \
             built kcontrol (cargo build --release -p kcontrol → target/release/kcontrol)"
        ),
    }
}

/// A running apiserver; SIGKILLed on drop. The data directory outlives
/// restarts of the process (it is what a restart must find again).
pub struct Apiserver {
    child: Option<Child>,
    lines: Option<Receiver<String>>,
    ns: String,
    pub data_dir: PathBuf,
    pub listen: String,
    /// More `kcontrol apiserver` arguments (e.g. `--store etcd://…`), kept
    /// across restarts.
    extra_args: Vec<String>,
}

impl Apiserver {
    pub fn start(node: &Netns, data_dir: &Path, listen: &str) -> Result<Apiserver> {
        Self::start_with(node, data_dir, listen, &[])
    }

    /// [`Apiserver::start`] with more arguments for `kcontrol apiserver`.
    pub fn start_with(
        node: &Netns,
        data_dir: &Path,
        listen: &str,
        extra_args: &[String],
    ) -> Result<Apiserver> {
        let mut a = Apiserver {
            child: None,
            lines: None,
            ns: node.name().to_string(),
            data_dir: data_dir.to_path_buf(),
            listen: listen.to_string(),
            extra_args: extra_args.to_vec(),
        };
        a.spawn()?;
        Ok(a)
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = kcontrol_bin();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(&bin)
            .args(["apiserver", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen", &self.listen])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                eprintln!("kcontrol | {line}");
                let _ = tx.send(line);
            }
        });
        self.child = Some(child);
        self.lines = Some(rx);
        self.wait_listening(Duration::from_secs(60))
    }

    fn wait_listening(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let rx = self.lines.as_ref().expect("spawned");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains("listening on") => return Ok(()),
                Ok(_) => {}
                Err(_) => bail!("kcontrol apiserver did not report listening within {timeout:?}"),
            }
        }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.data_dir.join("kubeconfig.yaml")
    }

    /// SIGKILL (an unplanned outage).
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().context("kill apiserver")?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts the process again on the same data directory and address.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }

    /// Runs real kubectl in the node namespace against this apiserver.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        Kubectl::new(&self.kubeconfig())
            .in_netns_path(&Path::new(NETNS_DIR).join(&self.ns))
            .run_stdin(args, stdin)
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
