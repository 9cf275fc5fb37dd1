//! One node run by a real `kcontrol kubelet` process, for the kubelet's
//! end-to-end tests: its own bridge (`kct<N>`), pod CIDR (10.252.<N>.0/24),
//! state dir and crun root, all removed on drop even when the kubelet
//! crashed; and the host-side probes (links, namespaces, cgroups, crun
//! containers) those tests check. Needs root, crun and the busybox rootfs
//! `cargo xtask setup` builds.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Pod};
use kcontrol_names::pod_hash;
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};

use super::{Server, TempDir};

pub const DEADLINE: Duration = Duration::from_secs(60);
pub const ROOTFS: &str = "/var/lib/kcontrol/images/busybox";

/// One node: its own bridge, CIDR, state dir and kubelet process.
pub struct Node1 {
    pub n: usize,
    pub node: String,
    pub bridge: String,
    pub cidr: String,
    pub root: TempDir,
    kubelet: Option<Child>,
    kubeconfig: PathBuf,
    uids: Mutex<BTreeSet<String>>,
}

pub fn next_n() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    // Spread over runs too, so a crashed run's leftovers never collide.
    10 + (std::process::id() as usize % 20) * 10 + N.fetch_add(1, Ordering::Relaxed)
}

pub fn prerequisites() {
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
    pub fn start(server: &Server) -> Node1 {
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

    pub fn crun_root(&self) -> PathBuf {
        self.root.0.join("crun")
    }

    pub fn spawn(&mut self) {
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
    pub fn stop(&mut self) -> std::process::ExitStatus {
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
    pub fn kill9(&mut self) {
        let mut child = self.kubelet.take().expect("kubelet running");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn track(&self, pod: &Pod) {
        self.uids
            .lock()
            .unwrap()
            .insert(pod.metadata.uid.clone().unwrap());
    }

    pub fn contains(&self, ip: &str) -> bool {
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
                .args(["netns", "del", &kcontrol_names::netns(&pod_hash(uid))])
                .stderr(Stdio::null())
                .output();
        }
        for root in cgroup_roots() {
            let _ = remove_tree(&root.join("kcontrol").join(&self.node));
        }
    }
}

pub fn remove_tree(p: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(p)?.flatten() {
        if e.file_type()?.is_dir() {
            let _ = remove_tree(&e.path());
        }
    }
    std::fs::remove_dir(p)
}

pub fn cgroup_roots() -> Vec<PathBuf> {
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

pub fn crun_ids(root: &Path) -> Vec<String> {
    crun_pids(root).into_iter().map(|(id, _)| id).collect()
}

/// (id, pid) of every container under a crun root.
pub fn crun_pids(root: &Path) -> Vec<(String, i64)> {
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
pub fn links_on(bridge: &str) -> Vec<String> {
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

pub fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .stderr(Stdio::null())
        .output()
        .unwrap()
        .status
        .success()
}

pub fn netns_list() -> String {
    String::from_utf8_lossy(&Command::new("ip").args(["netns"]).output().unwrap().stdout)
        .into_owned()
}

pub fn cgroup_left(node: &str, sub: &str) -> Vec<PathBuf> {
    cgroup_roots()
        .into_iter()
        .map(|r| r.join("kcontrol").join(node).join(sub))
        .filter(|p| p.exists())
        .collect()
}

/// What is left on the host of a pod with this UID.
pub fn leftovers(node: &Node1, uid: &str) -> Vec<String> {
    let h = pod_hash(uid);
    let mut left = Vec::new();
    let (veth, netns) = (kcontrol_names::veth(&h), kcontrol_names::netns(&h));
    if link_exists(&veth) {
        left.push(format!("veth {veth}"));
    }
    if netns_list().contains(&netns) {
        left.push(format!("netns {netns}"));
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

pub fn http_get(ip: &str, port: u16, path: &str) -> std::io::Result<(u16, String)> {
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
pub fn exec(node: &Node1, pod: &Pod, cmd: &[&str]) -> (i32, String) {
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

/// crun's id of the pod's first container: the kubelet's naming rule
/// ([`kcontrol_names::container_id`]) over the pod's UID and the container's
/// name, checked against the `containerID` the kubelet reports, if any yet.
pub fn container_id(pod: &Pod) -> String {
    let uid = pod.metadata.uid.as_deref().expect("pod without uid");
    let name = &pod.spec.as_ref().expect("pod without spec").containers[0].name;
    let id = kcontrol_names::container_id(&pod_hash(uid), name);
    let reported = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| &c.name == name))
        .and_then(|c| c.container_id.as_deref());
    if let Some(reported) = reported {
        assert_eq!(reported, format!("crun://{id}"), "containerID of {name}");
    }
    id
}

pub fn pod_json(name: &str, node: &str, containers: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": name } },
        "spec": { "nodeName": node, "terminationGracePeriodSeconds": 2, "containers": containers },
    }))
    .unwrap()
}

/// httpd serving its hostname on 8080.
pub fn web_container() -> Value {
    json!({
        "name": "web",
        "image": "busybox:1.36",
        "command": ["sh", "-c", "mkdir -p /tmp/www && hostname > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"],
        "ports": [{ "name": "http", "containerPort": 8080 }],
    })
}

pub async fn create(node: &Node1, api: &Api<Pod>, pod: Pod) -> Pod {
    let p = api
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    node.track(&p);
    p
}

pub async fn wait_pod(api: &Api<Pod>, name: &str, what: &str, f: impl Fn(&Pod) -> bool) -> Pod {
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

pub fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

pub fn condition(p: &Pod, t: &str) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| c.status.clone())
}

pub fn ready(p: &Pod) -> bool {
    condition(p, "Ready").as_deref() == Some("True")
}

pub fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map_or(0, |c| c.restart_count)
}

pub async fn events_for(client: &kube::Client, pod: &str) -> Vec<(String, String)> {
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

pub async fn wait_event(client: &kube::Client, pod: &str, reason: &str) -> Vec<(String, String)> {
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
