//! One task per pod bound to the node: builds its network, runs its
//! containers with crun (restart policy with back-off, probes), reports
//! status and events, and on deletion stops it within the grace period,
//! tears everything down and removes the pod from the API.
//!
//! This file is the worker's life cycle; what a container runs with is in
//! `container.rs`, what the pod reports in `status.rs`.

mod container;
mod status;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use kube::api::{Api, DeleteParams, Preconditions};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::Shared;
use super::net::{self, PodNet};
use super::probe;
use container::is_busybox;
pub use status::post_event;

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
        let hash = kcontrol_names::pod_hash(&uid);
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
                id: kcontrol_names::container_id(&hash, &c.name),
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
            // Wake for the next due probe (readiness is then reported as
            // soon as the probe passes), at the latest after 500 ms.
            // Only probes `probe_due` would run now count, so a due but
            // gated probe (liveness before startup passed) cannot spin.
            let wake = self
                .ctrs
                .iter()
                .filter(|c| c.running() && !c.killing && self.net.is_some())
                .flat_map(|c| {
                    [Kind::Startup, Kind::Liveness, Kind::Readiness]
                        .into_iter()
                        .filter(move |k| {
                            k.spec(&c.spec).is_some() && (*k == Kind::Startup) != c.started
                        })
                        .map(move |k| &c.probes[k as usize])
                })
                .filter(|p| !p.in_flight)
                .filter_map(|p| p.next_at)
                .fold(Instant::now() + Duration::from_millis(500), |a, b| a.min(b))
                .max(Instant::now() + Duration::from_millis(5));
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
                _ = tokio::time::sleep_until(wake.into()) => {}
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
}
