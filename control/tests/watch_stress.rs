//! Watch under load, in the style of etcd's robustness tests: concurrent
//! writers and many list-then-watch clients against the real apiserver, on
//! the embedded store and on a one-member etcd, while busy threads of the
//! test itself keep both cores loaded. Every client checks that it got every
//! change after its list's resourceVersion exactly once, in order, and
//! within a bound of the write's acknowledgement (issue 22).
//!
//! Clients: raw HTTP with JSON and Table events (with and without a label
//! selector, paged lists, bookmarks), each reconnecting often so that many
//! list→watch handoffs race the writers; and the real kubectl (`get -w
//! --watch-only`, Table and JSON), whose watch starts at the resourceVersion
//! of the list it made (read from its `-v=6` log).
//!
//! The short run is part of `cargo test`. `KCONTROL_WATCH_STRESS_SECS`
//! lengthens the write phase and `KCONTROL_WATCH_STRESS_REPORT=FILE` appends
//! one JSON line of figures per store (`cargo xtask bench watch` does both).
//!
//! The tests and the run are here; the writers are in watch_stress/writes.rs,
//! the sessions and their events in sessions.rs, the clients in raw.rs and
//! kubectl.rs, and the checks in verdict.rs.

mod common;
#[path = "watch_stress/kubectl.rs"]
mod kubectl;
#[path = "watch_stress/raw.rs"]
mod raw;
#[path = "watch_stress/sessions.rs"]
mod sessions;
#[path = "watch_stress/verdict.rs"]
mod verdict;
#[path = "watch_stress/writes.rs"]
mod writes;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, TempDir};
use kubectl::kubectl_client;
use raw::{RawSpec, raw_client};
use serde_json::json;
use sessions::{Format, Phase};
use testbed::EtcdCluster;
use verdict::verdict;
use writes::writer;

/// Writers, each owning [`KEYS_PER_WRITER`] ConfigMaps.
const WRITERS: usize = 6;
const KEYS_PER_WRITER: usize = 3;
/// Write phase of the short run (the whole test stays well under 30 s).
const SHORT_WRITE_PHASE: Duration = Duration::from_secs(8);
/// An event must arrive within this of its write's acknowledgement (or of
/// its watch's start, for the backlog). A lost event shows up as a stall
/// that no amount of load explains.
const LATENCY_BOUND: Duration = Duration::from_secs(10);
/// After the last write, every open watch must have caught up within this.
const CATCH_UP_BOUND: Duration = Duration::from_secs(30);
const NS: &str = "default";
/// The label selector of the selecting clients: one writer's keys.
const SELECTED_WRITER: usize = 1;

#[test]
fn watch_stress_sqlite() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("watch-stress-sqlite");
    let server = Server::start(&dir.0, &["--bookmark-interval-seconds", "1"]);
    run("sqlite", &server);
}

#[test]
fn watch_stress_etcd() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = EtcdCluster::start(1).expect("starting etcd (/usr/bin/etcd)");
    let dir = TempDir::new("watch-stress-etcd");
    let server = Server::start(
        &dir.0,
        &[
            "--store",
            &cluster.url(),
            "--bookmark-interval-seconds",
            "1",
        ],
    );
    run("etcd", &server);
}

/// The two stores are stressed one after the other: each run makes its own
/// load and measures its own latencies.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------
// The run.

/// Busy threads, one per core, until dropped.
struct CpuLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl CpuLoad {
    fn start() -> CpuLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 1u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..10_000 {
                            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                        }
                    }
                    x
                })
            })
            .collect();
        CpuLoad { stop, threads }
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn run(store: &str, server: &Server) {
    let write_phase = std::env::var("KCONTROL_WATCH_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(SHORT_WRITE_PHASE, Duration::from_secs);
    let load = CpuLoad::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let phase = Arc::new(Phase::default());
    let started = Instant::now();
    let ms = Duration::from_millis;
    let raw = [
        RawSpec {
            name: "raw-json-stalls",
            format: Format::Json,
            selector: None,
            page: None,
            bookmarks: true,
            holds: vec![],
            stalls: true,
        },
        RawSpec {
            name: "raw-json-all",
            format: Format::Json,
            selector: None,
            page: None,
            bookmarks: true,
            holds: vec![],
            stalls: false,
        },
        RawSpec {
            name: "raw-table-all",
            format: Format::Table,
            selector: None,
            page: None,
            bookmarks: false,
            holds: vec![],
            stalls: false,
        },
        RawSpec {
            name: "raw-table-selector",
            format: Format::Table,
            selector: Some(SELECTED_WRITER),
            page: Some(2),
            bookmarks: false,
            holds: vec![],
            stalls: false,
        },
        RawSpec {
            name: "raw-json-restart",
            format: Format::Json,
            selector: None,
            page: None,
            bookmarks: false,
            holds: vec![ms(300), ms(900), ms(150)],
            stalls: false,
        },
        RawSpec {
            name: "raw-json-paged",
            format: Format::Json,
            selector: None,
            page: Some(4),
            bookmarks: true,
            holds: vec![ms(700), ms(200)],
            stalls: false,
        },
        RawSpec {
            name: "raw-table-restart",
            format: Format::Table,
            selector: None,
            page: None,
            bookmarks: true,
            holds: vec![ms(250), ms(1100)],
            stalls: false,
        },
        RawSpec {
            name: "raw-json-selector",
            format: Format::Json,
            selector: Some(SELECTED_WRITER),
            page: None,
            bookmarks: true,
            holds: vec![ms(400), ms(800)],
            stalls: false,
        },
    ];
    // kubectl: Table and JSON throughout, and Table sessions of two seconds
    // back to back.
    let kubectl = [
        ("kubectl-table", Format::Table, None),
        ("kubectl-json", Format::Json, None),
        (
            "kubectl-table-restart",
            Format::Table,
            Some(Duration::from_secs(2)),
        ),
    ];
    let throughout = raw.iter().filter(|r| r.holds.is_empty()).count()
        + kubectl.iter().filter(|k| k.2.is_none()).count();
    let (written, mut sessions) = std::thread::scope(|scope| {
        let kubectls: Vec<_> = kubectl
            .into_iter()
            .map(|(name, format, hold)| {
                let phase = &*phase;
                scope.spawn(move || kubectl_client(server, name, format, hold, phase))
            })
            .collect();
        let (written, mut sessions) = rt.block_on(async {
            let mut clients = Vec::new();
            for spec in raw {
                let client = server.client().await;
                clients.push(tokio::spawn(raw_client(client, spec, phase.clone())));
            }
            // The sessions held throughout watch before the first write.
            let ready_by = Instant::now() + CATCH_UP_BOUND;
            while phase.ready.load(Ordering::SeqCst) < throughout && Instant::now() < ready_by {
                tokio::time::sleep(ms(20)).await;
            }
            let phase_end = Instant::now() + write_phase;
            let mut writers = Vec::new();
            for w in 0..WRITERS {
                writers.push(tokio::spawn(writer(server.client().await, w, phase_end)));
            }
            let mut written = Ok(Vec::new());
            for w in writers {
                match (w.await.unwrap(), &mut written) {
                    (Ok(o), Ok(all)) => all.extend(o),
                    (Err(e), _) => written = Err(e),
                    (Ok(_), Err(_)) => {}
                }
            }
            let lasts = match &written {
                Ok(ops) => ops.iter().filter(|o| o.last).cloned().collect(),
                Err(_) => Vec::new(),
            };
            *phase.lasts.lock().unwrap() = Some((Instant::now(), lasts));
            phase.writes_done.store(true, Ordering::SeqCst);
            let mut sessions = Vec::new();
            for c in clients {
                sessions.extend(c.await.unwrap());
            }
            (written, sessions)
        });
        for k in kubectls {
            sessions.extend(k.join().unwrap());
        }
        (written, sessions)
    });
    drop(load);
    let elapsed = started.elapsed();
    let ops = written.unwrap_or_else(|e| panic!("watch stress on {store}: a write failed: {e}"));
    let figures = verdict(store, ops, &mut sessions);
    eprintln!(
        "watch stress on {store}: {} writes, {} sessions, {} events checked, worst latency {:?}, p99 {:?}, {:?} in all",
        figures.writes,
        figures.sessions,
        figures.events_checked,
        figures.worst_latency,
        figures.p99_latency,
        elapsed
    );
    if let Some(file) = std::env::var_os("KCONTROL_WATCH_STRESS_REPORT") {
        use std::io::Write;
        let line = json!({
            "store": store,
            "write_phase_s": write_phase.as_secs(),
            "writes": figures.writes,
            "sessions": figures.sessions,
            "events_checked": figures.events_checked,
            "worst_latency_ms": figures.worst_latency.as_secs_f64() * 1000.0,
            "p99_latency_ms": figures.p99_latency.as_secs_f64() * 1000.0,
            "latency_bound_ms": LATENCY_BOUND.as_millis() as u64,
            "elapsed_s": elapsed.as_secs_f64(),
        });
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
            .expect("opening KCONTROL_WATCH_STRESS_REPORT");
        writeln!(f, "{line}").unwrap();
    }
}
