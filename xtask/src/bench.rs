//! `cargo xtask bench [compare] [ARGS...]` and `cargo xtask bench dataplane
//! [ARGS...]`: builds (eBPF object, agent, benchmark binaries), then runs
//!
//! - `compare` (the default, also when the first argument is a flag such as
//!   `--quick`): `kproxy-compare` from bench/, eBPF mode against iptables
//!   mode in network namespaces; report and plots in bench/results/;
//! - `dataplane`: `kproxy-bench dataplane` from proxy-user, the
//!   BPF_PROG_TEST_RUN ns/packet table, new-flow cost by selector and the
//!   conntrack sweep; report and plot (`kdataplane-report`) in
//!   bench/results/;
//! - `nodeport`: `knodeport-bench` from bench/, NodePort traffic to a remote
//!   endpoint through XDP, TC alone and iptables: ns/packet (test-run) and
//!   forwarded packets per second; report and plot in bench/results/;
//! - `apiserver [--store sqlite[,etcd]] [ARGS...]`: `kcontrol-bench` from
//!   bench/ against a real `kcontrol apiserver` per store (10,000 Service
//!   creates, watch delivery latency); report and plots in bench/results/.
//!   Needs no root and no eBPF build.
//! - `cluster [--pods N]`: a fresh single-node cluster (`kcontrol all` +
//!   kproxy), N pods created one at a time: create → Running, Ready and
//!   endpoint programmed (cluster_bench.rs); report by `kcluster-report`.
//! - `watch [--secs N] [--store sqlite,etcd]`: the long run of kcontrol's
//!   watch stress test (watch_bench.rs); report in bench/results/.
//!
//! Each takes `--smoke`: the smallest scale, seconds to a minute, the same
//! code path end to end (start, measure, report and plots), written under
//! target/bench-smoke/NAME/ (emptied first) instead of bench/results/, and
//! then checked: the report exists, it links its plots, and every file it
//! links to exists. `cargo xtask test` runs them all (smoke.rs).

use std::process::Stdio;

use anyhow::{Context, Result, bail};

use crate::build::{BPF_OBJ_ENV, KPROXY_BIN_ENV};
use crate::smoke;
use crate::util::{self, Toolchain, run};

/// Which benchmark `args` ask for, and its own arguments.
pub(crate) fn split(args: &[String]) -> Result<(&'static str, &[String])> {
    match args.first().map(String::as_str) {
        None => Ok(("compare", args)),
        Some("compare") => Ok(("compare", &args[1..])),
        Some("dataplane") => Ok(("dataplane", &args[1..])),
        Some("nodeport") => Ok(("nodeport", &args[1..])),
        Some("apiserver") => Ok(("apiserver", &args[1..])),
        Some("cluster") => Ok(("cluster", &args[1..])),
        Some("watch") => Ok(("watch", &args[1..])),
        Some(flag) if flag.starts_with('-') => Ok(("compare", args)),
        Some(other) => bail!(
            "unknown benchmark {other:?}: `cargo xtask bench [--quick]` (eBPF against iptables, \
             kproxy-compare), `cargo xtask bench dataplane [--quick]` (BPF_PROG_TEST_RUN) or \
             `cargo xtask bench nodeport` (XDP vs TC vs iptables, NodePort to a remote endpoint) or \
             `cargo xtask bench apiserver [--quick] [--store sqlite,etcd]` (kcontrol apiserver) or \
             `cargo xtask bench cluster [--pods N]` (pod create → Running/Ready/programmed) or \
             `cargo xtask bench watch [--secs N] [--store sqlite,etcd]` (watch stress)"
        ),
    }
}

/// One `--backend LABEL=ARGS` of kcontrol-bench per store named by
/// `--store` (comma-separated or repeated; default `sqlite`), and the other
/// arguments. A store that needs a server of its own is started by
/// `start_etcd` (called at most once; it returns the `--store` URL) and its
/// address passed in the apiserver arguments.
fn apiserver_backends(
    args: &[String],
    mut start_etcd: impl FnMut() -> Result<String>,
) -> Result<(Vec<String>, Vec<String>)> {
    let mut stores = Vec::new();
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--store" {
            let v = it.next().context("--store needs a value: sqlite, etcd")?;
            stores.extend(v.split(',').map(str::to_owned));
        } else if let Some(v) = a.strip_prefix("--store=") {
            stores.extend(v.split(',').map(str::to_owned));
        } else {
            rest.push(a.clone());
        }
    }
    if stores.is_empty() {
        stores.push("sqlite".into());
    }
    let mut backends = Vec::new();
    for s in stores {
        match s.as_str() {
            // The embedded store is kcontrol's default: no extra arguments.
            "sqlite" => backends.push("sqlite".to_owned()),
            // One etcd member on a free loopback port (stopped afterwards),
            // then the same measurement with `--store etcd://127.0.0.1:PORT`.
            "etcd" => backends.push(format!("etcd=--store {}", start_etcd()?)),
            other => bail!("--store {other:?}: expected sqlite or etcd"),
        }
    }
    Ok((backends, rest))
}

/// Removes `--smoke` from `args`; true when it was there.
fn take_smoke(args: &[String]) -> (bool, Vec<String>) {
    let rest: Vec<String> = args.iter().filter(|a| *a != "--smoke").cloned().collect();
    (rest.len() != args.len(), rest)
}

/// `cargo xtask bench …` as typed, recorded in the reports.
fn invocation(args: &[String]) -> String {
    let mut invocation = String::from("cargo xtask bench");
    for a in args {
        invocation.push(' ');
        invocation.push_str(a);
    }
    invocation
}

/// The checks of `cargo xtask bench dataplane --smoke` on kproxy-bench's
/// output: a table row per service count with every figure a positive
/// number (a class that was not measured or not translated would be 0,
/// NaN or missing), then the ratio and targets lines.
fn check_dataplane_table(out: &str, scales: &[u32]) -> Result<()> {
    for n in scales {
        let row = out
            .lines()
            .find(|l| l.starts_with(&format!("| {n} |")))
            .with_context(|| format!("no table row for {n} services in:\n{out}"))?;
        let cells: Vec<&str> = row
            .split('|')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        if cells.len() != 7 {
            bail!(
                "row for {n} services has {} cells, want 7: {row}",
                cells.len()
            );
        }
        // Programming 1 service rounds to 0.0 ms; the per-packet figures
        // (non-IPv4 … reverse NAT) cannot.
        for (i, c) in cells.iter().enumerate().skip(1) {
            let v: f64 = c
                .parse()
                .with_context(|| format!("cell {c:?} of row {row:?} is not a number"))?;
            if !v.is_finite() || v < 0.0 || (i >= 2 && v <= 0.0) {
                bail!("implausible figure {c} in row {row:?}");
            }
        }
    }
    if scales.len() > 1 && !out.lines().any(|l| l.starts_with("targets:")) {
        bail!("no `targets:` line in:\n{out}");
    }
    // Both families timed in one datapath: miss, new flow, established,
    // reverse NAT, each a positive number.
    for family in ["IPv4", "IPv6"] {
        let row = out
            .lines()
            .find(|l| l.starts_with(&format!("| {family} |")))
            .with_context(|| format!("no {family} row in:\n{out}"))?;
        let cells: Vec<f64> = row
            .split('|')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .skip(1)
            .map(|c| c.parse::<f64>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("{family} row {row:?} has a cell that is not a number"))?;
        if cells.len() != 4 || cells.iter().any(|v| !v.is_finite() || *v <= 0.0) {
            bail!("implausible {family} row {row:?}");
        }
    }
    Ok(())
}

/// Service counts of the dataplane smoke run.
const DATAPLANE_SMOKE_SCALES: [u32; 2] = [1, 1_000];

fn run_apiserver_bench(args: &[String], rest: &[String]) -> Result<()> {
    let (smoke, rest) = take_smoke(rest);
    let rest = &rest[..];
    let mut etcd = None;
    let (backends, rest) = apiserver_backends(rest, || {
        let e = testbed::EtcdCluster::start(1)?;
        let url = e.url();
        println!("xtask: etcd for the benchmark at {url}");
        etcd = Some(e);
        Ok(url)
    })?;
    let root = util::workspace_root();
    // Inside `cargo xtask test` (smoke.rs) kcontrol is built already.
    let kcontrol = match smoke::reused_builds()? {
        Some(outputs) => outputs.kcontrol,
        None => {
            let mut build = util::cargo(Toolchain::Active);
            build
                .current_dir(&root)
                .args(["build", "--release", "-p", "kcontrol", "--target-dir"])
                .arg(util::target_dir());
            run(&mut build)?;
            util::target_dir().join("release/kcontrol")
        }
    };
    let out = smoke.then(|| smoke::out_dir("apiserver"));
    if let Some(dir) = &out {
        smoke::fresh_dir(dir)?;
    }
    let mut cmd = util::cargo(Toolchain::Active);
    cmd.current_dir(&root)
        .env("KCONTROL_BENCH_INVOCATION", invocation(args))
        .args([
            "run",
            "--release",
            "-p",
            "kproxy-compare",
            "--bin",
            "kcontrol-bench",
            "--target-dir",
        ])
        .arg(util::target_dir())
        .arg("--")
        .arg("--kcontrol")
        .arg(kcontrol);
    for b in backends {
        cmd.arg("--backend").arg(b);
    }
    if let Some(dir) = &out {
        cmd.arg("--smoke").arg("--out").arg(dir);
    }
    cmd.args(rest);
    let result = run(&mut cmd);
    drop(etcd);
    result?;
    if let Some(dir) = &out {
        smoke::check_report(&dir.join("latest-apiserver-smoke.md"), 2)?;
    }
    Ok(())
}

pub fn run_bench(args: &[String]) -> Result<()> {
    let (what, rest) = split(args)?;
    if what == "apiserver" {
        return run_apiserver_bench(args, rest);
    }
    if what == "cluster" {
        return crate::cluster_bench::run_cluster_bench(rest);
    }
    if what == "watch" {
        return crate::watch_bench::run_watch_bench(rest);
    }
    let (smoke, rest) = take_smoke(rest);
    let outputs = smoke::builds()?;
    let mut cmd = util::cargo(Toolchain::Active);
    cmd.current_dir(util::workspace_root())
        .env(BPF_OBJ_ENV, &outputs.bpf_obj)
        .env(KPROXY_BIN_ENV, &outputs.kproxy)
        .args(["run", "--release"]);
    if what == "dataplane" {
        // kproxy-bench prints its tables on stdout (shown, and checked in a
        // smoke run) and writes its figures as JSON; kdataplane-report
        // turns those into the report and plot.
        let (dir, date) = if smoke {
            let dir = smoke::out_dir("dataplane");
            smoke::fresh_dir(&dir)?;
            (dir, "smoke".to_owned())
        } else {
            let date = String::from_utf8(
                std::process::Command::new("date")
                    .args(["-u", "+%Y-%m-%d"])
                    .output()
                    .context("running date")?
                    .stdout,
            )?;
            (
                util::workspace_root().join("bench/results"),
                date.trim().to_owned(),
            )
        };
        let json = util::target_dir().join("dataplane-figures.json");
        cmd.args(["-p", "proxy-user", "--bin", "kproxy-bench", "--target-dir"])
            .arg(util::target_dir())
            .arg("--")
            .arg("dataplane")
            .arg("--json")
            .arg(&json);
        let scales = DATAPLANE_SMOKE_SCALES.map(|n| n.to_string()).join(",");
        if smoke {
            cmd.args(["--smoke", "--services", &scales]);
        }
        cmd.args(rest);
        let shown = util::display(&cmd);
        say!("==> running: {shown}");
        let done = cmd
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("could not start `{shown}`"))?;
        let table = String::from_utf8_lossy(&done.stdout);
        say!("{table}");
        if !done.status.success() {
            bail!("`{shown}` failed ({})", done.status);
        }
        if smoke {
            check_dataplane_table(&table, &DATAPLANE_SMOKE_SCALES)?;
            say!("==> smoke: the table has every figure for {scales} services");
        }
        let mut report = util::cargo(Toolchain::Active);
        report
            .current_dir(util::workspace_root())
            .args([
                "run",
                "--release",
                "-p",
                "kproxy-compare",
                "--bin",
                "kdataplane-report",
                "--target-dir",
            ])
            .arg(util::target_dir())
            .arg("--")
            .arg("--json")
            .arg(&json)
            .arg("--out")
            .arg(&dir)
            .arg("--date")
            .arg(&date)
            .arg("--invocation")
            .arg(invocation(args));
        run(&mut report)?;
        if smoke {
            smoke::check_report(&dir.join("latest-dataplane.md"), 1)?;
        }
        return Ok(());
    }
    if what == "nodeport" {
        let out = smoke.then(|| smoke::out_dir("nodeport"));
        cmd.env("KNODEPORT_BENCH_INVOCATION", invocation(args))
            .args([
                "-p",
                "kproxy-compare",
                "--bin",
                "knodeport-bench",
                "--target-dir",
            ])
            .arg(util::target_dir())
            .arg("--");
        if let Some(dir) = &out {
            smoke::fresh_dir(dir)?;
            cmd.arg("--smoke").arg("--out").arg(dir);
        }
        cmd.args(rest);
        run(&mut cmd)?;
        if let Some(dir) = &out {
            smoke::check_report(&dir.join("latest-nodeport-smoke.md"), 1)?;
        }
        return Ok(());
    }
    // compare. Its own binary name: the package also has kcontrol-bench
    // and kcluster-report.
    let out = smoke.then(|| smoke::out_dir("compare"));
    cmd.env("KPROXY_COMPARE_INVOCATION", invocation(args))
        .args([
            "-p",
            "kproxy-compare",
            "--bin",
            "kproxy-compare",
            "--target-dir",
        ])
        .arg(util::target_dir())
        .arg("--")
        .arg("--kproxy")
        .arg(&outputs.kproxy);
    if let Some(dir) = &out {
        smoke::fresh_dir(dir)?;
        cmd.arg("--smoke")
            .arg("--out")
            .arg(dir)
            .arg("--log")
            .arg(dir.join("kproxy-compare.log"));
    }
    cmd.args(rest);
    run(&mut cmd)?;
    if let Some(dir) = &out {
        // Three plots: first-packet, change latency, programming.
        smoke::check_report(&dir.join("latest-smoke.md"), 3)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn compare_is_the_default() {
        assert_eq!(split(&[]).unwrap(), ("compare", &[][..]));
        let q = s(&["--quick"]);
        assert_eq!(split(&q).unwrap(), ("compare", &q[..]));
        let c = s(&["compare", "--quick"]);
        assert_eq!(split(&c).unwrap(), ("compare", &c[1..]));
        let d = s(&["dataplane", "--services", "1,100000"]);
        assert_eq!(split(&d).unwrap(), ("dataplane", &d[1..]));
        assert!(split(&s(&["nonsense"])).is_err());
        let a = s(&["apiserver", "--quick"]);
        assert_eq!(split(&a).unwrap(), ("apiserver", &a[1..]));
        let c = s(&["cluster", "--pods", "5"]);
        assert_eq!(split(&c).unwrap(), ("cluster", &c[1..]));
        let w = s(&["watch", "--secs", "300"]);
        assert_eq!(split(&w).unwrap(), ("watch", &w[1..]));
    }

    #[test]
    fn smoke_flag_is_taken_out_of_the_arguments() {
        let (smoke, rest) = super::take_smoke(&s(&["--smoke", "--store", "sqlite,etcd"]));
        assert!(smoke);
        assert_eq!(rest, s(&["--store", "sqlite,etcd"]));
        let (smoke, rest) = super::take_smoke(&s(&["--quick"]));
        assert!(!smoke);
        assert_eq!(rest, s(&["--quick"]));
        // `cargo xtask bench --smoke` is the compare benchmark's smoke run.
        let a = s(&["--smoke"]);
        assert_eq!(split(&a).unwrap(), ("compare", &a[..]));
        let a = s(&["dataplane", "--smoke"]);
        assert_eq!(split(&a).unwrap(), ("dataplane", &a[1..]));
        assert_eq!(
            super::invocation(&s(&["apiserver", "--smoke"])),
            "cargo xtask bench apiserver --smoke"
        );
    }

    #[test]
    fn dataplane_smoke_check_wants_every_figure() {
        let table = "\
BPF_PROG_TEST_RUN, ns/packet (repeat 1000, new flows over 100 single runs), kernel 6.18

| services | programming (ms) | non-IPv4 | IPv4 miss | new flow | established | reverse NAT |
|---:|---:|---:|---:|---:|---:|---:|
| 1 | 0.0 | 39.0 | 60.0 | 1007.2 | 167.0 | 134.0 |
| 1000 | 10.3 | 39.0 | 61.0 | 625.2 | 167.0 | 134.0 |

ratio 1000÷1 services: miss 1.02, new flow 0.62, established 1.00, reverse NAT 1.00
targets: established ≤ 120 ns: MISSED (167.0); miss ≤ 50 ns: MISSED (61.0)

| family | miss | new flow | established | reverse NAT |
|---|---:|---:|---:|---:|
| IPv4 | 83.0 | 604.0 | 183.0 | 143.0 |
| IPv6 | 65.0 | 666.0 | 190.0 | 148.0 |
";
        super::check_dataplane_table(table, &[1, 1000]).unwrap();
        let err = super::check_dataplane_table(table, &[1, 100_000]).unwrap_err();
        assert!(err.to_string().contains("no table row for 100000"), "{err}");
        for (from, to) in [
            ("| 625.2 |", "| 0.0 |"),
            ("| 625.2 |", "| NaN |"),
            ("| 625.2 |", "| - |"),
            ("| 134.0 |\n\n", "|\n\n"),
            ("targets:", "target"),
            ("| 666.0 |", "| 0.0 |"),
            ("| IPv6 |", "| IPv7 |"),
        ] {
            let broken = table.replacen(from, to, 1);
            assert_ne!(broken, table, "{from:?} not in the table");
            assert!(
                super::check_dataplane_table(&broken, &[1, 1000]).is_err(),
                "accepted with {from:?} → {to:?}:\n{broken}"
            );
        }
    }

    #[test]
    fn apiserver_stores_become_backends() {
        let no_etcd = || -> anyhow::Result<String> { panic!("etcd not asked for") };
        let (b, rest) = super::apiserver_backends(&s(&["--quick"]), no_etcd).unwrap();
        assert_eq!((b, rest), (s(&["sqlite"]), s(&["--quick"])));
        let (b, _) = super::apiserver_backends(&s(&["--store=sqlite"]), no_etcd).unwrap();
        assert_eq!(b, s(&["sqlite"]));
        let mut started = 0;
        let (b, _) = super::apiserver_backends(&s(&["--store", "sqlite,etcd"]), || {
            started += 1;
            Ok("etcd://127.0.0.1:2379".into())
        })
        .unwrap();
        assert_eq!(b, s(&["sqlite", "etcd=--store etcd://127.0.0.1:2379"]));
        assert_eq!(started, 1);
        let err =
            super::apiserver_backends(&s(&["--store", "etcd"]), || anyhow::bail!("no etcd binary"))
                .unwrap_err();
        assert!(err.to_string().contains("no etcd binary"), "{err}");
        assert!(super::apiserver_backends(&s(&["--store", "redis"]), no_etcd).is_err());
        assert!(super::apiserver_backends(&s(&["--store"]), no_etcd).is_err());
    }
}
