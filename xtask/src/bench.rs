//! `cargo xtask bench [compare] [ARGS...]` and `cargo xtask bench dataplane
//! [ARGS...]`: builds (eBPF object, agent, benchmark binaries), then runs
//!
//! - `compare` (the default, also when the first argument is a flag such as
//!   `--quick`): `kproxy-compare` from bench/, eBPF mode against iptables
//!   mode in network namespaces; report and plots in bench/results/;
//! - `dataplane`: `kproxy-bench dataplane` from proxy-user, the
//!   BPF_PROG_TEST_RUN ns/packet table.

use anyhow::{Result, bail};

use crate::build::{self, BPF_OBJ_ENV};
use crate::setup;
use crate::util::{self, Toolchain, run};

/// Which benchmark `args` ask for, and its own arguments.
fn split(args: &[String]) -> Result<(&'static str, &[String])> {
    match args.first().map(String::as_str) {
        None => Ok(("compare", args)),
        Some("compare") => Ok(("compare", &args[1..])),
        Some("dataplane") => Ok(("dataplane", &args[1..])),
        Some(flag) if flag.starts_with('-') => Ok(("compare", args)),
        Some(other) => bail!(
            "unknown benchmark {other:?}: `cargo xtask bench [--quick]` (eBPF against iptables, \
             kproxy-compare) or `cargo xtask bench dataplane [--quick]` (BPF_PROG_TEST_RUN)"
        ),
    }
}

pub fn run_bench(args: &[String]) -> Result<()> {
    let (what, rest) = split(args)?;
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
    }
}
