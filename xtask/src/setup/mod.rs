//! `cargo xtask setup`: makes this machine able to build and test kproxy.
//!
//! Idempotent and cheap when everything is there (only a handful of quick
//! probes run; no `cargo install`, no `apt-get`), so build/test/up/bench call
//! it every time and a fresh machine needs nothing done by hand.
//!
//! One module per kind of prerequisite: `toolchain.rs` (rustup toolchains,
//! components, the musl target, bpf-linker), `packages.rs` (Debian packages,
//! the table of every program the code starts, protoc), `kubernetes.rs`
//! (kubectl, the Python client, the kubelet's busybox rootfs and cgroups);
//! the platform checks and bpffs are here.

mod kubernetes;
mod packages;
mod toolchain;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Result, bail};

use crate::util::{self, run};

pub use kubernetes::PYTHON_VENV;

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
    let nightly = toolchain::ensure_nightly(&mut summary)?;
    toolchain::ensure_active_components(&mut summary)?;
    toolchain::ensure_musl_target(&mut summary)?;
    toolchain::ensure_bpf_linker(&mut summary, &nightly)?;
    packages::ensure_apt_packages(&mut summary)?;
    packages::check_programs(&mut summary)?;
    packages::check_protoc(&mut summary)?;
    kubernetes::check_kubectl(&mut summary)?;
    kubernetes::ensure_python_kubernetes(&mut summary)?;
    kubernetes::ensure_busybox_rootfs(&mut summary)?;
    kubernetes::ensure_crun_cgroups(&mut summary)?;
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
