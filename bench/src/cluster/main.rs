//! `kcluster-report`: the report of a cluster benchmark run again from its
//! samples file (what `kcluster-bench` measured and wrote, e.g.
//! target/cluster-bench.json or bench/results/cluster-DATE.json), into
//! bench/results/cluster-DATE[-probe].{md,json,svg} and
//! latest-cluster[-probe].md.

mod report;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "kcluster-report",
    about = "Report and plot for `cargo xtask bench cluster`, from its samples"
)]
struct Args {
    /// The samples a run wrote.
    #[arg(long)]
    samples: PathBuf,
    /// Where the report, JSON and plot go.
    #[arg(long, default_value_os_t = Path::new(env!("CARGO_MANIFEST_DIR")).join("results"))]
    out: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    report::write(&args.samples, &args.out)
}
