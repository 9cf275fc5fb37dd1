//! `cargo xtask test`: the whole gate CI runs (.ci/run): setup, build, format
//! check, clippy on both workspaces, then the test suite against the freshly
//! built agent (eBPF mode), the namespace suite once more against each of the
//! agent's netfilter modes (iptables, nftables), the README's main command
//! (`cargo xtask up --once`), a smoke
//! run of every other workflow, and the dataplane suite in qemu. It ends with
//! how many tests ran in each datapath mode.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::build::{self, BPF_OBJ_ENV, BPF_TARGET, KCONTROL_BIN_ENV, KPROXY_BIN_ENV};
use crate::setup;
use crate::testcount::{self, Counts};
use crate::util::{self, Toolchain, run};

/// Tells the integration tests which datapath (`kproxy --mode`) to test.
const KPROXY_MODE_ENV: &str = "KPROXY_MODE";
/// The interpreter of the Python client's virtual environment (setup made it).
const KPROXY_PYTHON_ENV: &str = "KPROXY_PYTHON";
/// The package of the integration tests, and where its test targets live.
const TESTS_PACKAGE: &str = "kproxy-tests";
const TESTS_DIR: &str = "tests/tests";
/// Integration test targets that exist only for the eBPF datapath: the eBPF
/// object itself (BPF_PROG_TEST_RUN), attaching to interfaces as they appear,
/// `--attach netlink`, the north-south cases with `--xdp off` and the XDP
/// program's own checks, the conntrack sweep, and the cluster (which runs kproxy in eBPF mode). Not
/// generated for the iptables and nftables steps; each fails with a message when run with
/// `KPROXY_MODE=iptables` (or `nftables`).
const EBPF_ONLY_TESTS: &[&str] = &[
    "packet_classes",
    "packet_classes_v6",
    "north_south_tc",
    "xdp",
    "conntrack_gc",
    "maglev",
    "follow_links",
    "cluster_e2e",
    "cleanup_netlink",
];

/// `args` are what followed `--` on the command line: arguments for
/// `cargo test` (e.g. a test-name filter); a second `--` in them starts the
/// arguments for the test binaries (e.g. `--nocapture`).
pub fn run_test(args: &[String]) -> Result<()> {
    let started = Instant::now();
    let mut timings = Vec::new();
    let mut counts = ModeCounts::default();
    let result = steps(args, &mut timings, &mut counts);

    counts.print();
    say!("==> step timings:");
    for (step, took) in &timings {
        say!("    {step:<16} {}", util::secs(*took));
    }
    let total = util::secs(started.elapsed());
    match result {
        Ok(()) => {
            say!("==> xtask test: PASS ({total})");
            Ok(())
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            say!("==> xtask test: FAIL ({total})");
            // Exit here so the FAIL line is the last thing printed.
            std::process::exit(1);
        }
    }
}

/// What the two `cargo test` steps ran, for the closing per-mode summary.
#[derive(Default)]
struct ModeCounts {
    /// Every package but kproxy-tests: unit tests, kcontrol, the store, xtask.
    independent: Option<Counts>,
    /// kproxy-tests with KPROXY_MODE=ebpf.
    ebpf: Option<Counts>,
    iptables: Option<Counts>,
    nftables: Option<Counts>,
    namespace_targets: Vec<String>,
    ebpf_only_targets: Vec<String>,
}

impl ModeCounts {
    fn print(&self) {
        if self.independent.is_none()
            && self.ebpf.is_none()
            && self.iptables.is_none()
            && self.nftables.is_none()
        {
            return;
        }
        say!("==> tests run per datapath mode:");
        let both = &self.namespace_targets;
        let ebpf_only = &self.ebpf_only_targets;
        // What kproxy-tests ran besides its test files (the harness
        // library's unit tests, doc tests): counted with those without a
        // datapath.
        let mut harness = (0, 0);
        if let Some(c) = &self.ebpf {
            let (suite, suite_n) = c.of(both);
            let (only, only_n) = c.of(ebpf_only);
            say!(
                "    eBPF mode      namespace suite: {}",
                testcount::describe(suite, suite_n)
            );
            say!(
                "    eBPF mode      eBPF-only files: {} ({})",
                testcount::describe(only, only_n),
                testcount::by_target(c, ebpf_only)
            );
            harness = (
                c.total().passed - suite.passed - only.passed,
                c.targets.len() - suite_n - only_n,
            );
        }
        if let Some(c) = &self.iptables {
            let (t, n) = c.of(both);
            say!(
                "    iptables mode  namespace suite: {}",
                testcount::describe(t, n)
            );
        }
        if let Some(c) = &self.nftables {
            let (t, n) = c.of(both);
            say!(
                "    nftables mode  namespace suite: {}",
                testcount::describe(t, n)
            );
        }
        if let Some(c) = &self.independent {
            say!(
                "    no datapath    unit tests, kcontrol, store, xtask, docs: {} passed in {} test targets",
                c.total().passed + harness.0,
                c.targets.len() + harness.1
            );
        }
    }
}

fn steps(
    args: &[String],
    timings: &mut Vec<(&'static str, std::time::Duration)>,
    counts: &mut ModeCounts,
) -> Result<()> {
    let mut step = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        say!("==> step: {name}");
        let t = Instant::now();
        let r = f();
        timings.push((name, t.elapsed()));
        r.map_err(|e| e.context(format!("step `{name}` failed")))
    };

    let root = util::workspace_root();
    let ebpf_dir = build::ebpf_dir();

    step("setup", &mut || setup::run_setup())?;

    let mut outputs = None;
    step("build", &mut || {
        outputs = Some(build::build_all(true)?);
        Ok(())
    })?;
    let Some(outputs) = outputs else {
        bail!("build produced no outputs");
    };

    step("fmt", &mut || {
        run(util::cargo(Toolchain::Active)
            .current_dir(&root)
            .args(["fmt", "--all", "--", "--check"]))?;
        // proxy-ebpf is excluded from the workspace, so `--all` above does
        // not reach it. Run from the root with --manifest-path so that cargo
        // does not read proxy-ebpf/.cargo/config.toml (its [unstable] table is
        // nightly-only) and stable rustfmt does the check.
        run(util::cargo(Toolchain::Active)
            .current_dir(&root)
            .arg("fmt")
            .arg("--manifest-path")
            .arg(ebpf_dir.join("Cargo.toml"))
            .args(["--all", "--", "--check"]))
    })?;

    step("clippy", &mut || {
        // KPROXY_BPF_OBJ: proxy-user's build script embeds the object, and
        // the same value as in the build keeps that build script fresh.
        // --release: the build scripts and proc macros the build step just
        // compiled are reused instead of compiled a second time for the dev
        // profile (time and disk).
        run(util::cargo(Toolchain::Active)
            .current_dir(&root)
            .env(BPF_OBJ_ENV, &outputs.bpf_obj)
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--release",
                "--target-dir",
            ])
            .arg(util::target_dir())
            .args(["--", "-D", "warnings"]))
    })?;

    step("clippy-ebpf", &mut || {
        // Same target, flags and target dir as the eBPF build. Only the
        // crate itself is linted (clippy-driver is the workspace wrapper);
        // core from build-std is compiled by plain rustc.
        run(util::cargo(Toolchain::Nightly)
            .current_dir(&ebpf_dir)
            .args([
                "clippy",
                "--release",
                "--target",
                BPF_TARGET,
                "-Z",
                "build-std=core",
            ])
            .arg("--target-dir")
            .arg(ebpf_dir.join("target"))
            .args(["--", "-D", "warnings"]))
    })?;

    let (cargo_args, test_args) = split_test_args(args);
    let python = util::target_dir()
        .join(setup::PYTHON_VENV)
        .join("bin/python3");
    counts.namespace_targets = namespace_test_targets(&root.join(TESTS_DIR))?;
    counts.ebpf_only_targets = EBPF_ONLY_TESTS.iter().map(|s| s.to_string()).collect();

    // `cargo test --release` of `packages` against the fresh builds with
    // datapath `mode`, the filter and test-binary arguments appended, its
    // output tallied.
    let cargo_test = |mode: &str, packages: &[&str]| -> Result<Counts> {
        let mut cmd = util::cargo(Toolchain::Active);
        cmd.current_dir(&root)
            .env(BPF_OBJ_ENV, &outputs.bpf_obj)
            .env(KPROXY_BIN_ENV, &outputs.kproxy)
            .env(KCONTROL_BIN_ENV, &outputs.kcontrol)
            .env(KPROXY_MODE_ENV, mode)
            .env(KPROXY_PYTHON_ENV, &python)
            .arg("test")
            .args(packages)
            .args(["--release", "--target-dir"])
            .arg(util::target_dir())
            .args(cargo_args);
        with_test_args(&mut cmd, test_args);
        testcount::run_counting(cmd)
    };

    // Unit tests of every crate and the whole integration suite, eBPF mode:
    // first everything but the namespace suite, then the suite (kproxy-tests)
    // on its own, so the per-mode counts are exact (test targets of different
    // packages share names, e.g. `api`).
    step("cargo test", &mut || {
        counts.independent = Some(cargo_test(
            "ebpf",
            &["--workspace", "--exclude", TESTS_PACKAGE],
        )?);
        Ok(())
    })?;
    step("tests (eBPF)", &mut || {
        counts.ebpf = Some(cargo_test("ebpf", &["--package", TESTS_PACKAGE])?);
        Ok(())
    })?;

    // The namespace suite again against `kproxy --mode iptables`, then
    // against `kproxy --mode nftables`: the same targets.
    let mut netfilter_args = vec!["--package", TESTS_PACKAGE];
    for target in &counts.namespace_targets {
        netfilter_args.extend(["--test", target.as_str()]);
    }
    step("tests (iptables)", &mut || {
        counts.iptables = Some(cargo_test("iptables", &netfilter_args)?);
        Ok(())
    })?;
    step("tests (nftables)", &mut || {
        counts.nftables = Some(cargo_test("nftables", &netfilter_args)?);
        Ok(())
    })?;

    // The README's main command, for real: a single-node cluster on this
    // host, the demo's requests answered by all three pods, then a teardown
    // that leaves nothing. A filtered run skips it, like vm-test.
    let unfiltered = cargo_args.is_empty() && test_args.is_empty();
    if unfiltered {
        // Its own process, as a user runs it: it installs a signal handler
        // and prints its own setup and build lines.
        step("up --once", &mut || {
            let xtask = std::env::current_exe().context("locating the xtask binary")?;
            run(Command::new(xtask).args(["up", "--once"]))
        })?;
        // Every other workflow at its smallest scale (`--smoke`), so one that
        // cannot start fails CI.
        step("smoke", &mut || crate::smoke::run_smokes(&outputs))?;
    }

    // The dataplane suite inside qemu on Debian's 6.1 and 6.12 kernel lines
    // (netlink attach on 6.1, tcx on 6.12), reusing the builds above. A
    // filtered run (`cargo xtask test -- NAME`) asked for a subset: skip it.
    if unfiltered {
        step("vm-test", &mut || {
            crate::vmtest::run_vm_test(&crate::vmtest::Options {
                kernels: Vec::new(),
                quick: false,
                break_program: false,
                dynamic: true,
                timeout: None,
            })
        })?;
    }
    Ok(())
}

/// Appends `--` and the test binaries' arguments to a `cargo test` command.
fn with_test_args<'a>(cmd: &'a mut Command, test_args: &[String]) -> &'a mut Command {
    cmd.arg("--");
    // The dataplane tests each build network namespaces and load BPF
    // programs; two at a time matches the 2-core machines.
    if !test_args.iter().any(|a| a.starts_with("--test-threads")) {
        cmd.arg("--test-threads=2");
    }
    cmd.args(test_args)
}

/// The integration test targets in `dir` (`NAME.rs` or `NAME/main.rs`, as
/// cargo discovers them) that run kproxy, i.e. all but [`EBPF_ONLY_TESTS`];
/// sorted.
fn namespace_test_targets(dir: &Path) -> Result<Vec<String>> {
    let mut targets = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = if path.is_dir() && path.join("main.rs").is_file() {
            path.file_name()
        } else if path.extension().is_some_and(|e| e == "rs") {
            path.file_stem()
        } else {
            None
        };
        if let Some(name) = name.and_then(|n| n.to_str())
            && !EBPF_ONLY_TESTS.contains(&name)
        {
            targets.push(name.to_owned());
        }
    }
    targets.sort();
    if targets.is_empty() {
        bail!("no integration test targets in {}", dir.display());
    }
    Ok(targets)
}

/// `["dataplane", "--", "--nocapture"]` → (`["dataplane"]`, `["--nocapture"]`).
fn split_test_args(args: &[String]) -> (&[String], &[String]) {
    match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::{EBPF_ONLY_TESTS, TESTS_DIR, namespace_test_targets, split_test_args};
    use crate::util;

    #[test]
    fn netfilter_steps_run_every_namespace_test_but_not_the_ebpf_only_ones() {
        let targets = namespace_test_targets(&util::workspace_root().join(TESTS_DIR)).unwrap();
        for t in ["distribution", "removal", "reject", "cleanup", "harness"] {
            assert!(targets.iter().any(|x| x == t), "{t} missing: {targets:?}");
        }
        for t in EBPF_ONLY_TESTS {
            assert!(!targets.iter().any(|x| x == t), "{t} included: {targets:?}");
        }
    }

    #[test]
    fn splits_cargo_and_test_binary_args() {
        let args: Vec<String> = ["dataplane", "--", "--nocapture"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (cargo, bin) = split_test_args(&args);
        assert_eq!(cargo, ["dataplane"]);
        assert_eq!(bin, ["--nocapture"]);
        let (cargo, bin) = split_test_args(&args[..1]);
        assert_eq!(cargo, ["dataplane"]);
        assert!(bin.is_empty());
    }
}
