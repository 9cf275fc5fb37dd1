//! `kproxy`: the node agent. Reads Services and EndpointSlices, programs the
//! eBPF dataplane, follows changes, and detaches cleanly on SIGINT/SIGTERM.
//!
//! Stdout carries one line per lifecycle event, for people and scripts:
//! `kproxy: attached …`, `kproxy: ready …`, `kproxy: applied …`,
//! `kproxy: rejected <file>: …`, `kproxy: detached`. Diagnostics go to
//! stderr through `log`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use proxy_common::{MAX_CONNTRACK, MAX_SERVICES, MAX_SLOTS};
use proxy_user::dataplane::{AttachMode, Dataplane, LoadOptions};
use proxy_user::iptables::Iptables;
use proxy_user::kube_source::{self, ApiEvent, ApiState};
use proxy_user::links;
use proxy_user::metrics::{self, Metrics, ScrapeRequest, Snapshot};
use proxy_user::model::DesiredState;
use proxy_user::reconcile;
use proxy_user::source::ManifestSource;
use proxy_user::watch::{Events, Inotify};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(
    name = "kproxy",
    version,
    about = "Kubernetes service dataplane in eBPF"
)]
struct Args {
    /// Service and EndpointSlice manifests: a YAML/JSON file or a directory of
    /// them. Followed for changes.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present_any = ["kubeconfig", "in_cluster"],
        conflicts_with_all = ["kubeconfig", "in_cluster"]
    )]
    manifests: Option<PathBuf>,
    /// Watch Services and EndpointSlices of the Kubernetes API described by
    /// this kubeconfig (kcontrol apiserver or any cluster).
    #[arg(long, value_name = "FILE", conflicts_with = "in_cluster")]
    kubeconfig: Option<PathBuf>,
    /// Watch the Kubernetes API with the pod's service account (in-cluster
    /// configuration, or $KUBECONFIG).
    #[arg(long)]
    in_cluster: bool,
    /// Name of the node this agent runs on; logged at start (nothing uses it
    /// yet: node-local traffic policies are not implemented).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Datapath: eBPF TC programs, or kube-proxy-style iptables rules (for
    /// comparison).
    #[arg(long, value_enum, default_value = "ebpf")]
    mode: Mode,
    /// Interfaces that face clients (comma-separated): ingress translates
    /// ClusterIP traffic, egress restores replies. eBPF mode needs this or
    /// --iface-prefix; iptables rules apply to the whole network namespace.
    #[arg(long, value_name = "IF[,IF…]", value_delimiter = ',')]
    iface: Vec<String>,
    /// eBPF mode: also attach to every interface whose name starts with one
    /// of these prefixes, now and as they appear (rtnetlink link events) —
    /// e.g. the kubelet's pod veths (`kcv`). Vanished ones are released.
    #[arg(long, value_name = "PREFIX[,PREFIX…]", value_delimiter = ',')]
    iface_prefix: Vec<String>,
    /// iptables mode: masquerade service traffic from outside this pod CIDR
    /// (kube-proxy's --cluster-cidr). Without it only hairpin traffic is
    /// masqueraded.
    #[arg(long, value_name = "CIDR")]
    cluster_cidr: Option<proxy_user::iptables::Cidr>,
    /// How to attach the TC programs: tcx links (kernel ≥ 6.6), netlink
    /// (clsact qdisc + cls_bpf), or auto (tcx where available).
    #[arg(long, value_enum, default_value = "auto")]
    attach: AttachArg,
    /// Agent log level (stderr).
    #[arg(long, default_value = "info")]
    log_level: log::LevelFilter,
    /// In-kernel aya-log level. `off` keeps logging off the hot path.
    #[arg(long, value_enum, default_value = "off")]
    bpf_log_level: BpfLogLevel,
    /// How often to check the manifests for changes, in milliseconds.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    poll_interval_ms: u64,
    /// Capacity of the frontend table (ClusterIP:port/protocol entries).
    #[arg(long, default_value_t = MAX_SERVICES, value_parser = clap::value_parser!(u32).range(1..))]
    max_services: u32,
    /// Capacity of the backend-slot table (sum of backends over frontends).
    #[arg(long, default_value_t = MAX_SLOTS, value_parser = clap::value_parser!(u32).range(1..))]
    max_backends: u32,
    /// bpffs directory for pinned maps and tcx links (mounted if needed,
    /// root-only). A restarted agent — also after `kill -9` — adopts what it
    /// finds there, so established flows keep working through the restart.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/kproxy")]
    pin_dir: PathBuf,
    /// Pin nothing: the datapath lives and dies with this process.
    #[arg(long)]
    no_pin: bool,
    /// On SIGINT/SIGTERM leave the datapath attached and pinned for the next
    /// agent (graceful restart/upgrade) instead of removing everything.
    #[arg(long)]
    keep_datapath_on_exit: bool,
    /// Address for /metrics (Prometheus), /healthz and /readyz; `off` to
    /// disable.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
    metrics_addr: String,
    /// Capacity of the LRU conntrack table (two entries per flow).
    #[arg(long, default_value_t = MAX_CONNTRACK, value_parser = clap::value_parser!(u32).range(2..))]
    conntrack_size: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Ebpf,
    Iptables,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AttachArg {
    Auto,
    Tcx,
    Netlink,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BpfLogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

fn main() {
    let args = Args::parse();
    env_logger::Builder::new()
        .filter_level(args.log_level)
        .format_target(false)
        .init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("kproxy: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    // Read the manifests before touching the kernel: a bad start changes
    // nothing.
    let load_started = Instant::now();
    let mut api = None;
    let mut source = match &args.manifests {
        Some(path) => {
            let mut source = ManifestSource::new(path);
            let first = source.refresh(None);
            if let Some(e) = first.rejected.first() {
                bail!("initial manifests: {e}");
            }
            source
        }
        None => {
            // The API source: wait for the first complete list of both
            // kinds, so the datapath starts from the whole picture.
            let client = kube_source::client(args.kubeconfig.as_deref()).await?;
            let mut events = kube_source::spawn_watchers(client);
            let mut state = ApiState::default();
            let mut source = ManifestSource::new("api");
            while !state.synced() {
                let Some(ev) = events.recv().await else {
                    bail!("Kubernetes API watchers stopped");
                };
                for e in state.handle(&mut source, ev).rejected {
                    println!("kproxy: rejected {}: {}", e.file.display(), e.message);
                }
            }
            api = Some((events, state));
            source
        }
    };
    if let Some(node) = &args.node_name {
        log::info!("running on node {node}");
    }
    let load_us = load_started.elapsed().as_micros();

    if args.mode == Mode::Ebpf
        && args
            .iface
            .iter()
            .chain(&args.iface_prefix)
            .all(|i| i.is_empty())
    {
        bail!("eBPF mode needs --iface IF[,IF…] or --iface-prefix PREFIX");
    }
    // Subscribed before the first listing, so no interface slips between.
    let links = if args.mode == Mode::Ebpf && !args.iface_prefix.is_empty() {
        let w = links::LinkWatcher::new().context("subscribing to rtnetlink link events")?;
        // SAFETY: the watcher owns its fd and lives inside the AsyncFd.
        Some(unsafe { AsyncFd::register_with_interest(w, Interest::READABLE) }?)
    } else {
        None
    };
    let mut proxier = match args.mode {
        Mode::Ebpf => Proxier::Ebpf(Box::new(start_ebpf(&args)?)),
        Mode::Iptables => {
            if !args.iface.is_empty() {
                log::info!("iptables mode: --iface is ignored (rules cover the namespace)");
            }
            Proxier::Iptables(Iptables::new(args.cluster_cidr)?)
        }
    };

    let metrics = Metrics::new();
    let (scrape_tx, mut scrape_rx) = tokio::sync::mpsc::channel::<ScrapeRequest>(4);
    if args.metrics_addr != "off" {
        let addr: std::net::SocketAddr = args
            .metrics_addr
            .parse()
            .with_context(|| format!("--metrics-addr {:?} is not HOST:PORT", args.metrics_addr))?;
        let bound = metrics::serve(addr, metrics.ready.clone(), scrape_tx).await?;
        println!("kproxy: metrics on http://{bound}/metrics");
    }

    let sync_started = Instant::now();
    // Against what the datapath already holds: nothing on a fresh start, the
    // adopted tables after a restart (then only the difference is written
    // and conntrack survives).
    let initial = reconcile::diff(&proxier.programmed_state(), source.state());
    if let Err(e) = proxier.apply(&initial) {
        let _ = proxier.shutdown();
        return Err(e);
    }
    if let Proxier::Ebpf(dp) = &mut proxier {
        dp.sync_names(source.state());
    }
    metrics
        .sync_duration
        .observe(sync_started.elapsed().as_secs_f64());
    metrics.services.set(proxier.service_count() as i64);
    metrics.backends.set(proxier.backend_count() as i64);
    metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    println!(
        "kproxy: ready services={} backends={} load_us={load_us} sync_us={}",
        proxier.service_count(),
        proxier.backend_count(),
        sync_started.elapsed().as_micros()
    );

    // inotify names changed files at once; the poll is the safety net.
    let inotify = match args
        .manifests
        .as_deref()
        .map_or(
            Err(std::io::Error::other("no manifests to watch")),
            Inotify::new,
        )
        .and_then(|i| {
            // SAFETY: the Inotify owns its fd and lives inside the AsyncFd.
            unsafe { AsyncFd::register_with_interest(i, Interest::READABLE) }
                .map_err(|e| std::io::Error::other(e.to_string()))
        }) {
        Ok(fd) => Some(fd),
        Err(e) => {
            if args.manifests.is_some() {
                log::warn!("inotify unavailable ({e}); relying on polling");
            }
            None
        }
    };
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(args.poll_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut generation = 1u64;
    // Set when an apply failed: the next round re-diffs the whole state.
    let mut resync = false;
    loop {
        let input = tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = tick.tick(), if args.manifests.is_some() => Input::Files(None),
            Some(ev) = next_api_event(api.as_mut()) => Input::Api(ev),
            events = next_link_events(links.as_ref()) => {
                if let Proxier::Ebpf(dp) = &mut proxier {
                    match events {
                        Ok(events) => follow_links(dp, &args, events),
                        Err(e) => log::warn!("reading link events: {e}"),
                    }
                }
                continue;
            }
            Some(reply) = scrape_rx.recv() => {
                let snap = match &proxier {
                    Proxier::Ebpf(dp) => snapshot(dp),
                    Proxier::Iptables(_) => None,
                };
                let _ = reply.send(metrics.render(snap.as_ref()));
                continue;
            }
            events = next_events(inotify.as_ref()) => match events {
                Ok(Events::Paths(p)) => Input::Files(Some(p)),
                Ok(Events::Rescan) => Input::Files(None),
                Err(e) => {
                    log::warn!("reading inotify events: {e}");
                    Input::Files(None)
                }
            },
        };
        let started = Instant::now();
        let refresh = match input {
            Input::Files(hint) => source.refresh(hint.as_ref()),
            Input::Api(ev) => match api.as_mut() {
                Some((_, state)) => state.handle(&mut source, ev),
                None => continue,
            },
        };
        for e in &refresh.rejected {
            println!(
                "kproxy: rejected {}: {} (previous state kept)",
                e.file.display(),
                e.message
            );
            log::error!("manifest rejected, previous state kept: {e}");
            metrics.manifests_rejected.inc();
        }
        let changes = if resync {
            reconcile::diff(&proxier.programmed_state(), source.state())
        } else {
            refresh.changes
        };
        if changes.is_empty() {
            continue;
        }
        match proxier.apply(&changes) {
            Ok(stats) => {
                metrics
                    .sync_duration
                    .observe(started.elapsed().as_secs_f64());
                metrics.services.set(proxier.service_count() as i64);
                metrics.backends.set(proxier.backend_count() as i64);
                resync = false;
                generation += 1;
                log::debug!("applied {} changes: {stats:?}", changes.len());
                println!(
                    "kproxy: applied generation={generation} services={} backends={} changes={} took_us={}",
                    proxier.service_count(),
                    proxier.backend_count(),
                    changes.len(),
                    started.elapsed().as_micros()
                );
            }
            Err(e) => {
                // The datapath holds a consistent prefix of the changes;
                // the next round re-diffs against what it really holds.
                resync = true;
                metrics.sync_errors.inc();
                println!("kproxy: error applying changes: {e:#}");
                log::error!("applying changes failed: {e:#}");
            }
        }
    }

    if let Proxier::Ebpf(dp) = &proxier {
        report_counters(dp);
    }
    if args.keep_datapath_on_exit && args.mode == Mode::Ebpf && !args.no_pin {
        println!(
            "kproxy: exiting, datapath left attached and pinned under {}",
            args.pin_dir.display()
        );
        return Ok(());
    }
    proxier.shutdown()?;
    println!("kproxy: detached");
    Ok(())
}

/// What woke the agent loop up.
enum Input {
    /// Manifest files changed (these, or any when `None`).
    Files(Option<std::collections::BTreeSet<PathBuf>>),
    /// A Kubernetes API watch event.
    Api(ApiEvent),
}

/// The next Kubernetes API event, or never without the API source.
async fn next_api_event(
    api: Option<&mut (tokio::sync::mpsc::Receiver<ApiEvent>, ApiState)>,
) -> Option<ApiEvent> {
    match api {
        Some((rx, _)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next batch of inotify events, or never when there is no inotify.
async fn next_events(fd: Option<&AsyncFd<Inotify>>) -> std::io::Result<Events> {
    let Some(fd) = fd else {
        return std::future::pending().await;
    };
    loop {
        let mut guard = fd.readable().await?;
        match guard.get_inner().read() {
            Ok(Events::Paths(p)) if p.is_empty() => guard.clear_ready(),
            other => {
                guard.clear_ready();
                return other;
            }
        }
    }
}

/// The next batch of rtnetlink link events, or never without a watcher.
async fn next_link_events(
    fd: Option<&AsyncFd<links::LinkWatcher>>,
) -> std::io::Result<Vec<links::LinkEvent>> {
    let Some(fd) = fd else {
        return std::future::pending().await;
    };
    loop {
        let mut guard = fd.readable().await?;
        match guard.get_inner().read() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => guard.clear_ready(),
            other => return other,
        }
    }
}

/// Attaches to interfaces matching `--iface-prefix` that appeared and
/// releases those that vanished.
fn follow_links(dp: &mut Dataplane, args: &Args, events: Vec<links::LinkEvent>) {
    let mut rescan = false;
    for ev in events {
        match ev {
            links::LinkEvent::Present(name) if links::matches(&args.iface_prefix, &name) => {
                attach_followed(dp, args, &name);
            }
            links::LinkEvent::Gone(name) if dp.forget(&name) => {
                println!("kproxy: released {name}");
            }
            links::LinkEvent::Rescan => rescan = true,
            _ => {}
        }
    }
    if rescan {
        attach_matching(dp, args);
    }
}

/// Compares the attachments with the interfaces that exist now: attaches to
/// matching ones not attached yet, releases the vanished.
fn attach_matching(dp: &mut Dataplane, args: &Args) {
    let present = match links::current_links() {
        Ok(p) => p,
        Err(e) => {
            log::warn!("listing interfaces: {e}");
            return;
        }
    };
    for (name, _) in dp.attached() {
        if !present.contains(&name) && dp.forget(&name) {
            println!("kproxy: released {name}");
        }
    }
    for name in present {
        if links::matches(&args.iface_prefix, &name) {
            attach_followed(dp, args, &name);
        }
    }
}

fn attach_followed(dp: &mut Dataplane, args: &Args, name: &str) {
    if dp.is_attached(name) {
        return;
    }
    let mode = attach_mode(args);
    match dp.attach(name, mode) {
        Ok(()) => println!("kproxy: attached {name} mode={mode}"),
        // It may already be gone again (or moved into a pod's namespace).
        Err(e) => log::warn!("attaching to {name}: {e:#}"),
    }
}

fn attach_mode(args: &Args) -> AttachMode {
    match args.attach {
        AttachArg::Auto => AttachMode::auto(),
        AttachArg::Tcx => AttachMode::Tcx,
        AttachArg::Netlink => AttachMode::Netlink,
    }
}

/// The datapath the agent drives; both take the same changes.
enum Proxier {
    Ebpf(Box<Dataplane>),
    Iptables(Iptables),
}

impl Proxier {
    fn apply(&mut self, changes: &[reconcile::Change]) -> Result<reconcile::ApplyStats> {
        match self {
            Proxier::Ebpf(d) => d.apply(changes),
            Proxier::Iptables(i) => i.apply(changes),
        }
    }
    fn programmed_state(&self) -> DesiredState {
        match self {
            Proxier::Ebpf(d) => d.programmed_state(),
            Proxier::Iptables(i) => i.programmed_state(),
        }
    }
    fn service_count(&self) -> usize {
        match self {
            Proxier::Ebpf(d) => d.service_count(),
            Proxier::Iptables(i) => i.service_count(),
        }
    }
    fn backend_count(&self) -> usize {
        match self {
            Proxier::Ebpf(d) => d.backend_count(),
            Proxier::Iptables(i) => i.backend_count(),
        }
    }
    /// Detaches the programs / removes the rules.
    fn shutdown(&mut self) -> Result<()> {
        match self {
            Proxier::Ebpf(d) => d.detach_all(),
            Proxier::Iptables(i) => i.cleanup(),
        }
    }
}

/// Loads the eBPF object and attaches it to every `--iface`.
fn start_ebpf(args: &Args) -> Result<Dataplane> {
    let opts = LoadOptions {
        max_services: args.max_services,
        max_slots: args.max_backends,
        conntrack_size: args.conntrack_size,
        bpf_log_level: args.bpf_log_level as u8,
        pin_dir: (!args.no_pin).then(|| args.pin_dir.clone()),
    };
    let mut dp = Dataplane::load(&opts)?;
    dp.keep_on_exit(args.keep_datapath_on_exit);
    if !matches!(args.bpf_log_level, BpfLogLevel::Off) {
        spawn_bpf_logger(&mut dp)?;
    }
    let mode = attach_mode(args);
    for name in dp.prune_stale_link_pins() {
        log::info!("removed pinned link {name}: its interface is gone");
    }
    for iface in args.iface.iter().filter(|i| !i.is_empty()) {
        // On error `dp` drops and detaches what was attached so far.
        dp.attach(iface, mode)?;
        println!("kproxy: attached {iface} mode={mode}");
    }
    if !args.iface_prefix.is_empty() {
        attach_matching(&mut dp, args);
    }
    Ok(dp)
}

/// Datapath counters for a scrape.
fn snapshot(dp: &Dataplane) -> Option<Snapshot> {
    match (dp.global_counters(), dp.service_counters()) {
        (Ok(global), Ok(per_service)) => Some(Snapshot {
            global,
            conntrack_entries: dp.conntrack_entries(),
            per_service,
        }),
        (Err(e), _) | (_, Err(e)) => {
            log::warn!("reading counters for /metrics: {e:#}");
            None
        }
    }
}

fn report_counters(dp: &Dataplane) {
    match dp.global_counters() {
        Ok(c) => println!(
            "kproxy: counters packets={} bytes={} new_flows={} rejects={} drops={} malformed={} \
             fragments={} fragments_unmatched={} conntrack_entries={}",
            c.packets,
            c.bytes,
            c.new_flows,
            c.rejects,
            c.drops,
            c.malformed,
            c.fragments,
            c.fragments_unmatched,
            dp.conntrack_entries()
        ),
        Err(e) => log::warn!("reading counters: {e:#}"),
    }
    if let Ok(per_service) = dp.service_counters() {
        for (fe, name, c) in per_service {
            println!(
                "kproxy: service {name} {fe} packets={} bytes={} new_flows={} rejects={} drops={}",
                c.packets, c.bytes, c.new_flows, c.rejects, c.drops
            );
        }
    }
}

/// Forwards aya-log records from the kernel to `log`.
fn spawn_bpf_logger(dp: &mut Dataplane) -> Result<()> {
    let logger = aya_log::EbpfLogger::init(dp.ebpf_mut()).context("starting aya-log")?;
    // SAFETY: the logger owns the ring buffer's fd and lives inside the
    // AsyncFd, so the fd stays open for as long as it is registered.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("registering the aya-log ring buffer: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}
