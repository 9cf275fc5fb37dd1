//! Client-side probes. Sockets are created inside the client namespace (via
//! [`Netns::run`]) and can then be used from the test thread.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// The request line/datagram the clients send.
pub const REQUEST: &str = "who";

/// Port 0 of the unspecified address of `target`'s family: where a client
/// socket towards it binds.
fn unspecified_like(target: SocketAddr) -> SocketAddr {
    match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// A TCP connection that can ask "which backend are you" repeatedly.
#[derive(Debug)]
pub struct TcpSession {
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    pending: Vec<u8>,
}

impl TcpSession {
    /// Connects from inside `ns` to `ip:port` within `timeout`; reads and
    /// writes also time out after `timeout`.
    pub fn connect(
        ns: &Netns,
        ip: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpSession> {
        let target = SocketAddr::new(ip.into(), port);
        let stream = ns
            .run(|| TcpStream::connect_timeout(&target, timeout))?
            .with_context(|| format!("tcp connect to {target} from {}", ns.name()))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        let local = stream.local_addr()?;
        Ok(TcpSession {
            stream,
            peer,
            local,
            pending: Vec::new(),
        })
    }

    /// Sends `who\n` and returns the reply line (without the newline).
    pub fn ask(&mut self) -> Result<String> {
        self.stream
            .write_all(format!("{REQUEST}\n").as_bytes())
            .with_context(|| format!("tcp send to {}", self.peer))?;
        let mut chunk = [0u8; 256];
        loop {
            if let Some(pos) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                return Ok(String::from_utf8_lossy(&line[..line.len() - 1])
                    .trim()
                    .to_owned());
            }
            let n = self
                .stream
                .read(&mut chunk)
                .with_context(|| format!("tcp read from {} (local {})", self.peer, self.local))?;
            if n == 0 {
                bail!("connection to {} closed before a reply line", self.peer);
            }
            self.pending.extend_from_slice(&chunk[..n]);
        }
    }

    /// The socket's peer address (what the client believes it talks to).
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The socket's local address (client ip and source port).
    pub fn local(&self) -> SocketAddr {
        self.local
    }
}

/// Opens a new TCP connection, sends `who\n`, reads one line. Returns the
/// reply and the socket's peer address.
pub fn tcp_ask(
    ns: &Netns,
    ip: impl Into<IpAddr>,
    port: u16,
    timeout: Duration,
) -> Result<(String, SocketAddr)> {
    let mut s = TcpSession::connect(ns, ip, port, timeout)?;
    let reply = s.ask()?;
    Ok((reply, s.peer()))
}

/// An unconnected UDP socket bound once (fixed local port): every ask uses
/// the same 5-tuple.
#[derive(Debug)]
pub struct UdpSession {
    sock: UdpSocket,
    target: SocketAddr,
    local: SocketAddr,
}

impl UdpSession {
    /// Binds an ephemeral port inside `ns`; asks go to `ip:port`, replies
    /// are awaited for at most `timeout`.
    pub fn open(
        ns: &Netns,
        ip: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<UdpSession> {
        let target = SocketAddr::new(ip.into(), port);
        let sock = ns
            .run(|| UdpSocket::bind(unspecified_like(target)))?
            .with_context(|| format!("udp bind in {}", ns.name()))?;
        sock.set_read_timeout(Some(timeout))?;
        let local = sock.local_addr()?;
        Ok(UdpSession {
            sock,
            target,
            local,
        })
    }

    /// Sends `who` with send_to and returns the first reply and its source.
    pub fn ask(&mut self) -> Result<(String, SocketAddr)> {
        self.sock
            .send_to(REQUEST.as_bytes(), self.target)
            .with_context(|| format!("udp send_to {}", self.target))?;
        let mut buf = [0u8; 2048];
        let (n, from) = self.sock.recv_from(&mut buf).with_context(|| {
            format!(
                "udp recv_from (asked {} from local port {})",
                self.target,
                self.local.port()
            )
        })?;
        Ok((String::from_utf8_lossy(&buf[..n]).trim().to_owned(), from))
    }

    /// Local address (0.0.0.0:<port>: the socket is bound to the
    /// unspecified address); the port stays the same for the session's life.
    pub fn local(&self) -> SocketAddr {
        self.local
    }
}

/// A fresh unconnected UDP socket: send_to `ip:port`, recv_from. Returns
/// the reply and the address it came from.
pub fn udp_ask(
    ns: &Netns,
    ip: impl Into<IpAddr>,
    port: u16,
    timeout: Duration,
) -> Result<(String, SocketAddr)> {
    UdpSession::open(ns, ip, port, timeout)?.ask()
}

/// A TCP connect that is expected to fail. Returns the error kind (e.g.
/// `ConnectionRefused` when an RST or ICMP port unreachable came back,
/// `TimedOut` when nothing came back) and the time the connect took.
/// Fails if the connection was established.
pub fn tcp_connect_error(
    ns: &Netns,
    ip: impl Into<IpAddr>,
    port: u16,
    timeout: Duration,
) -> Result<(ErrorKind, Duration)> {
    let target = SocketAddr::new(ip.into(), port);
    let (res, elapsed) = ns.run(|| {
        let t0 = Instant::now();
        let r = TcpStream::connect_timeout(&target, timeout);
        (r, t0.elapsed())
    })?;
    match res {
        Ok(s) => bail!(
            "tcp connect to {target} unexpectedly succeeded (local {:?}, after {elapsed:?})",
            s.local_addr().ok()
        ),
        Err(e) => Ok((e.kind(), elapsed)),
    }
}

/// A connected UDP socket sends `who` to `ip:port` and waits for the reply,
/// expecting an error instead: `ConnectionRefused` when an ICMP port
/// unreachable arrives, `WouldBlock`/`TimedOut` when nothing arrives within
/// `timeout`. Returns the error kind and the time from send to error. Fails
/// if a datagram came back.
pub fn udp_connect_error(
    ns: &Netns,
    ip: impl Into<IpAddr>,
    port: u16,
    timeout: Duration,
) -> Result<(ErrorKind, Duration)> {
    let target = SocketAddr::new(ip.into(), port);
    let res: io::Result<(io::Result<usize>, Vec<u8>, Duration)> = ns.run(|| {
        let sock = UdpSocket::bind(unspecified_like(target))?;
        sock.connect(target)?;
        sock.set_read_timeout(Some(timeout))?;
        let mut buf = vec![0u8; 2048];
        let t0 = Instant::now();
        let r = match sock.send(REQUEST.as_bytes()) {
            Ok(_) => sock.recv(&mut buf),
            Err(e) => Err(e),
        };
        Ok((r, buf, t0.elapsed()))
    })?;
    let (r, buf, elapsed) = res.with_context(|| format!("udp socket towards {target}"))?;
    match r {
        Ok(n) => bail!(
            "udp to {target} unexpectedly got a reply {:?} after {elapsed:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => Ok((e.kind(), elapsed)),
    }
}

/// `GET path` over HTTP/1.1 from inside `ns` to `addr`, reading until the
/// server closes: the status code and the body.
pub fn http_get(
    ns: &Netns,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let path = path.to_owned();
    let text = ns.try_run(move || {
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(timeout))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of the head in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}
