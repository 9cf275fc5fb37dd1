//! `cargo xtask vm-test`: the dataplane integration tests (the `kproxy-tests`
//! package) inside qemu, once per kernel, on Debian's kernel lines.
//!
//! The host side, top to bottom, one module per stage:
//! 1. *kernels* (`kernels.rs`): each `--kernel SPEC` (default: the newest 6.1
//!    and 6.12 cloud kernels the apt sources offer) becomes a vmlinuz plus a
//!    modules directory; packages are fetched with `apt-get download` and
//!    unpacked with `dpkg-deb -x` into `target/vm/kernels/<package>/` (kept as
//!    a cache).
//! 2. *builds* (`builds.rs`): the eBPF object, then kproxy (and kcontrol, for
//!    the tests against an API server), the test binaries and the guest's init
//!    (the `kproxy-vm-init` crate, xtask/vm-init/) as static
//!    x86_64-unknown-linux-musl executables (`--dynamic`: the host target's
//!    glibc builds, which `cargo xtask test` has already made, plus their
//!    shared libraries: no second build of the whole dependency tree).
//! 3. *image* (`initramfs.rs`, `modules.rs`): per kernel an initramfs
//!    (`target/vm/<label>/initrd.cpio`, newc) holding those binaries (debug
//!    info stripped), the host's `ip`, `tc`, `sysctl`, `nsenter` (+ `bpftool`,
//!    iptables, `conntrack`, `kubectl` when present) with their shared
//!    libraries and symlinks as on the host, the kernel modules the tests
//!    need, in dependency order (read from the modules' own
//!    `depends=`/`softdep=`; the .deb has no modules.dep), and the guest's
//!    plan.
//! 4. *boot* (`qemu.rs`): `qemu-system-x86_64 -accel tcg`, console streamed
//!    with a `[label]` prefix and saved to `target/vm/<label>/console.log`.
//! 5. *verdict* (`verdict.rs`): the verdict line decides, anything else
//!    (timeout, panic, no verdict) fails; one summary row per kernel.
//!
//! The guest side is the `kproxy-vm-init` crate (xtask/vm-init/): the
//! initramfs's `/init` runs the plan and prints the marker lines this side
//! reads; both are defined once, in its protocol.rs, which this module
//! compiles too.

mod builds;
mod initramfs;
mod kernels;
mod modules;
/// The plan and the console markers, compiled into the guest's init too.
#[path = "../../vm-init/src/protocol.rs"]
mod protocol;
mod qemu;
mod verdict;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::setup;
use crate::util;

use builds::{GuestBinaries, build_guest_binaries};
use initramfs::{Image, add_base, write_initramfs};
use kernels::{AptIndex, DEFAULT_LINES, Kernel, assign_labels, resolve_kernel};
use qemu::run_qemu;
use verdict::{KernelRun, print_summary};

pub use builds::MUSL_TARGET;
/// setup's test of its program table scans all sources with the same reader.
#[cfg(test)]
pub(crate) use initramfs::called_programs;

/// Whole-boot limit per kernel unless `--timeout` says otherwise: about
/// four times what a run takes on an idle 2-core machine (full ~2 min,
/// quick ~1 min per kernel), as TCG slows down with the host's load.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_QUICK_TIMEOUT: Duration = Duration::from_secs(300);

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
