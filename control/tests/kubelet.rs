//! The kubelet end to end: a real apiserver, a real `kcontrol kubelet`
//! process and real crun containers on the busybox rootfs `cargo xtask
//! setup` builds. There is no scheduler here, so pods are created with
//! spec.nodeName set. Each test has its own node, bridge (`kct<N>`) and pod
//! CIDR (10.252.<N>.0/24); traffic only goes between the host and those pod
//! addresses. Needs root, crun and the rootfs.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Server, TempDir};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Node, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);
const ROOTFS: &str = "/var/lib/kcontrol/images/busybox";

/// One node: its own bridge, CIDR, state dir and kubelet process.
struct Node1 {
    n: usize,
    node: String,
    bridge: String,
    cidr: String,
    root: TempDir,
    kubelet: Option<Child>,
    kubeconfig: PathBuf,
    uids: Mutex<BTreeSet<String>>,
}

fn next_n() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    // Spread over runs too, so a crashed run's leftovers never collide.
    10 + (std::process::id() as usize % 20) * 10 + N.fetch_add(1, Ordering::Relaxed)
}

fn prerequisites() {
    assert!(
        Path::new(ROOTFS).join("bin/busybox").exists(),
        "no busybox rootfs at {ROOTFS}: run `cargo xtask setup`"
    );
    assert!(
        Command::new("crun").arg("--version").output().is_ok(),
        "crun missing: run `cargo xtask setup`"
    );
}

impl Node1 {
    fn start(server: &Server) -> Node1 {
        prerequisites();
        let n = next_n();
        let mut node = Node1 {
            n,
            node: format!("node-{n}"),
            bridge: format!("kct{n}"),
            cidr: format!("10.252.{n}.0/24"),
            root: TempDir::new("kubelet"),
            kubelet: None,
            kubeconfig: server.kubeconfig.clone(),
            uids: Mutex::new(BTreeSet::new()),
        };
        node.spawn();
        node
    }

    fn crun_root(&self) -> PathBuf {
        self.root.0.join("crun")
    }

    fn spawn(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kcontrol"))
            .arg("kubelet")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--node-name", &self.node, "--pod-cidr", &self.cidr])
            .arg("--root-dir")
            .arg(&self.root.0)
            .args(["--bridge", &self.bridge])
            .args(["--restart-backoff-ms", "1000", "--lease-renew-seconds", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning kcontrol kubelet");
        let stderr = child.stderr.take().unwrap();
        let tag = self.node.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
            }
        });
        self.kubelet = Some(child);
    }

    /// SIGTERM and wait for the kubelet to finish its shutdown.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.kubelet.take().expect("kubelet running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kubelet did not stop within {DEADLINE:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no cleanup at all.
    fn kill9(&mut self) {
        let mut child = self.kubelet.take().expect("kubelet running");
        let _ = child.kill();
        let _ = child.wait();
    }

    fn track(&self, pod: &Pod) {
        self.uids
            .lock()
            .unwrap()
            .insert(pod.metadata.uid.clone().unwrap());
    }

    fn contains(&self, ip: &str) -> bool {
        ip.parse::<Ipv4Addr>()
            .is_ok_and(|ip| ip.octets()[..3] == [10, 252, self.n as u8])
    }
}

impl Drop for Node1 {
    fn drop(&mut self) {
        if self.kubelet.is_some() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.stop()));
        }
        // Backstop for a kubelet that crashed: nothing of ours may stay.
        let root = self.crun_root();
        for id in crun_ids(&root) {
            let _ = Command::new("crun")
                .arg("--root")
                .arg(&root)
                .args(["delete", "--force", &id])
                .output();
        }
        for l in links_on(&self.bridge) {
            let _ = Command::new("ip").args(["link", "del", &l]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .output();
        for uid in self.uids.lock().unwrap().iter() {
            let _ = Command::new("ip")
                .args(["netns", "del", &format!("kcns-{}", hash(uid))])
                .stderr(Stdio::null())
                .output();
        }
        for root in cgroup_roots() {
            let _ = remove_tree(&root.join("kcontrol").join(&self.node));
        }
    }
}

fn remove_tree(p: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(p)?.flatten() {
        if e.file_type()?.is_dir() {
            let _ = remove_tree(&e.path());
        }
    }
    std::fs::remove_dir(p)
}

/// The same FNV-1a hash the kubelet names things by.
fn hash(uid: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

fn cgroup_roots() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_path_buf()];
    }
    std::fs::read_dir(base)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect()
}

fn crun_ids(root: &Path) -> Vec<String> {
    crun_pids(root).into_iter().map(|(id, _)| id).collect()
}

/// (id, pid) of every container under a crun root.
fn crun_pids(root: &Path) -> Vec<(String, i64)> {
    if !root.exists() {
        return Vec::new();
    }
    let out = Command::new("crun")
        .arg("--root")
        .arg(root)
        .args(["list", "--format", "json"])
        .output()
        .expect("crun list");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| Some((c["id"].as_str()?.to_string(), c["pid"].as_i64()?)))
        .collect()
}

/// Names of the links enslaved to `bridge` (from `ip -o link`).
fn links_on(bridge: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show", "master", bridge])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .collect()
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .stderr(Stdio::null())
        .output()
        .unwrap()
        .status
        .success()
}

fn netns_list() -> String {
    String::from_utf8_lossy(&Command::new("ip").args(["netns"]).output().unwrap().stdout)
        .into_owned()
}

fn cgroup_left(node: &str, sub: &str) -> Vec<PathBuf> {
    cgroup_roots()
        .into_iter()
        .map(|r| r.join("kcontrol").join(node).join(sub))
        .filter(|p| p.exists())
        .collect()
}

/// What is left on the host of a pod with this UID.
fn leftovers(node: &Node1, uid: &str) -> Vec<String> {
    let h = hash(uid);
    let mut left = Vec::new();
    if link_exists(&format!("kcv{h}")) {
        left.push(format!("veth kcv{h}"));
    }
    if netns_list().contains(&format!("kcns-{h}")) {
        left.push(format!("netns kcns-{h}"));
    }
    for p in cgroup_left(&node.node, &h) {
        left.push(format!("cgroup {}", p.display()));
    }
    for id in crun_ids(&node.crun_root()) {
        if id.contains(&h) {
            left.push(format!("crun container {id}"));
        }
    }
    left
}

fn http_get(ip: &str, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {ip}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((code, body))
}

/// `crun exec` in a pod's container (found from its containerID).
fn exec(node: &Node1, pod: &Pod, cmd: &[&str]) -> (i32, String) {
    let id = container_id(pod);
    let out = Command::new("crun")
        .arg("--root")
        .arg(node.crun_root())
        .args(["exec", &id])
        .args(cmd)
        .output()
        .expect("crun exec");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), s)
}

fn container_id(pod: &Pod) -> String {
    let cs = &pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0];
    cs.container_id
        .as_deref()
        .expect("containerID")
        .strip_prefix("crun://")
        .unwrap()
        .to_string()
}

fn pod_json(name: &str, node: &str, containers: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": name } },
        "spec": { "nodeName": node, "terminationGracePeriodSeconds": 2, "containers": containers },
    }))
    .unwrap()
}

/// httpd serving its hostname on 8080.
fn web_container() -> Value {
    json!({
        "name": "web",
        "image": "busybox:1.36",
        "command": ["sh", "-c", "mkdir -p /tmp/www && hostname > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"],
        "ports": [{ "name": "http", "containerPort": 8080 }],
    })
}

async fn create(node: &Node1, api: &Api<Pod>, pod: Pod) -> Pod {
    let p = api
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    node.track(&p);
    p
}

async fn wait_pod(api: &Api<Pod>, name: &str, what: &str, f: impl Fn(&Pod) -> bool) -> Pod {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let p = api.get_opt(name).await.expect("get pod");
        if let Some(p) = &p
            && f(p)
        {
            return p.clone();
        }
        assert!(
            Instant::now() < deadline,
            "pod {name}: not {what} within {DEADLINE:?}; last: {}",
            serde_json::to_string_pretty(&p.map(|p| p.status)).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn condition(p: &Pod, t: &str) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| c.status.clone())
}

fn ready(p: &Pod) -> bool {
    condition(p, "Ready").as_deref() == Some("True")
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map_or(0, |c| c.restart_count)
}

async fn events_for(client: &kube::Client, pod: &str) -> Vec<(String, String)> {
    let api: Api<Event> = Api::namespaced(client.clone(), "default");
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(pod))
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

async fn wait_event(client: &kube::Client, pod: &str, reason: &str) -> Vec<(String, String)> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let evs = events_for(client, pod).await;
        if evs.iter().any(|(r, _)| r == reason) {
            return evs;
        }
        assert!(
            Instant::now() < deadline,
            "no {reason} event for {pod}: {evs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_registers_and_heartbeats() {
    let dir = TempDir::new("kl-node");
    let server = Server::start(&dir.0.join("api"), &[]);
    let node = Node1::start(&server);
    let client = server.client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + DEADLINE;
    let n = loop {
        if let Some(n) = nodes.get_opt(&node.node).await.unwrap() {
            break n;
        }
        assert!(Instant::now() < deadline, "node never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let spec = n.spec.unwrap();
    assert_eq!(spec.pod_cidr.as_deref(), Some(node.cidr.as_str()));
    let st = n.status.unwrap();
    let cap = st.capacity.unwrap();
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(cap["cpu"].0, cpus.to_string());
    assert!(cap["memory"].0.ends_with("Ki"), "{:?}", cap["memory"]);
    assert_eq!(cap["pods"].0, "110");
    let ready = st
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "True");
    assert!(
        st.addresses
            .unwrap()
            .iter()
            .any(|a| a.type_ == "InternalIP")
    );
    // The lease is renewed (every second here).
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let renew = |l: Lease| l.spec.unwrap().renew_time.unwrap().0;
    let deadline = Instant::now() + DEADLINE;
    let first = loop {
        if let Some(l) = leases.get_opt(&node.node).await.unwrap() {
            break renew(l);
        }
        assert!(Instant::now() < deadline, "no lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loop {
        let now = renew(leases.get(&node.node).await.unwrap());
        if now > first {
            break;
        }
        assert!(Instant::now() < deadline, "lease never renewed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The bridge carries the gateway address.
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "dev", &node.bridge])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("10.252.{}.1/24", node.n)),
        "bridge address: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_serve_http_reach_each_other_and_see_service_env() {
    let dir = TempDir::new("kl-http");
    let server = Server::start(&dir.0.join("api"), &[]);
    let node = Node1::start(&server);
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    // A Service made before the pods shows up in their environment.
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "back-end" },
        "spec": { "selector": { "app": "a" }, "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] },
    }))
    .unwrap();
    let svc = svcs.create(&PostParams::default(), &svc).await.unwrap();
    let cluster_ip = svc.spec.unwrap().cluster_ip.unwrap();

    let mut a = web_container();
    a["env"] = json!([
        { "name": "GREETING", "value": "hello" },
        { "name": "MESSAGE", "value": "$(GREETING) world" },
        { "name": "MY_POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } },
        { "name": "MY_NODE", "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } } },
    ]);
    a["workingDir"] = json!("/tmp");
    a["command"] = json!([
        "sh",
        "-c",
        "pwd > /tmp/cwd && mkdir -p /tmp/www && hostname > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"
    ]);
    a["startupProbe"] =
        json!({ "tcpSocket": { "port": "http" }, "periodSeconds": 1, "failureThreshold": 30 });
    a["readinessProbe"] = json!({ "httpGet": { "path": "/", "port": 8080 }, "periodSeconds": 1 });
    create(&node, &api, pod_json("a", &node.node, json!([a]))).await;
    create(
        &node,
        &api,
        pod_json("b", &node.node, json!([web_container()])),
    )
    .await;

    let pa = wait_pod(&api, "a", "Running and Ready", |p| {
        phase(p) == "Running" && ready(p)
    })
    .await;
    let pb = wait_pod(&api, "b", "Running and Ready", |p| {
        phase(p) == "Running" && ready(p)
    })
    .await;
    let st = pa.status.clone().unwrap();
    let ip_a = st.pod_ip.clone().unwrap();
    let ip_b = pb.status.clone().unwrap().pod_ip.unwrap();
    assert!(
        node.contains(&ip_a) && node.contains(&ip_b),
        "{ip_a} {ip_b}"
    );
    assert_ne!(ip_a, ip_b);
    assert!(st.host_ip.is_some());
    assert!(st.start_time.is_some());
    for c in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
        assert_eq!(condition(&pa, c).as_deref(), Some("True"), "{c}");
    }
    let cs = &st.container_statuses.unwrap()[0];
    assert!(cs.ready);
    assert!(cs.state.as_ref().unwrap().running.is_some());
    assert_eq!(cs.restart_count, 0);

    // From the host to each pod.
    assert_eq!(http_get(&ip_a, 8080, "/").unwrap(), (200, "a\n".into()));
    assert_eq!(http_get(&ip_b, 8080, "/").unwrap(), (200, "b\n".into()));
    // Pod to pod, directly over the bridge. (Debian's busybox 1.35 wget
    // crashes with -T, so no timeout flag.)
    let (code, out) = exec(
        &node,
        &pa,
        &["wget", "-qO-", &format!("http://{ip_b}:8080/")],
    );
    assert_eq!((code, out.as_str()), (0, "b\n"));
    let (code, out) = exec(
        &node,
        &pb,
        &["wget", "-qO-", &format!("http://{ip_a}:8080/")],
    );
    assert_eq!((code, out.as_str()), (0, "a\n"));
    // Inside: eth0 with the address, default route via the bridge.
    let (_, route) = exec(&node, &pa, &["ip", "route"]);
    assert!(
        route.contains(&format!("default via 10.252.{}.1", node.n)),
        "{route}"
    );

    // Environment.
    let (code, env) = exec(&node, &pa, &["env"]);
    assert_eq!(code, 0);
    let has = |kv: &str| env.lines().any(|l| l == kv);
    for kv in [
        format!("BACK_END_SERVICE_HOST={cluster_ip}"),
        "BACK_END_SERVICE_PORT=80".to_string(),
        "BACK_END_SERVICE_PORT_HTTP=80".to_string(),
        format!("BACK_END_PORT=tcp://{cluster_ip}:80"),
        "GREETING=hello".to_string(),
        "MESSAGE=hello world".to_string(),
        format!("MY_POD_IP={ip_a}"),
        format!("MY_NODE={}", node.node),
        "HOSTNAME=a".to_string(),
    ] {
        assert!(has(&kv), "{kv} missing from:\n{env}");
    }
    let (_, cwd) = exec(&node, &pa, &["cat", "/tmp/cwd"]);
    assert_eq!(cwd.trim(), "/tmp");
    // The root filesystem is read-only, /tmp is not.
    let (code, _) = exec(&node, &pa, &["touch", "/bin/x"]);
    assert_ne!(code, 0);

    let evs = events_for(&client, "a").await;
    for r in ["Pulled", "Created", "Started"] {
        assert!(evs.iter().any(|(e, _)| e == r), "no {r} event: {evs:?}");
    }
    // The host side of each pod's veth is a port of the node bridge.
    let ports = links_on(&node.bridge);
    for p in [&pa, &pb] {
        let veth = format!("kcv{}", hash(p.metadata.uid.as_deref().unwrap()));
        assert!(
            ports.contains(&veth),
            "{veth} not on {}: {ports:?}",
            node.bridge
        );
    }
    // The bridge has a fixed MAC derived from its address, not the lowest
    // of its ports' MACs (which changes as pods come and go and leaves the
    // pods' neighbour entry for their gateway pointing nowhere).
    let want = format!("0a:58:0a:fc:{:02x}:01", node.n);
    let out = std::process::Command::new("ip")
        .args(["-br", "link", "show", &node.bridge])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&out.stdout);
    assert!(link.contains(&want), "bridge MAC should be {want}: {link}");
    let (_, neigh) = exec(&node, &pa, &["ip", "neigh"]);
    assert!(
        neigh
            .lines()
            .filter(|l| l.starts_with(&format!("10.252.{}.1 ", node.n)))
            .all(|l| l.contains(&want)),
        "the pod's gateway entry should be {want}: {neigh}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_failure_restarts_the_container() {
    let dir = TempDir::new("kl-live");
    let server = Server::start(&dir.0.join("api"), &[]);
    let node = Node1::start(&server);
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let c = json!({
        "name": "app",
        "image": "docker.io/library/busybox:latest",
        // Healthy for a second, then not.
        "command": ["sh", "-c", "touch /tmp/healthy; sleep 1; rm /tmp/healthy; exec sleep 3600"],
        "livenessProbe": {
            "exec": { "command": ["cat", "/tmp/healthy"] },
            "periodSeconds": 1, "failureThreshold": 2,
        },
    });
    let mut pod = pod_json("live", &node.node, json!([c]));
    pod.spec.as_mut().unwrap().termination_grace_period_seconds = Some(1);
    create(&node, &api, pod).await;
    let p = wait_pod(&api, "live", "restarted twice", |p| restarts(p) >= 2).await;
    let cs = &p.status.unwrap().container_statuses.unwrap()[0];
    let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
    // sleep ignores nothing: SIGTERM ends it (143), else SIGKILL (137).
    assert!(
        [137, 143].contains(&last.exit_code),
        "exit code {}",
        last.exit_code
    );
    let evs = wait_event(&client, "live", "Killing").await;
    assert!(
        evs.iter()
            .any(|(r, m)| r == "Unhealthy" && m.starts_with("Liveness probe failed")),
        "{evs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_probe_drives_the_ready_condition() {
    let dir = TempDir::new("kl-ready");
    let server = Server::start(&dir.0.join("api"), &[]);
    let node = Node1::start(&server);
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let c = json!({
        "name": "app",
        "image": "busybox",
        "command": ["sleep", "3600"],
        "readinessProbe": {
            "exec": { "command": ["cat", "/tmp/ready"] },
            "periodSeconds": 1, "failureThreshold": 1, "successThreshold": 1,
        },
    });
    create(&node, &api, pod_json("rd", &node.node, json!([c]))).await;
    let p = wait_pod(&api, "rd", "Running", |p| {
        phase(p) == "Running"
            && restarts(p) == 0
            && p.status
                .as_ref()
                .unwrap()
                .container_statuses
                .as_ref()
                .is_some_and(|c| c[0].container_id.is_some())
    })
    .await;
    assert!(!ready(&p));
    assert_eq!(condition(&p, "ContainersReady").as_deref(), Some("False"));
    // Running is reported as soon as crun started the process; exec may
    // need a moment longer: poll for it (deadline 10 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (code, _) = exec(&node, &p, &["touch", "/tmp/ready"]);
        if code == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "exec kept failing ({code})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    wait_pod(&api, "rd", "Ready", ready).await;
    let (code, _) = exec(&node, &p, &["rm", "/tmp/ready"]);
    assert_eq!(code, 0);
    let p = wait_pod(&api, "rd", "not Ready", |p| !ready(p)).await;
    // Readiness never restarts anything.
    assert_eq!(restarts(&p), 0);
    assert_eq!(phase(&p), "Running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_image_is_err_image_pull_then_back_off() {
    let dir = TempDir::new("kl-image");
    let server = Server::start(&dir.0.join("api"), &[]);
    let node = Node1::start(&server);
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut stream = api
        .watch(&WatchParams::default().fields("metadata.name=img"), "0")
        .await
        .unwrap()
        .boxed();
    create(
        &node,
        &api,
        pod_json(
            "img",
            &node.node,
            json!([{ "name": "c", "image": "nginx:1.27" }]),
        ),
    )
    .await;
    let mut seen = BTreeSet::new();
    let mut message = String::new();
    let deadline = Instant::now() + DEADLINE;
    while !(seen.contains("ErrImagePull") && seen.contains("ImagePullBackOff")) {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, stream.try_next())
            .await
            .unwrap_or_else(|_| panic!("saw only {seen:?}"))
            .unwrap()
            .unwrap();
        if let WatchEvent::Modified(p) = ev {
            assert_eq!(phase(&p), "Pending");
            if let Some(w) = p
                .status
                .and_then(|s| s.container_statuses)
                .and_then(|c| c[0].state.clone())
                .and_then(|s| s.waiting)
            {
                let r = w.reason.unwrap_or_default();
                if r == "ErrImagePull" {
                    message = w.message.unwrap_or_default();
                }
                seen.insert(r);
            }
        }
    }
    assert!(
        message.contains("nginx:1.27") && message.contains("busybox"),
        "{message}"
    );
    let evs = wait_event(&client, "img", "Failed").await;
    assert!(
        evs.iter()
            .any(|(r, m)| r == "Failed" && m.contains("ErrImagePull")),
        "{evs:?}"
    );
    // Nothing ran.
    assert!(crun_ids(&node.crun_root()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_delete_sends_sigterm_waits_then_cleans_up() {
    let dir = TempDir::new("kl-delete");
    let server = Server::start(&dir.0.join("api"), &[]);
    let node = Node1::start(&server);
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    // Handles SIGTERM by exiting 42.
    let polite = json!({
        "name": "c", "image": "busybox",
        "command": ["sh", "-c", "trap 'exit 42' TERM; while true; do sleep 0.2; done"],
    });
    // Ignores SIGTERM: needs the SIGKILL after the grace period.
    let stubborn = json!({
        "name": "c", "image": "busybox",
        "command": ["sh", "-c", "trap '' TERM; while true; do sleep 0.2; done"],
    });
    let p1 = create(&node, &api, pod_json("polite", &node.node, json!([polite]))).await;
    let p2 = create(
        &node,
        &api,
        pod_json("stubborn", &node.node, json!([stubborn])),
    )
    .await;
    for n in ["polite", "stubborn"] {
        wait_pod(&api, n, "Running", |p| phase(p) == "Running").await;
    }
    // Let the shells install their traps.
    let p = api.get("polite").await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    while exec(&node, &p, &["true"]).0 != 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for (pod, name, want_exit) in [(&p1, "polite", 42), (&p2, "stubborn", 137)] {
        let uid = pod.metadata.uid.clone().unwrap();
        let mut stream = api
            .watch(
                &WatchParams::default().fields(&format!("metadata.name={name}")),
                "0",
            )
            .await
            .unwrap()
            .boxed();
        let res = api.delete(name, &DeleteParams::default()).await.unwrap();
        // Bound: marked, not removed.
        let marked = res.left().expect("a bound pod is not deleted at once");
        assert!(marked.metadata.deletion_timestamp.is_some());
        assert_eq!(marked.metadata.deletion_grace_period_seconds, Some(2));
        let mut exit = None;
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = tokio::time::timeout(left, stream.try_next())
                .await
                .expect("pod not deleted in time")
                .unwrap()
                .unwrap();
            match ev {
                WatchEvent::Modified(p) => {
                    if let Some(t) = p
                        .status
                        .and_then(|s| s.container_statuses)
                        .and_then(|c| c[0].state.clone())
                        .and_then(|s| s.terminated)
                    {
                        exit = Some(t.exit_code);
                    }
                }
                WatchEvent::Deleted(_) => break,
                _ => {}
            }
        }
        assert_eq!(exit, Some(want_exit), "{name}");
        assert!(api.get_opt(name).await.unwrap().is_none());
        let left = leftovers(&node, &uid);
        assert!(left.is_empty(), "{name} left {left:?}");
    }
    assert!(links_on(&node.bridge).is_empty());

    // Unbound pods and gracePeriodSeconds=0 go at once.
    let unbound: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "unbound" },
        "spec": { "containers": [{ "name": "c", "image": "busybox" }] },
    }))
    .unwrap();
    api.create(&PostParams::default(), &unbound).await.unwrap();
    api.delete("unbound", &DeleteParams::default())
        .await
        .unwrap();
    assert!(api.get_opt("unbound").await.unwrap().is_none());
    let now = create(
        &node,
        &api,
        pod_json(
            "now",
            &node.node,
            json!([{ "name": "c", "image": "busybox", "command": ["sleep", "3600"] }]),
        ),
    )
    .await;
    wait_pod(&api, "now", "Running", |p| phase(p) == "Running").await;
    api.delete(
        "now",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(api.get_opt("now").await.unwrap().is_none());
    // The kubelet sees it gone and cleans up anyway.
    let uid = now.metadata.uid.clone().unwrap();
    let deadline = Instant::now() + DEADLINE;
    while !leftovers(&node, &uid).is_empty() {
        assert!(Instant::now() < deadline, "{:?}", leftovers(&node, &uid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_does_not_double_run_and_shutdown_leaves_nothing() {
    let dir = TempDir::new("kl-restart");
    let server = Server::start(&dir.0.join("api"), &[]);
    let mut node = Node1::start(&server);
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let p1 = create(
        &node,
        &api,
        pod_json("r1", &node.node, json!([web_container()])),
    )
    .await;
    let p2 = create(
        &node,
        &api,
        pod_json("r2", &node.node, json!([web_container()])),
    )
    .await;
    let first = wait_pod(&api, "r1", "Running", |p| phase(p) == "Running").await;
    wait_pod(&api, "r2", "Running", |p| phase(p) == "Running").await;
    let ip1 = first.status.unwrap().pod_ip.unwrap();
    let deadline = Instant::now() + DEADLINE;
    while crun_ids(&node.crun_root()).len() != 2 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            crun_ids(&node.crun_root())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Crash: everything stays; a new kubelet takes over without a second copy.
    node.kill9();
    let before = crun_pids(&node.crun_root());
    assert_eq!(before.len(), 2);
    node.spawn();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let now = crun_pids(&node.crun_root());
        assert!(now.len() <= 2, "double run: {now:?}");
        let replaced = now.len() == 2 && now.iter().all(|c| !before.contains(c));
        if replaced && http_get(&ip1, 8080, "/").is_ok_and(|r| r == (200, "r1\n".into())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "r1 not back: {now:?} (before {before:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = wait_pod(&api, "r1", "Running", |p| phase(p) == "Running").await;
    assert_eq!(again.status.unwrap().pod_ip.unwrap(), ip1, "address kept");
    assert_eq!(links_on(&node.bridge).len(), 2);

    // Shutdown: nothing of ours stays on the host.
    let st = node.stop();
    assert!(st.success(), "kubelet exit: {st}");
    for p in [&p1, &p2] {
        let left = leftovers(&node, p.metadata.uid.as_deref().unwrap());
        assert!(left.is_empty(), "left {left:?}");
    }
    assert!(!link_exists(&node.bridge), "bridge {} left", node.bridge);
    assert!(cgroup_left(&node.node, "").is_empty(), "cgroups left");
    assert!(crun_ids(&node.crun_root()).is_empty());
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    for p in [&p1, &p2] {
        let h = hash(p.metadata.uid.as_deref().unwrap());
        assert!(!String::from_utf8_lossy(&out.stdout).contains(&h));
        assert!(!netns_list().contains(&h));
    }
}

/// The apiserver side alone (no kubelet): a bound pod's DELETE only marks
/// it; status updates keep it; a shorter grace period replaces a longer one;
/// gracePeriodSeconds=0 removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_marks_bound_pods_for_graceful_deletion() {
    let dir = TempDir::new("kl-grace");
    let server = Server::start(&dir.0.join("api"), &[]);
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut pod = pod_json("g", "nowhere", json!([{ "name": "c", "image": "busybox" }]));
    pod.spec.as_mut().unwrap().termination_grace_period_seconds = Some(45);
    api.create(&PostParams::default(), &pod).await.unwrap();
    let mut stream = api
        .watch(&WatchParams::default().fields("metadata.name=g"), "0")
        .await
        .unwrap()
        .boxed();
    let marked = api
        .delete("g", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("marked, not deleted");
    assert_eq!(marked.metadata.deletion_grace_period_seconds, Some(45));
    let ts = marked.metadata.deletion_timestamp.clone().unwrap().0;
    // deletionTimestamp is when the grace period ends.
    let ahead = ts.as_second() - jiff::Timestamp::now().as_second();
    assert!(
        (40..=46).contains(&ahead),
        "deletionTimestamp {ahead}s ahead"
    );
    let modified = loop {
        match tokio::time::timeout(DEADLINE, stream.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            WatchEvent::Modified(p) => break p,
            WatchEvent::Added(_) | WatchEvent::Bookmark(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(modified.metadata.deletion_timestamp.is_some());
    // A status update (what the kubelet sends while stopping) keeps it.
    api.patch_status(
        "g",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({ "status": { "phase": "Running" } })),
    )
    .await
    .unwrap();
    assert!(api.get_opt("g").await.unwrap().is_some());
    // A shorter period replaces it; a longer one does not.
    let dp = |g| DeleteParams {
        grace_period_seconds: Some(g),
        ..Default::default()
    };
    let p = api.delete("g", &dp(10)).await.unwrap().left().unwrap();
    assert_eq!(p.metadata.deletion_grace_period_seconds, Some(10));
    let p = api.delete("g", &dp(20)).await.unwrap().left().unwrap();
    assert_eq!(p.metadata.deletion_grace_period_seconds, Some(10));
    // Bad input is refused and loses nothing.
    let r = common::send(
        &client,
        "DELETE",
        "/api/v1/namespaces/default/pods/g?gracePeriodSeconds=soon",
        None,
        Vec::new(),
        None,
    )
    .await;
    assert_eq!(r.code, 400);
    assert!(api.get_opt("g").await.unwrap().is_some());
    api.delete("g", &dp(0)).await.unwrap();
    assert!(api.get_opt("g").await.unwrap().is_none());
}

/// restartPolicy: Never and OnFailure pods end Failed/Succeeded with the exit
/// code (and give their network back); Always restarts with back-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policies_and_back_off() {
    let dir = TempDir::new("kl-policy");
    let server = Server::start(&dir.0.join("api"), &[]);
    let node = Node1::start(&server);
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let ctr =
        |cmd: &str| json!([{ "name": "c", "image": "busybox", "command": ["sh", "-c", cmd] }]);
    let mut never = pod_json("never", &node.node, ctr("exit 3"));
    never.spec.as_mut().unwrap().restart_policy = Some("Never".into());
    let mut onfail = pod_json("onfail", &node.node, ctr("test -f /tmp/x || exit 0"));
    onfail.spec.as_mut().unwrap().restart_policy = Some("OnFailure".into());
    let always = pod_json("always", &node.node, ctr("exit 1"));
    let never = create(&node, &api, never).await;
    let onfail = create(&node, &api, onfail).await;
    create(&node, &api, always).await;

    let exit_of = |p: &Pod| {
        p.status.as_ref()?.container_statuses.as_ref()?[0]
            .state
            .as_ref()?
            .terminated
            .as_ref()
            .map(|t| (t.exit_code, t.reason.clone().unwrap_or_default()))
    };
    let p = wait_pod(&api, "never", "Failed", |p| phase(p) == "Failed").await;
    assert_eq!(exit_of(&p), Some((3, "Error".into())));
    assert_eq!(restarts(&p), 0);
    let p = wait_pod(&api, "onfail", "Succeeded", |p| phase(p) == "Succeeded").await;
    assert_eq!(exit_of(&p), Some((0, "Completed".into())));
    // Finished pods keep their status but not their network.
    for p in [&never, &onfail] {
        let uid = p.metadata.uid.clone().unwrap();
        let deadline = Instant::now() + DEADLINE;
        while !leftovers(&node, &uid).is_empty() {
            assert!(Instant::now() < deadline, "{:?}", leftovers(&node, &uid));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Always: restarted, then back-off (1 s, 2 s, … in this test).
    let p = wait_pod(&api, "always", "restarted twice", |p| restarts(p) >= 2).await;
    assert_eq!(phase(&p), "Running");
    let evs = wait_event(&client, "always", "BackOff").await;
    assert!(
        evs.iter()
            .any(|(r, m)| r == "BackOff" && m.contains("restarting failed container")),
        "{evs:?}"
    );
    wait_pod(&api, "always", "in CrashLoopBackOff", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c[0].state.as_ref()?.waiting.as_ref()?.reason.clone())
            .as_deref()
            == Some("CrashLoopBackOff")
    })
    .await;
}
