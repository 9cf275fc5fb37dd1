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
use kcontrol_store::etcd_cluster::EtcdCluster;
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
    /// The kcontrol processes, in start order (stopped in reverse).
    kcontrol: Vec<(String, Child)>,
    /// stdout lines of all of them.
    tx: std::sync::mpsc::Sender<String>,
    lines: Receiver<String>,
    pub data_dir: PathBuf,
    /// The etcd of [`Cluster::start_on_etcd`]; dropped after the kcontrol
    /// processes are stopped.
    etcd: Option<EtcdCluster>,
    /// Where `kcontrol all` runs; dropped last.
    pub node: Netns,
    _lock: SuiteLock,
}

impl Cluster {
    /// Starts `kcontrol all` in a fresh node namespace, waits for the node
    /// to be Ready, then starts kproxy (eBPF, unpinned) and waits for it.
    /// `extra` goes to `kcontrol all`.
    pub fn start(extra: &[&str]) -> Result<Cluster> {
        Cluster::start_all(Cluster::empty()?, extra)
    }

    /// [`Cluster::start`] with `kcontrol all --store etcd://…`: a one-member
    /// etcd runs in the node namespace (loopback) and is stopped after
    /// kcontrol.
    pub fn start_on_etcd() -> Result<Cluster> {
        let mut c = Cluster::empty()?;
        let etcd = c.node.try_run(|| EtcdCluster::start(1))?;
        let url = etcd.url();
        c.etcd = Some(etcd);
        Cluster::start_all(c, &["--store", &url])
    }

    fn start_all(mut c: Cluster, extra: &[&str]) -> Result<Cluster> {
        let mut args: Vec<String> = vec!["all".into(), "--data-dir".into()];
        args.push(c.data_dir.display().to_string());
        args.extend(
            [
                "--listen",
                "127.0.0.1:6443",
                "--node-name",
                NODE,
                "--pod-cidr",
                POD_CIDR,
                "--bridge",
                BRIDGE,
            ]
            .map(String::from),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        c.spawn("all", &args)?;
        c.wait_line("kcontrol: all: apiserver ready", START_TIMEOUT)?;
        c.finish_start()?;
        Ok(c)
    }

    /// The same node as separate processes — apiserver, scheduler,
    /// controller-manager (node monitor grace `grace`), kubelet (lease
    /// renewed every second) — so one of them can be paused.
    pub fn start_split(grace: &str) -> Result<Cluster> {
        let mut c = Cluster::empty()?;
        let data = c.data_dir.display().to_string();
        let kubeconfig = c.kubeconfig().display().to_string();
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        c.spawn(
            "apiserver",
            &own(&[
                "apiserver",
                "--data-dir",
                &data,
                "--listen",
                "127.0.0.1:6443",
            ]),
        )?;
        c.wait_line("kcontrol: apiserver listening", START_TIMEOUT)?;
        c.spawn(
            "scheduler",
            &own(&["scheduler", "--kubeconfig", &kubeconfig]),
        )?;
        c.spawn(
            "controller-manager",
            &own(&[
                "controller-manager",
                "--kubeconfig",
                &kubeconfig,
                "--node-monitor-grace-period",
                grace,
            ]),
        )?;
        let root = c.data_dir.join("kubelet").display().to_string();
        c.spawn(
            "kubelet",
            &own(&[
                "kubelet",
                "--kubeconfig",
                &kubeconfig,
                "--node-name",
                NODE,
                "--pod-cidr",
                POD_CIDR,
                "--root-dir",
                &root,
                "--bridge",
                BRIDGE,
                "--lease-renew-seconds",
                "1",
            ]),
        )?;
        c.finish_start()?;
        Ok(c)
    }

    fn empty() -> Result<Cluster> {
        let lock = SuiteLock::acquire()?;
        let node = Netns::new("cnode")?;
        let data_dir = std::env::temp_dir().join(format!("kpt-cluster-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir)?;
        let (tx, rx) = channel();
        Ok(Cluster {
            base_backends: 0,
            kproxy: None,
            kcontrol: Vec::new(),
            tx,
            lines: rx,
            data_dir,
            etcd: None,
            node,
            _lock: lock,
        })
    }

    /// Starts `kcontrol ARGS` in the node namespace.
    fn spawn(&mut self, label: &str, args: &[String]) -> Result<()> {
        // nsenter, not `ip netns exec`: the latter remounts /sys in a private
        // mount namespace, which would hide /sys/fs/cgroup from crun.
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", self.node.path().display()))
            .arg(kcontrol_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawn kcontrol {label}"))?;
        let out = child.stdout.take().expect("piped");
        let tx = self.tx.clone();
        let prefix = label.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                eprintln!("kcontrol-{prefix} | {line}");
                let _ = tx.send(line);
            }
        });
        self.kcontrol.push((label.to_string(), child));
        Ok(())
    }

    /// SIGSTOP / SIGCONT to one of the processes of [`Cluster::start_split`].
    pub fn signal(&self, label: &str, sig: i32) -> Result<()> {
        let (_, child) = self
            .kcontrol
            .iter()
            .find(|(l, _)| l == label)
            .with_context(|| format!("no kcontrol {label} running"))?;
        // SAFETY: plain kill(2) on our child's pid.
        if unsafe { libc::kill(child.id() as i32, sig) } != 0 {
            bail!("kill {label}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for the node to be Ready, then starts kproxy.
    fn finish_start(&mut self) -> Result<()> {
        let c = self;
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
        Ok(())
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
        while let Some((label, mut child)) = self.kcontrol.pop() {
            // A paused process would never see SIGTERM.
            // SAFETY: plain kill(2) on our child's pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGCONT);
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            loop {
                if let Some(status) = child.try_wait()? {
                    if !status.success() {
                        left.push(format!("kcontrol {label} exited with {status}"));
                    }
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    left.push(format!("kcontrol {label} did not stop within 60 s"));
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
