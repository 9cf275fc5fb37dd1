//! `cargo xtask bench [compare] [ARGS...]` and `cargo xtask bench dataplane
//! [ARGS...]`: builds (eBPF object, agent, benchmark binaries), then runs
//!
//! - `compare` (the default, also when the first argument is a flag such as
//!   `--quick`): `kproxy-compare` from bench/, eBPF mode against iptables
//!   mode in network namespaces; report and plots in bench/results/;
//! - `dataplane`: `kproxy-bench dataplane` from proxy-user, the
//!   BPF_PROG_TEST_RUN ns/packet table;
//! - `apiserver [--store sqlite[,etcd]] [ARGS...]`: `kcontrol-bench` from
//!   bench/ against a real `kcontrol apiserver` per store (10,000 Service
//!   creates, watch delivery latency); report and plots in bench/results/.
//!   Needs no root and no eBPF build.
//! - `cluster [--pods N]`: a fresh single-node cluster (`kcontrol all` +
//!   kproxy), N pods created one at a time: create → Running, Ready and
//!   endpoint programmed (cluster_bench.rs); report by `kcluster-report`.
//! - `watch [--secs N] [--store sqlite,etcd]`: the long run of kcontrol's
//!   watch stress test (watch_bench.rs); report in bench/results/.

use anyhow::{Context, Result, bail};

use crate::build::{self, BPF_OBJ_ENV};
use crate::etcd;
use crate::setup;
use crate::util::{self, Toolchain, run};

/// Which benchmark `args` ask for, and its own arguments.
fn split(args: &[String]) -> Result<(&'static str, &[String])> {
    match args.first().map(String::as_str) {
        None => Ok(("compare", args)),
        Some("compare") => Ok(("compare", &args[1..])),
        Some("dataplane") => Ok(("dataplane", &args[1..])),
        Some("apiserver") => Ok(("apiserver", &args[1..])),
        Some("cluster") => Ok(("cluster", &args[1..])),
        Some("watch") => Ok(("watch", &args[1..])),
        Some(flag) if flag.starts_with('-') => Ok(("compare", args)),
        Some(other) => bail!(
            "unknown benchmark {other:?}: `cargo xtask bench [--quick]` (eBPF against iptables, \
             kproxy-compare), `cargo xtask bench dataplane [--quick]` (BPF_PROG_TEST_RUN) or \
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

fn run_apiserver_bench(args: &[String], rest: &[String]) -> Result<()> {
    let mut etcd = None;
    let (backends, rest) = apiserver_backends(rest, || {
        let e = etcd::Etcd::start()?;
        let url = e.url();
        println!("xtask: etcd for the benchmark at {url}");
        etcd = Some(e);
        Ok(url)
    })?;
    let root = util::workspace_root();
    let mut build = util::cargo(Toolchain::Active);
    build
        .current_dir(&root)
        .args(["build", "--release", "-p", "kcontrol", "--target-dir"])
        .arg(util::target_dir());
    run(&mut build)?;
    let mut invocation = String::from("cargo xtask bench");
    for a in args {
        invocation.push(' ');
        invocation.push_str(a);
    }
    let mut cmd = util::cargo(Toolchain::Active);
    cmd.current_dir(&root)
        .env("KCONTROL_BENCH_INVOCATION", invocation)
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
        .arg(util::target_dir().join("release/kcontrol"));
    for b in backends {
        cmd.arg("--backend").arg(b);
    }
    cmd.args(rest);
    let result = run(&mut cmd);
    drop(etcd);
    result
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
    setup::run_setup()?;
    let outputs = build::build_all(true)?;
    let mut cmd = util::cargo(Toolchain::Active);
    cmd.current_dir(util::workspace_root())
        .env(BPF_OBJ_ENV, &outputs.bpf_obj)
        .env("KPROXY_BIN", &outputs.kproxy)
        .args(["run", "--release"]);
    match what {
        "dataplane" => {
            cmd.args(["-p", "proxy-user", "--bin", "kproxy-bench", "--target-dir"])
                .arg(util::target_dir())
                .arg("--")
                .arg("dataplane")
                .args(rest);
        }
        _ => {
            // Recorded in the report as the command that produced it.
            let mut invocation = String::from("cargo xtask bench");
            for a in args {
                invocation.push(' ');
                invocation.push_str(a);
            }
            cmd.env("KPROXY_COMPARE_INVOCATION", invocation)
                .args(["-p", "kproxy-compare", "--target-dir"])
                .arg(util::target_dir())
                .arg("--")
                .arg("--kproxy")
                .arg(&outputs.kproxy)
                .args(rest);
        }
    }
    run(&mut cmd)
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
