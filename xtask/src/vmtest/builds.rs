//! The guest's binaries: kproxy, kcontrol, the test executables and the
//! init, built for the guest and staged without debug info.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::Options;
use crate::build::{self, BPF_OBJ_ENV, BPF_TARGET};
use crate::util::{self, Toolchain, run, which};

/// Target of every binary that goes into the guest: static, so the
/// initramfs needs no libc for them.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// `--quick`: the test binaries run on each kernel. One test file per
/// behaviour that depends on the kernel: the attach path and its cleanup,
/// re-attach after `kill -9` (tcx links vs a surviving clsact qdisc), DNAT
/// with round-robin, reverse NAT, the ICMP reject, every packet class
/// through BPF_PROG_TEST_RUN (verifier and helpers of that kernel), and the
/// north-south path (FIB lookups, `bpf_redirect_neigh`, XDP on veth).
const QUICK_TESTS: &[&str] = &[
    "packet_classes",
    "north_south",
    "xdp",
    "distribution",
    "reverse_nat",
    "reject",
    "cleanup",
    "cleanup_netlink",
    "restart",
    "maglev",
    "session_affinity",
    "packet_classes_v6",
    "ipv6",
];

/// Programs the tests start, each named by an environment variable:
/// (variable, package, binary). kproxy is required; the others are built
/// when the workspace has their package.
const GUEST_PROGRAMS: &[(&str, &str, &str)] = &[
    ("KPROXY_BIN", "proxy-user", "kproxy"),
    ("KCONTROL_BIN", "kcontrol", "kcontrol"),
];

/// Test files of the suite that need the host (crun, the busybox rootfs).
const HOST_ONLY_TESTS: &[&str] = &["cluster_e2e"];

/// The package of the namespace test suite.
const TESTS_PACKAGE: &str = "kproxy-tests";

/// The package and binary of the guest's `/init` (xtask/vm-init/).
const INIT_PACKAGE: &str = "kproxy-vm-init";

/// Cargo feature of proxy-ebpf that makes the ingress program drop all
/// service traffic; `--break-program` builds it into its own target dir.
const BROKEN_FEATURE: &str = "broken-for-tests";

/// Static binaries for the guest, debug info stripped, in target/vm/stage/.
pub(super) struct GuestBinaries {
    pub(super) init: PathBuf,
    /// (environment variable, binary name, staged binary) from
    /// [`GUEST_PROGRAMS`], e.g. ("KPROXY_BIN", "kproxy", …/stage/kproxy).
    pub(super) programs: Vec<(String, String, PathBuf)>,
    /// (test target name, binary), e.g. ("cleanup", …/stage/tests/cleanup).
    pub(super) tests: Vec<(String, PathBuf)>,
}

pub(super) fn build_guest_binaries(opts: &Options, vm_dir: &Path) -> Result<GuestBinaries> {
    let root = util::workspace_root();
    let bpf_obj = if opts.break_program {
        build_broken_ebpf()?
    } else {
        build::build_ebpf()?
    };

    let programs: Vec<(&str, &str, &str)> = GUEST_PROGRAMS
        .iter()
        .copied()
        .filter(|(_, package, _)| {
            *package == "proxy-user"
                || util::succeeds(
                    util::cargo(Toolchain::Active)
                        .current_dir(&root)
                        .args(["pkgid", package]),
                )
        })
        .collect();
    let names: Vec<&str> = programs.iter().map(|(_, _, bin)| *bin).collect();
    // --dynamic: the host target's builds (what `cargo xtask build`/`test`
    // already made); their shared libraries go into the guest like ip's.
    let target: &[&str] = if opts.dynamic {
        &[]
    } else {
        &["--target", MUSL_TARGET]
    };
    let out_dir = if opts.dynamic {
        util::target_dir().join("release")
    } else {
        util::target_dir().join(MUSL_TARGET).join("release")
    };
    say!(
        "==> vm-test: building {}, the tests and the guest init ({INIT_PACKAGE}) for {}",
        names.join(", "),
        if opts.dynamic {
            "the host target (glibc, --dynamic)"
        } else {
            MUSL_TARGET
        }
    );
    // One package per cargo run: features are unified over the packages
    // selected, so `-p proxy-user` alone builds exactly what `cargo xtask
    // build` built (with --dynamic, nothing to do but the small init).
    for (package, bin) in programs
        .iter()
        .map(|(_, package, bin)| (*package, *bin))
        .chain([(INIT_PACKAGE, INIT_PACKAGE)])
    {
        run(util::cargo(Toolchain::Active)
            .current_dir(&root)
            .env(BPF_OBJ_ENV, &bpf_obj)
            .args(["build", "--release", "-p", package, "--bin", bin])
            .args(target)
            .arg("--target-dir")
            .arg(util::target_dir()))
        .with_context(|| format!("building {bin} for the guest"))?;
    }

    // With --dynamic the same selection as `cargo xtask test` (the whole
    // workspace), so its test binaries are reused; kproxy-tests' are taken.
    let selection: &[&str] = if opts.dynamic {
        &["--workspace"]
    } else {
        &["-p", TESTS_PACKAGE]
    };
    let mut cmd = util::cargo(Toolchain::Active);
    cmd.current_dir(&root)
        .env(BPF_OBJ_ENV, &bpf_obj)
        .args(["test", "--release", "--no-run"])
        .args(selection)
        .arg("--message-format=json-render-diagnostics")
        .args(target)
        .arg("--target-dir")
        .arg(util::target_dir())
        .stderr(Stdio::inherit());
    say!("==> running: {}", util::display(&cmd));
    let out = cmd.output().context("starting cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed ({})", out.status);
    }
    let mut tests = test_executables(&String::from_utf8_lossy(&out.stdout), TESTS_PACKAGE);
    tests.sort();
    if tests.is_empty() {
        bail!("cargo test --no-run reported no test executables of {TESTS_PACKAGE}");
    }
    // The cluster runs crun containers from a host-built busybox rootfs,
    // which the guest does not carry; it is a host test.
    tests.retain(|(name, _)| !HOST_ONLY_TESTS.contains(&name.as_str()));
    if opts.quick {
        tests.retain(|(name, _)| QUICK_TESTS.contains(&name.as_str()));
        let missing: Vec<&&str> = QUICK_TESTS
            .iter()
            .filter(|q| !tests.iter().any(|(n, _)| n == *q))
            .collect();
        if !missing.is_empty() {
            say!("==> vm-test: --quick: test files not found (skipped): {missing:?}");
        }
    }

    let stage = vm_dir.join("stage");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    fs::create_dir_all(stage.join("tests"))?;
    let init = stage_binary(&out_dir.join(INIT_PACKAGE), &stage.join("init"))?;
    let mut staged_programs = Vec::new();
    for (env, _, bin) in &programs {
        let dst = stage_binary(&out_dir.join(bin), &stage.join(bin))?;
        staged_programs.push((env.to_string(), bin.to_string(), dst));
    }
    let mut staged = Vec::new();
    for (name, exe) in tests {
        let dst = stage_binary(&exe, &stage.join("tests").join(&name))?;
        staged.push((name, dst));
    }
    say!(
        "==> vm-test: guest binaries: init, {}, {} test binaries ({})",
        names.join(", "),
        staged.len(),
        staged
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(GuestBinaries {
        init,
        programs: staged_programs,
        tests: staged,
    })
}

/// The eBPF object with the `broken-for-tests` feature, in its own target
/// dir so the real object (and everyone's incremental state) stays as is.
fn build_broken_ebpf() -> Result<PathBuf> {
    let dir = build::ebpf_dir();
    let target_dir = dir.join("target").join("vm-broken");
    say!("==> vm-test: --break-program: building the eBPF object with feature {BROKEN_FEATURE}");
    run(util::cargo(Toolchain::Nightly)
        .current_dir(&dir)
        .args([
            "build",
            "--release",
            "--target",
            BPF_TARGET,
            "-Z",
            "build-std=core",
        ])
        .args(["--features", BROKEN_FEATURE, "--target-dir"])
        .arg(&target_dir))
    .context("building the broken eBPF object")?;
    let obj = target_dir
        .join(BPF_TARGET)
        .join("release")
        .join("kproxy-ebpf");
    if !obj.is_file() {
        bail!("eBPF build succeeded but {} is missing", obj.display());
    }
    say!("==> vm-test: broken eBPF object: {}", obj.display());
    Ok(obj)
}

/// Test executables (target name, path) of `package` from cargo's JSON
/// messages: its `compiler-artifact` lines built with the test profile.
fn test_executables(json_lines: &str, package: &str) -> Vec<(String, PathBuf)> {
    json_lines
        .lines()
        .filter(|l| l.contains(r#""reason":"compiler-artifact""#))
        .filter(|l| {
            // `path+file:///…/tests#kproxy-tests@0.1.0`
            json_string(l, "package_id").is_some_and(|id| id.contains(&format!("#{package}@")))
        })
        .filter(|l| {
            // The profile object is flat: look for "test":true inside it.
            l.split_once(r#""profile":{"#)
                .and_then(|(_, rest)| rest.split_once('}'))
                .is_some_and(|(profile, _)| profile.contains(r#""test":true"#))
        })
        .filter_map(|l| {
            let target = l.split_once(r#""target":{"#)?.1;
            let name = json_string(target, "name")?;
            let exe = json_string(l, "executable")?;
            Some((name, PathBuf::from(exe)))
        })
        .collect()
}

/// The string value of the first `"key":"…"` in a compact JSON text.
fn json_string(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut out = String::new();
    let mut chars = json[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// Copies a binary without its debug info (symbols stay, for backtraces):
/// the test binaries are ~12 MB each with it, and all of it sits in the
/// guest's RAM.
fn stage_binary(src: &Path, dst: &Path) -> Result<PathBuf> {
    if !src.is_file() {
        bail!("{} is missing", src.display());
    }
    let stripped = which("strip").is_some()
        && util::succeeds(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(dst)
                .arg(src),
        );
    if !stripped {
        fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
    }
    Ok(dst.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_test_executables_from_cargo_json() {
        let json = concat!(
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#kproxy-tests@0.1.0","target":{"kind":["test"],"name":"cleanup","test":true},"profile":{"opt_level":"3","test":true},"executable":"/t/deps/cleanup-1"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#kproxy-tests@0.1.0","target":{"kind":["lib"],"name":"kproxy_tests","test":true},"profile":{"opt_level":"3","test":false},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/proxy-user#0.1.0","target":{"kind":["lib"],"name":"proxy_user","test":true},"profile":{"opt_level":"3","test":true},"executable":"/t/deps/proxy_user-2"}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
        );
        assert_eq!(
            test_executables(json, "kproxy-tests"),
            vec![("cleanup".to_string(), PathBuf::from("/t/deps/cleanup-1"))]
        );
        assert_eq!(json_string(r#"{"a":"x\"y"}"#, "a").as_deref(), Some("x\"y"));
    }
}
