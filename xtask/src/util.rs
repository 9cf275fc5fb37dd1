//! Small helpers shared by the subcommands: locating the workspace, running
//! commands with visible progress, and building `cargo` commands whose
//! environment is not polluted by the `cargo run` that started xtask.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Root of the kproxy workspace. xtask is always run from its own source tree
/// (`cargo xtask` is an alias for `cargo run -p xtask`), so the compile-time
/// manifest dir is the right anchor and works from any current directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ lives inside the workspace")
        .to_path_buf()
}

/// Target dir of the main workspace. Passed explicitly to every nested cargo
/// command so the binaries we hand to tests are where we say they are, even
/// if the caller exported CARGO_TARGET_DIR.
pub fn target_dir() -> PathBuf {
    workspace_root().join("target")
}

pub fn home_dir() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .context("HOME is not set")
}

pub fn cargo_home() -> Result<PathBuf> {
    match std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h)),
        None => Ok(home_dir()?.join(".cargo")),
    }
}

/// Makes sure `$CARGO_HOME/bin` is on PATH: rustc finds `bpf-linker` through
/// PATH, and `cargo install` puts it there. Must be called at the very start
/// of `main`, before any thread exists.
pub fn ensure_cargo_bin_on_path() {
    let Ok(bin) = cargo_home().map(|h| h.join("bin")) else {
        return;
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)));
    if let Ok(joined) = joined {
        // SAFETY: called first thing in main, while the process is still
        // single-threaded, so no other thread can read the environment.
        unsafe { std::env::set_var("PATH", joined) };
    }
}

/// Full path of an executable found on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The files ending in `.ext` in `dir` (in its subdirectories too with
/// `recursive`), appended to `out`; nothing for a missing `dir`.
#[cfg(test)]
pub fn files_with_extension(
    dir: &Path,
    ext: &str,
    recursive: bool,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if recursive {
                files_with_extension(&path, ext, true, out)?;
            }
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
    Ok(())
}

/// `KEY=value program args (in dir)` for progress lines and error messages
/// (the test bed's form plus the working directory). Only variables set
/// explicitly on the command are shown.
pub fn display(cmd: &Command) -> String {
    let mut out = testbed::process::display(cmd);
    if let Some(dir) = cmd.get_current_dir() {
        out.push_str(&format!("  (in {})", dir.display()));
    }
    out
}

/// Runs a command with inherited stdio, announcing it first; fails on a
/// non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    say!("==> running: {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs a probe quietly and returns its trimmed stdout; fails (with stderr in
/// the message) on a non-zero exit. Used for checks, so nothing is printed.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// True when a quiet probe exits 0.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Which Rust toolchain a nested cargo/rustc runs with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Toolchain {
    /// The toolchain that runs xtask itself (stable by default): builds and
    /// lints the main workspace. The caller's RUSTFLAGS etc. are respected.
    Active,
    /// `+nightly`, for the eBPF crate (needs `-Z build-std`).
    Nightly,
}

/// Variables `cargo run` sets for the program it runs (xtask). Nested cargo
/// commands must not see them: CARGO points at the outer toolchain's cargo,
/// CARGO_PKG_* and the manifest vars describe xtask, and the target-dir vars
/// are replaced by an explicit `--target-dir`.
const CARGO_RUN_VARS: &[&str] = &[
    "CARGO",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
];

/// Variables that would change how the eBPF crate is compiled. The nightly
/// build must get its flags only from proxy-ebpf/.cargo/config.toml: any
/// RUSTFLAGS / CARGO_ENCODED_RUSTFLAGS would replace the BPF rustflags there,
/// a RUSTC / wrapper would swap the compiler, CARGO_BUILD_TARGET would change
/// the target, and RUSTUP_TOOLCHAIN (set by the rustup proxy that started
/// xtask) would pin the stable toolchain.
const BUILD_OVERRIDE_VARS: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_BUILD_RUSTDOCFLAGS",
    "RUSTC",
    "RUSTDOC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTC",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_TARGET",
    "RUSTUP_TOOLCHAIN",
];

fn strip_env(cmd: &mut Command, toolchain: Toolchain) {
    for var in CARGO_RUN_VARS {
        cmd.env_remove(var);
    }
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CARGO_PKG_") {
            cmd.env_remove(key);
        }
    }
    if toolchain == Toolchain::Nightly {
        for var in BUILD_OVERRIDE_VARS {
            cmd.env_remove(var);
        }
    }
}

/// A `cargo` command for the given toolchain with a cleaned environment.
pub fn cargo(toolchain: Toolchain) -> Command {
    let mut cmd = Command::new("cargo");
    if toolchain == Toolchain::Nightly {
        cmd.arg("+nightly");
    }
    strip_env(&mut cmd, toolchain);
    cmd
}

/// A `rustc` command for the given toolchain with a cleaned environment.
pub fn rustc(toolchain: Toolchain) -> Command {
    let mut cmd = Command::new("rustc");
    if toolchain == Toolchain::Nightly {
        cmd.arg("+nightly");
    }
    strip_env(&mut cmd, toolchain);
    cmd
}

/// Seconds with one decimal, for timing lines.
pub fn secs(d: std::time::Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
