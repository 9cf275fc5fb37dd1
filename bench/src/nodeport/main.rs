//! `knodeport-bench` (`cargo xtask bench nodeport`): NodePort traffic to an
//! endpoint on another node through kproxy's XDP fast path, its TC programs
//! alone and kube-proxy-style iptables rules — ns/packet through
//! BPF_PROG_TEST_RUN (`testrun.rs`) and forwarded packets per second through
//! a node namespace (`pps.rs`), side by side in one run; report, plot and
//! JSON in bench/results/ (`report.rs`). Needs root; `KPROXY_BIN` names the
//! agent (xtask sets it).

mod pps;
mod report;
mod testrun;

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "knodeport-bench")]
struct Args {
    /// Seconds per forwarding round.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Forwarding rounds per mode (the best counts).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Single test runs per measured path.
    #[arg(long, default_value_t = 3000)]
    single_runs: u32,
    /// Repeats of the repeated (miss) test runs.
    #[arg(long, default_value_t = 200_000)]
    repeat: u32,
    /// Seconds, not minutes: every step at the smallest size.
    #[arg(long)]
    smoke: bool,
    /// Where the report goes (default bench/results).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn first_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.secs = 0.3;
        args.rounds = 1;
        args.single_runs = args.single_runs.min(100);
        args.repeat = 1000;
    }
    if args.secs <= 0.0 || args.rounds == 0 || args.single_runs == 0 || args.repeat == 0 {
        bail!("--secs, --rounds, --single-runs and --repeat must be positive");
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let env = report::Environment {
        date: first_line("date", &["-u", "+%F"]),
        kernel: first_line("uname", &["-r"]),
        cpu: std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "?".into()),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg: std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
        invocation: std::env::var("KNODEPORT_BENCH_INVOCATION")
            .unwrap_or_else(|_| "cargo xtask bench nodeport".into()),
        secs: args.secs,
        rounds: args.rounds,
        single_runs: args.single_runs,
    };
    eprintln!(
        "[nodeport] BPF_PROG_TEST_RUN, {} single runs per path",
        args.single_runs
    );
    let t = testrun::measure(args.single_runs, args.repeat)?;
    eprintln!("[nodeport] {t:?}");
    let pps = pps::measure(args.secs, args.rounds)?;
    let out = if args.smoke {
        report::Out {
            dir: args
                .out
                .clone()
                .unwrap_or_else(|| root.join("target/bench-smoke/nodeport")),
            stem: "nodeport-smoke".into(),
            latest: "latest-nodeport-smoke.md".into(),
        }
    } else {
        report::Out {
            dir: args
                .out
                .clone()
                .unwrap_or_else(|| root.join("bench/results")),
            stem: format!("nodeport-{}", env.date),
            latest: "latest-nodeport.md".into(),
        }
    };
    for p in report::write(&out, &env, &t, &pps)? {
        println!("wrote {}", p.display());
    }
    Ok(())
}
