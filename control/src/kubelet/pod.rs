//! One task per pod bound to the node: builds its network, runs its
//! containers with crun (restart policy with back-off, probes), reports
//! status and events, and on deletion stops it within the grace period,
//! tears everything down and removes the pod from the API.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Probe, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::Shared;
use super::net::{self, PodNet};
use super::probe;
use super::runtime::Bundle;

/// What the dispatcher wants for one pod.
#[derive(Clone)]
pub struct Desired {
    pub pod: Pod,
    /// The pod is no longer in the API (deleted without grace, or its
    /// namespace went).
    pub gone: bool,
    /// The kubelet is shutting down: stop everything, leave the API alone.
    pub shutdown: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Startup = 0,
    Liveness = 1,
    Readiness = 2,
}

impl Kind {
    fn title(self) -> &'static str {
        match self {
            Kind::Startup => "Startup",
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
        }
    }

    fn spec(self, c: &Container) -> Option<&Probe> {
        match self {
            Kind::Startup => c.startup_probe.as_ref(),
            Kind::Liveness => c.liveness_probe.as_ref(),
            Kind::Readiness => c.readiness_probe.as_ref(),
        }
    }
}

enum Msg {
    Exited {
        ctr: usize,
        epoch: u64,
        code: i32,
    },
    Probe {
        ctr: usize,
        epoch: u64,
        kind: Kind,
        result: Result<(), String>,
    },
}

#[derive(Clone, Debug)]
struct Term {
    exit_code: i32,
    reason: String,
    started_at: String,
    finished_at: String,
}

impl Term {
    fn json(&self) -> Value {
        json!({ "terminated": {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
        }})
    }
}

#[derive(Clone, Debug)]
enum CState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: String,
        since: Instant,
    },
    Terminated(Term),
}

#[derive(Default, Clone, Debug)]
struct ProbeState {
    successes: u32,
    failures: u32,
    result: Option<bool>,
    next_at: Option<Instant>,
    in_flight: bool,
}

struct Ctr {
    spec: Container,
    id: String,
    epoch: u64,
    state: CState,
    last_term: Option<Term>,
    restart_count: i32,
    /// Started at least once by this kubelet process.
    ever_ran: bool,
    /// The startup probe passed (or there is none).
    started: bool,
    /// Will not run again (restart policy).
    done: bool,
    /// Being killed because a probe failed.
    killing: bool,
    backoff_until: Option<Instant>,
    next_backoff: Duration,
    image_failures: u32,
    probes: [ProbeState; 3],
    /// The generation of the instance that is running, 0 when none.
    alive: Arc<AtomicU64>,
}

impl Ctr {
    fn running(&self) -> bool {
        matches!(self.state, CState::Running { .. })
    }

    fn ready(&self) -> bool {
        self.running()
            && self.started
            && !self.killing
            && self
                .spec
                .readiness_probe
                .as_ref()
                .is_none_or(|_| self.probes[Kind::Readiness as usize].result == Some(true))
    }
}

pub fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Whether `image` names the busybox image this node has: `busybox`,
/// `busybox:TAG`, `library/busybox`, `docker.io/library/busybox[:TAG]`
/// (digests too).
pub fn is_busybox(image: &str) -> bool {
    let name = image.split('@').next().unwrap_or("");
    // A ':' after the last '/' starts the tag.
    let name = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => &name[..i],
        _ => name,
    };
    matches!(
        name,
        "busybox"
            | "library/busybox"
            | "docker.io/busybox"
            | "docker.io/library/busybox"
            | "index.docker.io/library/busybox"
            | "registry-1.docker.io/library/busybox"
    )
}

/// Expands `$(VAR)` from `env` (`$$` is a literal `$`; unknown variables
/// stay as written), as the kubelet does for command, args and env.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('(')
            && let Some(end) = r.find(')')
        {
            let name = &r[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The `{SVC}_SERVICE_HOST`-style variables for the given services.
pub fn service_env(services: &[Service]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in services {
        let Some(spec) = &s.spec else { continue };
        let Some(ip) = spec.cluster_ip.as_deref() else {
            continue;
        };
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let ports = spec.ports.as_deref().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        let name = s
            .metadata
            .name
            .as_deref()
            .unwrap_or("")
            .to_uppercase()
            .replace('-', "_");
        out.push((format!("{name}_SERVICE_HOST"), ip.to_string()));
        out.push((format!("{name}_SERVICE_PORT"), first.port.to_string()));
        for p in ports {
            if let Some(pn) = p.name.as_deref().filter(|n| !n.is_empty()) {
                out.push((
                    format!(
                        "{name}_SERVICE_PORT_{}",
                        pn.to_uppercase().replace('-', "_")
                    ),
                    p.port.to_string(),
                ));
            }
        }
        let proto = |p: &k8s_openapi::api::core::v1::ServicePort| {
            p.protocol.clone().unwrap_or_else(|| "TCP".into())
        };
        out.push((
            format!("{name}_PORT"),
            format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port),
        ));
        for p in ports {
            let pr = proto(p);
            let base = format!("{name}_PORT_{}_{}", p.port, pr.to_uppercase());
            out.push((
                base.clone(),
                format!("{}://{ip}:{}", pr.to_lowercase(), p.port),
            ));
            out.push((format!("{base}_PROTO"), pr.to_lowercase()));
            out.push((format!("{base}_PORT"), p.port.to_string()));
            out.push((format!("{base}_ADDR"), ip.to_string()));
        }
    }
    out
}

/// A resource quantity in base units (bytes, or cores for cpu); `milli`
/// gives thousandths.
fn quantity(q: &str, milli: bool) -> Option<i64> {
    let q = q.trim();
    let (num, mult): (&str, f64) = if let Some(n) = q.strip_suffix("Ki") {
        (n, 1024.0)
    } else if let Some(n) = q.strip_suffix("Mi") {
        (n, 1024.0 * 1024.0)
    } else if let Some(n) = q.strip_suffix("Gi") {
        (n, 1024.0 * 1024.0 * 1024.0)
    } else if let Some(n) = q.strip_suffix('k') {
        (n, 1e3)
    } else if let Some(n) = q.strip_suffix('M') {
        (n, 1e6)
    } else if let Some(n) = q.strip_suffix('G') {
        (n, 1e9)
    } else if let Some(n) = q.strip_suffix('m') {
        (n, 1e-3)
    } else {
        (q, 1.0)
    };
    let v: f64 = num.parse().ok()?;
    let v = v * mult * if milli { 1000.0 } else { 1.0 };
    Some(v.ceil() as i64)
}

pub struct Worker {
    sh: Arc<Shared>,
    uid: String,
    name: String,
    ns: String,
    hash: String,
    pod: Pod,
    dir: PathBuf,
    net: Option<PodNet>,
    sandbox_retry: Option<Instant>,
    ctrs: Vec<Ctr>,
    tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
    start_time: String,
    conds: BTreeMap<&'static str, (bool, String)>,
    posted: Option<Value>,
    stopping: bool,
    terminal: bool,
}

impl Worker {
    pub fn new(sh: Arc<Shared>, pod: Pod) -> Worker {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let hash = super::pod_hash(&uid);
        let spec = pod.spec.clone().unwrap_or_default();
        // Restart counts survive a kubelet restart through the status.
        let prev: BTreeMap<String, i32> = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .map(|c| (c.name.clone(), c.restart_count))
            .collect();
        let ctrs = spec
            .containers
            .iter()
            .map(|c| Ctr {
                id: format!("kc-{hash}-{}", c.name),
                spec: c.clone(),
                epoch: 0,
                state: CState::Waiting {
                    reason: "ContainerCreating".into(),
                    message: None,
                },
                last_term: None,
                restart_count: prev.get(&c.name).copied().unwrap_or(0),
                ever_ran: prev.contains_key(&c.name) && prev.get(&c.name).copied().unwrap_or(0) > 0,
                started: c.startup_probe.is_none(),
                done: false,
                killing: false,
                backoff_until: None,
                next_backoff: Duration::ZERO,
                image_failures: 0,
                probes: Default::default(),
                alive: Arc::new(AtomicU64::new(0)),
            })
            .collect();
        let start_time = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_else(now);
        let (tx, rx) = mpsc::unbounded_channel();
        Worker {
            dir: sh.cfg.root_dir.join("pods").join(&uid),
            uid,
            name: pod.metadata.name.clone().unwrap_or_default(),
            ns: pod.metadata.namespace.clone().unwrap_or_default(),
            hash,
            pod,
            net: None,
            sandbox_retry: None,
            ctrs,
            tx,
            rx,
            start_time,
            conds: BTreeMap::new(),
            posted: None,
            stopping: false,
            terminal: false,
            sh,
        }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.sh.client.clone(), &self.ns)
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    fn event(&self, kind: &str, reason: &str, message: String, ctr: Option<&str>) {
        self.sh.event(
            &self.pod,
            kind,
            reason,
            message,
            ctr.map(|c| format!("spec.containers{{{c}}}")),
        );
    }

    pub async fn run(mut self, mut desired: watch::Receiver<Desired>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let d = desired.borrow_and_update().clone();
            self.pod = d.pod.clone();
            if d.gone || d.shutdown || self.pod.metadata.deletion_timestamp.is_some() {
                self.terminate(&d).await;
                return;
            }
            if self.net.is_none() && !self.terminal {
                self.setup_sandbox().await;
            }
            if self.net.is_some() {
                self.sync_containers().await;
            }
            if !self.terminal && !self.ctrs.is_empty() && self.ctrs.iter().all(|c| c.done) {
                // Nothing will run again: free the network, keep the status.
                self.terminal = true;
                self.teardown(false).await;
            }
            self.publish().await;
            tokio::select! {
                r = desired.changed() => {
                    if r.is_err() {
                        let mut d = desired.borrow().clone();
                        d.shutdown = true;
                        self.terminate(&d).await;
                        return;
                    }
                }
                Some(m) = self.rx.recv() => self.handle(m),
                _ = tick.tick() => {}
            }
        }
    }

    async fn setup_sandbox(&mut self) {
        if self.sandbox_retry.is_some_and(|t| Instant::now() < t) {
            return;
        }
        match self.try_setup_sandbox().await {
            Ok(pn) => {
                self.net = Some(pn);
                self.sandbox_retry = None;
            }
            Err(e) => {
                let msg = format!("Failed to create pod sandbox: {e:#}");
                eprintln!("kubelet: pod {}/{}: {msg}", self.ns, self.name);
                self.event("Warning", "FailedCreatePodSandBox", msg, None);
                self.sandbox_retry = Some(Instant::now() + Duration::from_secs(2));
                let _ = self.sh.teardown_net(&self.hash).await;
            }
        }
    }

    async fn try_setup_sandbox(&mut self) -> anyhow::Result<PodNet> {
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(self.dir.join("pod"), format!("{}/{}\n", self.ns, self.name))?;
        let ip = self.sh.allocate_ip(&self.uid)?;
        let pn = PodNet::new(&self.hash, ip);
        net::setup_pod(&self.sh.net, self.sh.bridge_index, self.sh.cidr, &pn).await?;
        std::fs::write(
            self.dir.join("hosts"),
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{}\n",
                self.name
            ),
        )?;
        std::fs::write(self.dir.join("hostname"), format!("{}\n", self.name))?;
        Ok(pn)
    }

    async fn sync_containers(&mut self) {
        let policy = self.restart_policy();
        let now = Instant::now();
        for i in 0..self.ctrs.len() {
            let c = &mut self.ctrs[i];
            if c.running() {
                self.probe_due(i);
                continue;
            }
            if c.done {
                continue;
            }
            let may_run = match &c.state {
                CState::Terminated(t) => match policy.as_str() {
                    "Never" => false,
                    "OnFailure" => t.exit_code != 0,
                    _ => true,
                },
                _ => true,
            };
            if !may_run {
                c.done = true;
                continue;
            }
            if c.backoff_until.is_some_and(|t| now < t) {
                if let CState::Waiting { reason, message } = &mut c.state
                    && reason == "ErrImagePull"
                {
                    let image = c.spec.image.clone().unwrap_or_default();
                    *reason = "ImagePullBackOff".into();
                    *message = Some(format!("Back-off pulling image \"{image}\""));
                    let msg = format!("Back-off pulling image \"{image}\"");
                    let name = c.spec.name.clone();
                    self.event("Normal", "BackOff", msg, Some(&name));
                }
                continue;
            }
            self.start(i).await;
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let base = self.sh.cfg.restart_backoff_base;
        let f = failures.saturating_sub(1).min(16);
        (base * 2u32.pow(f)).min(self.sh.cfg.restart_backoff_max)
    }

    async fn start(&mut self, i: usize) {
        let image = self.ctrs[i].spec.image.clone().unwrap_or_default();
        let cname = self.ctrs[i].spec.name.clone();
        if !is_busybox(&image) {
            let failures = {
                let c = &mut self.ctrs[i];
                c.image_failures += 1;
                c.image_failures
            };
            let delay = self.backoff(failures);
            let msg = format!(
                "Failed to pull image \"{image}\": no image registry is reachable from this node; \
                 it runs only the local busybox image (busybox, busybox:TAG, docker.io/library/busybox:TAG)"
            );
            self.event("Warning", "Failed", msg.clone(), Some(&cname));
            self.event(
                "Warning",
                "Failed",
                "Error: ErrImagePull".into(),
                Some(&cname),
            );
            let c = &mut self.ctrs[i];
            c.state = CState::Waiting {
                reason: "ErrImagePull".into(),
                message: Some(msg),
            };
            c.backoff_until = Some(Instant::now() + delay);
            return;
        }
        self.ctrs[i].image_failures = 0;
        self.event(
            "Normal",
            "Pulled",
            format!("Container image \"{image}\" already present on machine"),
            Some(&cname),
        );
        match self.launch(i).await {
            Ok(()) => {
                self.event(
                    "Normal",
                    "Created",
                    format!("Created container {cname}"),
                    Some(&cname),
                );
                self.event(
                    "Normal",
                    "Started",
                    format!("Started container {cname}"),
                    Some(&cname),
                );
            }
            Err(e) => {
                let msg = format!("{e:#}");
                self.event("Warning", "Failed", format!("Error: {msg}"), Some(&cname));
                let failures = {
                    let c = &mut self.ctrs[i];
                    c.image_failures += 1;
                    c.image_failures
                };
                let delay = self.backoff(failures);
                let c = &mut self.ctrs[i];
                c.state = CState::Waiting {
                    reason: "CreateContainerError".into(),
                    message: Some(msg),
                };
                c.backoff_until = Some(Instant::now() + delay);
            }
        }
    }

    async fn env(&self, c: &Container) -> anyhow::Result<Vec<(String, String)>> {
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("HOSTNAME".into(), self.name.clone()),
            ("HOME".into(), "/root".into()),
        ];
        let spec = self.pod.spec.clone().unwrap_or_default();
        if spec.enable_service_links != Some(false) {
            let mut services = Api::<Service>::namespaced(self.sh.client.clone(), &self.ns)
                .list(&ListParams::default())
                .await?
                .items;
            if self.ns != "default"
                && let Ok(Some(k)) = Api::<Service>::namespaced(self.sh.client.clone(), "default")
                    .get_opt("kubernetes")
                    .await
            {
                services.push(k);
            }
            env.extend(service_env(&services));
        }
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
            env.retain(|(n, _)| *n != k);
            env.push((k, v));
        };
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            if let Some(r) = &from.config_map_ref {
                let api = Api::<ConfigMap>::namespaced(self.sh.client.clone(), &self.ns);
                match api.get_opt(&r.name).await? {
                    Some(cm) => {
                        for (k, v) in cm.data.unwrap_or_default() {
                            set(&mut env, format!("{prefix}{k}"), v);
                        }
                    }
                    None if r.optional == Some(true) => {}
                    None => anyhow::bail!("configmap \"{}\" not found", r.name),
                }
            }
            if let Some(r) = &from.secret_ref {
                let api = Api::<Secret>::namespaced(self.sh.client.clone(), &self.ns);
                match api.get_opt(&r.name).await? {
                    Some(s) => {
                        for (k, v) in s.data.unwrap_or_default() {
                            set(
                                &mut env,
                                format!("{prefix}{k}"),
                                String::from_utf8_lossy(&v.0).into_owned(),
                            );
                        }
                    }
                    None if r.optional == Some(true) => {}
                    None => anyhow::bail!("secret \"{}\" not found", r.name),
                }
            }
        }
        let pod_ip = self
            .net
            .as_ref()
            .map(|n| n.ip.to_string())
            .unwrap_or_default();
        for e in c.env.iter().flatten() {
            let value = if let Some(v) = &e.value {
                expand(v, &env)
            } else if let Some(from) = &e.value_from {
                if let Some(f) = &from.field_ref {
                    let m = &self.pod.metadata;
                    match f.field_path.as_str() {
                        "metadata.name" => self.name.clone(),
                        "metadata.namespace" => self.ns.clone(),
                        "metadata.uid" => self.uid.clone(),
                        "spec.nodeName" => self.sh.cfg.node_name.clone(),
                        "spec.serviceAccountName" => {
                            spec.service_account_name.clone().unwrap_or_default()
                        }
                        "status.podIP" => pod_ip.clone(),
                        "status.hostIP" => self.sh.node_ip.to_string(),
                        p => {
                            let label = |pre: &str, map: &Option<BTreeMap<String, String>>| {
                                p.strip_prefix(pre)
                                    .and_then(|r| r.strip_suffix("']"))
                                    .and_then(|k| map.as_ref()?.get(k).cloned())
                            };
                            label("metadata.labels['", &m.labels)
                                .or_else(|| label("metadata.annotations['", &m.annotations))
                                .unwrap_or_default()
                        }
                    }
                } else if let Some(r) = &from.config_map_key_ref {
                    let api = Api::<ConfigMap>::namespaced(self.sh.client.clone(), &self.ns);
                    let v = api
                        .get_opt(&r.name)
                        .await?
                        .and_then(|cm| cm.data?.get(&r.key).cloned());
                    match v {
                        Some(v) => v,
                        None if r.optional == Some(true) => continue,
                        None => anyhow::bail!("configmap \"{}\" has no key {:?}", r.name, r.key),
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    let api = Api::<Secret>::namespaced(self.sh.client.clone(), &self.ns);
                    let v = api.get_opt(&r.name).await?.and_then(|s| {
                        s.data?
                            .get(&r.key)
                            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    });
                    match v {
                        Some(v) => v,
                        None if r.optional == Some(true) => continue,
                        None => anyhow::bail!("secret \"{}\" has no key {:?}", r.name, r.key),
                    }
                } else {
                    String::new()
                }
            } else {
                String::new()
            };
            set(&mut env, e.name.clone(), value);
        }
        Ok(env)
    }

    async fn launch(&mut self, i: usize) -> anyhow::Result<()> {
        let spec = self.ctrs[i].spec.clone();
        let env = self.env(&spec).await?;
        let command: Vec<String> = spec
            .command
            .iter()
            .flatten()
            .map(|s| expand(s, &env))
            .collect();
        let args: Vec<String> = spec
            .args
            .iter()
            .flatten()
            .map(|s| expand(s, &env))
            .collect();
        // busybox's image has no ENTRYPOINT and CMD ["sh"].
        let process = if !command.is_empty() {
            [command, args].concat()
        } else if !args.is_empty() {
            args
        } else {
            vec!["sh".to_string()]
        };
        let res = spec.resources.clone().unwrap_or_default();
        let get = |m: &Option<
            BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
        >,
                   k: &str,
                   milli: bool| {
            m.as_ref()
                .and_then(|m| m.get(k))
                .and_then(|q| quantity(&q.0, milli))
        };
        let net = self
            .net
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no pod network"))?;
        let netns = net.netns_path();
        let hosts = self.dir.join("hosts");
        let hostname_file = self.dir.join("hostname");
        let bundle = Bundle {
            args: process,
            env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cwd: spec
                .working_dir
                .clone()
                .filter(|w| !w.is_empty())
                .unwrap_or_else(|| "/".into()),
            hostname: self.name.chars().take(63).collect(),
            rootfs: &self.sh.cfg.busybox_rootfs,
            netns: &netns,
            cgroup: format!(
                "/kcontrol/{}/{}/{}",
                self.sh.cfg.node_name, self.hash, spec.name
            ),
            hosts: &hosts,
            hostname_file: &hostname_file,
            memory_limit: get(&res.limits, "memory", false),
            cpu_shares: get(&res.requests, "cpu", true).map(|m| (m as u64 * 1024 / 1000).max(2)),
            cpu_quota: get(&res.limits, "cpu", true).map(|m| (m * 100).max(1000)),
        };
        let bdir = self.dir.join(&spec.name);
        bundle.write(&bdir)?;
        let id = self.ctrs[i].id.clone();
        self.sh.rt.delete(&id).await?;
        let mut child = self
            .sh
            .rt
            .run(&id, &bdir, &self.dir.join(format!("{}.log", spec.name)))?;
        let c = &mut self.ctrs[i];
        if let CState::Terminated(t) = &c.state {
            c.last_term = Some(t.clone());
        }
        if c.ever_ran {
            c.restart_count += 1;
        }
        c.ever_ran = true;
        c.epoch += 1;
        c.alive.store(c.epoch, Ordering::SeqCst);
        c.killing = false;
        c.started = spec.startup_probe.is_none();
        let started = Instant::now();
        c.state = CState::Running {
            started_at: now(),
            since: started,
        };
        for k in [Kind::Startup, Kind::Liveness, Kind::Readiness] {
            c.probes[k as usize] = ProbeState {
                next_at: k
                    .spec(&spec)
                    .map(|p| started + probe::timing(p).initial_delay),
                ..Default::default()
            };
        }
        let (tx, epoch) = (self.tx.clone(), c.epoch);
        tokio::spawn(async move {
            use std::os::unix::process::ExitStatusExt;
            let code = match child.wait().await {
                Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9)),
                Err(_) => 255,
            };
            let _ = tx.send(Msg::Exited {
                ctr: i,
                epoch,
                code,
            });
        });
        Ok(())
    }

    fn probe_due(&mut self, i: usize) {
        let now = Instant::now();
        let pod_ip = match &self.net {
            Some(n) => IpAddr::V4(n.ip),
            None => return,
        };
        let c = &mut self.ctrs[i];
        if c.killing {
            return;
        }
        for k in [Kind::Startup, Kind::Liveness, Kind::Readiness] {
            let Some(p) = k.spec(&c.spec) else { continue };
            if (k == Kind::Startup) == c.started {
                continue;
            }
            let ps = &mut c.probes[k as usize];
            if ps.in_flight || ps.next_at.is_some_and(|t| now < t) {
                continue;
            }
            ps.in_flight = true;
            let (p, spec, rt, id, tx, epoch) = (
                p.clone(),
                c.spec.clone(),
                self.sh.rt.clone(),
                c.id.clone(),
                self.tx.clone(),
                c.epoch,
            );
            tokio::spawn(async move {
                let result = probe::run(&p, &spec, pod_ip, &rt, &id).await;
                let _ = tx.send(Msg::Probe {
                    ctr: i,
                    epoch,
                    kind: k,
                    result,
                });
            });
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Exited { ctr, epoch, code } => self.exited(ctr, epoch, code),
            Msg::Probe {
                ctr,
                epoch,
                kind,
                result,
            } => self.probed(ctr, epoch, kind, result),
        }
    }

    fn exited(&mut self, i: usize, epoch: u64, code: i32) {
        let policy = self.restart_policy();
        let base = self.sh.cfg.restart_backoff_base;
        let max = self.sh.cfg.restart_backoff_max;
        let stopping = self.stopping;
        let (pod, ns) = (self.name.clone(), self.ns.clone());
        let c = &mut self.ctrs[i];
        if epoch != c.epoch {
            return;
        }
        c.alive.store(0, Ordering::SeqCst);
        let (started_at, ran) = match &c.state {
            CState::Running { started_at, since } => (started_at.clone(), since.elapsed()),
            _ => (now(), Duration::ZERO),
        };
        let term = Term {
            exit_code: code,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            started_at,
            finished_at: now(),
        };
        c.state = CState::Terminated(term.clone());
        c.killing = false;
        c.started = c.spec.startup_probe.is_none();
        c.probes = Default::default();
        if stopping {
            c.done = true;
            return;
        }
        let restart = match policy.as_str() {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        };
        if !restart {
            c.done = true;
            return;
        }
        // A container that ran for 10 minutes starts its back-off afresh.
        if ran > Duration::from_secs(600) {
            c.next_backoff = Duration::ZERO;
        }
        let delay = c.next_backoff;
        c.next_backoff = if delay.is_zero() {
            base
        } else {
            (delay * 2).min(max)
        };
        if !delay.is_zero() {
            c.backoff_until = Some(Instant::now() + delay);
            c.last_term = Some(term);
            let name = c.spec.name.clone();
            c.state = CState::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: Some(format!(
                    "back-off {delay:?} restarting failed container={name} pod={pod}_{ns}"
                )),
            };
            self.event(
                "Warning",
                "BackOff",
                format!("Back-off restarting failed container {name} in pod {pod}_{ns}"),
                Some(&name),
            );
        } else {
            c.backoff_until = None;
        }
    }

    fn probed(&mut self, i: usize, epoch: u64, kind: Kind, result: Result<(), String>) {
        let c = &mut self.ctrs[i];
        if epoch != c.epoch || !c.running() {
            return;
        }
        let Some(p) = kind.spec(&c.spec) else { return };
        let t = probe::timing(p);
        let ps = &mut c.probes[kind as usize];
        ps.in_flight = false;
        ps.next_at = Some(Instant::now() + t.period);
        let name = c.spec.name.clone();
        let mut failed_now = false;
        match result {
            Ok(()) => {
                ps.failures = 0;
                ps.successes += 1;
                if ps.successes >= t.success_threshold {
                    ps.result = Some(true);
                }
            }
            Err(msg) => {
                ps.successes = 0;
                ps.failures += 1;
                if ps.failures >= t.failure_threshold {
                    ps.result = Some(false);
                    failed_now = true;
                }
                self.event(
                    "Warning",
                    "Unhealthy",
                    format!("{} probe failed: {msg}", kind.title()),
                    Some(&name),
                );
            }
        }
        let c = &mut self.ctrs[i];
        match kind {
            Kind::Startup if c.probes[0].result == Some(true) => c.started = true,
            Kind::Startup | Kind::Liveness if failed_now => {
                let why = format!("failed {} probe", kind.title().to_lowercase());
                self.kill_for_restart(i, &why);
            }
            _ => {}
        }
    }

    fn grace_seconds(&self) -> u64 {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30)
            .max(0) as u64
    }

    /// SIGTERM now, SIGKILL after the pod's grace period.
    fn kill_for_restart(&mut self, i: usize, why: &str) {
        let grace = Duration::from_secs(self.grace_seconds());
        let c = &mut self.ctrs[i];
        c.killing = true;
        let name = c.spec.name.clone();
        let (rt, id, alive, epoch) = (self.sh.rt.clone(), c.id.clone(), c.alive.clone(), c.epoch);
        self.event(
            "Normal",
            "Killing",
            format!("Container {name} {why}, will be restarted"),
            Some(&name),
        );
        tokio::spawn(async move {
            let _ = rt.kill(&id, "TERM").await;
            let deadline = tokio::time::Instant::now() + grace;
            // Done once that instance's exit was seen.
            while tokio::time::Instant::now() < deadline {
                if alive.load(Ordering::SeqCst) != epoch {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if alive.load(Ordering::SeqCst) == epoch {
                let _ = rt.kill(&id, "KILL").await;
            }
        });
    }

    /// Stops every container (SIGTERM, the grace period, SIGKILL), tears the
    /// pod down, and unless the kubelet is only shutting down, posts the
    /// final status and deletes the pod for good.
    async fn terminate(&mut self, d: &Desired) {
        self.stopping = true;
        let mut grace = if d.gone {
            self.grace_seconds()
        } else {
            self.pod
                .metadata
                .deletion_grace_period_seconds
                .unwrap_or(self.grace_seconds() as i64)
                .max(0) as u64
        };
        if d.shutdown {
            grace = grace.min(self.sh.cfg.shutdown_grace.as_secs());
        }
        let running: Vec<usize> = (0..self.ctrs.len())
            .filter(|&i| self.ctrs[i].running())
            .collect();
        for &i in &running {
            let name = self.ctrs[i].spec.name.clone();
            self.event(
                "Normal",
                "Killing",
                format!("Stopping container {name}"),
                Some(&name),
            );
            let _ = self.sh.rt.kill(&self.ctrs[i].id, "TERM").await;
        }
        let deadline = Instant::now() + Duration::from_secs(grace);
        self.wait_exits(deadline).await;
        if self.ctrs.iter().any(Ctr::running) {
            for c in self.ctrs.iter().filter(|c| c.running()) {
                let _ = self.sh.rt.kill(&c.id, "KILL").await;
            }
            self.wait_exits(Instant::now() + Duration::from_secs(10))
                .await;
        }
        for c in &mut self.ctrs {
            c.done = true;
            if c.running() {
                // Gone without an exit seen: report it killed.
                c.state = CState::Terminated(Term {
                    exit_code: 137,
                    reason: "Error".into(),
                    started_at: now(),
                    finished_at: now(),
                });
            }
        }
        if !d.gone && !d.shutdown {
            self.terminal = true;
            self.publish().await;
        }
        self.teardown(true).await;
        if !d.gone && !d.shutdown {
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(self.uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            if let Err(e) = self.pods().delete(&self.name, &dp).await {
                let not_found = matches!(&e, kube::Error::Api(s) if s.code == 404 || s.code == 409);
                if !not_found {
                    eprintln!("kubelet: deleting pod {}/{}: {e}", self.ns, self.name);
                }
            }
        }
    }

    async fn wait_exits(&mut self, deadline: Instant) {
        while self.ctrs.iter().any(Ctr::running) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            tokio::select! {
                Some(m) = self.rx.recv() => {
                    if let Msg::Exited { ctr, epoch, code } = m {
                        self.exited(ctr, epoch, code);
                    }
                }
                _ = tokio::time::sleep(left) => return,
            }
        }
    }

    /// Removes the pod's containers, network, cgroups and files; with
    /// `all` also its address and state directory.
    async fn teardown(&mut self, all: bool) {
        for c in &self.ctrs {
            if let Err(e) = self.sh.rt.delete(&c.id).await {
                eprintln!("kubelet: {e:#}");
            }
        }
        if let Err(e) = self.sh.teardown_net(&self.hash).await {
            eprintln!("kubelet: pod {}/{}: {e:#}", self.ns, self.name);
        }
        if let Err(e) = super::runtime::remove_cgroups(&format!(
            "kcontrol/{}/{}",
            self.sh.cfg.node_name, self.hash
        )) {
            eprintln!("kubelet: pod {}/{}: {e:#}", self.ns, self.name);
        }
        if all {
            self.sh.release_ip(&self.uid);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn status(&mut self) -> Value {
        let policy = self.restart_policy();
        let statuses: Vec<Value> = self
            .ctrs
            .iter()
            .map(|c| {
                let state = match &c.state {
                    CState::Waiting { reason, message } => {
                        let mut w = json!({ "reason": reason });
                        if let Some(m) = message {
                            w["message"] = json!(m);
                        }
                        json!({ "waiting": w })
                    }
                    CState::Running { started_at, .. } => {
                        json!({ "running": { "startedAt": started_at } })
                    }
                    CState::Terminated(t) => t.json(),
                };
                let image = c.spec.image.clone().unwrap_or_default();
                let mut s = json!({
                    "name": c.spec.name,
                    "image": image,
                    "imageID": if is_busybox(&image) { "local://busybox" } else { "" },
                    "state": state,
                    "lastState": c.last_term.as_ref().map_or(json!({}), Term::json),
                    "ready": c.ready(),
                    "restartCount": c.restart_count,
                    "started": c.running() && c.started,
                });
                if c.ever_ran {
                    s["containerID"] = json!(format!("crun://{}", c.id));
                }
                s
            })
            .collect();
        let all_done = !self.ctrs.is_empty() && self.ctrs.iter().all(|c| c.done);
        let phase = if all_done {
            let ok = self
                .ctrs
                .iter()
                .all(|c| matches!(&c.state, CState::Terminated(t) if t.exit_code == 0));
            // A pod whose containers always restart ends only by deletion;
            // report what its containers did.
            if ok && policy != "Always" {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if self.net.is_some() && self.ctrs.iter().any(|c| c.running() || c.ever_ran) {
            "Running"
        } else {
            "Pending"
        };
        let ready = self.ctrs.iter().all(Ctr::ready) && !self.ctrs.is_empty();
        let wanted: [(&'static str, bool); 5] = [
            ("PodReadyToStartContainers", self.net.is_some()),
            ("Initialized", true),
            ("ContainersReady", ready),
            ("Ready", ready),
            ("PodScheduled", true),
        ];
        let mut conditions = Vec::new();
        for (t, ok) in wanted {
            let e = self.conds.entry(t).or_insert((ok, now()));
            if e.0 != ok {
                *e = (ok, now());
            }
            let mut c = json!({
                "type": t,
                "status": if ok { "True" } else { "False" },
                "lastProbeTime": null,
                "lastTransitionTime": e.1,
            });
            if !ok && (t == "Ready" || t == "ContainersReady") {
                let not_ready: Vec<&str> = self
                    .ctrs
                    .iter()
                    .filter(|c| !c.ready())
                    .map(|c| c.spec.name.as_str())
                    .collect();
                c["reason"] = json!("ContainersNotReady");
                c["message"] = json!(format!(
                    "containers with unready status: [{}]",
                    not_ready.join(" ")
                ));
            }
            conditions.push(c);
        }
        let host_ip = self.sh.node_ip.to_string();
        let mut st = json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": host_ip,
            "hostIPs": [{ "ip": host_ip }],
            "startTime": self.start_time,
            "containerStatuses": statuses,
        });
        if let Some(n) = &self.net {
            st["podIP"] = json!(n.ip.to_string());
            st["podIPs"] = json!([{ "ip": n.ip.to_string() }]);
        } else if let Some(prev) = self.posted.as_ref().and_then(|p| p.get("podIP")).cloned() {
            // Keep the address a finished pod had.
            st["podIP"] = prev.clone();
            st["podIPs"] = json!([{ "ip": prev }]);
        }
        st
    }

    async fn publish(&mut self) {
        let st = self.status();
        if self.posted.as_ref() == Some(&st) {
            return;
        }
        let patch = json!({ "status": st });
        match self
            .pods()
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.posted = Some(st),
            Err(kube::Error::Api(s)) if s.code == 404 => self.posted = Some(st),
            Err(e) => eprintln!(
                "kubelet: updating the status of {}/{}: {e}",
                self.ns, self.name
            ),
        }
    }
}

/// Posts an event about `pod` (in the background; failures are logged).
pub fn post_event(
    client: kube::Client,
    node: String,
    pod: &Pod,
    kind: &str,
    reason: &str,
    message: String,
    field_path: Option<String>,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let suffix: u64 = {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        u64::from_le_bytes(b)
    };
    let t = now();
    let mut involved = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "name": name,
        "namespace": ns,
        "uid": pod.metadata.uid,
    });
    if let Some(f) = field_path {
        involved["fieldPath"] = json!(f);
    }
    let ev = json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": { "name": format!("{name}.{suffix:016x}"), "namespace": ns },
        "involvedObject": involved,
        "reason": reason,
        "message": message,
        "type": kind,
        "source": { "component": "kubelet", "host": node },
        "reportingComponent": "kubelet",
        "reportingInstance": node,
        "firstTimestamp": t,
        "lastTimestamp": t,
        "count": 1,
    });
    let reason = reason.to_string();
    tokio::spawn(async move {
        let ev: k8s_openapi::api::core::v1::Event = match serde_json::from_value(ev) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("kubelet: building an event: {e}");
                return;
            }
        };
        let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client, &ns);
        if let Err(e) = api.create(&PostParams::default(), &ev).await {
            eprintln!("kubelet: posting event {reason} for {ns}/{name}: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_names() {
        for ok in [
            "busybox",
            "busybox:1.36",
            "busybox:latest",
            "docker.io/library/busybox",
            "docker.io/library/busybox:1.35",
            "library/busybox",
            "busybox@sha256:abc",
        ] {
            assert!(is_busybox(ok), "{ok}");
        }
        for bad in [
            "nginx",
            "quay.io/busybox",
            "busybox2",
            "myreg:5000/busybox",
            "",
        ] {
            assert!(!is_busybox(bad), "{bad}");
        }
    }

    #[test]
    fn expansion() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("x$(A)y", &env), "x1y");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("a$b", &env), "a$b");
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity("64Mi", false), Some(64 << 20));
        assert_eq!(quantity("500m", true), Some(500));
        assert_eq!(quantity("2", true), Some(2000));
        assert_eq!(quantity("1G", false), Some(1_000_000_000));
        assert_eq!(quantity("x", false), None);
    }

    #[test]
    fn service_variables() {
        let s: Service = serde_json::from_value(json!({
            "metadata": { "name": "my-svc" },
            "spec": { "clusterIP": "10.96.0.5", "ports": [
                { "name": "http", "port": 80, "protocol": "TCP" },
                { "port": 53, "protocol": "UDP" },
            ]},
        }))
        .unwrap();
        let env: BTreeMap<_, _> = service_env(&[s]).into_iter().collect();
        assert_eq!(env["MY_SVC_SERVICE_HOST"], "10.96.0.5");
        assert_eq!(env["MY_SVC_SERVICE_PORT"], "80");
        assert_eq!(env["MY_SVC_SERVICE_PORT_HTTP"], "80");
        assert_eq!(env["MY_SVC_PORT"], "tcp://10.96.0.5:80");
        assert_eq!(env["MY_SVC_PORT_53_UDP_ADDR"], "10.96.0.5");
        assert_eq!(env["MY_SVC_PORT_53_UDP_PROTO"], "udp");
    }
}
