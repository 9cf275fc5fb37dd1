//! `cargo xtask bench cluster [--pods N] [--probe] [--smoke]`: builds
//! kcontrol and kproxy and runs `kcluster-bench` (bench/src/cluster/), which
//! starts a fresh single-node cluster (testbed's, the one `cargo xtask up`
//! runs), measures pod created → Running, → Ready and → endpoint programmed
//! in kproxy's dataplane, and writes the samples and the report. What is
//! measured and how is documented in bench/src/cluster/measure.rs; xtask
//! only parses the arguments, builds, and checks the smoke report.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::util::{self, Toolchain, run};
use crate::{build, smoke};

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

/// Builds, then runs the benchmark (and its report) as `kcluster-bench`.
pub fn run_cluster_bench(args: &[String]) -> Result<()> {
    let opts = parse_args(args)?;
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
    let samples = match &report_dir {
        Some(dir) => dir.join("samples.json"),
        None => samples_path(),
    };
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
            "kcluster-bench",
            "--target-dir",
        ])
        .arg(util::target_dir())
        .arg("--")
        .arg("--kcontrol")
        .arg(&outputs.kcontrol)
        .arg("--kproxy")
        .arg(&outputs.kproxy)
        .arg("--data-dir")
        .arg(util::target_dir().join("cluster-bench"))
        .args(["--pods", &opts.pods.to_string()])
        .args(["--invocation", &opts.invocation()])
        .arg("--samples")
        .arg(&samples);
    if opts.probe {
        cmd.arg("--probe");
    }
    if let Some(dir) = &report_dir {
        cmd.arg("--out").arg(dir);
    }
    run(&mut cmd)?;
    if let Some(dir) = &report_dir {
        smoke::check_report(&dir.join("latest-cluster.md"), 1)?;
    }
    Ok(())
}

/// Where a full run's samples go (`kcluster-report --samples` reads them
/// again).
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
}
