//! The agent loop: objects in, changes out to a [`Datapath`].
//!
//! It reads the sources (manifest files, or the Kubernetes API), programs
//! the datapath with the difference from what it already holds, then
//! follows changes until SIGINT/SIGTERM. Stdout carries one
//! [`Event`] line per lifecycle step; diagnostics go to stderr through
//! `log`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proxy_common::lifecycle::Event;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc::Receiver;

use crate::datapath::Datapath;
use crate::health::HealthServers;
use crate::index::Index;
use crate::kube_source::{self, ApiEvent, ApiState};
use crate::links::{LinkEvent, LinkWatcher};
use crate::metrics::{self, Metrics, ScrapeRequest};
use crate::model::{DesiredState, Node};
use crate::reconcile;
use crate::source::ManifestSource;
use crate::watch::{Events, Inotify};

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum Objects {
    /// A manifest file or a directory of them, followed for changes.
    Manifests(PathBuf),
    /// The Kubernetes API, through this kubeconfig or in-cluster
    /// configuration (`None`).
    Api { kubeconfig: Option<PathBuf> },
}

/// What the loop needs to know; the datapath is built by the caller.
#[derive(Clone, Debug)]
pub struct Config {
    pub objects: Objects,
    /// This node: its name decides which endpoints are local.
    pub node: Node,
    /// How often the manifests are checked (inotify is the fast path).
    pub poll_interval: Duration,
    /// How often the datapath's own conntrack is swept (eBPF).
    pub gc_interval: Duration,
    /// `HOST:PORT` for /metrics, /healthz and /readyz; `None`: not served.
    pub metrics_addr: Option<String>,
    /// On SIGINT/SIGTERM, leave the datapath in place, pinned under this
    /// directory, for the next agent; `None`: remove everything.
    pub leave_pinned_under: Option<PathBuf>,
}

/// A datapath ready to be programmed, from the caller's `start`.
pub struct Started {
    pub datapath: Box<dyn Datapath>,
    /// rtnetlink link events, when the datapath follows interfaces.
    pub links: Option<AsyncFd<LinkWatcher>>,
}

/// Runs the agent. The sources are read first, so a bad start leaves the
/// kernel untouched; then `start` builds the datapath.
pub async fn run(config: Config, start: impl FnOnce() -> Result<Started>) -> Result<()> {
    let load_started = Instant::now();
    let mut sources = read_sources(&config.objects, &config.node).await?;
    log::info!("running on node {}", config.node.name);
    let load_us = load_started.elapsed().as_micros() as u64;
    let Started {
        datapath: mut dp,
        links,
    } = start()?;

    let metrics = Metrics::new();
    let (scrape_tx, mut scrape_rx) = tokio::sync::mpsc::channel::<ScrapeRequest>(4);
    if let Some(addr) = &config.metrics_addr {
        let addr: std::net::SocketAddr = addr
            .parse()
            .with_context(|| format!("--metrics-addr {addr:?} is not HOST:PORT"))?;
        let bound = metrics::serve(addr, metrics.ready.clone(), scrape_tx).await?;
        println!(
            "{}",
            Event::Metrics {
                url: format!("http://{bound}/metrics")
            }
        );
    }

    let sync_started = Instant::now();
    // Against what the datapath already holds: nothing on a fresh start, the
    // adopted tables after a restart (then only the difference is written
    // and conntrack survives).
    let initial = reconcile::diff(&dp.programmed_state(), sources.state());
    if let Err(e) = dp.apply(&initial) {
        let _ = dp.shutdown();
        return Err(e);
    }
    metrics
        .sync_duration
        .observe(sync_started.elapsed().as_secs_f64());
    metrics.services.set(dp.service_count() as i64);
    metrics.backends.set(dp.backend_count() as i64);
    let mut health = HealthServers::default();
    health.update(&sources.state().health_checks);
    metrics.ready.store(true, Ordering::Relaxed);
    println!(
        "{}",
        Event::Ready {
            services: dp.service_count() as u64,
            backends: dp.backend_count() as u64,
            load_us,
            sync_us: sync_started.elapsed().as_micros() as u64,
        }
    );

    let manifests = match &config.objects {
        Objects::Manifests(path) => Some(path.as_path()),
        Objects::Api { .. } => None,
    };
    // inotify names changed files at once; the poll is the safety net.
    let inotify = match manifests
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
            if manifests.is_some() {
                log::warn!("inotify unavailable ({e}); relying on polling");
            }
            None
        }
    };
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gc_tick = tokio::time::interval(config.gc_interval);
    gc_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut table_full = false;
    let mut generation = 1u64;
    // Set when an apply failed: the next round re-diffs the whole state.
    let mut resync = false;
    loop {
        let input = tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = tick.tick(), if manifests.is_some() => Input::Files(None),
            Some(ev) = next_api_event(sources.api_events()) => Input::Api(ev),
            events = next_link_events(links.as_ref()) => {
                if let Some(follow) = dp.follow_links() {
                    match events {
                        Ok(events) => {
                            for ev in follow.links_changed(events) {
                                println!("{ev}");
                            }
                        }
                        Err(e) => log::warn!("reading link events: {e}"),
                    }
                }
                continue;
            }
            _ = gc_tick.tick() => {
                if let Some(gc) = dp.conntrack_gc() {
                    let r = gc.collect();
                    metrics.ct_gc_runs.inc();
                    metrics.ct_gc_deleted.inc_by(r.deleted as u64);
                    metrics.ct_gc_seconds.set(r.took.as_secs_f64());
                    metrics.ct_capacity.set(r.capacity as i64);
                    let full = r.live * 10 >= r.usable * 9;
                    if full {
                        metrics.ct_full.inc();
                        if !table_full {
                            log::warn!(
                                "conntrack table {}/{} full: the least recently used flows are \
                                 being evicted to make room (new flows are still served; raise \
                                 --conntrack-size)",
                                r.live,
                                r.capacity
                            );
                        }
                    }
                    table_full = full;
                    log::debug!("conntrack sweep: {r:?}");
                }
                continue;
            }
            Some(reply) = scrape_rx.recv() => {
                let snap = dp.counters().and_then(|c| c.snapshot());
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
        let refresh = match (input, &mut sources) {
            (Input::Files(hint), Sources::Files(source)) => source.refresh(hint.as_ref()),
            (Input::Api(ev), Sources::Api { index, state, .. }) => state.handle(index, ev),
            // Neither happens: files are only watched in manifests mode,
            // API events only come in API mode.
            (Input::Files(_), Sources::Api { .. }) | (Input::Api(_), Sources::Files(_)) => {
                continue;
            }
        };
        for e in &refresh.rejected {
            println!(
                "{}",
                Event::Rejected {
                    file: e.origin.to_string(),
                    message: e.message.clone(),
                    previous_kept: true,
                }
            );
            log::error!("manifest rejected, previous state kept: {e}");
            metrics.manifests_rejected.inc();
        }
        // Health checks follow the desired state, whatever the datapath did.
        health.update(&sources.state().health_checks);
        let changes = if resync {
            reconcile::diff(&dp.programmed_state(), sources.state())
        } else {
            refresh.changes
        };
        if changes.is_empty() {
            continue;
        }
        match dp.apply(&changes) {
            Ok(stats) => {
                metrics
                    .sync_duration
                    .observe(started.elapsed().as_secs_f64());
                metrics.services.set(dp.service_count() as i64);
                metrics.backends.set(dp.backend_count() as i64);
                resync = false;
                generation += 1;
                log::debug!("applied {} changes: {stats:?}", changes.len());
                println!(
                    "{}",
                    Event::Applied {
                        generation,
                        services: dp.service_count() as u64,
                        backends: dp.backend_count() as u64,
                        changes: changes.len() as u64,
                        took_us: started.elapsed().as_micros() as u64,
                    }
                );
            }
            Err(e) => {
                // The datapath holds a consistent prefix of the changes;
                // the next round re-diffs against what it really holds.
                resync = true;
                metrics.sync_errors.inc();
                println!(
                    "{}",
                    Event::ApplyError {
                        message: format!("{e:#}")
                    }
                );
                log::error!("applying changes failed: {e:#}");
            }
        }
    }

    if let Some(counters) = dp.counters() {
        for line in counters.report() {
            println!("{line}");
        }
    }
    if let Some(pin_dir) = &config.leave_pinned_under {
        println!(
            "{}",
            Event::LeftAttached {
                pin_dir: pin_dir.display().to_string()
            }
        );
        return Ok(());
    }
    dp.shutdown()?;
    println!("{}", Event::Detached);
    Ok(())
}

/// The objects the agent follows, by mode; each feeds an [`Index`].
enum Sources {
    /// A manifest file or directory.
    Files(ManifestSource),
    /// The Kubernetes API: watcher events folded into `index` by `state`.
    Api {
        index: Index,
        events: Receiver<ApiEvent>,
        state: ApiState,
    },
}

impl Sources {
    /// The desired state of every accepted object.
    fn state(&self) -> &DesiredState {
        match self {
            Sources::Files(source) => source.state(),
            Sources::Api { index, .. } => index.state(),
        }
    }

    /// The API watchers' events, in API mode.
    fn api_events(&mut self) -> Option<&mut Receiver<ApiEvent>> {
        match self {
            Sources::Api { events, .. } => Some(events),
            Sources::Files(_) => None,
        }
    }
}

/// The sources at their first complete state: every manifest accepted, or
/// the first complete list of both kinds from the API, so the datapath
/// starts from the whole picture.
async fn read_sources(objects: &Objects, node: &Node) -> Result<Sources> {
    match objects {
        Objects::Manifests(path) => {
            let mut source = ManifestSource::new(path, node.clone());
            let first = source.refresh(None);
            if let Some(e) = first.rejected.first() {
                bail!("initial manifests: {e}");
            }
            Ok(Sources::Files(source))
        }
        Objects::Api { kubeconfig } => {
            let client = kube_source::client(kubeconfig.as_deref()).await?;
            let mut node = node.clone();
            if node.zone.is_none() {
                node.zone = kube_source::node_zone(&client, &node.name).await;
            }
            let mut events = kube_source::spawn_watchers(client);
            let mut state = ApiState::default();
            let mut index = Index::new(node);
            while !state.synced() {
                let Some(ev) = events.recv().await else {
                    bail!("Kubernetes API watchers stopped");
                };
                for e in state.handle(&mut index, ev).rejected {
                    println!(
                        "{}",
                        Event::Rejected {
                            file: e.origin.to_string(),
                            message: e.message,
                            previous_kept: false,
                        }
                    );
                }
            }
            Ok(Sources::Api {
                index,
                events,
                state,
            })
        }
    }
}

/// What woke the agent loop up.
enum Input {
    /// Manifest files changed (these, or any when `None`).
    Files(Option<BTreeSet<PathBuf>>),
    /// A Kubernetes API watch event.
    Api(ApiEvent),
}

/// The next Kubernetes API event, or never without the API source.
async fn next_api_event(events: Option<&mut Receiver<ApiEvent>>) -> Option<ApiEvent> {
    match events {
        Some(rx) => rx.recv().await,
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
async fn next_link_events(fd: Option<&AsyncFd<LinkWatcher>>) -> std::io::Result<Vec<LinkEvent>> {
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
