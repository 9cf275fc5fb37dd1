//! The measurement of one backend: bulk creates by concurrent writers, then
//! paced creates, with a watcher on its own connection stamping every event.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use serde::Serialize;

use crate::server::Server;
use crate::{Args, Backend};

const NAMESPACE: &str = "bench";
/// How long the watcher may lag behind the last acknowledged write.
const WATCH_DEADLINE: Duration = Duration::from_secs(60);

/// Sorted durations with their percentiles.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Every value in ms, sorted (for the CDF plot).
    #[serde(skip)]
    pub sorted_ms: Vec<f64>,
}

impl Sample {
    pub fn new(values: impl IntoIterator<Item = Duration>) -> Sample {
        let mut v: Vec<f64> = values.into_iter().map(|d| d.as_secs_f64() * 1e3).collect();
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            // Nearest rank.
            let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1]
        };
        Sample {
            count: v.len(),
            p50_ms: pct(50.0),
            p90_ms: pct(90.0),
            p99_ms: pct(99.0),
            max_ms: v.last().copied().unwrap_or(0.0),
            mean_ms: if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            },
            sorted_ms: v,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub backend: Backend,
    /// The apiserver's command line.
    pub command: String,
    pub services: usize,
    pub writers: usize,
    /// First create sent → last create acknowledged.
    pub bulk_wall_s: f64,
    pub creates_per_s: f64,
    /// Per-request latency of the bulk creates.
    pub create_latency: Sample,
    /// Write acknowledged → event received, for the bulk creates (the
    /// watcher competes with the writers for the CPUs).
    pub watch_under_load: Sample,
    /// The same for the paced creates (the headline figure).
    pub watch_paced: Sample,
    /// Paced creates: request sent → event received (includes the commit).
    pub watch_paced_from_send: Sample,
    /// Per-request latency of the paced creates (one at a time).
    pub paced_create_latency: Sample,
    /// Paced events that arrived before the create's response did (counted
    /// as 0 ms): the server publishes after commit, then answers.
    pub paced_events_before_ack: usize,
    /// (seconds since the first create, creates acknowledged so far).
    pub timeline: Vec<(f64, usize)>,
    pub apiserver_cpu_s: f64,
    pub apiserver_peak_rss_mib: f64,
}

fn service(name: &str, i: usize) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": name, "labels": { "bench": "kcontrol" } },
        "spec": {
            "selector": { "app": format!("app-{i}") },
            "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }],
        },
    }))
    .expect("a valid Service")
}

/// Receive stamps of the watcher, per index, for both phases.
struct Stamps {
    bulk: Vec<Option<Instant>>,
    paced: Vec<Option<Instant>>,
    seen: usize,
}

fn record(stamps: &Mutex<Stamps>, name: &str, at: Instant) {
    let mut s = stamps.lock().expect("stamps lock");
    let slot = if let Some(i) = name.strip_prefix("b-") {
        i.parse::<usize>().ok().map(|i| (true, i))
    } else if let Some(i) = name.strip_prefix("p-") {
        i.parse::<usize>().ok().map(|i| (false, i))
    } else {
        None
    };
    if let Some((bulk, i)) = slot {
        let v = if bulk { &mut s.bulk } else { &mut s.paced };
        if let Some(x) = v.get_mut(i)
            && x.is_none()
        {
            *x = Some(at);
            s.seen += 1;
        }
    }
}

/// Follows ADDED events in the namespace from `rv`, re-watching from the
/// last revision seen when a watch times out.
async fn watcher(api: Api<Service>, mut rv: String, stamps: Arc<Mutex<Stamps>>) -> Result<()> {
    loop {
        let wp = WatchParams::default().timeout(290);
        let mut stream = api.watch(&wp, &rv).await?.boxed();
        while let Some(ev) = stream.try_next().await? {
            let at = Instant::now();
            match ev {
                WatchEvent::Added(s) | WatchEvent::Modified(s) | WatchEvent::Deleted(s) => {
                    if let Some(n) = s.metadata.name.as_deref() {
                        record(&stamps, n, at);
                    }
                    if let Some(v) = s.metadata.resource_version {
                        rv = v;
                    }
                }
                WatchEvent::Bookmark(b) => rv = b.metadata.resource_version,
                WatchEvent::Error(e) => bail!("watch error: {} {}", e.code, e.message),
            }
        }
    }
}

/// Waits (polling, with a deadline) until the watcher saw `want` events.
async fn wait_seen(stamps: &Mutex<Stamps>, want: usize, what: &str) -> Result<()> {
    let deadline = Instant::now() + WATCH_DEADLINE;
    loop {
        let seen = stamps.lock().expect("stamps lock").seen;
        if seen >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: the watcher saw {seen} of {want} events within {WATCH_DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn delivery(acks: &[Option<Instant>], recv: &[Option<Instant>]) -> (Sample, usize) {
    let mut early = 0;
    let d = acks.iter().zip(recv).filter_map(|(a, r)| {
        let (a, r) = (a.as_ref()?, r.as_ref()?);
        if r < a {
            early += 1;
        }
        Some(r.saturating_duration_since(*a))
    });
    let s = Sample::new(d.collect::<Vec<_>>());
    (s, early)
}

pub async fn run(kcontrol: &Path, backend: &Backend, args: &Args) -> Result<Run> {
    let n = args.services;
    let m = args.watch_writes;
    let server = Server::start(kcontrol, &backend.extra_args).await?;
    println!("apiserver up at {} ({})", server.url, server.command);
    let writers_client = server.client().await?;
    let watch_client = server.client().await?;

    let nss: Api<Namespace> = Api::all(writers_client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": NAMESPACE}}))?,
    )
    .await
    .context("creating the bench namespace")?;
    let api: Api<Service> = Api::namespaced(writers_client, NAMESPACE);
    let watch_api: Api<Service> = Api::namespaced(watch_client, NAMESPACE);
    let rv = watch_api
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .ok_or_else(|| anyhow!("list without resourceVersion"))?;

    let stamps = Arc::new(Mutex::new(Stamps {
        bulk: vec![None; n],
        paced: vec![None; m],
        seen: 0,
    }));
    let watch_task = tokio::spawn(watcher(watch_api, rv, stamps.clone()));

    // Bulk: W writers take the next index until N are created.
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let acks = Arc::new(Mutex::new(vec![None::<Instant>; n]));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.writers {
        let (api, next, done, acks) = (api.clone(), next.clone(), done.clone(), acks.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let name = format!("b-{i}");
                let t0 = Instant::now();
                api.create(&PostParams::default(), &service(&name, i))
                    .await
                    .with_context(|| format!("creating service {name}"))?;
                let t1 = Instant::now();
                lat.push(t1 - t0);
                acks.lock().expect("acks lock")[i] = Some(t1);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Progress once a second; the timeline four times a second.
    let mut timeline = vec![(0.0, 0)];
    let mut last_print = Instant::now();
    while done.load(Ordering::Relaxed) < n && !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let d = done.load(Ordering::Relaxed);
        let t = start.elapsed().as_secs_f64();
        timeline.push((t, d));
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let seen = stamps.lock().expect("stamps lock").seen;
            println!(
                "  bulk: {d}/{n} created in {t:.1} s ({:.0}/s), watcher saw {seen}",
                d as f64 / t
            );
        }
    }
    let mut create_lat = Vec::with_capacity(n);
    for t in tasks {
        create_lat.extend(t.await??);
    }
    let acks = acks.lock().expect("acks lock").clone();
    let last_ack = acks.iter().flatten().max().copied().unwrap_or(start);
    let bulk_wall = last_ack - start;
    timeline.push((bulk_wall.as_secs_f64(), n));
    println!(
        "  bulk: {n} created in {:.2} s ({:.0}/s)",
        bulk_wall.as_secs_f64(),
        n as f64 / bulk_wall.as_secs_f64()
    );
    wait_seen(&stamps, n, "bulk").await?;
    println!("  bulk: the watcher saw all {n}");

    // Paced: one create at a time, a pause between them.
    let mut paced_acks = vec![None; m];
    let mut paced_sends = vec![None; m];
    for (j, ack) in paced_acks.iter_mut().enumerate() {
        let name = format!("p-{j}");
        paced_sends[j] = Some(Instant::now());
        api.create(&PostParams::default(), &service(&name, n + j))
            .await
            .with_context(|| format!("creating service {name}"))?;
        *ack = Some(Instant::now());
        tokio::time::sleep(Duration::from_millis(args.pace_ms)).await;
        if (j + 1) % 100 == 0 {
            println!("  paced: {}/{m}", j + 1);
        }
    }
    wait_seen(&stamps, n + m, "paced").await?;
    if watch_task.is_finished() {
        watch_task.await??;
        bail!("the watcher ended");
    }
    watch_task.abort();
    let (cpu, rss) = server.usage();
    let command = server.command.clone();
    drop(server);

    let s = stamps.lock().expect("stamps lock");
    let (watch_under_load, _) = delivery(&acks, &s.bulk);
    let (watch_paced, early) = delivery(&paced_acks, &s.paced);
    let (watch_paced_from_send, _) = delivery(&paced_sends, &s.paced);
    let (paced_create_latency, _) = delivery(&paced_sends, &paced_acks);
    Ok(Run {
        backend: backend.clone(),
        command,
        services: n,
        writers: args.writers,
        bulk_wall_s: bulk_wall.as_secs_f64(),
        creates_per_s: n as f64 / bulk_wall.as_secs_f64(),
        create_latency: Sample::new(create_lat),
        watch_under_load,
        watch_paced,
        watch_paced_from_send,
        paced_create_latency,
        paced_events_before_ack: early,
        timeline,
        apiserver_cpu_s: cpu,
        apiserver_peak_rss_mib: rss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Sample::new((1..=100).map(Duration::from_millis));
        assert_eq!((s.p50_ms, s.p99_ms, s.max_ms), (50.0, 99.0, 100.0));
        assert_eq!(Sample::new(Vec::new()).p99_ms, 0.0);
    }
}
