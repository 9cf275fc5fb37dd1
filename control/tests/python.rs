//! The official Kubernetes Python client (`pip install kubernetes`, done by
//! `cargo xtask setup`) against `kcontrol apiserver`: see `py/client.py`.

mod common;

use std::process::Command;

use common::{Server, TempDir};

#[test]
fn python_client() {
    let importable = Command::new("python3")
        .args(["-c", "import kubernetes"])
        .status()
        .is_ok_and(|s| s.success());
    if !importable {
        // `cargo xtask setup` installs it; only a bare `cargo test` on a
        // machine without it gets here.
        eprintln!(
            "NOTE: python3 module `kubernetes` not importable; skipping the Python client test"
        );
        return;
    }
    let dir = TempDir::new("python");
    let server = Server::start(&dir.0, &[]);
    run_script(&server, &[]);

    // Watches from a compacted resourceVersion: the client raises a 410.
    let dir = TempDir::new("python-expired");
    let server = Server::start(&dir.0, &["--compaction-interval-seconds", "1"]);
    run_script(&server, &["expired"]);
}

fn run_script(server: &Server, extra: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/client.py");
    let out = Command::new("python3")
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
