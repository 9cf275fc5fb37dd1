//! A single-node cluster on this host, for `cargo xtask up` and `cargo xtask
//! bench cluster`: `kcontrol all` (apiserver, scheduler, controller-manager,
//! kubelet; embedded store) plus `kproxy` following the apiserver and
//! attaching to every pod veth (`kcv…`), both in the host network namespace.
//!
//! [`Cluster`] owns both processes. Their stdout lines are collected with
//! arrival times in a [`Log`] that waits can search; stderr goes to files in
//! the data dir. [`Cluster::stop`] sends SIGTERM to kproxy, then to kcontrol
//! (whose kubelet stops the pods and removes their namespaces, veths, bridge
//! and cgroups), and then checks that nothing is left; dropping a cluster
//! that was not stopped does the same. [`clean_stale`] removes what a
//! previous run that crashed or was SIGKILLed left behind.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::{self, output};

/// The node bridge and pod CIDR (kcontrol's defaults).
pub const BRIDGE: &str = "kcbr0";
pub const POD_CIDR: &str = "10.244.0.0/24";
/// kubelet host-side veths and pod network namespaces.
pub const VETH_PREFIX: &str = "kcv";
pub const NETNS_PREFIX: &str = "kcns-";
/// bpffs directory for kproxy's pinned maps: ours, so that a kproxy of the
/// tests (default /sys/fs/bpf/kproxy) is never disturbed, and so the bench
/// can read the backend slots it programmed.
pub const PIN_DIR: &str = "/sys/fs/bpf/kcluster";

/// Mount points of every cgroup hierarchy (cgroup2, or each v1 controller
/// on a v1/hybrid host): the kubelet makes `kcontrol/<node>` in each.
fn cgroup_roots() -> Vec<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            matches!(kind, "cgroup" | "cgroup2").then(|| PathBuf::from(dir))
        })
        .collect()
}

/// The node's cgroup in every hierarchy where it exists.
fn node_cgroups(node: &str) -> Vec<PathBuf> {
    cgroup_roots()
        .into_iter()
        .map(|r| r.join("kcontrol").join(node))
        .filter(|p| p.exists())
        .collect()
}

/// 12 hex digits of FNV-1a 64 over the pod UID, masked to 48 bits: the
/// kubelet's name for a pod's veth (`kcv<hash>`), namespace (`kcns-<hash>`),
/// containers (`kc-<hash>-<container>`) and cgroup.
pub fn pod_hash(uid: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

/// Whose line it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    Kcontrol,
    Kproxy,
    /// A `kubectl get -w` started with [`Cluster::watch`].
    Watch,
}

impl Src {
    fn tag(self) -> &'static str {
        match self {
            Src::Kcontrol => "kcontrol",
            Src::Kproxy => "kproxy",
            Src::Watch => "watch",
        }
    }
}

pub struct Line {
    pub src: Src,
    pub at: Instant,
    pub text: String,
}

#[derive(Default)]
struct LogState {
    lines: Vec<Line>,
    exited: Vec<Src>,
}

/// Stdout lines of the cluster's processes, with arrival times, plus the
/// Ctrl-C flag. Waiting is on a condition variable, never on a sleep.
#[derive(Default)]
pub struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
    interrupted: AtomicBool,
    /// Echo kproxy's per-change lines (`applied`, `attached`) to stdout.
    pub echo_changes: AtomicBool,
}

impl Log {
    pub fn interrupt(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
        let _guard = self.state.lock().unwrap();
        self.changed.notify_all();
    }

    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }

    fn push(&self, line: Line) {
        let mut st = self.state.lock().unwrap();
        st.lines.push(line);
        self.changed.notify_all();
    }

    fn exited(&self, src: Src) {
        let mut st = self.state.lock().unwrap();
        st.exited.push(src);
        self.changed.notify_all();
    }

    /// Number of lines so far: a cursor for [`Log::wait_for`].
    pub fn len(&self) -> usize {
        self.state.lock().unwrap().lines.len()
    }

    /// Arrival time of line `i` (an index [`Log::wait_for`] returned).
    pub fn line_at(&self, i: usize) -> Instant {
        self.state.lock().unwrap().lines[i].at
    }

    /// Waits until a line at index ≥ `from` satisfies `pred`; returns what
    /// `pred` made of it and the line's index. Fails on Ctrl-C, on the exit
    /// of kcontrol or kproxy, or at the deadline (`what` names the wait).
    pub fn wait_for<T>(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&Line) -> Option<T>,
    ) -> Result<(T, usize)> {
        let deadline = Instant::now() + timeout;
        let mut next = from;
        let mut st = self.state.lock().unwrap();
        loop {
            while next < st.lines.len() {
                if let Some(v) = pred(&st.lines[next]) {
                    return Ok((v, next));
                }
                next += 1;
            }
            if self.interrupted() {
                bail!("interrupted while waiting for {what}");
            }
            if let Some(src) = st
                .exited
                .iter()
                .find(|s| matches!(s, Src::Kcontrol | Src::Kproxy))
            {
                bail!("{} exited while waiting for {what}", src.tag());
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("timed out after {} waiting for {what}", util::secs(timeout));
            }
            st = self.changed.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// Sleeps up to `d`, returning early (with an error) on Ctrl-C or a
    /// process exit. Used between polls of the API.
    pub fn pause(&self, d: Duration) -> Result<()> {
        let st = self.state.lock().unwrap();
        let st = self.changed.wait_timeout(st, d).unwrap().0;
        if self.interrupted() {
            bail!("interrupted");
        }
        if let Some(src) = st.exited.first() {
            bail!("{} exited", src.tag());
        }
        Ok(())
    }
}

/// Children of the cluster: their own process group, so the terminal's
/// Ctrl-C reaches only xtask, which stops them in order; and a parent-death
/// signal, so an orphan shuts down (and cleans up) on its own.
fn cluster_child(cmd: &mut Command, death_signal: libc::c_int) {
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and only calls prctl,
    // which is async-signal-safe. We spawn from the main thread, which lives
    // until the cluster is stopped.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Reads `r` line by line into the log (echoing per `echo`), then records
/// the exit of `src`.
fn pump(log: Arc<Log>, src: Src, r: impl Read + Send + 'static) {
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(text) = line else { break };
            let at = Instant::now();
            let change =
                text.starts_with("kproxy: applied") || text.starts_with("kproxy: attached");
            if src != Src::Watch && (!change || log.echo_changes.load(Ordering::Relaxed)) {
                say!("[{}] {text}", src.tag());
            }
            log.push(Line { src, at, text });
        }
        log.exited(src);
    });
}

pub struct Cluster {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub node: String,
    pub crun_root: PathBuf,
    pub log: Arc<Log>,
    kcontrol: Option<Child>,
    kproxy: Option<Child>,
    watches: Vec<Child>,
    /// Pod UIDs seen, so the cleanup check can name their host objects.
    uids: BTreeSet<String>,
    stopped: bool,
}

pub fn host_name() -> Result<String> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname").context("reading the host name")?;
    Ok(name.trim().to_ascii_lowercase())
}

/// Whether `path`'s stale state can be read: pod UIDs the kubelet recorded.
fn recorded_uids(dir: &Path) -> Vec<String> {
    fs::read_dir(dir.join("kubelet/pods"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Names in /sys/class/net (or /run/netns) starting with `prefix`.
fn names_with_prefix(dir: &str, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

/// Pids of processes whose command line contains `needle` (ours excluded).
fn pids_with_arg(needle: &str) -> Vec<libc::pid_t> {
    let me = std::process::id() as libc::pid_t;
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|b| *b == 0).any(|a| a == needle.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// Children of this process still alive (besides `except`).
fn our_children() -> Vec<(libc::pid_t, String)> {
    let me = std::process::id();
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(status) = fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|p| p.trim().parse::<u32>().ok());
        if ppid == Some(me) {
            let name = status
                .lines()
                .find_map(|l| l.strip_prefix("Name:"))
                .unwrap_or("")
                .trim()
                .to_string();
            v.push((pid, name));
        }
    }
    v
}

/// Terminates `pids` (SIGTERM, then SIGKILL after `grace`).
fn terminate(pids: &[libc::pid_t], grace: Duration) {
    for &p in pids {
        // SAFETY: kill(2) on pids just found running our kcontrol/kproxy.
        unsafe { libc::kill(p, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline
        && pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        thread::sleep(Duration::from_millis(100));
    }
    for &p in pids {
        if Path::new(&format!("/proc/{p}")).exists() {
            // SAFETY: as above.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
}

/// Removes a cgroup directory tree bottom-up (cgroupfs only allows rmdir of
/// empty groups; processes still inside are killed through cgroup.kill).
fn remove_cgroup_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let _ = fs::write(path.join("cgroup.kill"), "1");
    for e in fs::read_dir(path)?.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_cgroup_tree(&e.path())?;
        }
    }
    // cgroup.kill is asynchronous: retry the rmdir briefly while it is busy.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
}

/// Removes what a previous run on `dir` left behind when it could not clean
/// up (xtask or kcontrol killed with SIGKILL, a crash): its processes, crun
/// containers, pod namespaces and veths, the bridge, the node's cgroups and
/// kproxy's pins; then the data dir itself, for a fresh store.
pub fn clean_stale(dir: &Path, node: &str) -> Result<()> {
    let dir_arg = dir.to_string_lossy().into_owned();
    let stale: Vec<_> = pids_with_arg(&dir_arg)
        .into_iter()
        .chain(pids_with_arg(PIN_DIR))
        .collect();
    if !stale.is_empty() {
        say!("==> stopping processes of a previous run: {stale:?}");
        terminate(&stale, Duration::from_secs(15));
    }
    let crun_root = dir.join("kubelet/crun");
    if crun_root.is_dir()
        && let Ok(list) = output(
            Command::new("crun")
                .arg("--root")
                .arg(&crun_root)
                .arg("list"),
        )
    {
        for id in list
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
        {
            say!("==> removing stale container {id}");
            let _ = output(
                Command::new("crun")
                    .arg("--root")
                    .arg(&crun_root)
                    .args(["delete", "--force", id]),
            );
        }
    }
    for uid in recorded_uids(dir) {
        let hash = pod_hash(&uid);
        let (ns, veth) = (
            format!("{NETNS_PREFIX}{hash}"),
            format!("{VETH_PREFIX}{hash}"),
        );
        if netns_exists(&ns) {
            say!("==> removing stale network namespace {ns}");
            let _ = output(Command::new("ip").args(["netns", "del", &ns]));
        }
        if link_exists(&veth) {
            say!("==> removing stale veth {veth}");
            let _ = output(Command::new("ip").args(["link", "del", &veth]));
        }
    }
    if link_exists(BRIDGE) {
        // Veths still enslaved to our bridge belong to our lost pods.
        for veth in names_with_prefix("/sys/class/net", VETH_PREFIX) {
            let master = fs::read_link(format!("/sys/class/net/{veth}/master")).ok();
            if master.is_some_and(|m| m.ends_with(BRIDGE)) {
                say!("==> removing stale veth {veth}");
                let _ = output(Command::new("ip").args(["link", "del", &veth]));
            }
        }
        say!("==> removing stale bridge {BRIDGE}");
        let _ = output(Command::new("ip").args(["link", "del", BRIDGE]));
    }
    for cg in node_cgroups(node) {
        say!("==> removing stale cgroups {}", cg.display());
        remove_cgroup_tree(&cg)?;
    }
    if Path::new(PIN_DIR).exists() {
        say!("==> removing stale kproxy pins under {PIN_DIR}");
        let _ = fs::remove_dir_all(PIN_DIR);
    }
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

impl Cluster {
    /// Cleans up after a previous run on `dir`, then starts `kcontrol all`
    /// on a fresh `dir` and kproxy, and waits until the node is Ready and
    /// kproxy has programmed the initial state.
    pub fn start(kcontrol: &Path, kproxy: &Path, dir: &Path, log: Arc<Log>) -> Result<Cluster> {
        let node = host_name()?;
        clean_stale(dir, &node)?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            kubeconfig: dir.join("kubeconfig.yaml"),
            node: node.clone(),
            crun_root: dir.join("kubelet/crun"),
            log: log.clone(),
            kcontrol: None,
            kproxy: None,
            watches: Vec::new(),
            uids: BTreeSet::new(),
            stopped: false,
        };

        let errlog = dir.join("kcontrol.stderr.log");
        let mut cmd = Command::new(kcontrol);
        cmd.arg("all")
            .arg("--data-dir")
            .arg(dir)
            .args([
                "--node-name",
                &node,
                "--pod-cidr",
                POD_CIDR,
                "--bridge",
                BRIDGE,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&errlog)?);
        cluster_child(&mut cmd, libc::SIGTERM);
        say!(
            "==> starting: {} (stderr: {})",
            util::display(&cmd),
            errlog.display()
        );
        let mut child = cmd.spawn().context("starting kcontrol all")?;
        pump(log.clone(), Src::Kcontrol, child.stdout.take().unwrap());
        c.kcontrol = Some(child);
        log.wait_for(0, Duration::from_secs(60), "kcontrol's apiserver", |l| {
            (l.src == Src::Kcontrol && l.text.starts_with("kcontrol: all: apiserver ready"))
                .then_some(())
        })?;

        let errlog = dir.join("kproxy.stderr.log");
        let mut cmd = Command::new(kproxy);
        cmd.arg("--kubeconfig")
            .arg(&c.kubeconfig)
            .args(["--iface-prefix", VETH_PREFIX, "--node-name", &node])
            .args(["--pin-dir", PIN_DIR, "--metrics-addr", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&errlog)?);
        // SIGTERM as death signal: an orphaned kproxy still detaches.
        cluster_child(&mut cmd, libc::SIGTERM);
        say!(
            "==> starting: {} (stderr: {})",
            util::display(&cmd),
            errlog.display()
        );
        let mut child = cmd.spawn().context("starting kproxy")?;
        pump(log.clone(), Src::Kproxy, child.stdout.take().unwrap());
        c.kproxy = Some(child);
        log.wait_for(0, Duration::from_secs(60), "kproxy's `ready` line", |l| {
            (l.src == Src::Kproxy && l.text.starts_with("kproxy: ready")).then_some(())
        })?;

        say!("==> waiting for node {node} to be Ready");
        let started = Instant::now();
        let deadline = started + Duration::from_secs(60);
        loop {
            let ready = c
                .kubectl_out(&[
                    "get",
                    "node",
                    &node,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ])
                .unwrap_or_default();
            if ready == "True" {
                break;
            }
            if Instant::now() > deadline {
                bail!("node {node} not Ready after 60 s (Ready={ready:?})");
            }
            log.pause(Duration::from_millis(200))?;
        }
        say!(
            "==> node {node} Ready ({} ms after the apiserver)",
            started.elapsed().as_millis()
        );
        Ok(c)
    }

    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    pub fn kubectl_out(&self, args: &[&str]) -> Result<String> {
        output(self.kubectl().args(args))
    }

    /// `kubectl apply -f -` (or another verb) with `yaml` on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], yaml: &str) -> Result<String> {
        let mut cmd = self.kubectl();
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting kubectl")?;
        child.stdin.take().unwrap().write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Starts `kubectl ARGS` (a `get -w`) whose stdout lines land in the log
    /// as [`Src::Watch`]; stopped with the cluster.
    pub fn watch(&mut self, args: &[&str]) -> Result<()> {
        let mut cmd = self.kubectl();
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(self.dir.join("watch.stderr.log"))?);
        cluster_child(&mut cmd, libc::SIGKILL);
        let mut child = cmd.spawn().context("starting kubectl get -w")?;
        pump(self.log.clone(), Src::Watch, child.stdout.take().unwrap());
        self.watches.push(child);
        Ok(())
    }

    /// Remembers the UIDs of all pods now in the cluster (for the checks).
    pub fn note_pods(&mut self) {
        if let Ok(uids) = self.kubectl_out(&[
            "get",
            "pods",
            "-A",
            "-o",
            "jsonpath={.items[*].metadata.uid}",
        ]) {
            self.uids.extend(uids.split_whitespace().map(str::to_owned));
        }
        self.uids.extend(recorded_uids(&self.dir));
    }

    /// crun's id for container `container` of the pod with UID `uid`.
    pub fn container_id(uid: &str, container: &str) -> String {
        format!("kc-{}-{container}", pod_hash(uid))
    }

    /// Stops kproxy, then kcontrol (SIGTERM each, wait), then checks that
    /// nothing of the cluster is left and prints each check. Fails if
    /// something is.
    pub fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        self.note_pods();
        for mut w in self.watches.drain(..) {
            let _ = w.kill();
            let _ = w.wait();
        }
        if let Some(child) = self.kproxy.take() {
            stop_child("kproxy", child, Duration::from_secs(10));
        }
        if let Some(child) = self.kcontrol.take() {
            // The kubelet gives each container up to 5 s after SIGTERM.
            stop_child("kcontrol", child, Duration::from_secs(30));
        }
        self.verify_clean()
    }

    fn verify_clean(&self) -> Result<()> {
        say!("==> checking that nothing is left behind");
        let mut left = Vec::new();
        let mut check = |what: String, found: Vec<String>| {
            if found.is_empty() {
                say!("    ok    {what}: none");
            } else {
                say!("    LEFT  {what}: {}", found.join(", "));
                left.push(what);
            }
        };
        let hashes: Vec<String> = self.uids.iter().map(|u| pod_hash(u)).collect();
        check(
            format!(
                "processes (children of xtask, or running on {})",
                self.dir.display()
            ),
            our_children()
                .into_iter()
                .map(|(p, n)| format!("{n}[{p}]"))
                .chain(
                    pids_with_arg(&self.dir.to_string_lossy())
                        .into_iter()
                        .map(|p| format!("pid {p}")),
                )
                .collect(),
        );
        let crun = if self.crun_root.is_dir() {
            output(
                Command::new("crun")
                    .arg("--root")
                    .arg(&self.crun_root)
                    .arg("list"),
            )
            .map(|l| {
                l.lines()
                    .skip(1)
                    .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_else(|e| vec![format!("{e:#}")])
        } else {
            Vec::new()
        };
        check(
            format!("crun containers under {}", self.crun_root.display()),
            crun,
        );
        check(
            format!(
                "pod network namespaces ({} pods: /run/netns/{NETNS_PREFIX}<hash>)",
                hashes.len()
            ),
            hashes
                .iter()
                .map(|h| format!("{NETNS_PREFIX}{h}"))
                .filter(|n| netns_exists(n))
                .collect(),
        );
        check(
            format!("pod veths ({VETH_PREFIX}<hash>)"),
            hashes
                .iter()
                .map(|h| format!("{VETH_PREFIX}{h}"))
                .filter(|n| link_exists(n))
                .collect(),
        );
        check(
            format!("bridge {BRIDGE}"),
            [BRIDGE.to_string()]
                .into_iter()
                .filter(|b| link_exists(b))
                .collect(),
        );
        check(
            format!(
                "cgroups kcontrol/{} (in {} cgroup hierarchies)",
                self.node,
                cgroup_roots().len()
            ),
            node_cgroups(&self.node)
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
        );
        check(
            format!("kproxy pins under {PIN_DIR}"),
            names_with_prefix(PIN_DIR, ""),
        );
        // Other kubelets (tests) may run on this host: their objects are
        // reported, not counted against us.
        let others: Vec<String> = names_with_prefix("/run/netns", NETNS_PREFIX)
            .into_iter()
            .chain(names_with_prefix("/sys/class/net", VETH_PREFIX))
            .collect();
        say!(
            "    info  {NETNS_PREFIX}* namespaces / {VETH_PREFIX}* links on the host (any kubelet): {}",
            if others.is_empty() {
                "none".to_string()
            } else {
                others.join(", ")
            }
        );
        if left.is_empty() {
            say!("==> clean: nothing left behind");
            Ok(())
        } else {
            bail!("left behind: {}", left.join("; "))
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.stopped
            && let Err(e) = self.stop()
        {
            say!("warning: {e:#}");
        }
    }
}

/// SIGTERM, then wait up to `grace`, then SIGKILL.
fn stop_child(name: &str, mut child: Child, grace: Duration) {
    if let Ok(Some(status)) = child.try_wait() {
        say!("==> {name} had already exited ({status})");
        return;
    }
    say!("==> sending SIGTERM to {name} (pid {})", child.id());
    // SAFETY: kill(2) on the pid of our own unreaped child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                say!(
                    "==> {name} exited ({status}) after {} ms",
                    started.elapsed().as_millis()
                );
                return;
            }
            Ok(None) if started.elapsed() < grace => thread::sleep(Duration::from_millis(50)),
            _ => {
                say!(
                    "==> {name} did not exit within {} s, killing it",
                    grace.as_secs()
                );
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pod_hash_is_fnv1a_48_bits() {
        // FNV-1a 64 of "" is the offset basis; of "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(super::pod_hash(""), "9ce484222325");
        assert_eq!(super::pod_hash("a"), "dc4c8601ec8c");
    }
}
