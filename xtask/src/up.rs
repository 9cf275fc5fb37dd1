//! `cargo xtask up`: a single-node cluster on this host (see [`run_up`]);
//! `cargo xtask up --manifests-demo`: the older demo of kproxy alone in
//! network namespaces, fed from manifest files (see [`run_manifests_demo`]):
//!
//! ```text
//!  kpdemo-client            kpdemo-node                kpdemo-be1..3
//!  eth0 10.0.1.2 ─── veth ─── kpn-c 10.0.1.1
//!                              kpn-b1 10.0.11.1 ─ veth ─ eth0 10.0.11.2:8080
//!                              kpn-b2 10.0.12.1 ─ veth ─ eth0 10.0.12.2:8080
//!                              kpn-b3 10.0.13.1 ─ veth ─ eth0 10.0.13.2:8080
//! ```
//!
//! There kproxy runs in kpdemo-node with its programs on kpn-c and serves
//! the Service `demo` (ClusterIP 10.96.0.10:80 → the three backends on
//! 8080). All addresses live in namespaces this command creates and removes
//! again.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::util::{self, output, run};
use crate::{build, setup};

use proxy_common::lifecycle;
use testbed::cluster::{Cluster, Options};
use testbed::log::Log;

/// The cluster's data dir (store, kubeconfig, kubelet state, logs).
pub fn cluster_dir() -> PathBuf {
    util::target_dir().join("cluster")
}

/// The demo: three busybox web servers each answering with its own pod name
/// (the container's hostname), a ClusterIP Service in front, and a client
/// pod. /tmp is the rootfs's writable tmpfs (the rootfs itself is
/// read-only).
const DEMO_YAML: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: demo
  namespace: default
spec:
  replicas: 3
  selector:
    matchLabels: {app: demo}
  template:
    metadata:
      labels: {app: demo}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: web
        image: busybox
        command: ["sh", "-c", "mkdir -p /tmp/www && hostname > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"]
        ports:
        - {name: http, containerPort: 8080}
        readinessProbe:
          httpGet: {path: /, port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: demo
  namespace: default
spec:
  selector: {app: demo}
  ports:
  - {name: http, port: 80, targetPort: http}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: default
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: client
    image: busybox
    command: ["sleep", "3600"]
"#;

/// Requests the demo makes to the ClusterIP: two rounds over 3 pods.
const REQUESTS: usize = 6;
const DEMO_REPLICAS: usize = 3;

/// `cargo xtask up`: setup, build, a single-node cluster (`kcontrol all` +
/// kproxy on this host), the demo applied with kubectl and requested from
/// a client pod; then up until Ctrl-C, which stops everything and checks
/// that nothing is left. With `once`, stops after the requests (and fails
/// if they were not answered round-robin by the three pods).
pub fn run_up(once: bool) -> Result<()> {
    setup::run_setup()?;
    let outputs = build::build_all(true)?;

    let log = Arc::new(Log::default());
    log.echo_changes
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let on_signal = log.clone();
    // Ctrl-C (and SIGTERM/SIGHUP) only sets a flag: the cluster has to be
    // stopped in order and checked.
    ctrlc::set_handler(move || on_signal.interrupt()).context("installing the Ctrl-C handler")?;

    let dir = cluster_dir();
    say!("==> [1/5] starting the cluster in {}", dir.display());
    let opts = Options::host(&outputs.kcontrol, &outputs.kproxy, &dir)?;
    let mut c = Cluster::start(opts, log.clone())?;
    let result = demo(&mut c, once);
    if let Err(e) = &result {
        say!("==> error: {e:#}");
    }
    say!("==> stopping the cluster");
    let stopped = c.stop_clean();
    result.and(stopped)
}

fn demo(c: &mut Cluster, once: bool) -> Result<()> {
    let kc = c.kubeconfig.display().to_string();
    say!();
    say!("    kubeconfig: {kc}");
    say!("    try:        kubectl --kubeconfig {kc} get pods -o wide");
    say!("                export KUBECONFIG={kc}; kubectl get nodes,svc,endpointslices");
    say!();

    say!("==> [2/5] kubectl apply: Deployment demo (3 × busybox httpd), Service demo, Pod client");
    let applied = c.kubectl_in(&["apply", "-f", "-"], Some(DEMO_YAML))?;
    for l in applied.lines() {
        say!("    {l}");
    }

    say!("==> [3/5] waiting for {DEMO_REPLICAS} ready endpoints of Service demo");
    let started = Instant::now();
    let mut last = String::new();
    let endpoints = loop {
        let eps = kubectl_out(
            c,
            &[
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=demo",
                "-o",
                "jsonpath={range .items[*].endpoints[*]}{.addresses[0]}={.conditions.ready} {end}",
            ],
        )
        .unwrap_or_default();
        let ready: Vec<String> = eps
            .split_whitespace()
            .filter_map(|e| e.strip_suffix("=true").map(str::to_owned))
            .collect();
        let pods = kubectl_out(c, &["get", "pods", "--no-headers"]).unwrap_or_default();
        let status = format!("{} ready endpoints: {}", ready.len(), ready.join(" "));
        if status != last {
            say!("    [{:>5} ms] {status}", started.elapsed().as_millis());
            for l in pods.lines() {
                say!("        {l}");
            }
            last = status;
        }
        if ready.len() >= DEMO_REPLICAS {
            break ready;
        }
        if started.elapsed() > Duration::from_secs(90) {
            bail!(
                "Service demo has {} ready endpoints after 90 s",
                ready.len()
            );
        }
        c.log.pause(Duration::from_millis(200))?;
    };

    // kproxy programs the endpoints when the EndpointSlice says they are
    // ready: wait for an `applied` line that holds all of them (its
    // `backends=` count covers every service, so compare with the count
    // before the demo: the `ready` line).
    let (base, _) = c.log.wait_for(
        0,
        Duration::from_secs(5),
        "kproxy's ready line",
        |l| match l.kproxy_event() {
            Some(lifecycle::Event::Ready { backends, .. }) => Some(backends),
            _ => None,
        },
    )?;
    let (n, _) = c.log.wait_for(
        0,
        Duration::from_secs(30),
        "kproxy to program the endpoints",
        |l| {
            match l.kproxy_event() {
                Some(lifecycle::Event::Applied { backends, .. }) => Some(backends),
                _ => None,
            }
            .filter(|n| *n >= base + endpoints.len() as u64)
        },
    )?;
    say!("==> kproxy programs {n} backends ({} for demo)", n - base);

    let vip = kubectl_out(
        c,
        &["get", "service", "demo", "-o", "jsonpath={.spec.clusterIP}"],
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let uid = loop {
        let s = kubectl_out(
            c,
            &[
                "get",
                "pod",
                "client",
                "-o",
                "jsonpath={.status.phase} {.metadata.uid}",
            ],
        )?;
        if let Some(uid) = s.strip_prefix("Running ") {
            break uid.to_string();
        }
        if Instant::now() > deadline {
            bail!("pod client is not Running after 60 s ({s})");
        }
        c.log.pause(Duration::from_millis(200))?;
    };
    let id = kcontrol_names::container_id(&kcontrol_names::pod_hash(&uid), "client");
    say!(
        "==> [4/5] {REQUESTS} requests from pod client to http://{vip}/ (Service demo's ClusterIP)"
    );
    let mut answers = BTreeMap::new();
    let mut ok = 0;
    for i in 1..=REQUESTS {
        let mut cmd = client_request(&c.crun_root, &id, &vip);
        if i == 1 {
            say!("    $ {}", util::display(&cmd));
        }
        match output(&mut cmd).and_then(|r| http_body(&r)) {
            Ok(text) => {
                say!("    request {i}: {text}");
                *answers.entry(text).or_insert(0) += 1;
                ok += 1;
            }
            Err(e) => say!("    request {i}: FAILED: {e:#}"),
        }
    }
    say!("==> {ok}/{REQUESTS} answered, by {} pods:", answers.len());
    for (pod, count) in &answers {
        say!("    {count} × {pod}");
    }
    c.note_pods();
    if once {
        if ok < REQUESTS || answers.len() != DEMO_REPLICAS {
            bail!("expected {REQUESTS} answers from {DEMO_REPLICAS} pods");
        }
        return Ok(());
    }
    say!();
    say!("==> [5/5] the cluster is up; Ctrl-C stops it. Try:");
    say!("    kubectl --kubeconfig {kc} get pods,svc,endpointslices -o wide");
    say!("    kubectl --kubeconfig {kc} scale deployment demo --replicas=5");
    say!(
        "    {}",
        util::display(&client_request(&c.crun_root, &id, &vip))
    );
    loop {
        match c.log.pause(Duration::from_secs(3600)) {
            Ok(()) => {}
            Err(_) if c.log.interrupted() => {
                say!("==> interrupted");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}

/// One HTTP request from inside the client container to `vip`:80, with
/// busybox `nc` (Debian's busybox-static `wget` dies of SIGSEGV here).
fn client_request(crun_root: &Path, id: &str, vip: &str) -> Command {
    let mut cmd = Command::new("crun");
    cmd.arg("--root")
        .arg(crun_root)
        .args(["exec", id, "sh", "-c"])
        .arg(format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {vip} 80"
        ));
    cmd
}

/// The body of an HTTP/1.0 response, after checking its status line.
fn http_body(response: &str) -> Result<String> {
    let status = response.lines().next().unwrap_or("");
    if !status.contains(" 200 ") {
        bail!("unexpected response {:?}", status.trim());
    }
    let body = response
        .split_once("\r\n\r\n")
        .or_else(|| response.split_once("\n\n"))
        .map(|(_, b)| b)
        .unwrap_or("");
    Ok(body.trim().to_string())
}

/// `kubectl ARGS` against the cluster, its stdout trimmed.
fn kubectl_out(c: &Cluster, args: &[&str]) -> Result<String> {
    Ok(c.kubectl(args)?.trim().to_string())
}

const NS_PREFIX: &str = "kpdemo-";
const CLIENT_NS: &str = "kpdemo-client";
const NODE_NS: &str = "kpdemo-node";
/// Node-side veth facing the client: kproxy attaches here (≤ 15 chars, the
/// kernel's interface name limit).
const CLIENT_IFACE: &str = "kpn-c";
const BACKENDS: u8 = 3;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// Connections the demo makes through the VIP: two rounds over 3 backends.
const PROBES: usize = 6;
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn backend_ns(i: u8) -> String {
    format!("kpdemo-be{i}")
}

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 10 + i, 2)
}

/// What the main thread waits for once the demo runs.
enum Event {
    Ready,
    KproxyExited,
    Interrupted,
}

pub fn run_manifests_demo(once: bool) -> Result<()> {
    // Setup and build, unless `cargo xtask test`'s smoke step (smoke.rs)
    // hands down the builds it made.
    let outputs = crate::smoke::builds()?;
    remove_stale_namespaces()?;

    let (tx, rx) = mpsc::channel();
    // From here on Ctrl-C (and SIGTERM/SIGHUP) must not kill xtask outright:
    // the namespaces have to be removed. The handler only reports the signal.
    let on_signal = tx.clone();
    ctrlc::set_handler(move || {
        let _ = on_signal.send(Event::Interrupted);
    })
    .context("installing the Ctrl-C handler")?;

    // Everything created below is recorded in `demo`; its Drop tears it all
    // down on every way out of this function (success, error, Ctrl-C).
    let mut demo = Demo::default();
    build_topology(&mut demo)?;
    start_backends(&mut demo)?;
    let manifests = write_manifests()?;
    start_kproxy(&mut demo, &outputs.kproxy, &manifests, tx)?;
    wait_ready(&rx)?;

    let answered = probe_service()?;
    if once {
        if answered < PROBES {
            bail!(
                "only {answered} of {PROBES} connections through {VIP}:{SERVICE_PORT} were answered"
            );
        }
        return Ok(());
    }

    say!();
    say!(
        "kproxy is running; try: ip netns exec {CLIENT_NS} nc {VIP} {SERVICE_PORT} ; Ctrl-C to stop"
    );
    loop {
        match rx.recv() {
            Ok(Event::Interrupted) | Err(_) => {
                say!("==> interrupted, stopping");
                return Ok(());
            }
            Ok(Event::KproxyExited) => bail!("kproxy exited unexpectedly"),
            Ok(Event::Ready) => {}
        }
    }
}

/// Processes and namespaces of a running demo, removed on drop.
#[derive(Default)]
struct Demo {
    namespaces: Vec<String>,
    kproxy: Option<Child>,
    /// Backend servers, with the read end of their stdout kept open so a late
    /// write of theirs does not die of SIGPIPE.
    servers: Vec<(Child, ChildStdout)>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        say!("==> cleaning up the demo");
        if let Some(kproxy) = self.kproxy.take() {
            stop_kproxy(kproxy);
        }
        for (mut server, _) in self.servers.drain(..) {
            let _ = server.kill();
            let _ = server.wait();
        }
        for ns in self.namespaces.drain(..).rev() {
            delete_namespace(&ns);
        }
    }
}

/// SIGTERM, so kproxy detaches its programs and exits on its own; SIGKILL
/// if it has not done so after 10 s.
fn stop_kproxy(mut child: Child) {
    if let Ok(Some(status)) = child.try_wait() {
        say!("==> kproxy had already exited ({status})");
        return;
    }
    say!("==> sending SIGTERM to kproxy (pid {})", child.id());
    // SAFETY: kill(2) on the pid of our own child, which we have not reaped
    // yet, so the pid cannot have been reused.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                say!("==> kproxy exited ({status})");
                return;
            }
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            _ => {
                say!("==> kproxy did not exit within 10 s, killing it");
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
        }
    }
}

/// A previous run that was killed hard (SIGKILL, crash) leaves its
/// namespaces, and possibly processes in them, behind.
fn remove_stale_namespaces() -> Result<()> {
    let list = output(Command::new("ip").args(["netns", "list"]))?;
    for name in list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NS_PREFIX))
    {
        say!("==> removing stale namespace {name}");
        delete_namespace(name);
    }
    Ok(())
}

fn delete_namespace(name: &str) {
    // Processes still inside (a stale kproxy or backend server) would keep
    // the namespace and its veths alive after `ip netns del`.
    if let Ok(pids) = output(Command::new("ip").args(["netns", "pids", name])) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<libc::pid_t>().ok())
        {
            // SAFETY: plain kill(2); these pids were just listed as living in
            // a kpdemo namespace, which only this tool creates.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    if let Err(e) = run(Command::new("ip").args(["netns", "del", name])) {
        say!("warning: {e:#}");
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

fn build_topology(demo: &mut Demo) -> Result<()> {
    let mut all = vec![CLIENT_NS.to_string(), NODE_NS.to_string()];
    all.extend((1..=BACKENDS).map(backend_ns));
    for ns in &all {
        ip(&["netns", "add", ns])?;
        demo.namespaces.push(ns.clone());
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }

    veth_pair(
        CLIENT_IFACE,
        "10.0.1.1/24",
        CLIENT_NS,
        "10.0.1.2/24",
        "10.0.1.1",
    )?;
    for i in 1..=BACKENDS {
        let net = 10 + i;
        veth_pair(
            &format!("kpn-b{i}"),
            &format!("10.0.{net}.1/24"),
            &backend_ns(i),
            &format!("10.0.{net}.2/24"),
            &format!("10.0.{net}.1"),
        )?;
    }

    // The node routes between client and backends. rp_filter off everywhere:
    // after kproxy's NAT, strict reverse-path checks can drop replies whose
    // source the kernel did not expect on that interface.
    let mut node_sysctls = vec![
        "net.ipv4.ip_forward=1".to_string(),
        "net.ipv4.conf.all.rp_filter=0".to_string(),
        "net.ipv4.conf.default.rp_filter=0".to_string(),
        format!("net.ipv4.conf.{CLIENT_IFACE}.rp_filter=0"),
    ];
    node_sysctls.extend((1..=BACKENDS).map(|i| format!("net.ipv4.conf.kpn-b{i}.rp_filter=0")));
    sysctl(NODE_NS, &node_sysctls)?;
    let leaf_sysctls = [
        "net.ipv4.conf.all.rp_filter=0".to_string(),
        "net.ipv4.conf.default.rp_filter=0".to_string(),
        "net.ipv4.conf.eth0.rp_filter=0".to_string(),
    ];
    sysctl(CLIENT_NS, &leaf_sysctls)?;
    for i in 1..=BACKENDS {
        sysctl(&backend_ns(i), &leaf_sysctls)?;
    }
    Ok(())
}

/// A veth between the node (`node_if`) and `peer_ns` (always `eth0` there),
/// both ends created directly in their namespaces, plus the peer's default
/// route through the node.
fn veth_pair(
    node_if: &str,
    node_addr: &str,
    peer_ns: &str,
    peer_addr: &str,
    gw: &str,
) -> Result<()> {
    ip(&[
        "link", "add", node_if, "netns", NODE_NS, "type", "veth", "peer", "name", "eth0", "netns",
        peer_ns,
    ])?;
    ip(&["-n", NODE_NS, "addr", "add", node_addr, "dev", node_if])?;
    ip(&["-n", NODE_NS, "link", "set", node_if, "up"])?;
    ip(&["-n", peer_ns, "addr", "add", peer_addr, "dev", "eth0"])?;
    ip(&["-n", peer_ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", peer_ns, "route", "add", "default", "via", gw])
}

fn sysctl(ns: &str, settings: &[String]) -> Result<()> {
    run(Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-q", "-w"])
        .args(settings))
}

/// Child processes of the demo: in their own process group, so the
/// terminal's Ctrl-C reaches only xtask, which then stops them in order; and
/// with a parent-death signal, so they do not outlive a SIGKILLed xtask.
fn demo_child(cmd: &mut Command, death_signal: libc::c_int) {
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and only calls prctl,
    // which is async-signal-safe. PR_SET_PDEATHSIG survives the exec (these
    // are not set-uid binaries) and fires when the spawning thread exits; we
    // spawn from the main thread, which lives until the demo is torn down.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// One `xtask __serve` per backend namespace. Waits until each one listens.
fn start_backends(demo: &mut Demo) -> Result<()> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    for i in 1..=BACKENDS {
        let mut cmd = Command::new(&exe);
        cmd.args(["__serve", "--ns", &backend_ns(i), "--addr"])
            .arg(SocketAddrV4::new(backend_ip(i), BACKEND_PORT).to_string())
            .arg("--reply")
            .arg(format!("hello from backend-{i}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        demo_child(&mut cmd, libc::SIGKILL);
        say!("==> running: {}", util::display(&cmd));
        let mut child = cmd.spawn().context("starting a backend server")?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        // __serve prints one line once it listens (or exits on failure).
        let line = read_line(&mut stdout);
        demo.servers.push((child, stdout));
        match line {
            Some(line) => say!("    backend-{i}: {line}"),
            None => bail!("backend server {i} exited before listening"),
        }
    }
    Ok(())
}

/// One line from a pipe, read byte by byte so nothing after it is consumed.
fn read_line(r: &mut impl Read) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match r.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            _ if line.is_empty() => return None,
            _ => break,
        }
    }
    Some(String::from_utf8_lossy(&line).into_owned())
}

/// target/kpdemo/manifests/demo.yaml: the Service and its EndpointSlice, the
/// same shapes the API server serves.
fn write_manifests() -> Result<PathBuf> {
    let dir = util::target_dir().join("kpdemo/manifests");
    // kproxy reads every file in the directory: start from an empty one.
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let endpoints: String = (1..=BACKENDS)
        .map(|i| {
            format!(
                "  - addresses: [\"{}\"]\n    conditions:\n      ready: true\n",
                backend_ip(i)
            )
        })
        .collect();
    let yaml = format!(
        "\
apiVersion: v1
kind: Service
metadata:
  name: demo
  namespace: default
spec:
  type: ClusterIP
  clusterIP: {VIP}
  clusterIPs: [\"{VIP}\"]
  selector:
    app: demo
  ports:
  - name: http
    protocol: TCP
    port: {SERVICE_PORT}
    targetPort: {BACKEND_PORT}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: demo-kpdemo
  namespace: default
  labels:
    kubernetes.io/service-name: demo
addressType: IPv4
endpoints:
{endpoints}ports:
- name: http
  protocol: TCP
  port: {BACKEND_PORT}
"
    );
    let file = dir.join("demo.yaml");
    fs::write(&file, yaml).with_context(|| format!("writing {}", file.display()))?;
    say!("==> wrote {}", file.display());
    Ok(dir)
}

/// Starts kproxy in the node namespace; a thread echoes its stdout and
/// reports readiness and exit through `events`.
fn start_kproxy(
    demo: &mut Demo,
    kproxy: &Path,
    manifests: &Path,
    events: Sender<Event>,
) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", NODE_NS])
        .arg(kproxy)
        .arg("--manifests")
        .arg(manifests)
        .args(["--iface", CLIENT_IFACE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    // SIGTERM as death signal: an orphaned kproxy still shuts down cleanly.
    demo_child(&mut cmd, libc::SIGTERM);
    say!("==> running: {}", util::display(&cmd));
    let mut child = cmd.spawn().context("starting kproxy")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    demo.kproxy = Some(child);

    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            say!("[kproxy] {line}");
            // Its programs are attached and the maps hold the manifests'
            // services.
            if matches!(
                lifecycle::Event::parse(&line),
                Some(lifecycle::Event::Ready { .. })
            ) {
                let _ = events.send(Event::Ready);
            }
        }
        let _ = events.send(Event::KproxyExited);
    });
    Ok(())
}

fn wait_ready(events: &Receiver<Event>) -> Result<()> {
    match events.recv_timeout(READY_TIMEOUT) {
        Ok(Event::Ready) => Ok(()),
        Ok(Event::KproxyExited) => bail!("kproxy exited before printing its `ready` line"),
        Ok(Event::Interrupted) => bail!("interrupted while waiting for kproxy"),
        Err(_) => bail!(
            "kproxy did not print its `ready` line within {} s",
            READY_TIMEOUT.as_secs()
        ),
    }
}

/// Connects to the VIP from the client namespace PROBES times and prints
/// each answer. Returns how many connections were answered.
fn probe_service() -> Result<usize> {
    say!("==> connecting {PROBES} times to {VIP}:{SERVICE_PORT} from {CLIENT_NS}");
    // setns(CLONE_NEWNET) moves only the calling thread, so a scratch thread
    // does the connecting and the rest of xtask stays where it is.
    let answers = thread::spawn(|| -> Result<Vec<Result<String>>> {
        enter_netns(CLIENT_NS)?;
        let vip = SocketAddr::from((VIP, SERVICE_PORT));
        Ok((0..PROBES).map(|_| fetch(vip)).collect())
    })
    .join()
    .map_err(|_| anyhow!("the client thread panicked"))??;

    let mut per_backend = BTreeMap::new();
    for (n, answer) in answers.iter().enumerate() {
        match answer {
            Ok(text) => {
                say!("    connection {}: {text}", n + 1);
                *per_backend.entry(text.clone()).or_insert(0) += 1;
            }
            Err(e) => say!("    connection {}: FAILED: {e:#}", n + 1),
        }
    }
    let answered = answers.iter().filter(|a| a.is_ok()).count();
    say!("==> {answered}/{PROBES} connections answered");
    for (text, count) in &per_backend {
        say!("    {count} × {text}");
    }
    Ok(answered)
}

/// One connection: read everything the server sends until it closes.
fn fetch(addr: SocketAddr) -> Result<String> {
    let timeout = Duration::from_secs(3);
    let mut conn = TcpStream::connect_timeout(&addr, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    Ok(text.trim_end().to_string())
}

/// Moves the calling thread into the network namespace `ip netns add` made.
fn enter_netns(name: &str) -> Result<()> {
    let path = format!("/var/run/netns/{name}");
    let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on a file descriptor we own and keep open for the call;
    // with CLONE_NEWNET it changes only this thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("entering {path}"));
    }
    Ok(())
}

/// `xtask __serve`: a tiny TCP server answering every connection with
/// `reply` (plus a newline), then closing. Prints one line once listening.
pub fn serve(ns: Option<&str>, addr: SocketAddr, reply: &str) -> Result<()> {
    if let Some(ns) = ns {
        // Done before any other thread exists, so every connection thread
        // inherits the namespace.
        enter_netns(ns)?;
    }
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let mut text = reply.to_string();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let text: Arc<str> = text.into();
    say!(
        "listening on {addr}{}",
        ns.map(|n| format!(" in {n}")).unwrap_or_default()
    );
    io::stdout().flush()?;
    for conn in listener.incoming() {
        match conn {
            Ok(conn) => {
                let text = Arc::clone(&text);
                thread::spawn(move || answer(conn, &text));
            }
            Err(e) => eprintln!("__serve {addr}: accept failed: {e}"),
        }
    }
    Ok(())
}

fn answer(mut conn: TcpStream, text: &str) {
    let _ = conn.write_all(text.as_bytes());
    // Half-close, then drain whatever the client sent: closing a socket with
    // unread input makes the kernel send RST, which can destroy the reply
    // before the client has read it (e.g. someone typing into nc).
    let _ = conn.shutdown(Shutdown::Write);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut sink = [0u8; 1024];
    while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
}
