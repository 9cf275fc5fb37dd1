//! A whole single-node cluster for end-to-end tests: `kcontrol all`
//! (apiserver, scheduler, controller-manager, kubelet running crun
//! containers) inside a node network namespace of its own, kproxy following
//! its API and attaching to each pod's veth (`--iface-prefix kcv`), and real
//! kubectl as the client.
//!
//! Everything network-related lives in namespaces: the node namespace holds
//! the kubelet's bridge and the pods' host-side veths; each pod has its own
//! namespace. Dropping the guard stops kproxy, then `kcontrol all` with
//! SIGTERM (the kubelet removes pods, namespaces, veths, bridge and
//! cgroups), then checks and force-removes anything left.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::apiserver::kcontrol_bin;
use crate::kproxy::{Kproxy, Launch, Source};
use crate::mode::Mode;
use crate::netns::Netns;
use crate::util::{SuiteLock, poll_until};

/// Node name, bridge and pod CIDR of the test node (distinct from what
/// `cargo xtask up` uses on the host).
pub const NODE: &str = "e2e-node";
pub const BRIDGE: &str = "kce2e0";
pub const POD_CIDR: &str = "10.244.77.0/24";
/// Host-side pod veths carry this prefix (control/src/kubelet/net.rs).
pub const VETH_PREFIX: &str = "kcv";

const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The pod-UID hash the kubelet names containers and namespaces with
/// (`kc-<hash>-<container>`, `kcns-<hash>`): FNV-1a 64 over the UID,
/// 48 bits as 12 hex digits.
pub fn pod_hash(uid: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

pub struct Cluster {
    /// Backend slots kproxy held at start (e.g. the `kubernetes` Service).
    pub base_backends: u64,
    kproxy: Option<Kproxy>,
    kcontrol: Option<Child>,
    lines: Receiver<String>,
    pub data_dir: PathBuf,
    /// Where `kcontrol all` runs; dropped last.
    pub node: Netns,
    _lock: SuiteLock,
}

impl Cluster {
    /// Starts `kcontrol all` in a fresh node namespace, waits for the node
    /// to be Ready, then starts kproxy (eBPF, unpinned) and waits for it.
    /// `extra` goes to `kcontrol all`.
    pub fn start(extra: &[&str]) -> Result<Cluster> {
        let lock = SuiteLock::acquire()?;
        let node = Netns::new("cnode")?;
        let data_dir = std::env::temp_dir().join(format!("kpt-cluster-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir)?;
        // nsenter, not `ip netns exec`: the latter remounts /sys in a private
        // mount namespace, which would hide /sys/fs/cgroup from crun.
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", node.path().display()))
            .arg(kcontrol_bin())
            .args(["all", "--data-dir"])
            .arg(&data_dir)
            .args([
                "--listen",
                "127.0.0.1:6443",
                "--node-name",
                NODE,
                "--pod-cidr",
                POD_CIDR,
                "--bridge",
                BRIDGE,
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn kcontrol all")?;
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                eprintln!("kcontrol-all | {line}");
                let _ = tx.send(line);
            }
        });
        let mut c = Cluster {
            base_backends: 0,
            kproxy: None,
            kcontrol: Some(child),
            lines: rx,
            data_dir,
            node,
            _lock: lock,
        };
        c.wait_line("kcontrol: all: apiserver ready", START_TIMEOUT)?;
        poll_until("the node to be Ready", START_TIMEOUT, || {
            let out = c.kubectl(&["get", "node", NODE, "-o", "json"])?;
            let v: Value = serde_json::from_str(&out)?;
            let ready = v["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            Ok(ready.then_some(()))
        })?;
        let kubeconfig = c.kubeconfig();
        let mut kp = Kproxy::start_from(
            &c.node,
            Source::Kubeconfig(&kubeconfig),
            &[],
            &[
                "--iface-prefix",
                VETH_PREFIX,
                "--node-name",
                NODE,
                "--no-pin",
            ],
            Mode::Ebpf,
            Launch::IpNetnsExec,
        )?;
        let ready = kp.wait_ready()?;
        c.base_backends = crate::kproxy::field_u64(&ready, "backends")?;
        c.kproxy = Some(kp);
        Ok(c)
    }

    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return Ok(l),
                Ok(_) => {}
                Err(_) => bail!("kcontrol all did not print {prefix:?} within {timeout:?}"),
            }
        }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.data_dir.join("kubeconfig.yaml")
    }

    pub fn kproxy(&mut self) -> &mut Kproxy {
        self.kproxy.as_mut().expect("kproxy started")
    }

    /// Real kubectl in the node namespace (the apiserver listens on its
    /// loopback).
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_in(args, None)
    }

    pub fn kubectl_in(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        use std::io::Write;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.node.path().display()))
            .arg("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().context("run kubectl")?;
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl get KIND [NAME] -o json` parsed.
    pub fn get_json(&self, args: &[&str]) -> Result<Value> {
        let mut full = vec!["get"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&full)?)?)
    }

    fn crun_root(&self) -> PathBuf {
        self.data_dir.join("kubelet").join("crun")
    }

    /// A handle to run commands inside a pod's container (`crun exec`).
    pub fn container(&self, pod: &str, container: &str) -> Result<Container> {
        let uid = self.get_json(&["pod", pod])?["metadata"]["uid"]
            .as_str()
            .context("pod without uid")?
            .to_string();
        Ok(Container {
            root: self.crun_root(),
            id: format!("kc-{}-{container}", pod_hash(&uid)),
        })
    }

    /// Names of the pods matching `selector` that are Running and Ready.
    pub fn ready_pods(&self, selector: &str) -> Result<Vec<String>> {
        let v = self.get_json(&["pods", "-l", selector])?;
        let mut names = Vec::new();
        for p in v["items"].as_array().into_iter().flatten() {
            let ready = p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            if p["status"]["phase"] == "Running"
                && ready
                && p["metadata"]["deletionTimestamp"].is_null()
            {
                names.push(
                    p["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
        }
        names.sort();
        Ok(names)
    }

    /// Ready endpoint addresses of the Service's EndpointSlices.
    pub fn ready_endpoints(&self, service: &str) -> Result<Vec<String>> {
        let v = self.get_json(&[
            "endpointslices",
            "-l",
            &format!("kubernetes.io/service-name={service}"),
        ])?;
        let mut ips = Vec::new();
        for s in v["items"].as_array().into_iter().flatten() {
            for e in s["endpoints"].as_array().into_iter().flatten() {
                if e["conditions"]["ready"] == true {
                    for a in e["addresses"].as_array().into_iter().flatten() {
                        ips.push(a.as_str().unwrap_or_default().to_string());
                    }
                }
            }
        }
        ips.sort();
        Ok(ips)
    }

    /// Stops kproxy, then `kcontrol all` (SIGTERM: the kubelet removes what
    /// it made) and reports what was left behind (namespaces, veths,
    /// bridge, cgroups, containers), removing it.
    pub fn stop(&mut self) -> Result<Vec<String>> {
        if let Some(mut kp) = self.kproxy.take() {
            kp.stop(Duration::from_secs(10))?;
        }
        let mut left = Vec::new();
        if let Some(mut child) = self.kcontrol.take() {
            // SAFETY: plain kill(2) on our child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            loop {
                if let Some(status) = child.try_wait()? {
                    if !status.success() {
                        left.push(format!("kcontrol all exited with {status}"));
                    }
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    left.push("kcontrol all did not stop within 60 s".into());
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        left.extend(self.force_cleanup());
        Ok(left)
    }

    /// Removes (and names) whatever the kubelet left: containers under its
    /// crun root, their pod namespaces, the bridge, the node's cgroups.
    fn force_cleanup(&self) -> Vec<String> {
        let mut left = Vec::new();
        let root = self.crun_root();
        if let Ok(out) = Command::new("crun")
            .arg("--root")
            .arg(&root)
            .arg("list")
            .output()
        {
            for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
                let Some(id) = line.split_whitespace().next() else {
                    continue;
                };
                left.push(format!("container {id}"));
                let _ = Command::new("crun")
                    .arg("--root")
                    .arg(&root)
                    .args(["delete", "-f", id])
                    .output();
                if let Some(hash) = id.strip_prefix("kc-").and_then(|r| r.get(..12)) {
                    let _ = Command::new("ip")
                        .args(["netns", "del", &format!("kcns-{hash}")])
                        .output();
                }
            }
        }
        if let Ok(out) = self.node.ip(&["-o", "link", "show"]) {
            for l in out.lines() {
                let name = l.split(": ").nth(1).unwrap_or("");
                let name = name.split('@').next().unwrap_or("");
                if name.starts_with(VETH_PREFIX) || name == BRIDGE {
                    left.push(format!("link {name}"));
                }
            }
        }
        for base in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            let dir = Path::new(base).join("kcontrol").join(NODE);
            if dir.exists() {
                left.push(format!("cgroup {}", dir.display()));
                remove_cgroup_tree(&dir);
            }
        }
        left
    }
}

/// A running container of a pod, by its crun id.
#[derive(Clone, Debug)]
pub struct Container {
    root: PathBuf,
    pub id: String,
}

impl Container {
    /// Runs `argv` inside the container; its stdout, or an error on a
    /// non-zero exit.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        let out = Command::new("crun")
            .arg("--root")
            .arg(&self.root)
            .args(["exec", &self.id])
            .args(argv)
            .output()
            .context("run crun exec")?;
        if !out.status.success() {
            bail!(
                "crun exec {} {}: {} {}",
                self.id,
                argv.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for Cluster {
    fn drop(&mut self) {
        match self.stop() {
            Ok(left) if left.is_empty() => {}
            Ok(left) => eprintln!("cluster: cleaned up after the kubelet: {left:?}"),
            Err(e) => eprintln!("cluster: stopping: {e:#}"),
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}
