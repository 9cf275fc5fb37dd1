//! `cargo xtask vm-test`: the dataplane integration tests (the `kproxy-tests`
//! package) inside qemu, once per kernel, on Debian's kernel lines.
//!
//! The host side, top to bottom:
//! 1. *kernels*: each `--kernel SPEC` (default: the newest 6.1 and 6.12 cloud
//!    kernels the apt sources offer) becomes a vmlinuz plus a modules
//!    directory; packages are fetched with `apt-get download` and unpacked
//!    with `dpkg-deb -x` into `target/vm/kernels/<package>/` (kept as a cache).
//! 2. *builds*: the eBPF object, then kproxy (and kcontrol, for the tests
//!    against an API server), the test binaries and xtask itself as static
//!    x86_64-unknown-linux-musl executables (`--dynamic`: the host target's
//!    glibc builds, which `cargo xtask test` has already made, plus their
//!    shared libraries: no second build of the whole dependency tree).
//! 3. *image*: per kernel an initramfs (`target/vm/<label>/initrd.cpio`,
//!    newc) holding those binaries (debug info stripped), the host's `ip`,
//!    `tc`, `sysctl`, `nsenter` (+ `bpftool`, iptables, `conntrack`,
//!    `kubectl` when present) with their shared libraries and symlinks as
//!    on the host, and the kernel
//!    modules the tests need, in dependency order (read from the modules'
//!    own `depends=`/`softdep=`; the .deb has no modules.dep).
//! 4. *boot*: `qemu-system-x86_64 -accel tcg`, console streamed with a
//!    `[label]` prefix and saved to `target/vm/<label>/console.log`; the
//!    verdict line decides, anything else (timeout, panic, no verdict) fails.
//!
//! The guest side is this same file: xtask built for musl is the
//! initramfs's `/init`, started as `/init __vm-init` (the kernel passes what
//! follows `--` on its command line to init). It mounts the pseudo
//! filesystems, loads the modules, runs every test of every test binary on
//! its own (`--exact NAME --test-threads=1 --nocapture`, so kproxy's
//! `attached IF mode=…` lines reach the console), prints one
//! `KPROXY-VM-TEST:` line per test and a `KPROXY-VM-VERDICT:` line, and
//! powers the machine off.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::build::{self, BPF_OBJ_ENV, BPF_TARGET};
use crate::setup;
use crate::util::{self, Toolchain, output, run, which};

/// Target of every binary that goes into the guest: static, so the
/// initramfs needs no libc for them.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// The kernel lines tested by default: the newest cloud kernel of each.
/// 6.1 is Debian 12's own kernel (no tcx: kproxy attaches through netlink),
/// 6.12 comes from bookworm-security (tcx links).
const DEFAULT_LINES: &[&str] = &["6.1", "6.12"];

/// `--quick`: the test binaries run on each kernel. One test file per
/// behaviour that depends on the kernel: the attach path and its cleanup,
/// re-attach after `kill -9` (tcx links vs a surviving clsact qdisc), DNAT
/// with round-robin, reverse NAT, the ICMP reject, and every packet class
/// through BPF_PROG_TEST_RUN (verifier and helpers of that kernel).
const QUICK_TESTS: &[&str] = &[
    "packet_classes",
    "distribution",
    "reverse_nat",
    "reject",
    "cleanup",
    "cleanup_netlink",
    "restart",
];

/// Modules without which no dataplane test can run: veths between the
/// namespaces, clsact (in sch_ingress) and cls_bpf for netlink attach.
const REQUIRED_MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf"];
/// Modules a Kubernetes node has loaded and kproxy's iptables mode uses
/// (conntrack, NAT, the statistic match, nf_tables for iptables-nft,
/// ctnetlink for `conntrack -D`). Loaded when the kernel has them.
const NODE_MODULES: &[&str] = &[
    "nf_conntrack",
    "nf_nat",
    "nf_conntrack_netlink",
    "x_tables",
    "ip_tables",
    "iptable_nat",
    "iptable_filter",
    "xt_statistic",
    "xt_conntrack",
    "xt_comment",
    "xt_mark",
    "xt_nat",
    "xt_addrtype",
    "xt_MASQUERADE",
    "xt_tcpudp",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_ct",
];

/// Host programs the tests call (`ip netns …`, `tc`, `sysctl`, `nsenter
/// --net=`). Busybox would not do: its `ip` has no `netns` nor veth peers
/// in another netns.
const REQUIRED_TOOLS: &[&str] = &["ip", "tc", "sysctl", "nsenter"];
/// Copied when the host has them: `bpftool` (cleanup.rs checks links with
/// it, and skips that part without it), iptables and `conntrack` (kproxy's
/// iptables mode), `kubectl` (api.rs drives kcontrol with it; a static Go
/// binary of ~57 MB, the largest file in the initramfs), `etcd` (api.rs runs
/// kcontrol on a one-member etcd too; Debian's etcd-server, ~21 MB).
const OPTIONAL_TOOLS: &[&str] = &[
    "bpftool",
    "iptables",
    "iptables-save",
    "iptables-restore",
    "conntrack",
    "kubectl",
    "etcd",
];

/// Where things live inside the guest.
const GUEST_DIR: &str = "kproxy-vm";
const GUEST_PLAN: &str = "/kproxy-vm/plan";
const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

/// Hidden xtask subcommand the guest's /init runs (`Cmd::VmInit`).
const GUEST_INIT_CMD: &str = "__vm-init";

/// Marker lines on the console; the host decides from these alone.
const TEST_MARK: &str = "KPROXY-VM-TEST: ";
const VERDICT_MARK: &str = "KPROXY-VM-VERDICT: ";
const INFO_MARK: &str = "KPROXY-VM: ";

/// A test that runs longer than this inside the guest is killed and
/// counted as failed (the suite's own deadlines are ≤ 30 s; the slowest
/// test takes ~15 s under TCG).
const GUEST_TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Whole-boot limit per kernel unless `--timeout` says otherwise: about
/// four times what a run takes on an idle 2-core machine (full ~2 min,
/// quick ~1 min per kernel), as TCG slows down with the host's load.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_QUICK_TIMEOUT: Duration = Duration::from_secs(300);

/// Cargo feature of proxy-ebpf that makes the ingress program drop all
/// service traffic; `--break-program` builds it into its own target dir.
const BROKEN_FEATURE: &str = "broken-for-tests";

pub struct Options {
    /// `--kernel` values; empty means the default lines.
    pub kernels: Vec<String>,
    pub quick: bool,
    pub break_program: bool,
    /// Guest binaries from the host target (glibc, dynamic) instead of
    /// static musl builds.
    pub dynamic: bool,
    /// Per-kernel limit for boot + tests + poweroff.
    pub timeout: Option<Duration>,
}

pub fn run_vm_test(opts: &Options) -> Result<()> {
    let started = Instant::now();
    setup::run_setup()?;
    let vm_dir = util::target_dir().join("vm");
    fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;

    let specs: Vec<String> = if opts.kernels.is_empty() {
        DEFAULT_LINES.iter().map(|s| s.to_string()).collect()
    } else {
        opts.kernels.clone()
    };
    say!("==> vm-test: kernels: {}", specs.join(", "));
    let mut apt = AptIndex::default();
    let mut kernels = Vec::new();
    for spec in &specs {
        kernels.push(resolve_kernel(spec, &vm_dir, &mut apt)?);
    }
    assign_labels(&mut kernels);

    let bins = build_guest_binaries(opts, &vm_dir)?;
    let mut base = Image::default();
    add_base(&mut base, &bins)?;

    let timeout = opts.timeout.unwrap_or(if opts.quick {
        DEFAULT_QUICK_TIMEOUT
    } else {
        DEFAULT_TIMEOUT
    });
    let mut runs = Vec::new();
    for kernel in &kernels {
        // One kernel's setup problem (say, a module missing from a custom
        // kernel) fails that kernel, not the others.
        let run = boot_kernel(kernel, &base, &bins, &vm_dir, timeout).unwrap_or_else(|e| {
            say!("==> vm-test [{}]: FAIL: {e:#}", kernel.label);
            KernelRun::failed(kernel, format!("{e:#}"))
        });
        runs.push(run);
    }

    print_summary(&runs, opts, started.elapsed());
    let failed: Vec<&str> = runs
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.label.as_str())
        .collect();
    if failed.is_empty() {
        say!("==> vm-test: PASS ({})", util::secs(started.elapsed()));
        Ok(())
    } else {
        bail!(
            "vm-test failed on {} (console logs: {}/<kernel>/console.log)",
            failed.join(", "),
            vm_dir.display()
        )
    }
}

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

/// A bootable kernel and its modules.
struct Kernel {
    /// Short name for the console prefix and the summary, e.g. `6.1`.
    label: String,
    /// `uname -r` of the kernel, e.g. `6.1.0-57-cloud-amd64`.
    release: String,
    vmlinuz: PathBuf,
    /// A `/lib/modules/<release>` directory (searched recursively).
    modules: PathBuf,
}

/// What a `--kernel` value names.
#[derive(Debug, PartialEq, Eq)]
enum KernelSpec {
    /// `6.1`: the newest `linux-image-6.1.*-cloud-amd64-unsigned`.
    Line(String),
    /// A Debian package name.
    Package(String),
    /// `path/to/vmlinuz:path/to/modules-dir`.
    Paths(PathBuf, PathBuf),
}

fn parse_spec(spec: &str) -> Result<KernelSpec> {
    if let Some((vmlinuz, modules)) = spec.split_once(':') {
        return Ok(KernelSpec::Paths(vmlinuz.into(), modules.into()));
    }
    let is_line = spec.split('.').count() == 2
        && spec
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if is_line {
        return Ok(KernelSpec::Line(spec.to_string()));
    }
    if spec.starts_with("linux-image-") {
        return Ok(KernelSpec::Package(spec.to_string()));
    }
    bail!(
        "--kernel {spec:?}: expected a kernel line (6.1), a Debian package \
         (linux-image-6.1.0-57-cloud-amd64-unsigned) or path/to/vmlinuz:path/to/modules-dir"
    )
}

fn resolve_kernel(spec: &str, vm_dir: &Path, apt: &mut AptIndex) -> Result<Kernel> {
    match parse_spec(spec)? {
        KernelSpec::Paths(vmlinuz, modules) => {
            if !vmlinuz.is_file() {
                bail!("--kernel {spec}: {} is not a file", vmlinuz.display());
            }
            if !modules.is_dir() {
                bail!("--kernel {spec}: {} is not a directory", modules.display());
            }
            let release = modules
                .canonicalize()?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "custom".into());
            Ok(Kernel {
                label: String::new(),
                release,
                vmlinuz,
                modules,
            })
        }
        KernelSpec::Package(pkg) => fetch_package(&pkg, vm_dir),
        KernelSpec::Line(line) => {
            let pkg = match apt.newest_cloud_kernel(&line)? {
                Some(pkg) => pkg,
                None => match newest_cached(&line, vm_dir) {
                    Some(pkg) => {
                        say!(
                            "==> vm-test: apt offers no {line} cloud kernel; using the cached {pkg}"
                        );
                        pkg
                    }
                    None => bail!(
                        "no linux-image-{line}.*-cloud-amd64-unsigned in this machine's apt sources \
                         (even after apt-get update); Debian 12 has 6.1 in bookworm and 6.12 in \
                         bookworm-security. Name a package or give path/to/vmlinuz:path/to/modules-dir"
                    ),
                },
            };
            say!("==> vm-test: kernel line {line}: {pkg}");
            fetch_package(&pkg, vm_dir)
        }
    }
}

/// Package names of the apt cache, read once (and refreshed once with
/// `apt-get update` when a line has no kernel at all).
#[derive(Default)]
struct AptIndex {
    names: Option<Vec<String>>,
    updated: bool,
}

impl AptIndex {
    fn load(&mut self) -> Result<&[String]> {
        if self.names.is_none() {
            let out = output(Command::new("apt-cache").args(["pkgnames", "linux-image-"]))
                .context("listing kernel packages with apt-cache")?;
            self.names = Some(out.lines().map(str::to_string).collect());
        }
        Ok(self.names.as_deref().unwrap_or_default())
    }

    fn newest_cloud_kernel(&mut self, line: &str) -> Result<Option<String>> {
        if which("apt-cache").is_none() {
            return Ok(None);
        }
        if let Some(pkg) = newest_of_line(line, self.load()?) {
            return Ok(Some(pkg));
        }
        if !self.updated {
            say!("==> vm-test: no {line} cloud kernel in the apt lists; refreshing them");
            run(Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["update", "-q"]))?;
            self.updated = true;
            self.names = None;
            return Ok(newest_of_line(line, self.load()?));
        }
        Ok(None)
    }
}

/// The newest `linux-image-<line>.…-cloud-amd64-unsigned` among `names`.
fn newest_of_line<S: AsRef<str>>(line: &str, names: &[S]) -> Option<String> {
    names
        .iter()
        .map(AsRef::as_ref)
        .filter_map(|n| Some((n, cloud_release(n)?)))
        .filter(|(_, rel)| rel.starts_with(&format!("{line}.")))
        .max_by_key(|(_, rel)| version_key(rel))
        .map(|(n, _)| n.to_string())
}

/// `linux-image-6.12.117+deb12-cloud-amd64-unsigned` → `6.12.117+deb12`.
fn cloud_release(pkg: &str) -> Option<&str> {
    pkg.strip_prefix("linux-image-")?
        .strip_suffix("-cloud-amd64-unsigned")
}

/// Numeric components of a release, for ordering: `6.1.0-57` → [6,1,0,57].
fn version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn kernels_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("kernels")
}

/// The newest already unpacked package of `line`, for offline runs.
fn newest_cached(line: &str, vm_dir: &Path) -> Option<String> {
    let names: Vec<String> = fs::read_dir(kernels_dir(vm_dir))
        .ok()?
        .flatten()
        .filter(|e| e.path().join(UNPACKED_STAMP).exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    newest_of_line(line, &names)
}

/// Written after a package was unpacked completely.
const UNPACKED_STAMP: &str = ".unpacked";

/// `apt-get download` + `dpkg-deb -x` into target/vm/kernels/<pkg>/, unless
/// it is there already.
fn fetch_package(pkg: &str, vm_dir: &Path) -> Result<Kernel> {
    let dir = kernels_dir(vm_dir).join(pkg);
    if dir.join(UNPACKED_STAMP).exists() {
        say!("==> vm-test: {pkg}: cached in {}", dir.display());
    } else {
        let debs = vm_dir.join("debs");
        fs::create_dir_all(&debs)?;
        let t = Instant::now();
        say!("==> vm-test: downloading {pkg}");
        // The sandbox user _apt cannot write into target/: download as root.
        run(Command::new("apt-get").current_dir(&debs).args([
            "download",
            "-q",
            "-o",
            "APT::Sandbox::User=root",
            pkg,
        ]))
        .with_context(|| format!("downloading {pkg} (is it in `apt-cache policy {pkg}`?)"))?;
        let deb = fs::read_dir(&debs)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
            })
            .with_context(|| {
                format!(
                    "apt-get download {pkg} left no {pkg}_*.deb in {}",
                    debs.display()
                )
            })?;
        // Package names contain dots: no with_extension here.
        fs::create_dir_all(kernels_dir(vm_dir))?;
        let partial = kernels_dir(vm_dir).join(format!("{pkg}.partial"));
        if partial.exists() {
            fs::remove_dir_all(&partial)?;
        }
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        say!("==> vm-test: unpacking {}", deb.display());
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        fs::rename(&partial, &dir)?;
        fs::write(dir.join(UNPACKED_STAMP), format!("{}\n", deb.display()))?;
        fs::remove_file(&deb).ok();
        say!(
            "==> vm-test: {pkg}: downloaded and unpacked in {}",
            util::secs(t.elapsed())
        );
    }
    let vmlinuz = only_entry(&dir.join("boot"), "vmlinuz-")?;
    let modules = only_entry(&dir.join("lib/modules"), "")?;
    let release = modules
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Kernel {
        label: String::new(),
        release,
        vmlinuz,
        modules,
    })
}

/// The single entry of `dir` whose name starts with `prefix`.
fn only_entry(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected exactly one {prefix}* in {}, found {}",
            dir.display(),
            found.len()
        ),
    }
}

/// Labels are the kernel's major.minor (`6.1`), or the whole release when
/// two kernels share it.
fn assign_labels(kernels: &mut [Kernel]) {
    let short = |k: &Kernel| {
        let mut parts = k.release.split(|c: char| !c.is_ascii_digit());
        match (parts.next(), parts.next()) {
            (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => format!("{a}.{b}"),
            _ => k.release.clone(),
        }
    };
    let shorts: Vec<String> = kernels.iter().map(short).collect();
    for (k, s) in kernels.iter_mut().zip(&shorts) {
        let unique = shorts.iter().filter(|o| *o == s).count() == 1;
        k.label = if unique { s.clone() } else { k.release.clone() };
    }
}

// ---------------------------------------------------------------------------
// Builds
// ---------------------------------------------------------------------------

/// Static binaries for the guest, debug info stripped, in target/vm/stage/.
struct GuestBinaries {
    init: PathBuf,
    /// (environment variable, binary name, staged binary) from
    /// [`GUEST_PROGRAMS`], e.g. ("KPROXY_BIN", "kproxy", …/stage/kproxy).
    programs: Vec<(String, String, PathBuf)>,
    /// (test target name, binary), e.g. ("cleanup", …/stage/tests/cleanup).
    tests: Vec<(String, PathBuf)>,
}

fn build_guest_binaries(opts: &Options, vm_dir: &Path) -> Result<GuestBinaries> {
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
        "==> vm-test: building {}, the tests and the guest init (xtask) for {}",
        names.join(", "),
        if opts.dynamic {
            "the host target (glibc, --dynamic)"
        } else {
            MUSL_TARGET
        }
    );
    // One package per cargo run: features are unified over the packages
    // selected, so `-p proxy-user` alone builds exactly what `cargo xtask
    // build` built (with --dynamic, nothing to do).
    for (package, bin) in programs
        .iter()
        .map(|(_, package, bin)| (*package, *bin))
        .chain([("xtask", "xtask")])
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
    let init = stage_binary(&out_dir.join("xtask"), &stage.join("init"))?;
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

// ---------------------------------------------------------------------------
// The initramfs
// ---------------------------------------------------------------------------

/// One initramfs entry.
#[derive(Clone)]
enum Node {
    Dir,
    /// Contents copied from a host file.
    File {
        src: PathBuf,
        mode: u32,
    },
    Bytes {
        data: Vec<u8>,
        mode: u32,
    },
    Symlink(String),
    CharDev(u32, u32),
}

/// Guest path (without the leading `/`) → entry. Sorted, so every
/// directory comes before what it contains.
#[derive(Clone, Default)]
struct Image {
    entries: BTreeMap<String, Node>,
}

impl Image {
    fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        let mut prefix = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.entries.entry(prefix.clone()).or_insert(Node::Dir);
        }
    }

    fn put(&mut self, path: &str, node: Node) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entries.insert(path.to_string(), node);
    }

    /// Copies a host path into the same place in the guest, recreating every
    /// symlink on the way (`/lib64` → `usr/lib64`, `libbpf.so.1` →
    /// `libbpf.so.1.1.0`, `iptables` → `xtables-nft-multi`, …), so that
    /// interpreters, sonames and multi-call names resolve as on the host.
    fn add_host_path(&mut self, path: &Path) -> Result<()> {
        // Walk name by name from /; `cur` never contains a symlink.
        let mut pending: VecDeque<OsString> = names(path);
        let mut cur = PathBuf::from("/");
        let mut hops = 0;
        while let Some(name) = pending.pop_front() {
            if name == ".." {
                cur.pop();
                continue;
            }
            let next = cur.join(&name);
            let meta = fs::symlink_metadata(&next).with_context(|| {
                format!("{} (while copying {})", next.display(), path.display())
            })?;
            let guest = next.to_string_lossy().into_owned();
            if meta.file_type().is_symlink() {
                hops += 1;
                if hops > 40 {
                    bail!("too many symlinks resolving {}", path.display());
                }
                let target = fs::read_link(&next)?;
                self.put(&guest, Node::Symlink(target.to_string_lossy().into_owned()));
                if target.is_absolute() {
                    cur = PathBuf::from("/");
                }
                let mut resolved = names(&target);
                resolved.extend(pending.drain(..));
                pending = resolved;
            } else if !pending.is_empty() {
                self.dir(&guest);
                cur = next;
            } else if meta.is_dir() {
                self.dir(&guest);
            } else {
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode() & 0o7777;
                self.put(&guest, Node::File { src: next, mode });
            }
        }
        Ok(())
    }

    /// Total bytes of file contents.
    fn payload(&self) -> u64 {
        self.entries
            .values()
            .map(|n| match n {
                Node::File { src, .. } => src.metadata().map(|m| m.len()).unwrap_or(0),
                Node::Bytes { data, .. } => data.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// Writes the image as a cpio archive in the "newc" format the kernel
    /// unpacks into its initial rootfs.
    fn write_cpio(&self, out: &Path) -> Result<()> {
        let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut w = BufWriter::new(file);
        let mut ino = 1u32;
        for (path, node) in &self.entries {
            ino += 1;
            match node {
                Node::Dir => cpio_entry(&mut w, path, 0o040755, ino, (0, 0), &[])?,
                Node::Symlink(target) => {
                    cpio_entry(&mut w, path, 0o120777, ino, (0, 0), target.as_bytes())?
                }
                Node::CharDev(major, minor) => {
                    cpio_entry(&mut w, path, 0o020600, ino, (*major, *minor), &[])?
                }
                Node::Bytes { data, mode } => {
                    cpio_entry(&mut w, path, 0o100000 | mode, ino, (0, 0), data)?
                }
                Node::File { src, mode } => {
                    let data =
                        fs::read(src).with_context(|| format!("reading {}", src.display()))?;
                    cpio_entry(&mut w, path, 0o100000 | mode, ino, (0, 0), &data)?
                }
            }
        }
        cpio_entry(&mut w, "TRAILER!!!", 0, 0, (0, 0), &[])?;
        w.flush()?;
        Ok(())
    }
}

/// The names in a path, `..` kept (resolved against the real directory
/// walked so far), `/` and `.` dropped.
fn names(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// One newc record: 110-byte ASCII header, name, data, each padded to 4.
fn cpio_entry(
    w: &mut impl Write,
    name: &str,
    mode: u32,
    ino: u32,
    rdev: (u32, u32),
    data: &[u8],
) -> Result<()> {
    let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime: fixed, so identical inputs give identical images
        u32::try_from(data.len()).context("file too large for cpio")?,
        0, // dev major
        0, // dev minor
        rdev.0,
        rdev.1,
        u32::try_from(name.len() + 1)?,
        0, // check
    ];
    let mut header = String::from("070701");
    for f in fields {
        header.push_str(&format!("{f:08x}"));
    }
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    w.write_all(&[0u8; 3][..pad4(header.len() + name.len() + 1)])?;
    w.write_all(data)?;
    w.write_all(&[0u8; 3][..pad4(data.len())])?;
    Ok(())
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Everything but the modules: directories, the console device, the
/// binaries, the host tools with their libraries.
fn add_base(image: &mut Image, bins: &GuestBinaries) -> Result<()> {
    for dir in ["dev", "proc", "sys", "run", "tmp", "etc", "root", "var"] {
        image.dir(dir);
    }
    // The kernel opens /dev/console for init before anything is mounted.
    image.put("dev/console", Node::CharDev(5, 1));
    image.put("var/run", Node::Symlink("../run".into()));
    image.put("var/tmp", Node::Symlink("../tmp".into()));
    image.put(
        "init",
        Node::File {
            src: bins.init.clone(),
            mode: 0o755,
        },
    );
    for (_, name, path) in &bins.programs {
        image.put(
            &format!("{GUEST_DIR}/bin/{name}"),
            Node::File {
                src: path.clone(),
                mode: 0o755,
            },
        );
    }
    for (name, path) in &bins.tests {
        image.put(
            &format!("{GUEST_DIR}/tests/{name}"),
            Node::File {
                src: path.clone(),
                mode: 0o755,
            },
        );
    }
    image.put(
        "etc/hosts",
        Node::Bytes {
            data: b"127.0.0.1 localhost\n".to_vec(),
            mode: 0o644,
        },
    );

    let mut programs = Vec::new();
    for tool in REQUIRED_TOOLS {
        let path = which(tool).with_context(|| {
            format!("`{tool}` is not on PATH; the guest needs it (cargo xtask setup installs iproute2 and procps)")
        })?;
        programs.push(path);
    }
    let mut optional = Vec::new();
    for tool in OPTIONAL_TOOLS {
        match which(tool) {
            Some(path) => {
                optional.push(*tool);
                programs.push(path);
            }
            None => say!("==> vm-test: `{tool}` not on this machine: the guest has none either"),
        }
    }
    // iptables loads its matches and targets with dlopen from here.
    let mut copies = programs.clone();
    if optional.contains(&"iptables") {
        for dir in ["/usr/lib/x86_64-linux-gnu/xtables", "/usr/lib/xtables"] {
            let dir = Path::new(dir);
            if dir.is_dir() {
                for entry in fs::read_dir(dir)?.flatten() {
                    copies.push(entry.path());
                }
                break;
            }
        }
    }
    for path in &copies {
        image.add_host_path(path)?;
    }
    // The guest's own binaries need libraries only with --dynamic; ldd
    // reports none for the static musl ones.
    let mut libs_of = copies;
    libs_of.push(bins.init.clone());
    libs_of.extend(bins.programs.iter().map(|(_, _, path)| path.clone()));
    libs_of.extend(bins.tests.iter().map(|(_, path)| path.clone()));
    for lib in shared_libraries(&libs_of)? {
        image.add_host_path(&lib)?;
    }
    // Lets the dynamic loader find the libraries exactly as on the host.
    if Path::new("/etc/ld.so.cache").exists() {
        image.add_host_path(Path::new("/etc/ld.so.cache"))?;
    }
    say!(
        "==> vm-test: guest tools: {} {}",
        REQUIRED_TOOLS.join(" "),
        optional.join(" ")
    );
    let unknown = programs_called_by_tests()
        .into_iter()
        .filter(|p| !REQUIRED_TOOLS.contains(&p.as_str()) && !OPTIONAL_TOOLS.contains(&p.as_str()))
        .collect::<Vec<_>>();
    if !unknown.is_empty() {
        say!(
            "==> vm-test: WARNING: the tests call {} but the guest has no such program: \
             add it to REQUIRED_TOOLS/OPTIONAL_TOOLS in xtask/src/vmtest.rs",
            unknown.join(", ")
        );
    }
    Ok(())
}

/// Program names the test sources start (`Command::new("x")`, the
/// harness's `cmd("x", …)`, `exec("x", …)`, …): a cheap early warning when
/// a test starts calling a program that the guest lacks.
fn programs_called_by_tests() -> BTreeSet<String> {
    let root = util::workspace_root().join("tests");
    let mut found = BTreeSet::new();
    for dir in [root.join("src"), root.join("tests")] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if let Ok(text) = fs::read_to_string(entry.path()) {
                found.extend(called_programs(&text));
            }
        }
    }
    found
}

pub(crate) fn called_programs(source: &str) -> BTreeSet<String> {
    const CALLS: &[&str] = &[
        "Command::new(\"",
        "cmd(\"",
        "cmd_output(\"",
        "exec(\"",
        "exec_output(\"",
        "have_program(\"",
    ];
    let mut found = BTreeSet::new();
    for call in CALLS {
        for (at, _) in source.match_indices(call) {
            // `ns.cmd(` etc. count too; `fn cmd(` declarations have no quote.
            let rest = &source[at + call.len()..];
            if let Some(name) = rest.split('"').next()
                && !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                found.insert(name.to_string());
            }
        }
    }
    found
}

/// Shared libraries (and the dynamic loader) of `binaries`, from one `ldd`.
fn shared_libraries(binaries: &[PathBuf]) -> Result<BTreeSet<PathBuf>> {
    let out = Command::new("ldd")
        .args(binaries)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("running ldd (Debian package libc-bin)")?;
    // ldd exits non-zero when one of them is static; its output still counts.
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

/// `\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` and
/// `\t/lib64/ld-linux-x86-64.so.2 (0x…)` → their absolute paths.
fn parse_ldd(text: &str) -> BTreeSet<PathBuf> {
    text.lines()
        .filter(|l| l.starts_with('\t'))
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => l,
            };
            let path = path.split(" (").next()?.trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Kernel modules
// ---------------------------------------------------------------------------

/// A module to load, in order.
struct Module {
    name: String,
    path: PathBuf,
}

/// Modules of `kernel` to load, every dependency before its users. Required
/// modules must exist (as a module file or built in); node modules are
/// skipped, with their users, when the kernel lacks them.
fn module_plan(kernel: &Kernel) -> Result<(Vec<Module>, Vec<String>)> {
    let mut index: HashMap<String, PathBuf> = HashMap::new();
    index_modules(&kernel.modules, &mut index)?;
    let builtin: BTreeSet<String> = fs::read_to_string(kernel.modules.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .map(|f| module_name(f).unwrap_or(f).replace('-', "_"))
        .collect();

    let mut plan = Planner {
        index,
        builtin,
        done: BTreeSet::new(),
        visiting: BTreeSet::new(),
        order: Vec::new(),
        skipped: Vec::new(),
    };
    for name in REQUIRED_MODULES {
        if !plan.visit(name)? {
            bail!(
                "kernel {}: module {name} is neither in {} nor built in (modules.builtin)",
                kernel.release,
                kernel.modules.display()
            );
        }
    }
    for name in NODE_MODULES {
        if !plan.visit(name)? {
            plan.skipped.push(name.to_string());
        }
    }
    Ok((plan.order, plan.skipped))
}

struct Planner {
    index: HashMap<String, PathBuf>,
    builtin: BTreeSet<String>,
    done: BTreeSet<String>,
    visiting: BTreeSet<String>,
    order: Vec<Module>,
    skipped: Vec<String>,
}

impl Planner {
    /// Plans `name` after its dependencies. False when it cannot be loaded.
    fn visit(&mut self, name: &str) -> Result<bool> {
        let name = name.replace('-', "_");
        if self.done.contains(&name) || self.builtin.contains(&name) {
            return Ok(true);
        }
        if !self.visiting.insert(name.clone()) {
            bail!("module dependency cycle through {name}");
        }
        let Some(path) = self.index.get(&name).cloned() else {
            self.visiting.remove(&name);
            return Ok(false);
        };
        let (depends, pre, post) = module_deps(&path)?;
        // softdep pre: modules are wanted, not needed (e.g. crc32c's
        // implementation for libcrc32c): load them when they exist.
        for soft in &pre {
            self.visit(soft)?;
        }
        for dep in &depends {
            if !self.visit(dep)? {
                self.visiting.remove(&name);
                return Ok(false);
            }
        }
        self.visiting.remove(&name);
        self.done.insert(name.clone());
        self.order.push(Module { name, path });
        for soft in &post {
            self.visit(soft)?;
        }
        Ok(true)
    }
}

/// `depends` and the `pre:`/`post:` parts of `softdep`, from modinfo.
fn module_deps(path: &Path) -> Result<(Vec<String>, Vec<String>, Vec<String>)> {
    let field = |f: &str| -> Result<String> {
        output(Command::new("modinfo").args(["-F", f]).arg(path))
            .with_context(|| format!("modinfo -F {f} {} (Debian package kmod)", path.display()))
    };
    let depends: Vec<String> = field("depends")?
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect();
    let (pre, post) = parse_softdep(&field("softdep")?);
    Ok((depends, pre, post))
}

/// `pre: a b post: c` (one softdep per line) → ([a, b], [c]).
fn parse_softdep(text: &str) -> (Vec<String>, Vec<String>) {
    let (mut pre, mut post) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let mut into_pre = true;
        for word in line.split_whitespace() {
            match word {
                "pre:" => into_pre = true,
                "post:" => into_pre = false,
                w if into_pre => pre.push(w.to_string()),
                w => post.push(w.to_string()),
            }
        }
    }
    (pre, post)
}

/// `veth.ko.xz` → `veth`.
fn module_name(file: &str) -> Option<&str> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
}

fn index_modules(dir: &Path, index: &mut HashMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(name) = module_name(&entry.file_name().to_string_lossy()) {
            index.insert(name.replace('-', "_"), path);
        }
    }
    Ok(())
}

/// The module as an uncompressed .ko: the guest loads it with finit_module
/// without asking the kernel to decompress (6.1 cannot).
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {tool} -dc {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

// ---------------------------------------------------------------------------
// Boot
// ---------------------------------------------------------------------------

/// What one kernel's run showed.
struct KernelRun {
    label: String,
    release: String,
    verdict: Option<Verdict>,
    /// Why the run failed before (or without) a verdict.
    problem: Option<String>,
    attach: AttachLog,
    failed_tests: Vec<String>,
    wall: Duration,
}

impl KernelRun {
    fn failed(kernel: &Kernel, problem: String) -> KernelRun {
        KernelRun {
            label: kernel.label.clone(),
            release: kernel.release.clone(),
            verdict: None,
            problem: Some(problem),
            attach: AttachLog::default(),
            failed_tests: Vec::new(),
            wall: Duration::ZERO,
        }
    }

    fn passed(&self) -> bool {
        self.problem.is_none() && self.verdict.as_ref().is_some_and(|v| v.pass)
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    pass: bool,
    passed: usize,
    failed: usize,
    ignored: usize,
}

/// `KPROXY-VM-VERDICT: PASS passed=3 failed=0 ignored=1`.
fn parse_verdict(line: &str) -> Option<Verdict> {
    let rest = &line[line.find(VERDICT_MARK)? + VERDICT_MARK.len()..];
    let mut words = rest.split_whitespace();
    let pass = match words.next()? {
        "PASS" => true,
        "FAIL" => false,
        _ => return None,
    };
    let mut v = Verdict {
        pass,
        passed: 0,
        failed: 0,
        ignored: 0,
    };
    for word in words {
        if let Some((k, n)) = word.split_once('=') {
            let n = n.parse().unwrap_or(0);
            match k {
                "passed" => v.passed = n,
                "failed" => v.failed = n,
                "ignored" => v.ignored = n,
                _ => {}
            }
        }
    }
    Some(v)
}

/// A console line without its CRLF and without the terminal control
/// sequences the firmware prints (`ESC c`, `ESC [2J`, …).
fn printable(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.trim_end_matches(['\r', '\n']).chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.next_if_eq(&'[').is_some() {
                    // CSI: parameters, then one final byte in @..~.
                    for p in chars.by_ref() {
                        if ('@'..='~').contains(&p) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Which attach path kproxy took, per kproxy process. The tests print
/// `kproxy[PID@NS]: started … ARGS` and then echo its stdout as
/// `kproxy[PID@NS] | kproxy: attached c0 mode=tcx`; a start with an explicit
/// `--attach` is a test of that mode, not the kernel's `auto` choice.
#[derive(Default)]
struct AttachLog {
    explicit: BTreeSet<String>,
    /// "auto" or "--attach" → mode → count.
    seen: BTreeMap<(&'static str, String), usize>,
}

impl AttachLog {
    fn line(&mut self, line: &str) {
        let Some(start) = line.find("kproxy[") else {
            return;
        };
        let rest = &line[start..];
        let Some(end) = rest.find(']') else {
            return;
        };
        let who = rest[..=end].to_string();
        let after = &rest[end + 1..];
        if after.starts_with(": started") {
            if after.contains("\"--attach\"") || after.contains(" --attach ") {
                self.explicit.insert(who);
            }
        } else if let Some(mode) = attach_mode(after) {
            let how = if self.explicit.contains(&who) {
                "--attach"
            } else {
                "auto"
            };
            *self.seen.entry((how, mode.to_string())).or_default() += 1;
        }
    }

    /// `auto: tcx x7; --attach: netlink x1`.
    fn summary(&self) -> String {
        if self.seen.is_empty() {
            return "-".into();
        }
        let mut parts = Vec::new();
        for how in ["auto", "--attach"] {
            let modes: Vec<String> = self
                .seen
                .iter()
                .filter(|((h, _), _)| *h == how)
                .map(|((_, m), n)| format!("{m} x{n}"))
                .collect();
            if !modes.is_empty() {
                parts.push(format!("{how}: {}", modes.join(", ")));
            }
        }
        parts.join("; ")
    }
}

/// `kproxy: attached c0 mode=tcx` → `tcx`.
fn attach_mode(line: &str) -> Option<&str> {
    let rest = &line[line.find("kproxy: attached ")?..];
    let mode = rest.split_once("mode=")?.1;
    Some(mode.split_whitespace().next().unwrap_or(mode))
}

fn boot_kernel(
    kernel: &Kernel,
    base: &Image,
    bins: &GuestBinaries,
    vm_dir: &Path,
    timeout: Duration,
) -> Result<KernelRun> {
    let dir = vm_dir.join(&kernel.label);
    fs::create_dir_all(&dir)?;
    let initrd = write_initramfs(kernel, base, bins, &dir)?;
    run_qemu(kernel, &initrd, &dir, timeout)
}

/// The shared base plus this kernel's modules and the guest's plan, as
/// `DIR/initrd.cpio`.
fn write_initramfs(
    kernel: &Kernel,
    base: &Image,
    bins: &GuestBinaries,
    dir: &Path,
) -> Result<PathBuf> {
    let label = &kernel.label;
    let (modules, skipped) = module_plan(kernel)?;
    let mut image = base.clone();
    let mut plan = String::new();
    plan.push_str(&format!("label {label}\n"));
    plan.push_str(&format!("test-timeout {}\n", GUEST_TEST_TIMEOUT.as_secs()));
    plan.push_str(&format!("env PATH={GUEST_PATH}\n"));
    for (env, name, _) in &bins.programs {
        plan.push_str(&format!("env {env}=/{GUEST_DIR}/bin/{name}\n"));
    }
    // The kernel-dependent datapath; iptables mode is kernel-independent.
    plan.push_str("env KPROXY_MODE=ebpf\n");
    plan.push_str("env HOME=/root\n");
    plan.push_str("env RUST_BACKTRACE=1\n");
    for (i, m) in modules.iter().enumerate() {
        let guest = format!("/{GUEST_DIR}/modules/{i:02}-{}.ko", m.name);
        image.put(
            &guest,
            Node::Bytes {
                data: module_bytes(&m.path)?,
                mode: 0o644,
            },
        );
        plan.push_str(&format!("module {} {guest}\n", m.name));
    }
    for (name, _) in &bins.tests {
        plan.push_str(&format!("test {name} /{GUEST_DIR}/tests/{name}\n"));
    }
    image.put(
        GUEST_PLAN,
        Node::Bytes {
            data: plan.into_bytes(),
            mode: 0o644,
        },
    );
    let initrd = dir.join("initrd.cpio");
    image.write_cpio(&initrd)?;
    say!(
        "==> vm-test [{label}]: {} ({}), {} modules ({}){}, initramfs {} MiB",
        kernel.release,
        kernel.vmlinuz.display(),
        modules.len(),
        modules
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        if skipped.is_empty() {
            String::new()
        } else {
            format!(", not in this kernel: {}", skipped.join(" "))
        },
        image.payload() / (1024 * 1024)
    );
    Ok(initrd)
}

/// Boots the kernel, streams and parses its console until the verdict,
/// the end of qemu or the timeout.
fn run_qemu(kernel: &Kernel, initrd: &Path, dir: &Path, timeout: Duration) -> Result<KernelRun> {
    let label = &kernel.label;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg",
        "-m",
        "1G",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .arg("-append")
    .arg(format!("console=ttyS0 panic=-1 quiet -- {GUEST_INIT_CMD}"))
    // -nographic puts a terminal on stdin into raw mode; the guest
    // needs no input.
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    say!(
        "==> vm-test [{label}]: booting (timeout {}): {}",
        util::secs(timeout),
        util::display(&cmd)
    );
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .context("starting qemu-system-x86_64 (Debian package qemu-system-x86)")?;
    let (tx, rx) = channel::<(bool, String)>();
    for (is_err, stream) in [
        (
            false,
            Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
        ),
        (
            true,
            Box::new(child.stderr.take().expect("piped")) as Box<dyn Read + Send>,
        ),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = printable(&String::from_utf8_lossy(&buf));
                        if tx.send((is_err, line)).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    drop(tx);

    let mut log = BufWriter::new(File::create(dir.join("console.log"))?);
    let mut run = KernelRun {
        problem: None,
        ..KernelRun::failed(kernel, String::new())
    };
    let deadline = started + timeout;
    // After the verdict the guest powers off at once; give it a moment.
    let mut grace: Option<Instant> = None;
    loop {
        let limit = grace.unwrap_or(deadline);
        let now = Instant::now();
        if now >= limit {
            if grace.is_none() {
                run.problem = Some(format!("timed out after {}", util::secs(timeout)));
                say!(
                    "[{label}] !! timeout after {}: killing qemu",
                    util::secs(timeout)
                );
            }
            child.kill().ok();
            break;
        }
        match rx.recv_timeout(limit - now) {
            Ok((is_err, line)) => {
                let _ = writeln!(log, "{line}");
                if is_err {
                    say!("[{label} qemu] {line}");
                } else {
                    say!("[{label}] {line}");
                }
                run.attach.line(&line);
                if let Some(rest) = line.split_once(TEST_MARK).map(|(_, r)| r)
                    && let Some(name) = rest.strip_prefix("FAILED ")
                {
                    run.failed_tests
                        .push(name.split(" (").next().unwrap_or(name).to_string());
                }
                if line.contains("Kernel panic - not syncing") && run.problem.is_none() {
                    run.problem = Some(format!("kernel panic: {}", line.trim()));
                }
                if let Some(v) = parse_verdict(&line) {
                    run.verdict = Some(v);
                    grace = Some(Instant::now() + Duration::from_secs(15));
                }
            }
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().context("waiting for qemu")?;
    log.flush()?;
    run.wall = started.elapsed();
    if run.verdict.is_none() && run.problem.is_none() {
        run.problem = Some(format!(
            "no {} line on the console (qemu exited: {status})",
            VERDICT_MARK.trim()
        ));
    }
    say!(
        "==> vm-test [{label}]: {} in {}",
        if run.passed() { "PASS" } else { "FAIL" },
        util::secs(run.wall)
    );
    Ok(run)
}

fn print_summary(runs: &[KernelRun], opts: &Options, total: Duration) {
    let mut what = Vec::new();
    if opts.quick {
        what.push("--quick");
    }
    if opts.break_program {
        what.push("--break-program");
    }
    if opts.dynamic {
        what.push("--dynamic");
    }
    say!(
        "==> vm-test summary{} (total {}):",
        if what.is_empty() {
            String::new()
        } else {
            format!(" [{}]", what.join(" "))
        },
        util::secs(total)
    );
    let header = [
        "kernel", "release", "attach", "passed", "failed", "ignored", "wall", "result",
    ];
    let mut rows: Vec<[String; 8]> = Vec::new();
    for r in runs {
        let attach = r.attach.summary();
        let (p, f, i) = match &r.verdict {
            Some(v) => (
                v.passed.to_string(),
                v.failed.to_string(),
                v.ignored.to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let result = match (&r.problem, r.passed()) {
            (Some(problem), _) => format!("FAIL ({problem})"),
            (None, true) => "PASS".into(),
            (None, false) => "FAIL".into(),
        };
        rows.push([
            r.label.clone(),
            r.release.clone(),
            attach,
            p,
            f,
            i,
            util::secs(r.wall),
            result,
        ]);
    }
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::from("    ");
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s
    };
    say!("{}", line(&header.map(String::from)));
    for row in &rows {
        say!("{}", line(row));
    }
    for r in runs {
        for t in &r.failed_tests {
            say!("    [{}] failed: {t}", r.label);
        }
    }
}

// ---------------------------------------------------------------------------
// Guest side: /init
// ---------------------------------------------------------------------------

/// The guest's init (`/init __vm-init`). Never returns: it powers off.
pub fn guest_init() -> ! {
    match guest_main() {
        Ok(()) => {}
        Err(e) => {
            println!("{VERDICT_MARK}FAIL passed=0 failed=0 ignored=0 error={e:#}");
        }
    }
    power_off()
}

/// What the host put into /kproxy-vm/plan.
#[derive(Default)]
struct GuestPlan {
    label: String,
    test_timeout: Duration,
    env: Vec<(String, String)>,
    modules: Vec<(String, PathBuf)>,
    tests: Vec<(String, PathBuf)>,
}

impl GuestPlan {
    fn parse(text: &str) -> Result<GuestPlan> {
        let mut plan = GuestPlan {
            test_timeout: GUEST_TEST_TIMEOUT,
            ..GuestPlan::default()
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
            let pair = || -> Result<(String, String)> {
                let (a, b) = rest
                    .split_once([' ', '='])
                    .with_context(|| format!("plan line {line:?}"))?;
                Ok((a.to_string(), b.to_string()))
            };
            match key {
                "label" => plan.label = rest.to_string(),
                "test-timeout" => {
                    plan.test_timeout = Duration::from_secs(rest.parse().context("test-timeout")?)
                }
                "env" => plan.env.push(pair()?),
                "module" => {
                    let (n, p) = pair()?;
                    plan.modules.push((n, p.into()));
                }
                "test" => {
                    let (n, p) = pair()?;
                    plan.tests.push((n, p.into()));
                }
                other => bail!("unknown plan line {other:?}"),
            }
        }
        Ok(plan)
    }
}

fn guest_main() -> Result<()> {
    mount_pseudo_filesystems()?;
    let plan = GuestPlan::parse(&fs::read_to_string(GUEST_PLAN).context(GUEST_PLAN)?)?;
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "{INFO_MARK}[{}] kernel {} on {cpus} CPUs",
        plan.label,
        release.trim()
    );

    let t = Instant::now();
    let mut loaded = Vec::new();
    for (name, path) in &plan.modules {
        match load_module(path) {
            Ok(()) => loaded.push(name.as_str()),
            Err(e) => println!("{INFO_MARK}module {name}: {e:#}"),
        }
    }
    println!(
        "{INFO_MARK}loaded {} modules in {}: {}",
        loaded.len(),
        util::secs(t.elapsed()),
        loaded.join(" ")
    );
    guest_cmd(&plan, "ip", &["link", "set", "lo", "up"])?;

    let (mut passed, mut failed, mut ignored) = (0usize, 0usize, 0usize);
    for (binary, path) in &plan.tests {
        let all = list_tests(&plan, path, false)?;
        let skip: BTreeSet<String> = list_tests(&plan, path, true)?.into_iter().collect();
        println!("{INFO_MARK}{binary}: {} tests", all.len());
        for test in &all {
            let full = format!("{binary}::{test}");
            if skip.contains(test) {
                println!("{TEST_MARK}ignored {full}");
                ignored += 1;
                continue;
            }
            let t = Instant::now();
            let ok = run_guest_test(&plan, path, test)?;
            let took = util::secs(t.elapsed());
            if ok {
                passed += 1;
                println!("{TEST_MARK}ok {full} ({took})");
            } else {
                failed += 1;
                println!("{TEST_MARK}FAILED {full} ({took})");
            }
        }
    }
    let verdict = if failed == 0 && passed > 0 {
        "PASS"
    } else {
        "FAIL"
    };
    println!("{VERDICT_MARK}{verdict} passed={passed} failed={failed} ignored={ignored}");
    Ok(())
}

fn mount_pseudo_filesystems() -> Result<()> {
    let mounts: &[(&str, &str, &str, &str)] = &[
        ("proc", "/proc", "proc", ""),
        ("sysfs", "/sys", "sysfs", ""),
        ("devtmpfs", "/dev", "devtmpfs", ""),
        ("tmpfs", "/run", "tmpfs", "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", "mode=1777"),
        ("bpf", "/sys/fs/bpf", "bpf", "mode=0700"),
    ];
    for (source, target, fstype, data) in mounts {
        fs::create_dir_all(target).ok();
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in mount arguments");
        let (source_c, target_c, fstype_c, data_c) = (c(source), c(target), c(fstype), c(data));
        // SAFETY: all pointers are valid NUL-terminated strings for the call.
        let rc = unsafe {
            libc::mount(
                source_c.as_ptr(),
                target_c.as_ptr(),
                fstype_c.as_ptr(),
                0,
                data_c.as_ptr().cast(),
            )
        };
        if rc != 0 {
            bail!(
                "mount -t {fstype} {source} {target}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    // `ip netns add` keeps its handles here (tests use /var/run/netns).
    fs::create_dir_all("/run/netns")?;
    Ok(())
}

fn load_module(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let file = File::open(path)?;
    // SAFETY: finit_module reads the module from a valid open fd; the
    // parameter string is an empty NUL-terminated string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), 0) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(err).context("finit_module");
        }
    }
    Ok(())
}

fn guest_cmd(plan: &GuestPlan, program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Test names of a libtest binary (`--list`; with `ignored`, only those
/// marked #[ignore]).
fn list_tests(plan: &GuestPlan, binary: &Path, ignored: bool) -> Result<Vec<String>> {
    let path = binary.to_string_lossy();
    let mut args = vec!["--list"];
    if ignored {
        args.push("--ignored");
    }
    let out = guest_cmd(plan, &path, &args)?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect())
}

/// Runs one test on its own with the console as stdout/stderr. As PID 1 we
/// also reap whatever the tests orphaned, so the child is awaited through
/// waitpid(-1) rather than `Child::wait`.
fn run_guest_test(plan: &GuestPlan, binary: &Path, test: &str) -> Result<bool> {
    use std::os::unix::process::CommandExt;
    let child = Command::new(binary)
        .args(["--exact", test, "--test-threads=1", "--nocapture"])
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        // Own process group: a timeout kills kproxy and the servers too.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child.id() as libc::pid_t;
    let deadline = Instant::now() + plan.test_timeout;
    let mut killed = false;
    loop {
        let mut status = 0;
        // SAFETY: plain waitpid on any child; `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if r == pid {
            return Ok(!killed && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        }
        if r > 0 {
            continue;
        }
        if !killed && Instant::now() >= deadline {
            println!(
                "{INFO_MARK}{test}: still running after {}: killing it",
                util::secs(plan.test_timeout)
            );
            // SAFETY: kill(2) on the process group we created.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn power_off() -> ! {
    let _ = std::io::stdout().flush();
    // SAFETY: sync and reboot have no memory-safety preconditions; we are
    // PID 1 in a throwaway VM.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
        // Without ACPI power-off, a reset also ends qemu (-no-reboot).
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // Exiting PID 1 panics the kernel; panic=-1 then resets, too.
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_newest_cloud_kernel_of_a_line() {
        let names = [
            "linux-image-6.1.0-9-cloud-amd64-unsigned",
            "linux-image-6.1.0-57-cloud-amd64-unsigned",
            "linux-image-6.1.0-57-cloud-amd64",
            "linux-image-6.1.0-57-cloud-amd64-dbg",
            "linux-image-6.12.9+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.113+deb12-cloud-amd64-unsigned",
        ];
        assert_eq!(
            newest_of_line("6.1", &names).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64-unsigned")
        );
        assert_eq!(
            newest_of_line("6.12", &names).as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64-unsigned")
        );
        assert_eq!(newest_of_line("5.10", &names), None);
    }

    #[test]
    fn parses_kernel_specs() {
        assert_eq!(parse_spec("6.12").unwrap(), KernelSpec::Line("6.12".into()));
        assert_eq!(
            parse_spec("linux-image-6.1.0-57-cloud-amd64-unsigned").unwrap(),
            KernelSpec::Package("linux-image-6.1.0-57-cloud-amd64-unsigned".into())
        );
        assert_eq!(
            parse_spec("a/vmlinuz:b/modules").unwrap(),
            KernelSpec::Paths("a/vmlinuz".into(), "b/modules".into())
        );
        assert!(parse_spec("6.1.0").is_err());
    }

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

    #[test]
    fn parses_console_markers() {
        assert_eq!(
            parse_verdict("KPROXY-VM-VERDICT: PASS passed=12 failed=0 ignored=1"),
            Some(Verdict {
                pass: true,
                passed: 12,
                failed: 0,
                ignored: 1
            })
        );
        assert!(
            !parse_verdict("x KPROXY-VM-VERDICT: FAIL passed=1 failed=2")
                .unwrap()
                .pass
        );
        assert_eq!(parse_verdict("KPROXY-VM: loaded"), None);
        assert_eq!(
            attach_mode("kproxy[7@kpt-1-0-node] | kproxy: attached c0 mode=netlink"),
            Some("netlink")
        );
        assert_eq!(attach_mode("kproxy: ready services=1 backends=3"), None);

        let mut log = AttachLog::default();
        for line in [
            r#"test a ... kproxy[7@kpt-1-0-node]: started "ip" "netns" "exec" "kpt-1-0-node" "/k""#,
            "kproxy[7@kpt-1-0-node] | kproxy: attached c0 mode=tcx",
            r#"test b ... kproxy[9@kpt-2-0-node]: started "ip" "/k" "--attach" "netlink""#,
            "kproxy[9@kpt-2-0-node] | kproxy: attached c0 mode=netlink",
            "kproxy[11@kpt-3-0-node] | kproxy: attached c0 mode=tcx",
        ] {
            log.line(line);
        }
        assert_eq!(log.summary(), "auto: tcx x2; --attach: netlink x1");
        assert_eq!(
            printable("\u{1b}c\u{1b}[?7l\u{1b}[2JKPROXY-VM: x\r\n"),
            "KPROXY-VM: x"
        );
    }

    #[test]
    fn parses_ldd_and_softdeps() {
        let ldd = "/usr/sbin/ip:\n\tlinux-vdso.so.1 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x1)\n\t/lib64/ld-linux-x86-64.so.2 (0x2)\n";
        let libs: Vec<PathBuf> = parse_ldd(ldd).into_iter().collect();
        assert_eq!(
            libs,
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert_eq!(
            parse_softdep("pre: crc32c post: foo bar"),
            (
                vec!["crc32c".to_string()],
                vec!["foo".to_string(), "bar".to_string()]
            )
        );
        assert_eq!(module_name("veth.ko.xz"), Some("veth"));
    }

    #[test]
    fn finds_programs_the_tests_call() {
        let src = r#"cmd("ip", &["netns"]); Command::new("nsenter"); ns.exec("bpftool", &[]);
            Command::new(program); fn cmd(program: &str) {} have_program("x/y");"#;
        let found: Vec<String> = called_programs(src).into_iter().collect();
        assert_eq!(found, ["bpftool", "ip", "nsenter"]);
    }

    #[test]
    fn cpio_records_are_padded() {
        let mut out = Vec::new();
        cpio_entry(&mut out, "init", 0o100755, 2, (0, 0), b"abcde").unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        assert_eq!(&out[110..115], b"init\0");
    }

    #[test]
    fn guest_plan_round_trip() {
        let plan = GuestPlan::parse(
            "label 6.1\ntest-timeout 9\nenv PATH=/bin:/sbin\nmodule veth /m/00-veth.ko\ntest cleanup /t/cleanup\n",
        )
        .unwrap();
        assert_eq!(plan.label, "6.1");
        assert_eq!(plan.test_timeout, Duration::from_secs(9));
        assert_eq!(
            plan.env,
            vec![("PATH".to_string(), "/bin:/sbin".to_string())]
        );
        assert_eq!(plan.modules[0].0, "veth");
        assert_eq!(plan.tests[0].1, PathBuf::from("/t/cleanup"));
    }
}
