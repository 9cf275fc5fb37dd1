//! Test harness: runs the real `kcontrol apiserver` binary on a free
//! loopback port with a fresh data dir, waits for `/readyz`, and hands out
//! kube-rs clients (also used for raw HTTP requests) and the kubeconfig.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod fake_kubelet;
pub mod kubelet_node;

use http_body_util::BodyExt;
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::Value;

/// A data dir removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "kcontrol-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Server {
    child: Child,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    pub data_dir: PathBuf,
    pub kubeconfig: PathBuf,
    _stderr: std::thread::JoinHandle<()>,
}

const START_DEADLINE: Duration = Duration::from_secs(30);

impl Server {
    /// Starts on `data_dir` (created if needed) with extra flags.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Server::start_on(data_dir, "127.0.0.1:0", extra)
    }

    /// Starts listening on `listen` (a restart on the same port: the
    /// address of a previous [`Server::url`]).
    pub fn start_on(data_dir: &Path, listen: &str, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kcontrol"))
            .arg("apiserver")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning kcontrol");
        // The "listening on" line carries the port picked by the kernel.
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stderr = child.stderr.take().unwrap();
        let stderr_thread = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[kcontrol] {line}");
            }
        });
        let deadline = Instant::now() + START_DEADLINE;
        let url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        break rest.split_whitespace().next().unwrap().to_string();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("kcontrol did not report its address within {START_DEADLINE:?}");
                }
            }
        };
        let server = Server {
            child,
            url,
            data_dir: data_dir.to_path_buf(),
            kubeconfig: data_dir.join("kubeconfig.yaml"),
            _stderr: stderr_thread,
        };
        server.wait_ready(deadline);
        server
    }

    /// Polls `/readyz` (no credentials needed) until it answers 200.
    fn wait_ready(&self, deadline: Instant) {
        // On its own thread, so that async tests can start servers too.
        std::thread::scope(|scope| {
            scope.spawn(|| self.poll_ready(deadline)).join().unwrap();
        });
    }

    fn poll_ready(&self, deadline: Instant) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = self.anonymous_client().await;
            loop {
                let req = http::Request::get("/readyz").body(Vec::new()).unwrap();
                if let Ok(text) = client.request_text(req).await
                    && text.trim() == "ok"
                {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "kcontrol not ready by the deadline"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }

    pub async fn config(&self) -> kube::Config {
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("reading the kubeconfig");
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig")
    }

    /// A client with the admin token.
    pub async fn client(&self) -> Client {
        Client::try_from(self.config().await).expect("client")
    }

    /// A client that trusts the CA but sends no credentials.
    pub async fn anonymous_client(&self) -> Client {
        let mut cfg = self.config().await;
        cfg.auth_info = Default::default();
        Client::try_from(cfg).expect("client")
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `127.0.0.1:PORT` of [`Server::url`].
    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("https://")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw answer: status code, headers and body (JSON when it parses).
pub struct Reply {
    pub code: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends one request through a kube client (its TLS and token) and reads
/// the whole answer.
pub async fn send(
    client: &Client,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
    accept: Option<&str>,
) -> Reply {
    try_send(client, method, path, content_type, body, accept)
        .await
        .unwrap_or_else(|| panic!("{method} {path}: no answer"))
}

/// Like [`send`], `None` when the connection fails.
pub async fn try_send(
    client: &Client,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
    accept: Option<&str>,
) -> Option<Reply> {
    let mut b = http::Request::builder().method(method).uri(path);
    if let Some(ct) = content_type {
        b = b.header("content-type", ct);
    }
    if let Some(a) = accept {
        b = b.header("accept", a);
    }
    let req = b.body(kube::client::Body::from(body)).unwrap();
    let resp = client.send(req).await.ok()?;
    let code = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.ok()?.to_bytes().to_vec();
    Some(Reply {
        code,
        headers,
        body,
    })
}

pub async fn get(client: &Client, path: &str) -> Reply {
    send(client, "GET", path, None, Vec::new(), None).await
}

pub async fn post_json(client: &Client, path: &str, v: &Value) -> Reply {
    send(
        client,
        "POST",
        path,
        Some("application/json"),
        serde_json::to_vec(v).unwrap(),
        None,
    )
    .await
}

pub async fn put_json(client: &Client, path: &str, v: &Value) -> Reply {
    send(
        client,
        "PUT",
        path,
        Some("application/json"),
        serde_json::to_vec(v).unwrap(),
        None,
    )
    .await
}

pub async fn patch(client: &Client, path: &str, ctype: &str, v: &Value) -> Reply {
    send(
        client,
        "PATCH",
        path,
        Some(ctype),
        serde_json::to_vec(v).unwrap(),
        None,
    )
    .await
}

pub async fn delete(client: &Client, path: &str) -> Reply {
    send(client, "DELETE", path, None, Vec::new(), None).await
}

pub fn configmap(name: &str, labels: Value) -> Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": name, "labels": labels },
        "data": { "k": "v" },
    })
}
