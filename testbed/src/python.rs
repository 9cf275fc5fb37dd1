//! The official Kubernetes Python client, in the workspace's virtual
//! environment (`cargo xtask setup` makes target/pyenv with
//! kubernetes==33.1.0); `$KPROXY_PYTHON` names another interpreter.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result};

/// Environment variable naming the interpreter (set by `cargo xtask test`).
pub const PYTHON_ENV: &str = "KPROXY_PYTHON";

/// `$KPROXY_PYTHON`, else the interpreter of the workspace's target/pyenv.
pub fn interpreter() -> PathBuf {
    match std::env::var_os(PYTHON_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/pyenv/bin/python3"
        )),
    }
}

/// Whether the interpreter can import the client.
pub fn client_importable() -> bool {
    Command::new(interpreter())
        .args(["-c", "import kubernetes"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `script ARGS` with the interpreter; its output whatever the exit
/// status.
pub fn run_script(script: &Path, args: &[&std::ffi::OsStr]) -> Result<Output> {
    Command::new(interpreter())
        .arg(script)
        .args(args)
        .output()
        .with_context(|| format!("running {} {}", interpreter().display(), script.display()))
}
