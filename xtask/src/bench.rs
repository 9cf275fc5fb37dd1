//! `cargo xtask bench WHAT [ARGS...]`: builds, then runs the benchmark binary
//! `kproxy-bench` from proxy-user with the freshly built eBPF object.

use anyhow::Result;

use crate::build::{self, BPF_OBJ_ENV};
use crate::setup;
use crate::util::{self, Toolchain, run};

pub fn run_bench(what: &str, rest: &[String]) -> Result<()> {
    setup::run_setup()?;
    let outputs = build::build_all(true)?;
    run(util::cargo(Toolchain::Active)
        .current_dir(util::workspace_root())
        .env(BPF_OBJ_ENV, &outputs.bpf_obj)
        .env("KPROXY_BIN", &outputs.kproxy)
        .args([
            "run",
            "--release",
            "-p",
            "proxy-user",
            "--bin",
            "kproxy-bench",
            "--target-dir",
        ])
        .arg(util::target_dir())
        .arg("--")
        .arg(what)
        .args(rest))
}
