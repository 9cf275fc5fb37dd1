//! `kproxy-compare`: kproxy's eBPF mode against its kube-proxy-style
//! iptables mode, side by side, on the same network-namespace topology
//! (client → node running kproxy → backends with real servers), at several
//! service counts. Writes a Markdown report, a JSON dump and SVG plots to
//! `bench/results/`. Needs root. Run it through `cargo xtask bench`.
//!
//! Per service count: one topology and one manifest directory; per mode a
//! fresh kproxy, which is stopped before the next mode starts (eBPF first,
//! so no iptables or netfilter state ever precedes an eBPF run).

mod measure;
mod plot;
mod progress;
mod report;
mod run;
mod scenario;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use kproxy_tests::Mode;

/// Default seed of the target-service generator (ASCII "kproxy").
pub const DEFAULT_SEED: u64 = 0x6b70_726f_7879;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "kproxy-compare",
    about = "kproxy eBPF mode against kube-proxy-style iptables mode (root; network namespaces)"
)]
pub struct Args {
    /// Quick preset (< 5 min): 1, 1,000, 10,000, 30,000 services; 500
    /// connections; 20 changes; iperf3 at the smallest and largest scale;
    /// programming bound 60 s. Default: the full preset (< 30 min) with
    /// 100,000 services too, 2,000 connections, 100 changes, iperf3 at
    /// every scale and a 120 s programming bound.
    #[arg(long)]
    pub quick: bool,
    /// Smoke preset (seconds; `cargo xtask test` runs it): 1 and 100
    /// services, 30 connections, 3 changes, iperf3 1 s once at 1 service, a
    /// small BPF_PROG_TEST_RUN table. The same code path end to end (start,
    /// measure, report, plots); the figures mean little. Give it `--out`
    /// so that it does not replace the committed reports.
    #[arg(long, conflicts_with = "quick")]
    pub smoke: bool,
    /// Service counts, comma-separated (overrides the preset's).
    #[arg(long, value_delimiter = ',')]
    pub services: Vec<u32>,
    /// New connections per (scale, mode) for first-packet latency.
    #[arg(long)]
    pub connections: Option<usize>,
    /// Endpoint changes per (scale, mode) for change latency.
    #[arg(long)]
    pub changes: Option<usize>,
    /// Modes to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["ebpf".to_owned(), "iptables".to_owned()])]
    pub modes: Vec<String>,
    /// Seed of the generator that picks target services (splitmix64).
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Bound on programming (kproxy start → `ready`), seconds; a mode that
    /// does not get there is recorded as "not programmed within bound"
    /// and skips its other figures at that scale. Default 120 (quick: 60).
    #[arg(long)]
    pub program_bound_secs: Option<u64>,
    /// Where the report, JSON and plots go.
    #[arg(long, default_value_os_t = default_out_dir())]
    pub out: PathBuf,
    /// Log file for stderr (kproxy's output, harness messages).
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// kproxy binary (default: $KPROXY_BIN, else target/release/kproxy).
    #[arg(long)]
    pub kproxy: Option<PathBuf>,
    /// kproxy-bench binary (default: next to kproxy).
    #[arg(long)]
    pub kproxy_bench: Option<PathBuf>,
    /// Keep the normal scheduling policy. By default the benchmark's
    /// threads, its servers and kproxy (with its iptables-restore children)
    /// run under SCHED_FIFO, so other load on the machine does not add
    /// scheduling delays to the latencies (iperf3 always runs SCHED_OTHER).
    #[arg(long)]
    pub no_realtime: bool,
    /// Skip the BPF_PROG_TEST_RUN table (kproxy-bench dataplane).
    #[arg(long)]
    pub no_dataplane: bool,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ lives inside the workspace")
        .to_path_buf()
}

fn default_out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("results")
}

/// The settings of one run, after presets and overrides.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub preset: String,
    pub scales: Vec<u32>,
    pub modes: Vec<String>,
    pub connections: usize,
    pub warmup_connections: usize,
    /// Time bound of the first-packet phase per (scale, mode).
    pub latency_bound_s: u64,
    pub changes: usize,
    /// Time bound of the change phase per (scale, mode).
    pub change_bound_s: u64,
    /// Time bound of one change (rename → new backend answers).
    pub change_timeout_s: u64,
    /// How the change phase paces its probe connections.
    pub probe_pacing: measure::ProbePacing,
    pub iperf_secs: u32,
    /// (direct, via ClusterIP) pairs per measured scale.
    pub iperf_pairs: usize,
    /// Scales at which throughput is measured.
    pub iperf_scales: Vec<u32>,
    pub program_bound_s: u64,
    /// Bound on kproxy's exit after SIGTERM (iptables mode removes its rules).
    pub stop_bound_s: u64,
    pub seed: u64,
}

impl Plan {
    fn from_args(a: &Args) -> Result<Plan> {
        let mut p = if a.smoke {
            Plan {
                preset: "smoke".into(),
                scales: vec![1, 100],
                modes: Vec::new(),
                connections: 30,
                warmup_connections: 5,
                latency_bound_s: 20,
                changes: 3,
                change_bound_s: 20,
                change_timeout_s: 10,
                probe_pacing: PACING,
                iperf_secs: 1,
                iperf_pairs: 1,
                iperf_scales: Vec::new(),
                program_bound_s: a.program_bound_secs.unwrap_or(30),
                stop_bound_s: 30,
                seed: a.seed,
            }
        } else if a.quick {
            Plan {
                preset: "quick".into(),
                scales: vec![1, 1_000, 10_000, 30_000],
                modes: Vec::new(),
                connections: 500,
                warmup_connections: 50,
                latency_bound_s: 60,
                changes: 20,
                change_bound_s: 20,
                change_timeout_s: 30,
                probe_pacing: PACING,
                iperf_secs: 3,
                iperf_pairs: 2,
                iperf_scales: Vec::new(),
                program_bound_s: a.program_bound_secs.unwrap_or(60),
                stop_bound_s: 120,
                seed: a.seed,
            }
        } else {
            Plan {
                preset: "full".into(),
                scales: vec![1, 1_000, 10_000, 30_000, 100_000],
                modes: Vec::new(),
                connections: 2_000,
                warmup_connections: 100,
                latency_bound_s: 120,
                changes: 100,
                change_bound_s: 120,
                change_timeout_s: 60,
                probe_pacing: PACING,
                iperf_secs: 3,
                iperf_pairs: 3,
                iperf_scales: Vec::new(),
                program_bound_s: a.program_bound_secs.unwrap_or(120),
                stop_bound_s: 180,
                seed: a.seed,
            }
        };
        let mut custom = false;
        if !a.services.is_empty() {
            if a.services.contains(&0) || a.services.iter().any(|n| *n > 131_000) {
                bail!("--services: counts must be 1..=131000");
            }
            let mut s = a.services.clone();
            s.sort_unstable();
            s.dedup();
            p.scales = s;
            custom = true;
        }
        if let Some(c) = a.connections {
            p.connections = c.max(1);
            custom = true;
        }
        if let Some(c) = a.changes {
            p.changes = c.max(1);
            custom = true;
        }
        for m in &a.modes {
            let mode = Mode::parse(m).with_context(|| format!("--modes: unknown mode {m:?}"))?;
            if !p.modes.contains(&mode.as_str().to_owned()) {
                p.modes.push(mode.as_str().to_owned());
            }
        }
        // eBPF first: its run never follows iptables state in the node.
        p.modes.sort_by_key(|m| m != "ebpf");
        p.iperf_scales = if a.smoke {
            vec![p.scales[0]]
        } else if a.quick {
            let mut v = vec![p.scales[0]];
            v.extend(p.scales.last().filter(|l| **l != p.scales[0]));
            v
        } else {
            p.scales.clone()
        };
        if custom {
            p.preset = format!("{}-custom", p.preset);
        }
        Ok(p)
    }

    /// Preset arguments of `kproxy-bench dataplane` (after `--services`).
    pub fn dataplane_args(&self) -> Vec<&'static str> {
        if self.preset.starts_with("smoke") {
            vec!["--smoke"]
        } else if self.preset.starts_with("quick") {
            vec!["--quick"]
        } else {
            Vec::new()
        }
    }

    pub fn modes(&self) -> Vec<Mode> {
        self.modes.iter().filter_map(|m| Mode::parse(m)).collect()
    }
}

/// Probes of the change phase: one every 200 µs or 2 % of the time since
/// the rename, whichever is longer; up to 64 in flight; 1 s each.
const PACING: measure::ProbePacing = measure::ProbePacing {
    min_gap_us: 200,
    relative_gap: 0.02,
    probe_timeout_ms: 1_000,
    max_in_flight: 64,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether SIGINT/SIGTERM arrived: loops stop, guards clean up.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails once SIGINT/SIGTERM arrived.
pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sends stderr to `log` (kproxy's output and the harness' messages would
/// tear the progress bars apart); returns the original stderr.
fn redirect_stderr(log: &Path) -> Result<File> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = File::create(log).with_context(|| format!("create {}", log.display()))?;
    // SAFETY: dup/dup2 on valid fds; the returned fd is owned by the File.
    unsafe {
        let saved = libc::dup(2);
        if saved < 0 || libc::dup2(file.as_raw_fd(), 2) < 0 {
            bail!("redirecting stderr: {}", std::io::Error::last_os_error());
        }
        Ok(<File as std::os::fd::FromRawFd>::from_raw_fd(saved))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kproxy-compare: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ok(false): the run finished and wrote its report, but some phase failed.
fn real_main(args: &Args) -> Result<bool> {
    kproxy_tests::require_root();
    let plan = Plan::from_args(args)?;
    let kproxy = match (
        &args.kproxy,
        std::env::var_os(kproxy_tests::kproxy::KPROXY_BIN_ENV),
    ) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => PathBuf::from(p),
        (None, None) => workspace_root().join("target/release/kproxy"),
    };
    let kproxy = std::path::absolute(&kproxy)?;
    if !kproxy.is_file() {
        bail!(
            "{} does not exist: run `cargo xtask build` (or use `cargo xtask bench`)",
            kproxy.display()
        );
    }
    let kproxy_bench = args
        .kproxy_bench
        .clone()
        .unwrap_or_else(|| kproxy.with_file_name("kproxy-bench"));
    if !kproxy_tests::util::have_program("iperf3") {
        bail!("iperf3 is not installed (cargo xtask setup installs it)");
    }
    let realtime = if args.no_realtime {
        None
    } else {
        match measure::go_realtime() {
            Ok(()) => Some(measure::RT_PRIORITY),
            Err(e) => {
                println!("kproxy-compare: SCHED_FIFO unavailable ({e}); normal scheduling");
                None
            }
        }
    };
    // SAFETY: still single-threaded; the harness reads KPROXY_BIN later.
    unsafe { std::env::set_var(kproxy_tests::kproxy::KPROXY_BIN_ENV, &kproxy) };
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }

    let started = Instant::now();
    let date = report::utc_date();
    let stem = format!("{date}-{}", plan.preset);
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let log = args.log.clone().unwrap_or_else(|| {
        workspace_root()
            .join("target/kproxy-compare")
            .join(format!("{stem}.log"))
    });
    println!(
        "kproxy-compare: preset {}, services {:?}, modes {:?}, seed {:#x}",
        plan.preset, plan.scales, plan.modes, plan.seed
    );
    println!(
        "kproxy-compare: stderr (kproxy, harness) → {}",
        log.display()
    );
    let mut stderr = redirect_stderr(&log)?;
    let mut env = report::Environment::collect(&workspace_root(), &kproxy, args);
    env.realtime_priority = realtime;

    println!(
        "kproxy-compare: taking {} (integration tests and benchmarks never overlap)",
        kproxy_tests::util::SUITE_LOCK_PATH
    );
    let lock = kproxy_tests::SuiteLock::acquire()?;
    let steps = (plan.scales.len() * plan.modes.len()) as u64 + u64::from(!args.no_dataplane);
    let progress = progress::Progress::new(steps);
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for &n in &plan.scales {
        if interrupted() {
            break;
        }
        match run::run_scale(&plan, n, &progress) {
            Ok(runs) => {
                for r in &runs {
                    failures.extend(
                        r.errors
                            .iter()
                            .map(|e| format!("{} services, {}: {e}", r.services, r.mode)),
                    );
                }
                results.extend(runs);
            }
            Err(e) => {
                progress.println(&format!("{}: {e:#}", run::services_label(n)));
                failures.push(format!("{}: {e:#}", run::services_label(n)));
                if interrupted() {
                    break;
                }
            }
        }
    }
    let mut dataplane = None;
    if !args.no_dataplane && !interrupted() {
        let largest = plan.scales.iter().copied().max().unwrap_or(1);
        progress.step(&format!("BPF_PROG_TEST_RUN · 1 and {largest} services"));
        progress.phase("kproxy-bench dataplane", 1);
        match run::dataplane_table(&kproxy_bench, largest, &plan.dataplane_args()) {
            Ok(t) => dataplane = Some(t),
            Err(e) => failures.push(format!("kproxy-bench dataplane: {e:#}")),
        }
        progress.bar().inc(1);
        progress.step_done();
    }
    drop(lock);
    progress.finish();
    if interrupted() {
        failures.push("interrupted (SIGINT/SIGTERM): figures are partial".into());
    }

    let wall = started.elapsed();
    env.load_at_end = report::loadavg();
    let run = report::Run {
        plan: plan.clone(),
        env,
        stem: stem.clone(),
        results,
        dataplane,
        failures: failures.clone(),
        wall_s: wall.as_secs_f64(),
        log: log.clone(),
    };
    let written = report::write_all(&run, &args.out)?;
    // Back to the terminal for the summary.
    // SAFETY: dup2 of a valid fd onto 2.
    unsafe { libc::dup2(stderr.as_raw_fd(), 2) };
    use std::io::Write as _;
    let _ = stderr.flush();
    println!();
    println!("{}", report::headline_table(&run));
    println!("{}", report::targets_section(&run));
    for p in &written {
        println!("wrote {}", p.display());
    }
    println!("wall time: {}", report::fmt_duration(wall));
    if !failures.is_empty() {
        println!("{} problem(s):", failures.len());
        for f in &failures {
            println!("  - {f}");
        }
        println!("log: {}", log.display());
        return Ok(false);
    }
    Ok(true)
}

/// A bound on a loop: `count` iterations or `time`, whichever comes first.
pub fn deadline(bound: Duration) -> Instant {
    Instant::now() + bound
}

#[cfg(test)]
mod tests {
    use super::{Args, Plan};
    use clap::Parser;

    fn plan(argv: &[&str]) -> anyhow::Result<Plan> {
        let args =
            Args::try_parse_from(std::iter::once("kproxy-compare").chain(argv.iter().copied()))?;
        Plan::from_args(&args)
    }

    #[test]
    fn presets() {
        let full = plan(&[]).unwrap();
        assert_eq!(full.preset, "full");
        assert_eq!(full.scales, [1, 1_000, 10_000, 30_000, 100_000]);
        assert_eq!(full.iperf_scales, full.scales);
        assert!(full.dataplane_args().is_empty());

        let quick = plan(&["--quick"]).unwrap();
        assert_eq!(quick.preset, "quick");
        assert_eq!(quick.scales, [1, 1_000, 10_000, 30_000]);
        assert_eq!(quick.iperf_scales, [1, 30_000]);
        assert_eq!(quick.dataplane_args(), ["--quick"]);

        let smoke = plan(&["--smoke", "--out", "/tmp/smoke"]).unwrap();
        assert_eq!(smoke.preset, "smoke");
        assert_eq!(smoke.scales, [1, 100]);
        assert_eq!(smoke.modes, ["ebpf", "iptables"]);
        assert_eq!((smoke.connections, smoke.changes), (30, 3));
        assert_eq!(
            (smoke.iperf_scales.as_slice(), smoke.iperf_secs),
            (&[1][..], 1)
        );
        assert_eq!(smoke.dataplane_args(), ["--smoke"]);

        let custom = plan(&["--smoke", "--services", "5,1"]).unwrap();
        assert_eq!(
            (custom.preset.as_str(), custom.scales.as_slice()),
            ("smoke-custom", &[1, 5][..])
        );
        assert_eq!(custom.dataplane_args(), ["--smoke"]);

        assert!(plan(&["--smoke", "--quick"]).is_err());
        assert!(plan(&["--services", "0"]).is_err());
    }
}
