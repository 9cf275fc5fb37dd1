//! Rust toolchains: nightly with rust-src and clippy (the eBPF build), the
//! active toolchain's rustfmt, clippy and musl target, and bpf-linker built
//! against the nightly's own libLLVM.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::Summary;
use crate::util::{self, Toolchain, output, run, succeeds, which};

/// bpf-linker release we build. It links against the libLLVM shipped with the
/// nightly toolchain, whose major version must match the `llvm-NN` feature.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What the rest of setup and the eBPF build need to know about nightly.
pub(super) struct Nightly {
    sysroot: PathBuf,
    llvm_major: u32,
}

pub(super) fn ensure_nightly(summary: &mut Summary) -> Result<Nightly> {
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
pub(super) fn ensure_active_components(summary: &mut Summary) -> Result<()> {
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
pub(super) fn ensure_musl_target(summary: &mut Summary) -> Result<()> {
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
pub(super) fn ensure_bpf_linker(summary: &mut Summary, nightly: &Nightly) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llvm_major() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv), Some(22));
        assert_eq!(llvm_major("rustc 1.0"), None);
    }
}
