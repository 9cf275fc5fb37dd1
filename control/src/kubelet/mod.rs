//! `kcontrol kubelet`: runs the pods bound to one node as crun containers.
//!
//! - registers the Node and heartbeats through a Lease (node.rs);
//! - watches pods with `spec.nodeName=<node>` and runs one worker per pod
//!   (pod.rs): network namespace + veth on the node bridge (net.rs), one OCI
//!   bundle per container run by crun (runtime.rs), probes (probe.rs),
//!   status and events, graceful deletion;
//! - on shutdown (SIGINT/SIGTERM, or [`shutdown`] after the future was
//!   dropped) stops every container and removes every namespace, veth, the
//!   bridge and the cgroups it made.
//!
//! Host names (veths, namespaces, crun containers under crun root
//! `<root_dir>/crun`, cgroups) follow the `kcontrol-names` crate, which the
//! test harnesses share.

pub mod net;
mod node;
mod pod;
mod probe;
mod runtime;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use net::{Cidr, PodNet};
use pod::{Desired, Worker};
use runtime::Runtime;

pub use net::VETH_PREFIX;

/// Default location of the busybox root filesystem `cargo xtask setup` builds.
pub const DEFAULT_BUSYBOX_ROOTFS: &str = "/var/lib/kcontrol/images/busybox";
/// Default node bridge.
pub const DEFAULT_BRIDGE: &str = "kcbr0";

/// What a kubelet runs as.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    /// Pod addresses come from here; the first address is the bridge's (the
    /// pods' gateway). E.g. 10.244.0.0/24.
    pub pod_cidr: String,
    /// State: crun's root, bundles, logs, address allocations.
    pub root_dir: PathBuf,
    /// The node bridge (at most 15 characters).
    pub bridge: String,
    /// The crun binary.
    pub crun: PathBuf,
    /// What image `busybox` (any tag) resolves to.
    pub busybox_rootfs: PathBuf,
    pub lease_renew_interval: Duration,
    pub node_status_interval: Duration,
    /// Container restart back-off: first restart at once, then this,
    /// doubling up to `restart_backoff_max` (the image pull back-off too).
    pub restart_backoff_base: Duration,
    pub restart_backoff_max: Duration,
    /// On kubelet shutdown containers get at most this long after SIGTERM.
    pub shutdown_grace: Duration,
    pub max_pods: u32,
}

impl Config {
    /// Defaults for everything but the node name, pod CIDR and state dir.
    pub fn new(node_name: &str, pod_cidr: &str, root_dir: &Path) -> Config {
        Config {
            node_name: node_name.to_string(),
            pod_cidr: pod_cidr.to_string(),
            root_dir: root_dir.to_path_buf(),
            bridge: DEFAULT_BRIDGE.to_string(),
            crun: PathBuf::from("crun"),
            busybox_rootfs: PathBuf::from(DEFAULT_BUSYBOX_ROOTFS),
            lease_renew_interval: Duration::from_secs(10),
            node_status_interval: Duration::from_secs(60),
            restart_backoff_base: Duration::from_secs(10),
            restart_backoff_max: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(5),
            max_pods: 110,
        }
    }

    fn runtime(&self) -> Runtime {
        Runtime {
            crun: self.crun.clone(),
            root: self.root_dir.join("crun"),
        }
    }
}

/// What every pod worker shares.
pub(crate) struct Shared {
    client: Client,
    cfg: Config,
    rt: Runtime,
    cidr: Cidr,
    node_ip: Ipv4Addr,
    bridge_index: u32,
    net: rtnetlink::Handle,
    ipam: Mutex<()>,
}

impl Shared {
    fn event(&self, pod: &Pod, kind: &str, reason: &str, msg: String, field: Option<String>) {
        pod::post_event(
            self.client.clone(),
            self.cfg.node_name.clone(),
            pod,
            kind,
            reason,
            msg,
            field,
        );
    }

    fn ipam_dir(&self) -> PathBuf {
        self.cfg.root_dir.join("ipam")
    }

    /// The pod's address: the one recorded for its UID, else the first free
    /// one, recorded as a file named after it (so a restarted kubelet
    /// neither hands it out twice nor loses it).
    fn allocate_ip(&self, uid: &str) -> Result<Ipv4Addr> {
        let _g = self.ipam.lock().unwrap();
        let dir = self.ipam_dir();
        fs::create_dir_all(&dir)?;
        for e in fs::read_dir(&dir)?.flatten() {
            if fs::read_to_string(e.path()).ok().as_deref() == Some(uid)
                && let Some(ip) = e.file_name().to_str().and_then(|n| n.parse().ok())
            {
                return Ok(ip);
            }
        }
        for ip in self.cidr.pod_addresses() {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dir.join(ip.to_string()))
            {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(uid.as_bytes())?;
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e.into()),
            }
        }
        bail!("no free address left in {}", self.cidr)
    }

    fn release_ip(&self, uid: &str) {
        let _g = self.ipam.lock().unwrap();
        for e in fs::read_dir(self.ipam_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            if fs::read_to_string(e.path()).ok().as_deref() == Some(uid) {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Frees the addresses of pods not in `live`.
    fn prune_ips(&self, live: &HashSet<String>) {
        let _g = self.ipam.lock().unwrap();
        for e in fs::read_dir(self.ipam_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let uid = fs::read_to_string(e.path()).unwrap_or_default();
            if !live.contains(&uid) {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    async fn teardown_net(&self, hash: &str) -> Result<()> {
        net::teardown_pod(&self.net, &PodNet::new(hash, Ipv4Addr::UNSPECIFIED)).await
    }
}

/// Refuses a hybrid cgroup layout crun cannot use, with what to do.
fn check_cgroups() -> Result<()> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return Ok(());
    }
    let left = fs::read_to_string(base.join("unified/cgroup.controllers")).unwrap_or_default();
    if !left.trim().is_empty() {
        bail!(
            "crun cannot use this hybrid cgroup layout: the cgroup2 tree at /sys/fs/cgroup/unified \
             still owns controller(s) {:?}; run `cargo xtask setup` (it mounts them as v1 hierarchies)",
            left.trim()
        );
    }
    Ok(())
}

/// Runs the kubelet until SIGINT/SIGTERM, then stops every pod and removes
/// what it made (see [`shutdown`]). When the future is dropped instead, call
/// [`shutdown`] with the same config.
pub async fn run(client: Client, cfg: Config) -> Result<()> {
    // First, so that a signal during start-up still ends in the clean-up.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let cidr = Cidr::parse(&cfg.pod_cidr)?;
    if cfg.bridge.is_empty() || cfg.bridge.len() > 15 {
        bail!("bridge name {:?} must be 1 to 15 characters", cfg.bridge);
    }
    if cfg.node_name.is_empty() {
        bail!("the node name must not be empty");
    }
    let rt = cfg.runtime();
    let version = rt.version().await?;
    if !cfg.busybox_rootfs.join("bin/busybox").exists() {
        bail!(
            "no busybox root filesystem at {} (expected bin/busybox): run `cargo xtask setup`, \
             which builds it from Debian's busybox-static",
            cfg.busybox_rootfs.display()
        );
    }
    check_cgroups()?;
    for d in ["pods", "ipam", "crun"] {
        fs::create_dir_all(cfg.root_dir.join(d))
            .with_context(|| format!("creating {}", cfg.root_dir.join(d).display()))?;
    }
    // Whatever a previous run left (it crashed, or was killed): its
    // containers are stopped and its pods set up afresh.
    if let Err(e) = cleanup(&cfg, false).await {
        eprintln!("kubelet: leftovers of an earlier run: {e:#}");
    }
    let h = net::connect()?;
    let bridge_index = net::ensure_bridge(&h, &cfg.bridge, cidr).await?;
    let node_ip = net::node_ip(&h, cidr).await?;
    let sh = Arc::new(Shared {
        client,
        rt,
        cidr,
        node_ip,
        bridge_index,
        net: h,
        ipam: Mutex::new(()),
        cfg: cfg.clone(),
    });
    let since = pod::now();
    node::register(&sh, &since, &version).await?;
    eprintln!(
        "kubelet: node {} registered (pod CIDR {cidr}, bridge {}, node IP {node_ip}, crun {version})",
        cfg.node_name, cfg.bridge
    );
    let hb = tokio::spawn(node::heartbeat(sh.clone(), since, version));

    let mut workers: HashMap<String, (watch::Sender<Desired>, JoinHandle<()>)> = HashMap::new();
    let result = tokio::select! {
        r = dispatch(sh.clone(), &mut workers) => r,
        _ = int.recv() => Ok(()),
        _ = term.recv() => Ok(()),
    };
    eprintln!("kubelet: shutting down: stopping {} pod(s)", workers.len());
    hb.abort();
    for (tx, _) in workers.values() {
        tx.send_modify(|d| d.shutdown = true);
    }
    for (_, (_, h)) in workers.drain() {
        let _ = tokio::time::timeout(cfg.shutdown_grace + Duration::from_secs(15), h).await;
    }
    drop(sh);
    shutdown(&cfg).await?;
    eprintln!("kubelet: stopped, nothing left behind");
    result
}

async fn dispatch(
    sh: Arc<Shared>,
    workers: &mut HashMap<String, (watch::Sender<Desired>, JoinHandle<()>)>,
) -> Result<()> {
    let api: Api<Pod> = Api::all(sh.client.clone());
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", sh.cfg.node_name));
    let mut stream = watcher(api, wc).default_backoff().boxed();
    let mut listed: HashSet<String> = HashSet::new();
    let mut last: HashMap<String, Pod> = HashMap::new();
    while let Some(ev) = stream.next().await {
        workers.retain(|_, (_, h)| !h.is_finished());
        match ev {
            Err(e) => eprintln!("kubelet: watching pods: {e}"),
            Ok(watcher::Event::Init) => listed.clear(),
            Ok(watcher::Event::InitApply(p)) => {
                let uid = p.metadata.uid.clone().unwrap_or_default();
                listed.insert(uid);
                upsert(&sh, workers, &mut last, p);
            }
            Ok(watcher::Event::Apply(p)) => upsert(&sh, workers, &mut last, p),
            Ok(watcher::Event::InitDone) => {
                let gone: Vec<String> = workers
                    .keys()
                    .filter(|u| !listed.contains(*u))
                    .cloned()
                    .collect();
                for uid in gone {
                    if let Some((tx, _)) = workers.get(&uid) {
                        tx.send_modify(|d| d.gone = true);
                    }
                    last.remove(&uid);
                }
                sh.prune_ips(&listed);
            }
            Ok(watcher::Event::Delete(p)) => {
                let uid = p.metadata.uid.clone().unwrap_or_default();
                last.remove(&uid);
                if let Some((tx, _)) = workers.get(&uid) {
                    tx.send_modify(|d| {
                        d.pod = p;
                        d.gone = true;
                    });
                }
            }
        }
    }
    Err(anyhow!("the pod watch ended"))
}

fn upsert(
    sh: &Arc<Shared>,
    workers: &mut HashMap<String, (watch::Sender<Desired>, JoinHandle<()>)>,
    last: &mut HashMap<String, Pod>,
    p: Pod,
) {
    let uid = p.metadata.uid.clone().unwrap_or_default();
    if uid.is_empty() {
        return;
    }
    last.insert(uid.clone(), p.clone());
    if let Some((tx, _)) = workers.get(&uid) {
        tx.send_modify(|d| d.pod = p);
        return;
    }
    // Pods that already ended are not run again (a restarted kubelet must
    // not start them twice).
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return;
    }
    let (tx, rx) = watch::channel(Desired {
        pod: p.clone(),
        gone: false,
        shutdown: false,
    });
    let w = Worker::new(sh.clone(), p);
    let h = tokio::spawn(w.run(rx));
    workers.insert(uid, (tx, h));
}

/// Removes everything a kubelet with this config made: its crun
/// containers, each pod's veth, namespace and cgroups, stray `kcv` veths on
/// its bridge, the bridge itself, the `/kcontrol/<node>` cgroups and its
/// state. Safe to call when nothing is left.
pub async fn shutdown(cfg: &Config) -> Result<()> {
    cleanup(cfg, true).await
}

async fn cleanup(cfg: &Config, all: bool) -> Result<()> {
    let mut errors = Vec::new();
    let rt = cfg.runtime();
    match rt.list().await {
        Ok(ids) => {
            for id in ids {
                if let Err(e) = rt.delete(&id).await {
                    errors.push(format!("{e:#}"));
                }
            }
        }
        Err(e) => errors.push(format!("{e:#}")),
    }
    let h = net::connect()?;
    let pods = cfg.root_dir.join("pods");
    for e in fs::read_dir(&pods).into_iter().flatten().flatten() {
        let uid = e.file_name().to_string_lossy().into_owned();
        let hash = kcontrol_names::pod_hash(&uid);
        if let Err(e) = net::teardown_pod(&h, &PodNet::new(&hash, Ipv4Addr::UNSPECIFIED)).await {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = runtime::remove_cgroups(&format!("kcontrol/{}/{hash}", cfg.node_name)) {
            errors.push(format!("{e:#}"));
        }
        let _ = fs::remove_dir_all(e.path());
    }
    // Veths on our bridge whose pod directory was lost.
    if let Some(bridge) = net::link_index(&h, &cfg.bridge).await? {
        for (_, name, ctrl) in net::links(&h).await? {
            if name.starts_with(VETH_PREFIX)
                && ctrl == Some(bridge)
                && let Err(e) = net::delete_link(&h, &name).await
            {
                errors.push(format!("{e:#}"));
            }
        }
        if all && let Err(e) = net::delete_link(&h, &cfg.bridge).await {
            errors.push(format!("{e:#}"));
        }
    }
    if let Err(e) = runtime::remove_cgroups(&format!("kcontrol/{}", cfg.node_name)) {
        errors.push(format!("{e:#}"));
    }
    if all {
        // The shared parent goes when no other node's kubelet uses it.
        let _ = runtime::remove_empty_cgroup("kcontrol");
        for d in ["pods", "ipam", "crun"] {
            let _ = fs::remove_dir_all(cfg.root_dir.join(d));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("cleaning up: {}", errors.join("; ")))
    }
}
