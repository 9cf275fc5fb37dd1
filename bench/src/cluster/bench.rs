//! `kcluster-bench`: the single-node cluster benchmark (measure.rs), then
//! its report (report.rs). `cargo xtask bench cluster` builds kcontrol and
//! kproxy and runs this; the measuring lives here, next to its report, and
//! the cluster is the test bed's, as `cargo xtask up` runs it.

mod measure;
mod report;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use testbed::cluster::{Cluster, Options};
use testbed::log::Log;

#[derive(Parser)]
#[command(
    name = "kcluster-bench",
    about = "Pod created → Running/Ready/endpoint programmed on a fresh single-node cluster \
             (run by `cargo xtask bench cluster`)"
)]
struct Args {
    #[arg(long)]
    kcontrol: PathBuf,
    #[arg(long)]
    kproxy: PathBuf,
    /// The cluster's data dir (removed first: a fresh store).
    #[arg(long)]
    data_dir: PathBuf,
    /// Measured pods (after one warm-up pod).
    #[arg(long, default_value_t = 50)]
    pods: usize,
    /// A readinessProbe (httpGet every 1 s) decides Ready.
    #[arg(long)]
    probe: bool,
    /// The command line the report records.
    #[arg(long)]
    invocation: String,
    /// Where the samples go.
    #[arg(long)]
    samples: PathBuf,
    /// Where the report, JSON and plot go.
    #[arg(long, default_value_os_t = Path::new(env!("CARGO_MANIFEST_DIR")).join("results"))]
    out: PathBuf,
}

fn today() -> Result<String> {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .context("running date")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let log = Arc::new(Log::default());
    let on_signal = log.clone();
    // Ctrl-C only sets a flag: the cluster has to be stopped in order and
    // checked.
    ctrlc::set_handler(move || on_signal.interrupt()).context("installing the Ctrl-C handler")?;
    println!(
        "==> starting a fresh cluster in {}",
        args.data_dir.display()
    );
    let host = Options::host(&args.kcontrol, &args.kproxy, &args.data_dir)?;
    let mut c = Cluster::start(host, log)?;
    let result = measure::measure(&mut c, args.pods, args.probe);
    println!("==> stopping the cluster");
    let stopped = c.stop_clean();
    let (samples, verified) = result?;
    stopped?;

    let s = report::Samples {
        date: today()?,
        invocation: args.invocation,
        probe: args.probe,
        verified,
        samples,
    };
    let json = serde_json::to_string_pretty(&s)? + "\n";
    std::fs::write(&args.samples, json)
        .with_context(|| format!("writing {}", args.samples.display()))?;
    println!("==> samples: {}", args.samples.display());
    report::write(&args.samples, &args.out)
}
