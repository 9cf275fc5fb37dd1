//! Probe actions: httpGet (from the host to podIP:port), tcpSocket and exec
//! (`crun exec`). Each returns Ok(()) on success or the failure's message.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::runtime::Runtime;

/// The settings of a probe with Kubernetes' defaults filled in.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

pub fn timing(p: &Probe) -> Timing {
    let secs = |v: Option<i32>, d: i32| Duration::from_secs(v.unwrap_or(d).max(0) as u64);
    Timing {
        initial_delay: secs(p.initial_delay_seconds, 0),
        period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
        failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
    }
}

fn port_of(port: &IntOrString, ctr: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
        IntOrString::String(name) => ctr
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("no container port named {name:?}")),
    }
}

/// Runs one probe attempt.
pub async fn run(
    p: &Probe,
    ctr: &Container,
    pod_ip: IpAddr,
    rt: &Runtime,
    id: &str,
) -> Result<(), String> {
    let t = timing(p);
    if let Some(h) = &p.http_get {
        let port = port_of(&h.port, ctr)?;
        if h.scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
        {
            return Err("HTTPS probes are not supported by this kubelet".into());
        }
        let host: IpAddr = match h.host.as_deref() {
            Some(s) if !s.is_empty() => s.parse().map_err(|_| format!("bad probe host {s:?}"))?,
            _ => pod_ip,
        };
        let path = h.path.as_deref().filter(|p| !p.is_empty()).unwrap_or("/");
        let mut headers = String::new();
        for hd in h.http_headers.iter().flatten() {
            headers.push_str(&format!("{}: {}\r\n", hd.name, hd.value));
        }
        let addr = SocketAddr::new(host, port);
        let url = format!("http://{addr}{path}");
        let fut = async {
            let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\n{headers}Connection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            // The status line is all we need.
            while !buf.contains(&b'\n') && buf.len() < 8192 {
                let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let line = String::from_utf8_lossy(&buf);
            let code: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| "malformed HTTP response".to_string())?;
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {code}"))
            }
        };
        return match tokio::time::timeout(t.timeout, fut).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("Get \"{url}\": {e}")),
            Err(_) => Err(format!(
                "Get \"{url}\": context deadline exceeded (timeout {:?})",
                t.timeout
            )),
        };
    }
    if let Some(tcp) = &p.tcp_socket {
        let port = port_of(&tcp.port, ctr)?;
        let host: IpAddr = match tcp.host.as_deref() {
            Some(s) if !s.is_empty() => s.parse().map_err(|_| format!("bad probe host {s:?}"))?,
            _ => pod_ip,
        };
        let addr = SocketAddr::new(host, port);
        return match tokio::time::timeout(t.timeout, TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial tcp {addr}: {e}")),
            Err(_) => Err(format!("dial tcp {addr}: i/o timeout")),
        };
    }
    if let Some(ex) = &p.exec {
        let cmd = ex.command.clone().unwrap_or_default();
        if cmd.is_empty() {
            return Err("exec probe without a command".into());
        }
        return match rt.exec(id, &cmd, t.timeout).await {
            Ok((0, _)) => Ok(()),
            Ok((code, out)) => Err(format!(
                "command {cmd:?} exited with {code}: {}",
                out.trim()
            )),
            Err(e) => Err(format!("command {cmd:?}: {e}")),
        };
    }
    if p.grpc.is_some() {
        return Err("gRPC probes are not supported by this kubelet".into());
    }
    Err("probe has no action (httpGet, tcpSocket or exec)".into())
}
