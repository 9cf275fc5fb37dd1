//! `cargo xtask setup`: makes this machine able to build and test kproxy.
//!
//! Idempotent and cheap when everything is there (only a handful of quick
//! probes run; no `cargo install`, no `apt-get`), so build/test/up/bench call
//! it every time and a fresh machine needs nothing done by hand.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::util::{self, Toolchain, output, run, succeeds, which};

/// bpf-linker release we build. It links against the libLLVM shipped with the
/// nightly toolchain, whose major version must match the `llvm-NN` feature.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests and the demo use: `ip` (iproute2), iptables (the
/// comparison baseline in tests), iperf3 (throughput checks), sysctl/pkill
/// (procps), modprobe (kmod), `conntrack` (kproxy's iptables mode deletes
/// stale UDP flows with it, as kube-proxy does), and `nc` (netcat-openbsd),
/// which the demo (`cargo xtask up`) tells the user to try. `cargo xtask
/// vm-test` boots kernels in qemu (qemu-system-x86), unpacks their .ko.xz
/// modules (xz-utils) and builds static musl binaries, some with C inside
/// (ring, through kube's rustls): musl-tools has `x86_64-linux-musl-gcc`.
/// kcontrol's etcd store: the `etcd-client` crate compiles etcd's protobufs
/// with `protoc` (protobuf-compiler), and those import the well-known types
/// (`google/protobuf/descriptor.proto`), which Debian ships separately in
/// libprotobuf-dev (see [`check_protoc`]); the etcd tests, the `--store etcd`
/// benchmark and users' etcd clusters run `/usr/bin/etcd` (etcd-server).
/// bpftool: the cleanup and cluster tests and `bench cluster` read BPF links
/// and maps with it. python3-venv: the Python client's own interpreter
/// (see [`ensure_python_kubernetes`]).
pub const APT_REQUIRED: &[&str] = &[
    "iproute2",
    "iptables",
    "iperf3",
    "procps",
    "kmod",
    "conntrack",
    "netcat-openbsd",
    "qemu-system-x86",
    "xz-utils",
    "musl-tools",
    "protobuf-compiler",
    "libprotobuf-dev",
    "etcd-server",
    "bpftool",
    "python3-venv",
    // kcontrol's kubelet runs pod containers with crun, from a rootfs made of
    // busybox-static (see `ensure_busybox_rootfs`).
    "crun",
    "busybox-static",
];

/// Every program the project's code starts, and where it comes from: a
/// package of [`APT_REQUIRED`], a package every Debian system has
/// ([`BASE_PACKAGES`]), or something else that setup installs or checks
/// (`rustup`: the toolchains; `machine`: kubectl, which this kind of machine
/// ships; `venv`: the Python client's interpreter). A unit test fails when the
/// code starts a program missing here, and (on Debian) when a program is not
/// in the package named for it — so a program installed by hand cannot keep
/// the suite green here while a fresh machine fails.
pub const PROGRAMS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("ss", "iproute2"),
    ("iptables", "iptables"),
    ("iptables-save", "iptables"),
    ("iptables-restore", "iptables"),
    ("conntrack", "conntrack"),
    ("iperf3", "iperf3"),
    ("sysctl", "procps"),
    ("modinfo", "kmod"),
    ("bpftool", "bpftool"),
    ("crun", "crun"),
    ("busybox", "busybox-static"),
    ("etcd", "etcd-server"),
    ("protoc", "protobuf-compiler"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("nc", "netcat-openbsd"),
    ("nsenter", "util-linux"),
    ("mount", "mount"),
    ("sh", "dash"),
    ("date", "coreutils"),
    ("false", "coreutils"),
    ("ldd", "libc-bin"),
    ("strip", "binutils"),
    ("git", "machine"),
    ("dpkg", "dpkg"),
    ("dpkg-query", "dpkg"),
    ("dpkg-deb", "dpkg"),
    ("apt-get", "apt"),
    ("apt-cache", "apt"),
    ("python3", "python3-minimal"),
    ("cargo", "rustup"),
    ("rustc", "rustup"),
    ("rustup", "rustup"),
    ("kubectl", "machine"),
];

/// The [`PROGRAMS`] sources that are not Debian packages.
const NOT_APT: &[&str] = &["machine", "rustup"];

/// Packages of every Debian 12 system of this kind (essential or priority
/// required/important, or on the machine before anything is installed:
/// binutils and python3 come with its toolchains). `machine` is what this
/// kind of machine ships outside Debian's packages: kubectl (checked by
/// [`check_kubectl`]) and a git under /usr/local.
const BASE_PACKAGES: &[&str] = &[
    "util-linux",
    "mount",
    "dash",
    "coreutils",
    "libc-bin",
    "binutils",
    "dpkg",
    "apt",
    "python3-minimal",
];

/// One line of the closing summary.
struct Summary {
    rows: Vec<(&'static str, String)>,
}

impl Summary {
    /// Prints the outcome of a step now and keeps it for the summary.
    fn note(&mut self, item: &'static str, status: impl Into<String>) {
        let status = status.into();
        say!("==> setup: {item}: {status}");
        self.rows.push((item, status));
    }
}

pub fn run_setup() -> Result<()> {
    let started = Instant::now();
    let mut summary = Summary { rows: Vec::new() };

    check_platform(&mut summary)?;
    check_disk_space(&mut summary);
    let nightly = ensure_nightly(&mut summary)?;
    ensure_active_components(&mut summary)?;
    ensure_musl_target(&mut summary)?;
    ensure_bpf_linker(&mut summary, &nightly)?;
    ensure_apt_packages(&mut summary)?;
    check_programs(&mut summary)?;
    check_protoc(&mut summary)?;
    check_kubectl(&mut summary)?;
    ensure_python_kubernetes(&mut summary)?;
    ensure_busybox_rootfs(&mut summary)?;
    ensure_crun_cgroups(&mut summary)?;
    ensure_bpffs(&mut summary);

    say!("==> setup done in {}:", util::secs(started.elapsed()));
    let width = summary.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (item, status) in &summary.rows {
        say!("    {item:<width$}  {status}");
    }
    Ok(())
}

/// A clean `cargo xtask test` writes about 5 GB under target/ (release
/// builds, every test binary, the eBPF object, the vm-test initramfs). Say
/// how much room there is, and warn up front when it looks too little: a
/// full disk otherwise shows up much later as a linker crash (SIGBUS) or
/// "IO failure on output stream".
fn check_disk_space(summary: &mut Summary) {
    const WANT_GIB: u64 = 8;
    let dir = util::workspace_root();
    let Some(free) = free_bytes(&dir) else {
        summary.note(
            "disk",
            format!("free space under {} unknown", dir.display()),
        );
        return;
    };
    let gib = free / (1 << 30);
    if gib < WANT_GIB {
        summary.note(
            "disk",
            format!(
                "WARNING: only {gib} GiB free under {} (a clean build and test run needs about {WANT_GIB} GiB): free space or expect \"No space left on device\"",
                dir.display()
            ),
        );
    } else {
        summary.note("disk", format!("{gib} GiB free under {}", dir.display()));
    }
}

/// Bytes available to an unprivileged writer on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `st` a valid,
    // writable statvfs that the call fills in.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Linux, root, and a kernel with the BPF syscall and BTF. Nothing else in
/// kproxy works without these, and none of them can be fixed by installing
/// packages, so fail early with what to do.
fn check_platform(summary: &mut Summary) -> Result<()> {
    if std::env::consts::OS != "linux" {
        bail!(
            "kproxy needs Linux (eBPF, network namespaces), this is {}: run it on a Linux machine or VM",
            std::env::consts::OS
        );
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "not running as root: loading eBPF programs, creating network namespaces and \
             installing packages need root. Run as root, e.g. `sudo -E env PATH=\"$PATH\" cargo xtask ...`"
        );
    }
    // This sysctl exists exactly when the kernel has CONFIG_BPF_SYSCALL.
    if !Path::new("/proc/sys/kernel/unprivileged_bpf_disabled").exists() {
        bail!(
            "the kernel has no BPF syscall (/proc/sys/kernel/unprivileged_bpf_disabled is missing): \
             boot a kernel built with CONFIG_BPF_SYSCALL=y"
        );
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "the kernel has no BTF (/sys/kernel/btf/vmlinux is missing): boot a kernel built with \
             CONFIG_DEBUG_INFO_BTF=y (Debian 11+/Ubuntu 20.10+ stock kernels have it)"
        );
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    summary.note(
        "platform",
        format!("Linux {}, root, BPF syscall, BTF", release.trim()),
    );
    Ok(())
}

/// What the rest of setup and the eBPF build need to know about nightly.
struct Nightly {
    sysroot: PathBuf,
    llvm_major: u32,
}

fn ensure_nightly(summary: &mut Summary) -> Result<Nightly> {
    let version = match output(util::rustc(Toolchain::Nightly).arg("-vV")) {
        Ok(v) => {
            summary.note(
                "nightly toolchain",
                format!("already present ({})", first_line(&v)),
            );
            v
        }
        Err(_) => {
            require_rustup()?;
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]))?;
            let v = output(util::rustc(Toolchain::Nightly).arg("-vV"))
                .context("nightly was installed but `rustc +nightly -vV` still fails")?;
            summary.note(
                "nightly toolchain",
                format!("installed ({})", first_line(&v)),
            );
            v
        }
    };
    let llvm_major = llvm_major(&version).with_context(|| {
        format!("no `LLVM version: N.x` line in `rustc +nightly -vV`:\n{version}")
    })?;
    let sysroot = PathBuf::from(output(
        util::rustc(Toolchain::Nightly).args(["--print", "sysroot"]),
    )?);

    // rust-src: `-Z build-std=core` compiles core for bpfel-unknown-none from
    // it. clippy: `cargo xtask test` lints the eBPF crate with nightly. The
    // minimal profile has neither.
    let mut missing = Vec::new();
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        missing.push("rust-src");
    }
    if !sysroot.join("bin/cargo-clippy").exists() {
        missing.push("clippy");
    }
    if missing.is_empty() {
        summary.note("nightly components", "already present (rust-src, clippy)");
    } else {
        require_rustup()?;
        let mut cmd = Command::new("rustup");
        cmd.args(["component", "add"])
            .args(&missing)
            .args(["--toolchain", "nightly"]);
        run(&mut cmd)?;
        summary.note(
            "nightly components",
            format!("installed {}", missing.join(", ")),
        );
    }
    Ok(Nightly {
        sysroot,
        llvm_major,
    })
}

/// rustfmt and clippy for the toolchain that runs xtask (stable by default):
/// `cargo xtask test` runs `cargo fmt --check` and `cargo clippy` with it.
fn ensure_active_components(summary: &mut Summary) -> Result<()> {
    let sysroot = PathBuf::from(output(
        util::rustc(Toolchain::Active).args(["--print", "sysroot"]),
    )?);
    let version = output(util::rustc(Toolchain::Active).arg("-V"))?;
    let mut missing = Vec::new();
    if !sysroot.join("bin/cargo-fmt").exists() || !sysroot.join("bin/rustfmt").exists() {
        missing.push("rustfmt");
    }
    if !sysroot.join("bin/cargo-clippy").exists() {
        missing.push("clippy");
    }
    if missing.is_empty() {
        summary.note(
            "default toolchain",
            format!("already present ({version}, rustfmt, clippy)"),
        );
    } else {
        require_rustup()?;
        // No --toolchain: rustup adds to the active toolchain, the same one
        // (RUSTUP_TOOLCHAIN from the outer cargo) that will run fmt/clippy.
        run(Command::new("rustup")
            .args(["component", "add"])
            .args(&missing))?;
        summary.note(
            "default toolchain",
            format!("{version}: installed {}", missing.join(", ")),
        );
    }
    Ok(())
}

/// `cargo xtask vm-test` builds kproxy, the tests and its guest init as
/// static musl binaries for the initramfs.
fn ensure_musl_target(summary: &mut Summary) -> Result<()> {
    let target = crate::vmtest::MUSL_TARGET;
    let sysroot = PathBuf::from(output(
        util::rustc(Toolchain::Active).args(["--print", "sysroot"]),
    )?);
    if sysroot
        .join("lib/rustlib")
        .join(target)
        .join("lib")
        .is_dir()
    {
        summary.note("musl target", format!("already present ({target})"));
        return Ok(());
    }
    require_rustup()?;
    // No --toolchain: the active toolchain is the one that builds them.
    run(Command::new("rustup").args(["target", "add", target]))?;
    summary.note("musl target", format!("installed {target}"));
    Ok(())
}

fn require_rustup() -> Result<()> {
    if which("rustup").is_none() {
        bail!(
            "rustup is not on PATH, but it is needed to install the nightly toolchain and components: \
             install rustup (https://rustup.rs) and run `cargo xtask setup` again"
        );
    }
    Ok(())
}

/// bpf-linker, built against the nightly's own libLLVM so that it reads the
/// bitcode rustc emits. Rebuilt whenever the nightly's LLVM major changes
/// (recorded in a stamp file) or when the installed one no longer starts
/// (e.g. a nightly update removed the libLLVM it was linked against).
fn ensure_bpf_linker(summary: &mut Summary, nightly: &Nightly) -> Result<()> {
    let prefix = util::home_dir()?.join(".local/share/kproxy/llvm");
    let stamp = prefix.join("bpf-linker.llvm-major");
    let major = nightly.llvm_major;

    let installed = which("bpf-linker");
    let runs = installed
        .as_ref()
        .is_some_and(|path| succeeds(Command::new(path).arg("--version")));
    let stamped = fs::read_to_string(&stamp)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());

    let reason = match (&installed, runs, stamped) {
        (None, _, _) => "not installed".to_string(),
        (Some(_), false, _) => "installed but does not start".to_string(),
        (Some(_), true, Some(m)) if m == major => {
            summary.note("bpf-linker", format!("already present (LLVM {major})"));
            return Ok(());
        }
        (Some(_), true, Some(m)) => format!("built for LLVM {m}, nightly has LLVM {major}"),
        // Installed by hand or by an older setup: accept it if the binary is
        // dynamically linked against a libLLVM of the right major.
        (Some(path), true, None) => match linked_llvm_major(path) {
            Some(m) if m == major => {
                write_stamp(&stamp, major)?;
                summary.note(
                    "bpf-linker",
                    format!("already present (links libLLVM {major}; stamp written)"),
                );
                return Ok(());
            }
            Some(m) => format!("links libLLVM {m}, nightly has LLVM {major}"),
            None => "its LLVM version cannot be determined".to_string(),
        },
    };
    say!(
        "==> setup: bpf-linker: {reason}: building {BPF_LINKER_VERSION} for LLVM {major} (about a minute)"
    );

    link_nightly_llvm(&prefix, &nightly.sysroot)?;
    let install = |locked: bool| {
        let mut cmd = util::cargo(Toolchain::Active);
        cmd.env("LLVM_PREFIX", &prefix)
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--force",
            ])
            .args(locked.then_some("--locked"))
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}"));
        run(&mut cmd)
    };
    // --locked reproduces the release's dependency set; if that lock no
    // longer resolves on this toolchain, fall back to fresh resolution.
    if let Err(e) = install(true) {
        say!(
            "==> setup: bpf-linker: install with --locked failed ({e:#}); retrying without --locked"
        );
        install(false)?;
    }

    let linker = util::cargo_home()?.join("bin/bpf-linker");
    let version = output(Command::new(&linker).arg("--version"))
        .with_context(|| format!("{} was installed but does not run", linker.display()))?;
    write_stamp(&stamp, major)?;
    summary.note("bpf-linker", format!("installed {version} (LLVM {major})"));
    Ok(())
}

/// Lays out `$prefix/lib` the way llvm-sys expects an LLVM install: the
/// nightly's versioned libLLVM under its own name (that is the soname
/// bpf-linker will need at run time, found through its rpath) and as
/// `libLLVM.so` (what the linker looks for at build time).
fn link_nightly_llvm(prefix: &Path, sysroot: &Path) -> Result<()> {
    let lib_dir = prefix.join("lib");
    fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    let sys_lib = sysroot.join("lib");
    let mut candidates: Vec<PathBuf> = fs::read_dir(&sys_lib)
        .with_context(|| format!("reading {}", sys_lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") || n.starts_with("libLLVM-"))
        })
        .collect();
    candidates.sort();
    let Some(lib) = candidates.pop() else {
        bail!(
            "no libLLVM.so.* in {}: the nightly toolchain does not ship libLLVM, so bpf-linker cannot be built against it",
            sys_lib.display()
        );
    };
    let name = lib.file_name().expect("read_dir entries have names");

    // Drop links left from an older nightly so llvm-sys cannot pick them up.
    for entry in fs::read_dir(&lib_dir)?.flatten() {
        let path = entry.path();
        if path.is_symlink() && !path.exists() {
            fs::remove_file(&path).ok();
        }
    }
    for link in [lib_dir.join("libLLVM.so"), lib_dir.join(name)] {
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), lib.display()))?;
    }
    say!(
        "==> setup: linked {} into {}",
        lib.display(),
        lib_dir.display()
    );
    Ok(())
}

fn write_stamp(stamp: &Path, major: u32) -> Result<()> {
    if let Some(dir) = stamp.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(stamp, format!("{major}\n")).with_context(|| format!("writing {}", stamp.display()))
}

/// "LLVM version: 22.1.4" → 22.
fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .and_then(|m| m.parse().ok())
}

/// Major version of the libLLVM a binary is dynamically linked against, read
/// from its DT_NEEDED string (`libLLVM.so.22.1-rust-…` or `libLLVM-17.so`).
/// None for a statically linked binary.
fn linked_llvm_major(binary: &Path) -> Option<u32> {
    let bytes = fs::read(binary).ok()?;
    let needle = b"libLLVM";
    let mut start = 0;
    while let Some(pos) = find(&bytes[start..], needle) {
        let rest = &bytes[start + pos + needle.len()..];
        let digits = rest
            .strip_prefix(b".so.")
            .or_else(|| rest.strip_prefix(b"-"));
        if let Some(digits) = digits {
            let n: String = digits
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .map(|&b| b as char)
                .collect();
            if let Ok(major) = n.parse() {
                return Some(major);
            }
        }
        start += pos + needle.len();
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn ensure_apt_packages(summary: &mut Summary) -> Result<()> {
    if which("dpkg-query").is_none() || which("apt-get").is_none() {
        summary.note(
            "system packages",
            format!(
                "not a Debian-like system: install the equivalents of {} yourself",
                APT_REQUIRED.join(", ")
            ),
        );
        return Ok(());
    }
    let missing_required: Vec<&str> = APT_REQUIRED
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing_required.is_empty() {
        summary.note("system packages", "already present");
        return Ok(());
    }

    let mut apt = Apt { updated: false };
    // apt-get cannot install anything before the package lists exist.
    if !apt.lists_present() {
        apt.update()?;
    }

    if !apt.install(&missing_required) {
        // Stale lists are the usual reason (a mirror dropped the old
        // version): refresh them once and try again.
        if apt.updated {
            bail!("apt-get install {} failed", missing_required.join(" "));
        }
        apt.update()?;
        if !apt.install(&missing_required) {
            bail!("apt-get install {} failed", missing_required.join(" "));
        }
    }
    summary.note(
        "system packages",
        format!("installed {}", missing_required.join(" ")),
    );
    Ok(())
}

/// The official Kubernetes Python client, which kcontrol's apiserver tests
/// drive (`control/tests/py/client.py`), in a virtual environment of the
/// project's own ([`PYTHON_VENV`] under target/), never in the system
/// interpreter. The version is pinned to the client generation that matches
/// the newest API the apiserver serves (1.33). Only `import kubernetes` runs
/// when it is there already.
fn ensure_python_kubernetes(summary: &mut Summary) -> Result<()> {
    if which("python3").is_none() {
        bail!("python3 is missing: install it (Debian: apt-get install python3 python3-venv)");
    }
    let venv = util::target_dir().join(PYTHON_VENV);
    let python = venv.join("bin/python3");
    let wanted = format!("kubernetes=={PYTHON_KUBERNETES_VERSION}");
    let check = format!(
        "import kubernetes, sys; sys.exit(kubernetes.__version__ != '{PYTHON_KUBERNETES_VERSION}')"
    );
    if python.exists() && succeeds(Command::new(&python).args(["-c", &check])) {
        summary.note(
            "python kubernetes client",
            format!("already present ({wanted} in {})", venv.display()),
        );
        return Ok(());
    }
    if !python.exists() {
        // Debian's interpreter (its venv module is python3-venv), not
        // whatever python3 comes first on PATH.
        let system = if Path::new("/usr/bin/python3").exists() {
            PathBuf::from("/usr/bin/python3")
        } else {
            PathBuf::from("python3")
        };
        run(Command::new(system).args(["-m", "venv"]).arg(&venv)).with_context(|| {
            format!(
                "creating the virtual environment {} (Debian: apt-get install python3-venv)",
                venv.display()
            )
        })?;
    }
    run(Command::new(&python).args(["-m", "pip", "install", "--quiet", &wanted]))
        .with_context(|| format!("pip install {wanted} into {}", venv.display()))?;
    if !succeeds(Command::new(&python).args(["-c", &check])) {
        bail!(
            "{wanted} was installed into {} but does not import",
            venv.display()
        );
    }
    summary.note(
        "python kubernetes client",
        format!("installed {wanted} into {}", venv.display()),
    );
    Ok(())
}

/// Every program of [`PROGRAMS`] is on PATH now (kubectl has a check of its
/// own; the toolchain's programs are rustup's). Names the package to install
/// for each one that is not.
fn check_programs(summary: &mut Summary) -> Result<()> {
    let missing: Vec<String> = PROGRAMS
        .iter()
        .filter(|(_, package)| !NOT_APT.contains(package))
        .filter(|(program, _)| which(program).is_none())
        .map(|(program, package)| {
            let kind = if BASE_PACKAGES.contains(package) {
                "base package"
            } else {
                "package"
            };
            format!("{program} ({kind} {package})")
        })
        .collect();
    if !missing.is_empty() {
        bail!(
            "programs the build, tests or demo run are missing after setup: {}; install those \
             packages",
            missing.join(", ")
        );
    }
    summary.note(
        "programs",
        format!("all {} the project runs are on PATH", PROGRAMS.len()),
    );
    Ok(())
}

/// The Python client's virtual environment, under the workspace's target dir
/// (`KPROXY_PYTHON` tells the tests its interpreter).
pub const PYTHON_VENV: &str = "pyenv";
/// kubernetes-client/python 33.x is generated from Kubernetes 1.33.
const PYTHON_KUBERNETES_VERSION: &str = "33.1.0";

/// `protoc` as etcd-client's build script runs it: a file importing a
/// well-known type must compile. Debian's protobuf-compiler has no
/// `google/protobuf/*.proto`; without libprotobuf-dev this fails minutes into
/// the build ("google/protobuf/descriptor.proto: File not found"), so check
/// it here and name the package.
fn check_protoc(summary: &mut Summary) -> Result<()> {
    let dir = tempdir("protoc-check")?;
    fs::write(
        dir.join("check.proto"),
        "syntax = \"proto3\";\nimport \"google/protobuf/descriptor.proto\";\n\
         message Check { google.protobuf.FileDescriptorProto f = 1; }\n",
    )?;
    let result = output(
        Command::new("protoc")
            .arg("-I")
            .arg(&dir)
            .arg("--descriptor_set_out")
            .arg(dir.join("check.pb"))
            .arg(dir.join("check.proto")),
    );
    let _ = fs::remove_dir_all(&dir);
    match result {
        Ok(_) => {
            let version = output(Command::new("protoc").arg("--version")).unwrap_or_default();
            summary.note(
                "protoc",
                format!("{version} compiles google/protobuf/descriptor.proto imports"),
            );
            Ok(())
        }
        Err(e) => bail!(
            "protoc cannot compile a file importing google/protobuf/descriptor.proto, which the etcd \
             store's build needs: install the Debian package libprotobuf-dev (and protobuf-compiler) \
             ({e:#})"
        ),
    }
}

/// A fresh directory under the system temp dir.
fn tempdir(tag: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kproxy-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The kubectl versions the tests pin to (the oldest and newest this kind of
/// machine ships): `kubectl.1.27` and `kubectl.1.33` beside the `kubectl`
/// dispatcher.
const KUBECTL_PINNED: &[&str] = &["1.27", "1.33"];
/// The oldest kubectl the tests and `cargo xtask up` work with.
const KUBECTL_MIN_MINOR: u32 = 27;

/// kubectl cannot come from apt here (Debian's kubernetes-client conflicts
/// with the one the machine image ships), so setup only checks: a kubectl ≥
/// 1.27 on PATH and the pinned versioned binaries next to its real target.
fn check_kubectl(summary: &mut Summary) -> Result<()> {
    const HOW: &str = "install kubectl ≥ 1.27 on PATH (https://kubernetes.io/docs/tasks/tools/), \
                       with the versioned binaries kubectl.1.27 and kubectl.1.33 in the same folder \
                       (the Google Cloud SDK's kubectl component ships them)";
    let Some(kubectl) = which("kubectl") else {
        bail!("kubectl is not on PATH: {HOW}");
    };
    let version = output(Command::new(&kubectl).args(["version", "--client", "-o", "json"]))
        .with_context(|| format!("`{} version --client` failed: {HOW}", kubectl.display()))?;
    let minor = kubectl_minor(&version).with_context(|| {
        format!("no clientVersion.minor in `kubectl version --client -o json`:\n{version}")
    })?;
    if minor < KUBECTL_MIN_MINOR {
        bail!("kubectl on PATH is 1.{minor}, older than 1.{KUBECTL_MIN_MINOR}: {HOW}");
    }
    let dir = fs::canonicalize(&kubectl)
        .with_context(|| format!("resolving {}", kubectl.display()))?
        .parent()
        .map(Path::to_path_buf)
        .context("kubectl has no folder")?;
    let missing: Vec<String> = KUBECTL_PINNED
        .iter()
        .map(|v| dir.join(format!("kubectl.{v}")))
        .filter(|p| !util::is_executable(p))
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        bail!("missing {}: {HOW}", missing.join(", "));
    }
    summary.note(
        "kubectl",
        format!(
            "1.{minor} at {}, pinned {} beside it",
            kubectl.display(),
            KUBECTL_PINNED.join(", ")
        ),
    );
    Ok(())
}

/// `"minor": "33"` (sometimes `"33+"`) of `kubectl version --client -o json`.
fn kubectl_minor(json: &str) -> Option<u32> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let minor = value.get("clientVersion")?.get("minor")?.as_str()?;
    minor.trim_end_matches('+').parse().ok()
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", pkg]))
        .is_ok_and(|s| s == "installed")
}

struct Apt {
    updated: bool,
}

impl Apt {
    fn lists_present(&self) -> bool {
        fs::read_dir("/var/lib/apt/lists")
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
            })
            .unwrap_or(false)
    }

    fn update(&mut self) -> Result<()> {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["update", "-q"]))?;
        self.updated = true;
        Ok(())
    }

    fn install(&self, pkgs: &[&str]) -> bool {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(pkgs))
        .is_ok()
    }
}

/// bpffs at /sys/fs/bpf, for pinning maps/links while debugging. kproxy does
/// not need it, so failing to mount is only reported.
fn ensure_bpffs(summary: &mut Summary) {
    let mounted = fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let mut f = l.split_whitespace();
                let (_, dir, fstype) = (f.next(), f.next(), f.next());
                dir == Some("/sys/fs/bpf") && fstype == Some("bpf")
            })
        })
        .unwrap_or(false);
    if mounted {
        summary.note("bpffs", "already mounted at /sys/fs/bpf");
        return;
    }
    match run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])) {
        Ok(()) => summary.note("bpffs", "mounted at /sys/fs/bpf"),
        Err(e) => summary.note(
            "bpffs",
            format!("not mounted ({e:#}); not needed by kproxy"),
        ),
    }
}

/// Where the kubelet finds the image it resolves `busybox` (any tag) to; the
/// same default as kcontrol's `--busybox-rootfs`.
pub const BUSYBOX_ROOTFS: &str = "/var/lib/kcontrol/images/busybox";

/// Builds the busybox root filesystem the kubelet's containers run on, from
/// Debian's busybox-static: /bin/busybox plus one symlink per applet, the
/// mount points crun needs in a read-only root, and a minimal /etc. Rebuilt
/// only when the busybox binary changed (a stamp records its size and mtime).
fn ensure_busybox_rootfs(summary: &mut Summary) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    let meta = fs::metadata(busybox)
        .context("/bin/busybox is missing: install the Debian package busybox-static")?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let stamp_text = format!("busybox {} {mtime} layout 1\n", meta.len());
    let root = Path::new(BUSYBOX_ROOTFS);
    let stamp = root.join(".kcontrol-rootfs");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(stamp_text.as_str()) {
        summary.note("busybox rootfs", format!("{BUSYBOX_ROOTFS} up to date"));
        return Ok(());
    }
    let tmp = root.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    for d in [
        "bin", "dev", "proc", "sys", "tmp", "etc", "root", "run", "var/www", "home", "usr",
    ] {
        fs::create_dir_all(tmp.join(d))
            .with_context(|| format!("creating {}", tmp.join(d).display()))?;
    }
    fs::copy(busybox, tmp.join("bin/busybox")).context("copying /bin/busybox")?;
    let list = output(Command::new(busybox).arg("--list"))?;
    for applet in list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        std::os::unix::fs::symlink("busybox", tmp.join("bin").join(applet))
            .with_context(|| format!("linking applet {applet}"))?;
    }
    for (link, target) in [
        ("sbin", "bin"),
        ("usr/bin", "../bin"),
        ("usr/sbin", "../bin"),
    ] {
        std::os::unix::fs::symlink(target, tmp.join(link))?;
    }
    let files = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        // Mount points for the per-pod files the kubelet bind-mounts.
        ("etc/hosts", ""),
        ("etc/hostname", ""),
        ("etc/resolv.conf", ""),
    ];
    for (name, text) in files {
        fs::write(tmp.join(name), text)?;
    }
    fs::write(tmp.join(".kcontrol-rootfs"), &stamp_text)?;
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("removing the old {BUSYBOX_ROOTFS}"))?;
    }
    fs::rename(&tmp, root).with_context(|| format!("moving the rootfs into {BUSYBOX_ROOTFS}"))?;
    summary.note("busybox rootfs", format!("built {BUSYBOX_ROOTFS}"));
    Ok(())
}

/// crun refuses a hybrid cgroup layout (v1 controllers plus a cgroup2 tree
/// at /sys/fs/cgroup/unified) while the cgroup2 tree still owns a
/// controller ("cgroups in hybrid mode not supported"). Some machines leave
/// e.g. hugetlb there: give each such controller its own v1 hierarchy, the
/// layout systemd's hybrid mode makes.
fn ensure_crun_cgroups(summary: &mut Summary) -> Result<()> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        summary.note("cgroups for crun", "unified (v2)");
        return Ok(());
    }
    let left = fs::read_to_string(base.join("unified/cgroup.controllers")).unwrap_or_default();
    let left: Vec<&str> = left.split_whitespace().collect();
    if left.is_empty() {
        summary.note("cgroups for crun", "v1/hybrid, no controller in cgroup2");
        return Ok(());
    }
    for c in &left {
        let dir = base.join(c);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        run(Command::new("mount")
            .args(["-t", "cgroup", "-o", c, "cgroup"])
            .arg(&dir))
        .with_context(|| format!("mounting a cgroup v1 hierarchy for {c}"))?;
    }
    summary.note(
        "cgroups for crun",
        format!("moved {} from cgroup2 to v1 hierarchies", left.join(", ")),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn parses_llvm_major() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv), Some(22));
        assert_eq!(llvm_major("rustc 1.0"), None);
    }

    /// Sources whose `Command::new("x")`-style calls start programs on the
    /// host (the vm-test guest's own list is checked by vm-test).
    const SOURCE_DIRS: &[&str] = &[
        "tests/src",
        "tests/tests",
        "control/src",
        "control/tests",
        "control/store/src",
        "control/store/tests",
        "proxy-user/src",
        "bench/src",
        "xtask/src",
    ];

    #[test]
    fn every_program_the_code_starts_comes_from_setup() {
        let root = util::workspace_root();
        let mut files = Vec::new();
        for d in SOURCE_DIRS {
            util::files_with_extension(&root.join(d), "rs", true, &mut files).unwrap();
        }
        assert!(files.len() > 50, "found only {} sources", files.len());
        let mut unknown = std::collections::BTreeMap::new();
        for f in &files {
            let text = fs::read_to_string(f).unwrap();
            for program in crate::vmtest::called_programs(&text) {
                // Calls inside this test's own fixtures (xtask's unit tests
                // of the scanner use made-up names).
                if ["x", "x/y"].contains(&program.as_str()) {
                    continue;
                }
                if !PROGRAMS.iter().any(|(p, _)| *p == program) {
                    unknown
                        .entry(program)
                        .or_insert_with(Vec::new)
                        .push(f.strip_prefix(&root).unwrap().display().to_string());
                }
            }
        }
        assert!(
            unknown.is_empty(),
            "programs started by the code but not in setup::PROGRAMS (add each with the \
             package that provides it, and that package to APT_REQUIRED): {unknown:#?}"
        );
        for (program, package) in PROGRAMS {
            assert!(
                APT_REQUIRED.contains(package)
                    || BASE_PACKAGES.contains(package)
                    || NOT_APT.contains(package),
                "{program}: package {package} is neither installed by setup nor a base package"
            );
        }
    }

    /// `coreutils, util-linux: /usr/bin/x` or `iproute2:amd64: /bin/ip` →
    /// the package names.
    fn dpkg_owners(out: &str) -> Vec<String> {
        out.lines()
            .filter_map(|l| l.split_once(": "))
            .flat_map(|(pkgs, _)| {
                pkgs.split(", ")
                    .map(|p| p.split(':').next().unwrap_or(p).to_owned())
            })
            .collect()
    }

    /// The table names the right packages: each program on this machine
    /// (setup has run) belongs to the package the table says.
    #[test]
    fn program_table_matches_the_installed_packages() {
        let mut wrong = Vec::new();
        for (program, package) in PROGRAMS {
            if NOT_APT.contains(package) {
                continue;
            }
            let path = which(program)
                .unwrap_or_else(|| panic!("{program} is not on PATH: run `cargo xtask setup`"));
            let real = fs::canonicalize(&path).unwrap();
            // dpkg records the path the package ships (/bin or /usr/bin with
            // merged /usr): ask for each spelling; python3 on PATH may be a
            // shim, so for it ask for Debian's interpreter.
            let mut candidates = vec![path.clone(), real.clone()];
            if *program == "python3" {
                candidates.push(PathBuf::from("/usr/bin/python3"));
            }
            for p in candidates.clone() {
                match p.strip_prefix("/usr") {
                    Ok(rest) => candidates.push(Path::new("/").join(rest)),
                    Err(_) => candidates.push(Path::new("/usr").join(p.strip_prefix("/").unwrap())),
                }
            }
            let owners: BTreeSet<String> = candidates
                .iter()
                .filter_map(|p| output(Command::new("dpkg").arg("-S").arg(p)).ok())
                .flat_map(|out| dpkg_owners(&out))
                .collect();
            if !owners.iter().any(|o| o == package) {
                wrong.push(format!(
                    "{program} ({}) belongs to {owners:?}, not {package}",
                    real.display()
                ));
            }
        }
        assert!(wrong.is_empty(), "setup::PROGRAMS is wrong: {wrong:#?}");
    }

    #[test]
    fn parses_kubectl_minor() {
        let json = r#"{"clientVersion":{"major":"1","minor":"32+","gitVersion":"v1.32.4"},"kustomizeVersion":"v5"}"#;
        assert_eq!(kubectl_minor(json), Some(32));
        assert_eq!(kubectl_minor(r#"{"clientVersion":{"major":"1"}}"#), None);
        assert_eq!(kubectl_minor("not json"), None);
    }
}
