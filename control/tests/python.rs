//! The official Kubernetes Python client against `kcontrol apiserver`: see
//! `py/client.py`. It runs in the project's own virtual environment, which
//! `cargo xtask setup` makes (target/pyenv, kubernetes==33.1.0);
//! `KPROXY_PYTHON` names another interpreter.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::{Server, TempDir};
use testbed::python;

#[test]
fn python_client() {
    assert!(
        python::client_importable(),
        "{} cannot import the Python client `kubernetes`: run `cargo xtask setup` \
         (it makes that virtual environment) or set KPROXY_PYTHON",
        python::interpreter().display()
    );
    let dir = TempDir::new("python");
    let server = Server::start(&dir.0, &[]);
    run_script(&server, &[]);

    // Watches from a compacted resourceVersion: the client raises a 410.
    let dir = TempDir::new("python-expired");
    let server = Server::start(&dir.0, &["--compaction-interval-seconds", "1"]);
    run_script(&server, &["expired"]);
}

fn run_script(server: &Server, extra: &[&str]) {
    let script = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/client.py"));
    let mut args: Vec<&OsStr> = vec![server.kubeconfig.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    let out = python::run_script(script, &args).expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client {extra:?} failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("python client: ok"), "{stdout}\n{stderr}");
}
