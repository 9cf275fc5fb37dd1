//! `/metrics` (Prometheus / OpenMetrics text), `/healthz` and `/readyz`.
//!
//! The HTTP side never touches the datapath: a scrape is a message to the
//! agent's loop, which owns the datapath, reads its counters (eBPF: the
//! per-CPU maps; iptables keeps none) and answers with the rendered text.
//! So a scrape never races a map update.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use proxy_common::{Counters, XdpCounters};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::model::Frontend;

/// Picks one field of a service's counters.
type CounterField = fn(&Counters) -> u64;

/// Datapath counters read at scrape time (eBPF mode).
pub struct Snapshot {
    pub global: Counters,
    /// When XDP is attached somewhere.
    pub xdp: Option<XdpCounters>,
    pub conntrack_entries: usize,
    pub per_service: Vec<(Frontend, String, Counters)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
    frontend: String,
}

/// Metrics the agent updates as it works.
#[derive(Clone)]
pub struct Metrics {
    /// Change seen (manifest event) → datapath written.
    pub sync_duration: Histogram,
    pub services: Gauge,
    pub backends: Gauge,
    pub sync_errors: Counter,
    pub manifests_rejected: Counter,
    /// Conntrack garbage collection (eBPF).
    pub ct_gc_runs: Counter,
    pub ct_gc_deleted: Counter,
    pub ct_gc_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Sweeps that found the table at least 90 % full.
    pub ct_full: Counter,
    pub ct_capacity: Gauge,
    pub ready: Arc<AtomicBool>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            // 50 µs … ~26 s.
            sync_duration: Histogram::new(exponential_buckets(50e-6, 2.0, 20)),
            services: Gauge::default(),
            backends: Gauge::default(),
            sync_errors: Counter::default(),
            manifests_rejected: Counter::default(),
            ct_gc_runs: Counter::default(),
            ct_gc_deleted: Counter::default(),
            ct_gc_seconds: Gauge::default(),
            ct_full: Counter::default(),
            ct_capacity: Gauge::default(),
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The OpenMetrics text of everything, with datapath counters if given.
    pub fn render(&self, snap: Option<&Snapshot>) -> String {
        let mut reg = Registry::with_prefix("kproxy");
        reg.register(
            "sync_duration_seconds",
            "Time from a change being seen to the datapath being written",
            self.sync_duration.clone(),
        );
        reg.register("services", "Frontends programmed", self.services.clone());
        reg.register(
            "backends",
            "Backend slots programmed",
            self.backends.clone(),
        );
        reg.register(
            "sync_errors",
            "Failed datapath updates",
            self.sync_errors.clone(),
        );
        reg.register(
            "manifests_rejected",
            "Manifest files rejected (previous state kept)",
            self.manifests_rejected.clone(),
        );
        if snap.is_some() {
            reg.register(
                "conntrack_gc_runs",
                "Conntrack garbage-collection sweeps",
                self.ct_gc_runs.clone(),
            );
            reg.register(
                "conntrack_gc_deleted",
                "Expired conntrack entries the sweeps deleted",
                self.ct_gc_deleted.clone(),
            );
            reg.register(
                "conntrack_gc_last_seconds",
                "Duration of the last sweep",
                self.ct_gc_seconds.clone(),
            );
            reg.register(
                "conntrack_full",
                "Sweeps that found the conntrack table at least 90 % full (LRU eviction of live flows)",
                self.ct_full.clone(),
            );
            reg.register(
                "conntrack_capacity",
                "Conntrack table capacity (entries)",
                self.ct_capacity.clone(),
            );
        }
        if let Some(s) = snap {
            let g = &s.global;
            for (name, help, v) in [
                ("packets", "Packets translated or rejected", g.packets),
                ("bytes", "Bytes of those packets", g.bytes),
                ("new_flows", "Conntrack flows created", g.new_flows),
                ("rejects", "Packets rejected (no endpoints)", g.rejects),
                ("drops", "Packets dropped", g.drops),
                (
                    "malformed_packets",
                    "Malformed IPv4 packets passed on",
                    g.malformed,
                ),
                ("fragments", "Later fragments translated", g.fragments),
                (
                    "fragments_unmatched",
                    "Later fragments without a first fragment",
                    g.fragments_unmatched,
                ),
            ] {
                let c = Counter::<u64>::default();
                c.inc_by(v);
                reg.register(name, help, c);
            }
            if let Some(x) = &s.xdp {
                for (name, help, v) in [
                    ("xdp_tx", "Packets XDP translated and sent back out", x.tx),
                    (
                        "xdp_redirected",
                        "Packets XDP translated and redirected to another interface",
                        x.redirected,
                    ),
                    ("xdp_bytes", "Bytes XDP sent itself", x.bytes),
                    (
                        "xdp_passed",
                        "Service packets XDP passed on to TC",
                        x.passed,
                    ),
                    ("xdp_dropped", "Packets XDP dropped", x.dropped),
                    ("xdp_new_flows", "Flows XDP opened", x.new_flows),
                ] {
                    let c = Counter::<u64>::default();
                    c.inc_by(v);
                    reg.register(name, help, c);
                }
            }
            let ct = Gauge::<i64>::default();
            ct.set(s.conntrack_entries as i64);
            reg.register("conntrack_entries", "Conntrack entries (two per flow)", ct);
            let fams: [(&str, &str, CounterField); 5] = [
                ("service_packets", "Packets of a service", |c| c.packets),
                ("service_bytes", "Bytes of a service", |c| c.bytes),
                ("service_new_flows", "New flows of a service", |c| {
                    c.new_flows
                }),
                ("service_rejects", "Rejected packets of a service", |c| {
                    c.rejects
                }),
                ("service_drops", "Dropped packets of a service", |c| c.drops),
            ];
            for (name, help, field) in fams {
                let fam = Family::<ServiceLabels, Counter>::default();
                for (fe, svc, c) in &s.per_service {
                    fam.get_or_create(&ServiceLabels {
                        service: svc.clone(),
                        frontend: fe.to_string(),
                    })
                    .inc_by(field(c));
                }
                reg.register(name, help, fam);
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg)
            .expect("writing to a String cannot fail");
        out
    }
}

/// A scrape: the agent loop answers with the rendered text.
pub type ScrapeRequest = oneshot::Sender<String>;

/// Serves /metrics, /healthz and /readyz on `addr`.
pub async fn serve(
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    scrapes: mpsc::Sender<ScrapeRequest>,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let ready = ready.clone();
            let scrapes = scrapes.clone();
            tokio::spawn(async move {
                // Read the whole request head (clients may send it in
                // pieces); closing with unread bytes would reset the reply.
                let mut buf = Vec::with_capacity(1024);
                let mut chunk = [0u8; 1024];
                let deadline = std::time::Duration::from_secs(5);
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                    match tokio::time::timeout(deadline, sock.read(&mut chunk)).await {
                        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                        Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let n = buf.len();
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("");
                let (status, ctype, body) = match path.split('?').next().unwrap_or("") {
                    "/healthz" | "/livez" => ("200 OK", "text/plain", "ok\n".to_string()),
                    "/readyz" if ready.load(Ordering::Relaxed) => {
                        ("200 OK", "text/plain", "ready\n".to_string())
                    }
                    "/readyz" => (
                        "503 Service Unavailable",
                        "text/plain",
                        "first sync not done\n".to_string(),
                    ),
                    "/metrics" => {
                        let (tx, rx) = oneshot::channel();
                        let text = match scrapes.send(tx).await {
                            Ok(()) => rx.await.unwrap_or_default(),
                            Err(_) => String::new(),
                        };
                        (
                            "200 OK",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            text,
                        )
                    }
                    _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
            });
        }
    });
    Ok(local)
}
