//! A single-node cluster: `kcontrol all` (apiserver, scheduler,
//! controller-manager, kubelet running crun containers) — or the same
//! components as separate processes — plus kproxy following the apiserver
//! and attaching to every pod veth (`--iface-prefix kcv`).
//!
//! One runner for `cargo xtask up`, `cargo xtask bench cluster` (on the
//! host, [`Place::Host`]) and the end-to-end tests (in a node network
//! namespace of their own, [`Place::Netns`], so a test never touches the
//! host's network). [`Options`] holds what differs between them.
//!
//! The processes' stdout lines are collected with arrival times in a
//! [`Log`] that waits can search. [`Cluster::stop`] sends SIGTERM to
//! kproxy, then to kcontrol (whose kubelet stops the pods and removes their
//! namespaces, veths, bridge and cgroups), then checks that nothing is left
//! and removes what is (see cleanup.rs); dropping a cluster that was not
//! stopped does the same. On the host, [`clean_stale`] first removes what a
//! previous run that crashed or was SIGKILLed left behind.

mod cleanup;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kcontrol_names::{VETH_PREFIX, container_id, pod_hash};
use proxy_common::lifecycle::Event;
use serde_json::Value;

pub use cleanup::clean_stale;

use crate::etcd::EtcdCluster;
use crate::kubectl::Kubectl;
use crate::log::{Log, Src};
use crate::netns::Netns;
use crate::process::{self, Stopped};
use crate::util::SuiteLock;

/// The node bridge and pod CIDR of kcontrol's defaults (the host's cluster).
pub const BRIDGE: &str = "kcbr0";
pub const POD_CIDR: &str = "10.244.0.0/24";
/// bpffs directory for the host cluster's kproxy pins: ours, so that a
/// kproxy of the tests (default /sys/fs/bpf/kproxy) is never disturbed, and
/// so the bench can read the backend slots it programmed.
pub const PIN_DIR: &str = "/sys/fs/bpf/kcluster";

const START_TIMEOUT: Duration = Duration::from_secs(60);
const KPROXY_STOP: Duration = Duration::from_secs(10);
/// The kubelet gives each container up to 5 s after SIGTERM.
const KCONTROL_STOP: Duration = Duration::from_secs(60);

/// Where the node's network lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// The host's network namespace; children in their own process group
    /// with a parent-death signal, stderr to files in the data dir.
    Host,
    /// A fresh network namespace (`kpt-…-cnode`), deleted with the cluster;
    /// stderr inherited.
    Netns,
}

/// How the control plane runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One `kcontrol all` process.
    All,
    /// apiserver, scheduler, controller-manager (this node monitor grace
    /// period) and kubelet (lease renewed every second) as separate
    /// processes, so one of them can be paused ([`Cluster::signal`]).
    Split { node_monitor_grace: String },
}

/// Where the apiserver keeps its objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// kcontrol's embedded SQLite store in the data dir.
    Embedded,
    /// A one-member etcd on loopback (in the node's namespace), stopped
    /// after kcontrol.
    Etcd,
}

pub struct Options {
    pub kcontrol: PathBuf,
    pub kproxy: PathBuf,
    /// Data dir of kcontrol (store, kubelet root, kubeconfig, logs).
    pub data_dir: PathBuf,
    pub place: Place,
    pub layout: Layout,
    pub store: Store,
    pub node: String,
    pub bridge: String,
    pub pod_cidr: String,
    /// The apiserver's `--listen`, if not kcontrol's default.
    pub listen: Option<String>,
    /// More arguments for `kcontrol all`.
    pub kcontrol_args: Vec<String>,
    /// kproxy's arguments after `--kubeconfig K --iface-prefix kcv
    /// --node-name NODE`.
    pub kproxy_args: Vec<String>,
    /// kproxy's pin dir, checked empty (and emptied) after the stop.
    pub pin_dir: Option<PathBuf>,
    /// Hold the kproxy tests' [`SuiteLock`] while the cluster runs.
    pub suite_lock: bool,
    /// Remove the data dir when the cluster is dropped.
    pub remove_data_dir: bool,
}

impl Options {
    /// The host's cluster of `cargo xtask up` and `bench cluster`: node
    /// named after the host, kcontrol's default bridge and pod CIDR,
    /// kproxy pinned under [`PIN_DIR`] with metrics on a free port; the
    /// data dir is kept (it holds the logs).
    pub fn host(kcontrol: &Path, kproxy: &Path, data_dir: &Path) -> Result<Options> {
        Ok(Options {
            kcontrol: kcontrol.to_path_buf(),
            kproxy: kproxy.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            place: Place::Host,
            layout: Layout::All,
            store: Store::Embedded,
            node: host_name()?,
            bridge: BRIDGE.into(),
            pod_cidr: POD_CIDR.into(),
            listen: None,
            kcontrol_args: Vec::new(),
            kproxy_args: ["--pin-dir", PIN_DIR, "--metrics-addr", "127.0.0.1:0"]
                .map(String::from)
                .to_vec(),
            pin_dir: Some(PIN_DIR.into()),
            suite_lock: false,
            remove_data_dir: false,
        })
    }
}

pub fn host_name() -> Result<String> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname").context("reading the host name")?;
    Ok(name.trim().to_ascii_lowercase())
}

pub struct Cluster {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub node: String,
    pub crun_root: PathBuf,
    pub log: Arc<Log>,
    /// Backend slots kproxy held at start (e.g. the `kubernetes` Service).
    pub base_backends: u64,
    opts: Options,
    kubectl: Kubectl,
    /// The kcontrol processes, in start order (stopped in reverse).
    kcontrol: Vec<(String, Child)>,
    kproxy: Option<Child>,
    watches: Vec<Child>,
    /// Pod UIDs seen, so the cleanup check can name their host objects.
    uids: BTreeSet<String>,
    stopped: bool,
    /// Stopped after the kcontrol processes.
    etcd: Option<EtcdCluster>,
    /// Where the node runs ([`Place::Netns`]); dropped after everything
    /// above.
    netns: Option<Netns>,
    _lock: Option<SuiteLock>,
}

impl Cluster {
    /// Starts the control plane, then kproxy, and waits until the node is
    /// Ready and kproxy has programmed the initial state. On the host, what
    /// a previous run on the same data dir left behind is removed first.
    pub fn start(opts: Options, log: Arc<Log>) -> Result<Cluster> {
        let lock = opts.suite_lock.then(SuiteLock::acquire).transpose()?;
        let dir = opts.data_dir.clone();
        let netns = match opts.place {
            Place::Host => {
                clean_stale(&log, &opts)?;
                None
            }
            Place::Netns => {
                let ns = Netns::new("cnode")?;
                let _ = fs::remove_dir_all(&dir);
                Some(ns)
            }
        };
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let kubeconfig = dir.join("kubeconfig.yaml");
        let mut kubectl = Kubectl::new(&kubeconfig);
        if let Some(ns) = &netns {
            kubectl = kubectl.in_netns(ns);
        }
        let mut c = Cluster {
            kubeconfig,
            node: opts.node.clone(),
            crun_root: dir.join("kubelet/crun"),
            dir,
            log,
            base_backends: 0,
            kubectl,
            kcontrol: Vec::new(),
            kproxy: None,
            watches: Vec::new(),
            uids: BTreeSet::new(),
            stopped: false,
            etcd: None,
            netns,
            _lock: lock,
            opts,
        };
        c.start_control_plane()?;
        c.start_kproxy()?;
        c.wait_node_ready()?;
        let (backends, _) =
            c.log
                .wait_for(0, START_TIMEOUT, "kproxy's `ready` line", |l| {
                    match l.kproxy_event() {
                        Some(Event::Ready { backends, .. }) => Some(backends),
                        _ => None,
                    }
                })?;
        c.base_backends = backends;
        Ok(c)
    }

    fn start_control_plane(&mut self) -> Result<()> {
        let mut store = Vec::new();
        if self.opts.store == Store::Etcd {
            let etcd = match &self.netns {
                Some(ns) => ns.try_run(|| EtcdCluster::start(1))?,
                None => EtcdCluster::start(1)?,
            };
            store = vec!["--store".to_string(), etcd.url()];
            self.etcd = Some(etcd);
        }
        let data = self.dir.display().to_string();
        let node = self.opts.node.clone();
        let listen: Vec<String> = match &self.opts.listen {
            Some(l) => vec!["--listen".into(), l.clone()],
            None => Vec::new(),
        };
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        match self.opts.layout.clone() {
            Layout::All => {
                let mut args = own(&["all", "--data-dir", &data]);
                args.extend(listen);
                args.extend(own(&[
                    "--node-name",
                    &node,
                    "--pod-cidr",
                    &self.opts.pod_cidr,
                    "--bridge",
                    &self.opts.bridge,
                ]));
                args.extend(store);
                args.extend(self.opts.kcontrol_args.iter().cloned());
                self.spawn_kcontrol("all", &args)?;
                self.wait_kcontrol_line("kcontrol: all: apiserver ready")?;
            }
            Layout::Split { node_monitor_grace } => {
                let kubeconfig = self.kubeconfig.display().to_string();
                let mut args = own(&["apiserver", "--data-dir", &data]);
                args.extend(listen);
                args.extend(store);
                self.spawn_kcontrol("apiserver", &args)?;
                self.wait_kcontrol_line("kcontrol: apiserver listening")?;
                self.spawn_kcontrol(
                    "scheduler",
                    &own(&["scheduler", "--kubeconfig", &kubeconfig]),
                )?;
                self.spawn_kcontrol(
                    "controller-manager",
                    &own(&[
                        "controller-manager",
                        "--kubeconfig",
                        &kubeconfig,
                        "--node-monitor-grace-period",
                        &node_monitor_grace,
                    ]),
                )?;
                let root = self.dir.join("kubelet").display().to_string();
                self.spawn_kcontrol(
                    "kubelet",
                    &own(&[
                        "kubelet",
                        "--kubeconfig",
                        &kubeconfig,
                        "--node-name",
                        &node,
                        "--pod-cidr",
                        &self.opts.pod_cidr,
                        "--root-dir",
                        &root,
                        "--bridge",
                        &self.opts.bridge,
                        "--lease-renew-seconds",
                        "1",
                    ]),
                )?;
            }
        }
        Ok(())
    }

    fn wait_kcontrol_line(&self, prefix: &str) -> Result<()> {
        self.log
            .wait_for(0, START_TIMEOUT, &format!("{prefix:?}"), |l| {
                (l.src == Src::Kcontrol && l.text.starts_with(prefix)).then_some(())
            })?;
        Ok(())
    }

    /// stdout piped into the log; stderr to `<dir>/<name>.stderr.log` on
    /// the host, inherited in a namespace (test output).
    fn stdio(&self, cmd: &mut Command, name: &str) -> Result<String> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        match self.opts.place {
            Place::Host => {
                let path = self.dir.join(format!("{name}.stderr.log"));
                cmd.stderr(File::create(&path)?);
                Ok(format!(" (stderr: {})", path.display()))
            }
            Place::Netns => {
                cmd.stderr(Stdio::inherit());
                Ok(String::new())
            }
        }
    }

    /// Starts `kcontrol ARGS` where the node runs.
    fn spawn_kcontrol(&mut self, label: &str, args: &[String]) -> Result<()> {
        let mut cmd = match &self.netns {
            // nsenter, not `ip netns exec`: the latter remounts /sys in a
            // private mount namespace, which would hide /sys/fs/cgroup from
            // crun.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.path().display()))
                    .arg(&self.opts.kcontrol);
                c
            }
            None => Command::new(&self.opts.kcontrol),
        };
        cmd.args(args);
        let name = if label == "all" {
            "kcontrol".to_string()
        } else {
            format!("kcontrol-{label}")
        };
        let shown = self.stdio(&mut cmd, &name)?;
        if self.opts.place == Place::Host {
            process::own_group(&mut cmd, libc::SIGTERM);
        }
        self.log
            .note(&format!("==> starting: {}{shown}", process::display(&cmd)));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting kcontrol {label}"))?;
        self.log
            .pump(Src::Kcontrol, &name, child.stdout.take().expect("piped"));
        self.kcontrol.push((label.to_string(), child));
        Ok(())
    }

    fn start_kproxy(&mut self) -> Result<()> {
        let mut cmd = match &self.netns {
            // `ip netns exec`, as the namespace tests start kproxy.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.name()]).arg(&self.opts.kproxy);
                c
            }
            None => Command::new(&self.opts.kproxy),
        };
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "--iface-prefix",
                VETH_PREFIX,
                "--node-name",
                &self.opts.node,
            ])
            .args(&self.opts.kproxy_args);
        let shown = self.stdio(&mut cmd, "kproxy")?;
        if self.opts.place == Place::Host {
            // SIGTERM as death signal: an orphaned kproxy still detaches.
            process::own_group(&mut cmd, libc::SIGTERM);
        }
        self.log
            .note(&format!("==> starting: {}{shown}", process::display(&cmd)));
        let mut child = cmd.spawn().context("starting kproxy")?;
        self.log
            .pump(Src::Kproxy, "kproxy", child.stdout.take().expect("piped"));
        self.kproxy = Some(child);
        Ok(())
    }

    fn wait_node_ready(&self) -> Result<()> {
        let node = &self.opts.node;
        self.log
            .note(&format!("==> waiting for node {node} to be Ready"));
        let started = Instant::now();
        let deadline = started + START_TIMEOUT;
        loop {
            let ready = self
                .kubectl(&[
                    "get",
                    "node",
                    node,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ])
                .unwrap_or_default();
            if ready.trim() == "True" {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "node {node} not Ready after {} s (Ready={:?})",
                    START_TIMEOUT.as_secs(),
                    ready.trim()
                );
            }
            self.log.pause(Duration::from_millis(200))?;
        }
        self.log.note(&format!(
            "==> node {node} Ready ({} ms after the apiserver)",
            started.elapsed().as_millis()
        ));
        Ok(())
    }

    /// SIGSTOP / SIGCONT to one of the kcontrol processes (`all`, or a
    /// component of [`Layout::Split`]).
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

    /// The node's network namespace, if it has one of its own.
    pub fn netns(&self) -> Option<&Netns> {
        self.netns.as_ref()
    }

    /// The kubectl runner for this cluster (in the node's namespace).
    pub fn kubectl_runner(&self) -> &Kubectl {
        &self.kubectl
    }

    /// `kubectl ARGS`: its stdout, or an error with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl.run(args)
    }

    /// `kubectl ARGS` with `stdin` (e.g. `apply -f -`).
    pub fn kubectl_in(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        self.kubectl.run_stdin(args, stdin)
    }

    /// `kubectl get ARGS -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Result<Value> {
        self.kubectl.get_json(args)
    }

    /// Starts `kubectl ARGS` (a `get -w`) whose stdout lines land in the log
    /// as [`Src::Watch`]; stopped with the cluster.
    pub fn watch(&mut self, args: &[&str]) -> Result<()> {
        let mut cmd = self.kubectl.command();
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(self.dir.join("watch.stderr.log"))?);
        if self.opts.place == Place::Host {
            process::own_group(&mut cmd, libc::SIGKILL);
        }
        let mut child = cmd.spawn().context("starting kubectl get -w")?;
        self.log
            .pump(Src::Watch, "watch", child.stdout.take().expect("piped"));
        self.watches.push(child);
        Ok(())
    }

    /// A handle to run commands inside a pod's container (`crun exec`).
    pub fn container(&self, pod: &str, container: &str) -> Result<Container> {
        let uid = self.get_json(&["pod", pod])?["metadata"]["uid"]
            .as_str()
            .context("pod without uid")?
            .to_string();
        Ok(Container {
            root: self.crun_root.clone(),
            id: container_id(&pod_hash(&uid), container),
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

    /// Remembers the UIDs of all pods now in the cluster (for the checks).
    pub fn note_pods(&mut self) {
        if let Ok(uids) = self.kubectl(&[
            "get",
            "pods",
            "-A",
            "-o",
            "jsonpath={.items[*].metadata.uid}",
        ]) {
            self.uids.extend(uids.split_whitespace().map(str::to_owned));
        }
        self.uids.extend(cleanup::recorded_uids(&self.dir));
    }

    /// Stops kproxy, then kcontrol (SIGTERM each, wait), then checks that
    /// nothing of the cluster is left, printing each check, and removes
    /// what is. Returns what went wrong: a process that did not stop
    /// cleanly, or what had to be removed.
    pub fn stop(&mut self) -> Result<Vec<String>> {
        if self.stopped {
            return Ok(Vec::new());
        }
        self.stopped = true;
        self.note_pods();
        for mut w in self.watches.drain(..) {
            let _ = w.kill();
            let _ = w.wait();
        }
        let log = self.log.clone();
        let note = |s: &str| log.note(s);
        let mut left = Vec::new();
        let mut judge = |name: &str, how: Stopped, grace: Duration| match how {
            Stopped::Exited(s) | Stopped::AlreadyExited(s) if !s.success() => {
                left.push(format!("{name} exited with {s}"))
            }
            Stopped::Killed => {
                left.push(format!("{name} did not stop within {} s", grace.as_secs()))
            }
            _ => {}
        };
        if let Some(child) = self.kproxy.take() {
            let how = process::stop_child("kproxy", child, KPROXY_STOP, &note);
            judge("kproxy", how, KPROXY_STOP);
        }
        while let Some((label, child)) = self.kcontrol.pop() {
            let name = format!("kcontrol {label}");
            let how = process::stop_child(&name, child, KCONTROL_STOP, &note);
            judge(&name, how, KCONTROL_STOP);
        }
        self.etcd = None;
        left.extend(self.leftovers());
        Ok(left)
    }

    /// [`Cluster::stop`] that fails when anything went wrong.
    pub fn stop_clean(&mut self) -> Result<()> {
        let left = self.stop()?;
        if left.is_empty() {
            Ok(())
        } else {
            bail!("left behind: {}", left.join("; "))
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.stopped {
            match self.stop() {
                Ok(left) if left.is_empty() => {}
                Ok(left) => self.log.note(&format!("warning: left behind: {left:?}")),
                Err(e) => self.log.note(&format!("warning: stopping: {e:#}")),
            }
        }
        if self.opts.remove_data_dir {
            let _ = fs::remove_dir_all(&self.dir);
        }
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
