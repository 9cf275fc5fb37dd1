//! The official Kubernetes Python client against `kcontrol apiserver`: see
//! `py/client.py`. It runs in the project's own virtual environment, which
//! `cargo xtask setup` makes (target/pyenv, kubernetes==33.1.0);
//! `KPROXY_PYTHON` names another interpreter.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Server, TempDir};

#[test]
fn python_client() {
    let python = python();
    let importable = Command::new(&python)
        .args(["-c", "import kubernetes"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        importable,
        "{} cannot import the Python client `kubernetes`: run `cargo xtask setup` \
         (it makes that virtual environment) or set KPROXY_PYTHON",
        python.display()
    );
    let dir = TempDir::new("python");
    let server = Server::start(&dir.0, &[]);
    run_script(&server, &[]);

    // Watches from a compacted resourceVersion: the client raises a 410.
    let dir = TempDir::new("python-expired");
    let server = Server::start(&dir.0, &["--compaction-interval-seconds", "1"]);
    run_script(&server, &["expired"]);
}

/// `$KPROXY_PYTHON`, else the interpreter of the workspace's target/pyenv.
fn python() -> PathBuf {
    match std::env::var_os("KPROXY_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/pyenv/bin/python3"
        )),
    }
}

fn run_script(server: &Server, extra: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/client.py");
    let out = Command::new(python())
        .arg(script)
        .arg(&server.kubeconfig)
        .args(extra)
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client {extra:?} failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("python client: ok"), "{stdout}\n{stderr}");
}
