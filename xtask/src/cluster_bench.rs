//! `cargo xtask bench cluster [--pods N]`: on a fresh single-node cluster
//! (the one `cargo xtask up` runs, testbed's `cluster`), creates N pods one at a
//! time, all selected by one Service, and measures for each:
//!
//! - **running**: created → phase Running, and **ready**: created → Ready
//!   condition True, both as seen on one `kubectl get pods -w` watch;
//! - **programmed**: created → its endpoint is in kproxy's dataplane: the
//!   arrival of kproxy's `kproxy: applied … backends=B` line in which the
//!   backend count first includes this pod. kproxy prints that line after
//!   the map updates returned, and since the pods come one at a time (the
//!   next is created only after this one is programmed) and a pod's
//!   endpoint only counts once ready, `B` = previous count + 1 is exactly
//!   this pod's endpoint. At the end the pinned SLOTS map is read with
//!   bpftool to confirm every pod IP really is programmed.
//!
//! "created" is the arrival of the pod's ADDED event on the watch (the
//! moment the store holds it; the apiserver benchmark puts watch delivery at
//! ~0.1 ms). All times are taken with one monotonic clock in xtask as the
//! lines arrive on pipes. The `kubectl create` call itself (process start,
//! discovery, request) is reported separately.
//!
//! A warm-up pod (bench-0) is created first and not measured: it makes sure
//! the watch is established and caches are warm. The samples go to
//! target/cluster-bench.json; `kcluster-report` (bench/) turns them into a
//! report and plots under bench/results/.

use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::{self, Toolchain, output, run};
use crate::{build, smoke};
use proxy_common::lifecycle::Event;
use testbed::cluster::{Cluster, Options, PIN_DIR};
use testbed::log::{Line, Log, Src};

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

struct Sample {
    name: String,
    ip: String,
    /// `kubectl create` wall time (process start to exit).
    create_call_ms: f64,
    running_ms: f64,
    ready_ms: f64,
    programmed_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What `cargo xtask bench cluster` was asked for.
#[derive(Debug, PartialEq)]
struct Opts {
    pods: usize,
    probe: bool,
    /// `--smoke`: 2 pods (unless `--pods`), report under target/bench-smoke/.
    smoke: bool,
}

impl Opts {
    /// The command line as the report records it.
    fn invocation(&self) -> String {
        format!(
            "cargo xtask bench cluster --pods {}{}{}",
            self.pods,
            if self.probe { " --probe" } else { "" },
            if self.smoke { " --smoke" } else { "" }
        )
    }
}

/// `--pods N` (default 50; 2 with `--smoke`), `--probe` and `--smoke`.
fn parse_args(args: &[String]) -> Result<Opts> {
    let mut pods = None;
    let mut probe = false;
    let mut smoke = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = if a == "--probe" {
            probe = true;
            continue;
        } else if a == "--smoke" {
            smoke = true;
            continue;
        } else if a == "--pods" {
            it.next().context("--pods needs a number")?.as_str()
        } else if let Some(v) = a.strip_prefix("--pods=") {
            v
        } else {
            bail!(
                "unknown argument {a:?}: `cargo xtask bench cluster [--pods N] [--probe] [--smoke]`"
            );
        };
        pods = Some(
            v.parse()
                .ok()
                .filter(|n| (1..=200).contains(n))
                .with_context(|| format!("--pods {v:?}: expected 1..=200 (one /24 pod CIDR)"))?,
        );
    }
    Ok(Opts {
        pods: pods.unwrap_or(if smoke { 2 } else { 50 }),
        probe,
        smoke,
    })
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
    let dump = output(
        Command::new("bpftool")
            .arg("map")
            .arg("dump")
            .arg("pinned")
            .arg(&slots),
    )?;
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

pub fn run_cluster_bench(args: &[String]) -> Result<()> {
    let opts = parse_args(args)?;
    let (pods, probe) = (opts.pods, opts.probe);
    // The smoke run's report goes to target/bench-smoke/cluster (emptied
    // first, so only this run's files can pass the check), never beside the
    // committed reports.
    let report_dir = if opts.smoke {
        let dir = smoke::out_dir("cluster");
        smoke::fresh_dir(&dir)?;
        Some(dir)
    } else {
        None
    };
    let outputs = smoke::builds()?;

    let log = Arc::new(Log::default());
    let on_signal = log.clone();
    ctrlc::set_handler(move || on_signal.interrupt()).context("installing the Ctrl-C handler")?;
    let dir = util::target_dir().join("cluster-bench");
    say!("==> starting a fresh cluster in {}", dir.display());
    let host = Options::host(&outputs.kcontrol, &outputs.kproxy, &dir)?;
    let mut c = Cluster::start(host, log.clone())?;
    let result = measure(&mut c, pods, probe);
    say!("==> stopping the cluster");
    let stopped = c.stop_clean();
    let (samples, verified) = result?;
    stopped?;

    let json = match &report_dir {
        Some(dir) => dir.join("samples.json"),
        None => samples_path(),
    };
    fs::write(&json, to_json(&opts, &samples, &verified)?)
        .with_context(|| format!("writing {}", json.display()))?;
    say!("==> samples: {}", json.display());
    let mut cmd = util::cargo(Toolchain::Active);
    // The same KPROXY_BPF_OBJ as the build above for proxy-user (a
    // dependency of the bench crate). It is still recompiled here, as for
    // the other benches: the bench crate's dependency set unifies features
    // differently from `-p proxy-user -p kcontrol`.
    cmd.current_dir(util::workspace_root())
        .env(build::BPF_OBJ_ENV, &outputs.bpf_obj)
        .args([
            "run",
            "--release",
            "-p",
            "kproxy-compare",
            "--bin",
            "kcluster-report",
            "--target-dir",
        ])
        .arg(util::target_dir())
        .arg("--")
        .arg("--samples")
        .arg(&json);
    if let Some(dir) = &report_dir {
        cmd.arg("--out").arg(dir);
    }
    run(&mut cmd)?;
    if let Some(dir) = &report_dir {
        smoke::check_report(&dir.join("latest-cluster.md"), 1)?;
    }
    Ok(())
}

fn measure(c: &mut Cluster, pods: usize, probe: bool) -> Result<(Vec<Sample>, String)> {
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
    say!("==> warm-up pod bench-0 (not measured)");
    let warm = measure_pod(c, "bench-0", probe)?;
    say!(
        "    bench-0 {}: running {:.0} ms, ready {:.0} ms, programmed {:.0} ms",
        warm.ip,
        warm.running_ms,
        warm.ready_ms,
        warm.programmed_ms
    );
    say!("==> creating {pods} pods one at a time (Service bench selects them all)");
    let mut samples = Vec::new();
    for i in 1..=pods {
        let s = measure_pod(c, &format!("bench-{i}"), probe)?;
        say!(
            "    [{i:>3}/{pods}] {:<9} {:<12} create call {:>4.0} ms | running {:>5.0} ms  ready {:>5.0} ms  programmed {:>5.0} ms",
            s.name,
            s.ip,
            s.create_call_ms,
            s.running_ms,
            s.ready_ms,
            s.programmed_ms
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
    say!("==> {verified}");

    say!();
    say!("    {pods} pods, from created (ADDED on the watch):");
    for (what, f) in [
        ("running", (|s: &Sample| s.running_ms) as fn(&Sample) -> f64),
        ("ready", |s| s.ready_ms),
        ("programmed", |s| s.programmed_ms),
        ("kubectl create call", |s| s.create_call_ms),
    ] {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        say!(
            "    {what:<20} p50 {:>6.0} ms  p99 {:>6.0} ms  max {:>6.0} ms",
            percentile(&v, 50.0),
            percentile(&v, 99.0),
            v.last().copied().unwrap_or(0.0)
        );
    }
    Ok((samples, verified))
}

fn to_json(opts: &Opts, samples: &[Sample], verified: &str) -> Result<String> {
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d"]))?;
    let mut s = String::new();
    write!(
        s,
        "{{\n  \"date\": \"{date}\",\n  \"invocation\": \"{}\",\n  \
         \"probe\": {},\n  \"verified\": \"{verified}\",\n  \"samples\": [",
        opts.invocation(),
        opts.probe
    )?;
    for (i, x) in samples.iter().enumerate() {
        write!(
            s,
            "{}\n    {{\"name\": \"{}\", \"ip\": \"{}\", \"create_call_ms\": {:.3}, \"running_ms\": {:.3}, \
             \"ready_ms\": {:.3}, \"programmed_ms\": {:.3}}}",
            if i == 0 { "" } else { "," },
            x.name,
            x.ip,
            x.create_call_ms,
            x.running_ms,
            x.ready_ms,
            x.programmed_ms
        )?;
    }
    s.push_str("\n  ]\n}\n");
    Ok(s)
}

pub fn samples_path() -> PathBuf {
    util::target_dir().join("cluster-bench.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<(usize, bool, bool)> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        parse_args(&args).map(|o| (o.pods, o.probe, o.smoke))
    }

    #[test]
    fn pods_argument() {
        assert_eq!(parse(&[]).unwrap(), (50, false, false));
        assert_eq!(parse(&["--pods", "7"]).unwrap(), (7, false, false));
        assert_eq!(parse(&["--pods=9", "--probe"]).unwrap(), (9, true, false));
        assert!(parse(&["--pods", "0"]).is_err());
        assert!(parse(&["--pods"]).is_err());
        assert!(parse(&["--nope"]).is_err());
    }

    #[test]
    fn smoke_is_two_pods_unless_told_otherwise() {
        assert_eq!(parse(&["--smoke"]).unwrap(), (2, false, true));
        assert_eq!(
            parse(&["--smoke", "--pods", "3"]).unwrap(),
            (3, false, true)
        );
        assert_eq!(parse(&["--pods=3", "--smoke"]).unwrap(), (3, false, true));
        let o = parse_args(&["--smoke".into(), "--probe".into()]).unwrap();
        assert_eq!(
            o.invocation(),
            "cargo xtask bench cluster --pods 2 --probe --smoke"
        );
        assert_eq!(
            parse_args(&[]).unwrap().invocation(),
            "cargo xtask bench cluster --pods 50"
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }
}
