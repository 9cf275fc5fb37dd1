//! The measurement of `cargo xtask bench cluster`: on a fresh single-node
//! cluster (testbed's, the one `cargo xtask up` runs), creates N pods one
//! at a time, all selected by one Service, and measures for each:
//!
//! - **running**: created → phase Running, and **ready**: created → Ready
//!   condition True, both as seen on one `kubectl get pods -w` watch;
//! - **programmed**: created → its endpoint is in kproxy's dataplane: the
//!   arrival of kproxy's `applied` lifecycle line in which the backend
//!   count first includes this pod. kproxy prints that line after the map
//!   updates returned, and since the pods come one at a time (the next is
//!   created only after this one is programmed) and a pod's endpoint only
//!   counts once ready, previous count + 1 is exactly this pod's endpoint.
//!   At the end the pinned SLOTS map is read with bpftool to confirm every
//!   pod IP really is programmed.
//!
//! "created" is the arrival of the pod's ADDED event on the watch (the
//! moment the store holds it; the apiserver benchmark puts watch delivery at
//! ~0.1 ms). All times are taken with one monotonic clock as the lines
//! arrive on pipes. The `kubectl create` call itself (process start,
//! discovery, request) is reported separately.
//!
//! A warm-up pod (bench-0) is created first and not measured: it makes sure
//! the watch is established and caches are warm.

use std::fs;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proxy_common::lifecycle::Event;
use testbed::cluster::{Cluster, PIN_DIR};
use testbed::log::{Line, Log, Src};

use crate::report::{Sample, percentile};

const SERVICE_YAML: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: bench
  namespace: default
spec:
  selector: {app: bench}
  ports:
  - {name: http, port: 80, targetPort: 8080}
"#;

/// A bench pod; with `probe`, a readinessProbe (httpGet every 1 s, the
/// shortest period Kubernetes allows) decides Ready, else the container's
/// start does (as in Kubernetes).
fn pod_yaml(name: &str, probe: bool) -> String {
    let probe = if probe {
        "    readinessProbe:\n      httpGet: {path: /, port: 8080}\n      periodSeconds: 1\n"
    } else {
        ""
    };
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels: {{app: bench}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: busybox
    command: ["sh", "-c", "mkdir -p /tmp/www && hostname > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"]
    ports:
    - {{name: http, containerPort: 8080}}
{probe}"#
    )
}

/// The watch prints one line per event: type, name, phase, Ready, podIP.
const WATCH_FORMAT: &str = "jsonpath={.type} {.object.metadata.name} {.object.status.phase} \
     r={.object.status.conditions[?(@.type==\"Ready\")].status} ip={.object.status.podIP}{\"\\n\"}";

const PER_POD_TIMEOUT: Duration = Duration::from_secs(60);

fn ms(d: Duration) -> f64 {
    // Three decimals are what the samples file keeps.
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// One event of the watch for pod `name`: (phase, ready, ip).
fn watch_event<'a>(l: &'a Line, name: &str) -> Option<(&'a str, &'a str, bool, &'a str)> {
    if l.src != Src::Watch {
        return None;
    }
    let mut f = l.text.split_whitespace();
    let kind = f.next()?;
    if f.next()? != name {
        return None;
    }
    let (mut phase, mut ready, mut ip) = ("", false, "");
    for w in f {
        if let Some(r) = w.strip_prefix("r=") {
            ready = r == "True";
        } else if let Some(i) = w.strip_prefix("ip=") {
            ip = i;
        } else {
            phase = w;
        }
    }
    Some((kind, phase, ready, ip))
}

/// The backend count of kproxy's latest `ready`/`applied` line.
fn latest_backends(log: &Log) -> Result<u64> {
    log.last(|l| match l.kproxy_event() {
        Some(Event::Applied { backends, .. } | Event::Ready { backends, .. }) => Some(backends),
        _ => None,
    })
    .context("kproxy has not reported its backends yet")
}

fn measure_pod(c: &Cluster, name: &str, probe: bool) -> Result<Sample> {
    let log = &c.log;
    let base = latest_backends(log)?;
    let cursor = log.len();
    let t_cmd = Instant::now();
    c.kubectl_in(&["create", "-f", "-"], Some(&pod_yaml(name, probe)))?;
    let create_call = t_cmd.elapsed();
    let ((), i_add) = log.wait_for(cursor, PER_POD_TIMEOUT, &format!("{name} ADDED"), |l| {
        watch_event(l, name).filter(|e| e.0 == "ADDED").map(drop)
    })?;
    let at = |i: usize| -> Instant { log.line_at(i) };
    let t_add = at(i_add);
    let ((), i_run) = log.wait_for(i_add, PER_POD_TIMEOUT, &format!("{name} Running"), |l| {
        watch_event(l, name).filter(|e| e.1 == "Running").map(drop)
    })?;
    let (ip, i_ready) = log.wait_for(i_add, PER_POD_TIMEOUT, &format!("{name} Ready"), |l| {
        watch_event(l, name)
            .filter(|e| e.2)
            .map(|e| e.3.to_string())
    })?;
    let ((), i_dp) = log.wait_for(
        cursor,
        PER_POD_TIMEOUT,
        &format!("kproxy to program {name}'s endpoint"),
        |l| match l.kproxy_event() {
            Some(Event::Applied { backends, .. }) => (backends > base).then_some(()),
            _ => None,
        },
    )?;
    let since = |i: usize| ms(at(i).saturating_duration_since(t_add));
    Ok(Sample {
        name: name.to_string(),
        ip,
        create_call_ms: ms(create_call),
        running_ms: since(i_run),
        ready_ms: since(i_ready),
        programmed_ms: since(i_dp),
    })
}

/// IPv4 addresses of the backends in kproxy's pinned SLOTS map (value:
/// address in network order, then port).
fn programmed_ips() -> Result<Vec<Ipv4Addr>> {
    let slots = fs::read_dir(PIN_DIR)
        .with_context(|| format!("reading {PIN_DIR}"))?
        .flatten()
        .map(|e| e.path().join("SLOTS"))
        .find(|p| p.exists())
        .with_context(|| format!("no pinned SLOTS map under {PIN_DIR}"))?;
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&slots)
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool map dump pinned {}: {}",
            slots.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let dump = String::from_utf8_lossy(&out.stdout);
    let mut ips = Vec::new();
    for line in dump.lines() {
        let Some(v) = line.split("value:").nth(1) else {
            continue;
        };
        let b: Vec<u8> = v
            .split_whitespace()
            .take(4)
            .filter_map(|h| u8::from_str_radix(h, 16).ok())
            .collect();
        if let [a, b2, c2, d] = b[..] {
            ips.push(Ipv4Addr::new(a, b2, c2, d));
        }
    }
    Ok(ips)
}

/// Measures `pods` pods (after the warm-up); the samples and the check of
/// kproxy's SLOTS map.
pub fn measure(c: &mut Cluster, pods: usize, probe: bool) -> Result<(Vec<Sample>, String)> {
    c.kubectl_in(&["apply", "-f", "-"], Some(SERVICE_YAML))?;
    c.watch(&[
        "get",
        "pods",
        "-l",
        "app=bench",
        "-w",
        "--output-watch-events",
        "-o",
        WATCH_FORMAT,
    ])?;
    println!("==> warm-up pod bench-0 (not measured)");
    let warm = measure_pod(c, "bench-0", probe)?;
    println!(
        "    bench-0 {}: running {:.0} ms, ready {:.0} ms, programmed {:.0} ms",
        warm.ip, warm.running_ms, warm.ready_ms, warm.programmed_ms
    );
    println!("==> creating {pods} pods one at a time (Service bench selects them all)");
    let mut samples = Vec::new();
    for i in 1..=pods {
        let s = measure_pod(c, &format!("bench-{i}"), probe)?;
        println!(
            "    [{i:>3}/{pods}] {:<9} {:<12} create call {:>4.0} ms | running {:>5.0} ms  ready {:>5.0} ms  programmed {:>5.0} ms",
            s.name, s.ip, s.create_call_ms, s.running_ms, s.ready_ms, s.programmed_ms
        );
        samples.push(s);
    }
    c.note_pods();

    let ips = programmed_ips()?;
    let missing: Vec<&str> = samples
        .iter()
        .chain([&warm])
        .filter(|s| !ips.iter().any(|ip| ip.to_string() == s.ip))
        .map(|s| s.name.as_str())
        .collect();
    let verified = if missing.is_empty() {
        format!(
            "all {} pod IPs found in kproxy's pinned SLOTS map ({} slots)",
            pods + 1,
            ips.len()
        )
    } else {
        bail!(
            "pods missing from kproxy's SLOTS map: {}",
            missing.join(", ")
        );
    };
    println!("==> {verified}");

    println!();
    println!("    {pods} pods, from created (ADDED on the watch):");
    for (what, f) in [
        ("running", (|s: &Sample| s.running_ms) as fn(&Sample) -> f64),
        ("ready", |s| s.ready_ms),
        ("programmed", |s| s.programmed_ms),
        ("kubectl create call", |s| s.create_call_ms),
    ] {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        println!(
            "    {what:<20} p50 {:>6.0} ms  p99 {:>6.0} ms  max {:>6.0} ms",
            percentile(&v, 50.0),
            percentile(&v, 99.0),
            v.last().copied().unwrap_or(0.0)
        );
    }
    Ok((samples, verified))
}
