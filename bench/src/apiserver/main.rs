//! `kcontrol-bench`: the real `kcontrol apiserver` on a temporary data dir
//! (loopback, port 0, HTTPS with the admin kubeconfig it writes), measured
//! from outside through the API with kube-rs:
//!
//! 1. bulk: N Services created by W concurrent writers (wall time,
//!    creates/s, per-request latency p50/p99), while a watcher on its own
//!    connection receives every event (delivery latency under load);
//! 2. paced: M more creates, one at a time, each followed by a short pause;
//!    watch delivery latency = event received − write acknowledged, both
//!    stamped with the same monotonic clock in this process.
//!
//! Each `--backend LABEL[=ARGS]` runs the same measurement against a fresh
//! apiserver started with ARGS appended to its command line (e.g.
//! `etcd=--store etcd://127.0.0.1:2379`), and the report shows the backends
//! side by side. Run it through `cargo xtask bench apiserver`.

mod measure;
mod report;
mod server;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "kcontrol-bench",
    about = "kcontrol apiserver: create throughput and watch delivery latency"
)]
pub struct Args {
    /// Services created in the bulk phase.
    #[arg(long, default_value_t = 10_000)]
    pub services: usize,
    /// Concurrent writers in the bulk phase (each its own HTTP/1.1
    /// connection from kube-rs's pool).
    #[arg(long, default_value_t = 32)]
    pub writers: usize,
    /// Paced writes for the watch delivery latency.
    #[arg(long, default_value_t = 300)]
    pub watch_writes: usize,
    /// Pause between paced writes, milliseconds.
    #[arg(long, default_value_t = 10)]
    pub pace_ms: u64,
    /// Quick preset: 1,000 services, 100 paced writes.
    #[arg(long)]
    pub quick: bool,
    /// Smoke preset (seconds; `cargo xtask test` runs it): 100 services by 4
    /// writers, 20 paced writes 2 ms apart; the report is
    /// `apiserver-DATE-smoke.*` and `latest-apiserver-smoke.md`. Give it
    /// `--out` so that it does not land beside the committed reports.
    #[arg(long, conflicts_with = "quick")]
    pub smoke: bool,
    /// A store to measure: LABEL, or LABEL=ARGS where ARGS (split at
    /// whitespace) are appended to `kcontrol apiserver`. Repeatable; the
    /// default is the embedded store, `sqlite`.
    #[arg(long = "backend")]
    pub backends: Vec<String>,
    /// The kcontrol binary (default: $KCONTROL_BIN, else
    /// target/release/kcontrol).
    #[arg(long)]
    pub kcontrol: Option<PathBuf>,
    /// Where the report, JSON and plots go.
    #[arg(long, default_value_os_t = Path::new(env!("CARGO_MANIFEST_DIR")).join("results"))]
    pub out: PathBuf,
}

/// One store to measure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Backend {
    pub label: String,
    /// Appended to `kcontrol apiserver --data-dir D --listen 127.0.0.1:0`.
    pub extra_args: Vec<String>,
}

pub fn parse_backend(s: &str) -> Result<Backend> {
    let (label, args) = match s.split_once('=') {
        Some((l, a)) => (l.trim(), a.split_whitespace().map(str::to_owned).collect()),
        None => (s.trim(), Vec::new()),
    };
    if label.is_empty()
        || !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("--backend {s:?}: expected LABEL or LABEL=ARGS (LABEL: letters, digits, - _ .)");
    }
    Ok(Backend {
        label: label.to_owned(),
        extra_args: args,
    })
}

impl Args {
    /// Applies `--quick` / `--smoke` (they only ever lower the counts).
    fn apply_preset(&mut self) {
        if self.quick {
            self.services = self.services.min(1_000);
            self.watch_writes = self.watch_writes.min(100);
        }
        if self.smoke {
            self.services = self.services.min(100);
            self.writers = self.writers.min(4);
            self.watch_writes = self.watch_writes.min(20);
            self.pace_ms = self.pace_ms.min(2);
        }
    }

    /// `-quick`, `-smoke` or nothing: the suffix of the report's file names.
    pub fn preset_suffix(&self) -> &'static str {
        if self.smoke {
            "-smoke"
        } else if self.quick {
            "-quick"
        } else {
            ""
        }
    }
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    args.apply_preset();
    if args.writers == 0 || args.services == 0 || args.watch_writes == 0 {
        bail!("--services, --writers and --watch-writes must be at least 1");
    }
    let backends = if args.backends.is_empty() {
        vec![parse_backend("sqlite")?]
    } else {
        args.backends
            .iter()
            .map(|b| parse_backend(b))
            .collect::<Result<Vec<_>>>()?
    };
    let kcontrol = match &args.kcontrol {
        Some(p) => p.clone(),
        None => std::env::var_os("KCONTROL_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/kcontrol")
            }),
    };
    if !kcontrol.is_file() {
        bail!(
            "kcontrol binary {} not found: build it (cargo build --release -p kcontrol) or pass --kcontrol",
            kcontrol.display()
        );
    }
    let env = report::Environment::collect(&kcontrol);
    println!(
        "kcontrol-bench: {} services by {} writers, {} paced watch writes; backends: {}; {} CPUs, load {}",
        args.services,
        args.writers,
        args.watch_writes,
        backends
            .iter()
            .map(|b| b.label.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        env.cpus,
        env.load_at_start
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut runs = Vec::new();
    for b in &backends {
        println!("== backend {} ({})", b.label, b.extra_args.join(" "));
        let run = rt
            .block_on(measure::run(&kcontrol, b, &args))
            .with_context(|| format!("backend {}", b.label))?;
        report::print(&run);
        runs.push(run);
    }
    let env = env.finish();
    let paths = report::write(&args, &env, &runs)?;
    for p in paths {
        println!("wrote {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Args, parse_backend};
    use clap::Parser;

    fn parsed(argv: &[&str]) -> Args {
        let mut a =
            Args::try_parse_from(std::iter::once("kcontrol-bench").chain(argv.iter().copied()))
                .unwrap();
        a.apply_preset();
        a
    }

    #[test]
    fn presets_lower_the_counts() {
        let a = parsed(&[]);
        assert_eq!(
            (a.services, a.writers, a.watch_writes, a.preset_suffix()),
            (10_000, 32, 300, "")
        );
        let a = parsed(&["--quick"]);
        assert_eq!(
            (a.services, a.watch_writes, a.preset_suffix()),
            (1_000, 100, "-quick")
        );
        let a = parsed(&["--smoke", "--out", "/tmp/x"]);
        assert_eq!(
            (
                a.services,
                a.writers,
                a.watch_writes,
                a.pace_ms,
                a.preset_suffix()
            ),
            (100, 4, 20, 2, "-smoke")
        );
        assert_eq!(a.out, std::path::Path::new("/tmp/x"));
        // Explicit smaller counts stay.
        assert_eq!(parsed(&["--smoke", "--services", "10"]).services, 10);
        assert!(
            Args::try_parse_from(["kcontrol-bench", "--smoke", "--quick"]).is_err(),
            "--smoke and --quick together"
        );
    }

    #[test]
    fn backends_take_a_label_and_extra_args() {
        let b = parse_backend("sqlite").unwrap();
        assert_eq!((b.label.as_str(), b.extra_args.len()), ("sqlite", 0));
        let b = parse_backend("etcd=--store etcd://127.0.0.1:2379").unwrap();
        assert_eq!(b.label, "etcd");
        assert_eq!(b.extra_args, ["--store", "etcd://127.0.0.1:2379"]);
        assert!(parse_backend("=x").is_err());
        assert!(parse_backend("a b").is_err());
    }
}
