//! `healthCheckNodePort` servers: for each `Local` policy LoadBalancer
//! Service with one, an HTTP listener on that port of every node address
//! answering what cloud load balancers probe — `200` while this node has
//! ready endpoints of the Service, `503` when it has none — with kube-proxy's
//! JSON body: `{"service":{"namespace":…,"name":…},"localEndpoints":N,
//! "serviceProxyHealthy":true}`. Any path and method get the same answer.
//!
//! Served by the agent whatever the datapath, as kube-proxy does. The agent
//! calls [`HealthServers::update`] with the desired state's checks after
//! every sync: listeners start and stop with their Services, and a running
//! listener answers from shared state, so a change of endpoint count needs
//! no restart.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::model::HealthCheck;

/// Largest request head read before answering.
const MAX_REQUEST: usize = 8192;

struct Server {
    check: Arc<Mutex<HealthCheck>>,
    task: JoinHandle<()>,
}

/// The running health-check listeners, by port.
#[derive(Default)]
pub struct HealthServers {
    servers: BTreeMap<u16, Server>,
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for s in self.servers.values() {
            s.task.abort();
        }
    }
}

impl HealthServers {
    /// Starts, stops and updates listeners to match `want`. A port that
    /// cannot be bound is logged and returned; the others keep serving.
    pub fn update(&mut self, want: &BTreeMap<u16, HealthCheck>) -> Vec<(u16, std::io::Error)> {
        self.servers.retain(|port, s| {
            let keep = want.contains_key(port);
            if !keep {
                s.task.abort();
            }
            keep
        });
        let mut failed = Vec::new();
        for (port, check) in want {
            if let Some(s) = self.servers.get(port) {
                *s.check.lock().expect("health state lock") = check.clone();
                continue;
            }
            match bind(*port) {
                Ok(listener) => {
                    let shared = Arc::new(Mutex::new(check.clone()));
                    let task = tokio::spawn(serve(listener, shared.clone()));
                    self.servers.insert(
                        *port,
                        Server {
                            check: shared,
                            task,
                        },
                    );
                }
                Err(e) => {
                    log::error!(
                        "healthCheckNodePort {port} of {}/{}: cannot listen: {e}",
                        check.namespace,
                        check.name
                    );
                    failed.push((*port, e));
                }
            }
        }
        failed
    }

    /// Ports being served.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.servers.keys().copied()
    }
}

/// Binds now (so the port is served once `update` returns).
fn bind(port: u16) -> std::io::Result<TcpListener> {
    let std = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    std.set_nonblocking(true)?;
    TcpListener::from_std(std)
}

async fn serve(listener: TcpListener, check: Arc<Mutex<HealthCheck>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let check = check.lock().expect("health state lock").clone();
                tokio::spawn(answer(stream, check));
            }
            Err(e) => log::warn!("health check accept: {e}"),
        }
    }
}

/// The status line and body a check answers with.
pub fn response(check: &HealthCheck) -> (u16, String) {
    let body = serde_json::json!({
        "service": {"namespace": check.namespace, "name": check.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let status = if check.local_endpoints > 0 { 200 } else { 503 };
    (status, body)
}

async fn answer(mut stream: TcpStream, check: HealthCheck) {
    // Read the request head (any path, any method): up to the blank line.
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let (status, body) = response(&check);
    let reason = if status == 200 {
        "OK"
    } else {
        "Service Unavailable"
    };
    let reply = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_and_status_follow_the_local_endpoint_count() {
        let mut check = HealthCheck {
            namespace: "default".into(),
            name: "lb".into(),
            local_endpoints: 2,
        };
        let (status, body) = response(&check);
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["service"]["name"], "lb");
        check.local_endpoints = 0;
        assert_eq!(response(&check).0, 503);
    }
}
