//! TCP and UDP "which backend are you" servers living in backend namespaces.
//!
//! Each backend runs, on a chosen port (8080 by default in the tests):
//! - a TCP server that answers every received line with `backend-<i>\n` and
//!   keeps the connection open for further lines;
//! - a UDP server that answers every datagram with `backend-<i>`.
//!
//! The sockets are created inside the backend namespace; the serving threads
//! are ordinary threads. Servers stop (and join their threads) on drop.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::Netns;
use crate::topology::backend_name;

/// How often serving threads look at their stop flag.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// What a backend server observed.
#[derive(Debug, Default)]
pub struct ServerStats {
    tcp_accepted: AtomicUsize,
    tcp_requests: AtomicUsize,
    udp_requests: AtomicUsize,
    tcp_peers: Mutex<Vec<SocketAddr>>,
    udp_peers: Mutex<Vec<SocketAddr>>,
}

/// TCP + UDP servers of one backend on one port.
pub struct BackendServer {
    pub index: usize,
    pub ip: Ipv4Addr,
    pub port: u16,
    stats: Arc<ServerStats>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl BackendServer {
    /// Binds 0.0.0.0:`port` (TCP and UDP) inside `ns` and starts serving.
    /// The sockets are bound when this returns, so the server is ready.
    pub fn start(ns: &Netns, index: usize, ip: Ipv4Addr, port: u16) -> Result<BackendServer> {
        BackendServer::start_families(ns, index, ip, port, false)
    }

    /// [`BackendServer::start`], and with `ipv6` also `[::]:port` (the
    /// namespace has `net.ipv6.bindv6only` set, so those sockets take IPv6
    /// only and both can be bound).
    pub fn start_families(
        ns: &Netns,
        index: usize,
        ip: Ipv4Addr,
        port: u16,
        ipv6: bool,
    ) -> Result<BackendServer> {
        let mut addrs = vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))];
        if ipv6 {
            addrs.push(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)));
        }
        let sockets = ns
            .try_run(|| {
                addrs
                    .iter()
                    .map(|a| {
                        let l = TcpListener::bind(a).with_context(|| format!("bind tcp {a}"))?;
                        let u = UdpSocket::bind(a).with_context(|| format!("bind udp {a}"))?;
                        Ok((l, u))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .with_context(|| format!("start servers in {}", ns.name()))?;
        let stats = Arc::new(ServerStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let reply = backend_name(index);
        let mut threads = Vec::new();
        for (listener, udp) in sockets {
            let tcp = {
                let (stats, stop, reply) = (stats.clone(), stop.clone(), reply.clone());
                std::thread::Builder::new()
                    .name(format!("tcp-{reply}-{port}"))
                    .spawn(move || tcp_accept_loop(listener, stats, stop, reply))?
            };
            let udp = {
                let (stats, stop, reply) = (stats.clone(), stop.clone(), reply.clone());
                udp.set_read_timeout(Some(STOP_CHECK))?;
                std::thread::Builder::new()
                    .name(format!("udp-{reply}-{port}"))
                    .spawn(move || udp_loop(udp, stats, stop, reply))?
            };
            threads.extend([tcp, udp]);
        }
        Ok(BackendServer {
            index,
            ip,
            port,
            stats,
            stop,
            threads,
        })
    }

    /// `backend-<index>`.
    pub fn name(&self) -> String {
        backend_name(self.index)
    }

    /// `<ip>:<port>` of this server as seen from outside.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.port))
    }

    /// TCP connections accepted so far.
    pub fn tcp_accepted(&self) -> usize {
        self.stats.tcp_accepted.load(Ordering::SeqCst)
    }

    /// TCP request lines answered so far.
    pub fn tcp_requests(&self) -> usize {
        self.stats.tcp_requests.load(Ordering::SeqCst)
    }

    /// UDP datagrams answered so far.
    pub fn udp_requests(&self) -> usize {
        self.stats.udp_requests.load(Ordering::SeqCst)
    }

    /// Remote addresses of accepted TCP connections, in order.
    pub fn tcp_peers(&self) -> Vec<SocketAddr> {
        self.stats
            .tcp_peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Source addresses of received UDP datagrams, in order.
    pub fn udp_peers(&self) -> Vec<SocketAddr> {
        self.stats
            .udp_peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn tcp_accept_loop(
    listener: TcpListener,
    stats: Arc<ServerStats>,
    stop: Arc<AtomicBool>,
    reply: String,
) {
    if let Err(e) = listener.set_nonblocking(true) {
        eprintln!("kproxy-tests: {reply}: set_nonblocking: {e}");
        return;
    }
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; wait at most STOP_CHECK.
        unsafe { libc::poll(&mut pfd, 1, STOP_CHECK.as_millis() as i32) };
        match listener.accept() {
            Ok((stream, peer)) => {
                stats.tcp_accepted.fetch_add(1, Ordering::SeqCst);
                stats
                    .tcp_peers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(peer);
                let (stats, stop, reply) = (stats.clone(), stop.clone(), reply.clone());
                conns.push(std::thread::spawn(move || {
                    serve_conn(stream, stats, stop, reply)
                }));
                conns.retain(|h| !h.is_finished());
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => eprintln!("kproxy-tests: {reply}: accept: {e}"),
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

fn serve_conn(
    mut stream: TcpStream,
    stats: Arc<ServerStats>,
    stop: Arc<AtomicBool>,
    reply: String,
) {
    let _ = stream.set_nonblocking(false);
    if stream.set_read_timeout(Some(STOP_CHECK)).is_err() {
        return;
    }
    let answer = format!("{reply}\n");
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 1024];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                pending.extend_from_slice(&chunk[..n]);
                while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                    pending.drain(..=pos);
                    stats.tcp_requests.fetch_add(1, Ordering::SeqCst);
                    if stream.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

fn udp_loop(sock: UdpSocket, stats: Arc<ServerStats>, stop: Arc<AtomicBool>, reply: String) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        match sock.recv_from(&mut buf) {
            Ok((_, from)) => {
                stats.udp_requests.fetch_add(1, Ordering::SeqCst);
                stats
                    .udp_peers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(from);
                if let Err(e) = sock.send_to(reply.as_bytes(), from) {
                    eprintln!("kproxy-tests: {reply}: udp send_to {from}: {e}");
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            // ICMP errors queued on the socket (e.g. a client went away).
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            Err(e) => {
                eprintln!("kproxy-tests: {reply}: udp recv: {e}");
                return;
            }
        }
    }
}

/// The servers of all backends on one port.
pub struct Servers {
    list: Vec<BackendServer>,
}

impl Servers {
    pub fn new(list: Vec<BackendServer>) -> Servers {
        Servers { list }
    }

    pub fn all(&self) -> &[BackendServer] {
        &self.list
    }

    /// Server of backend `index` (1-based).
    pub fn backend(&self, index: usize) -> &BackendServer {
        self.list
            .iter()
            .find(|s| s.index == index)
            .unwrap_or_else(|| panic!("no server for backend {index}"))
    }

    /// Accepted TCP connections per backend name.
    pub fn tcp_accepted(&self) -> BTreeMap<String, usize> {
        self.list
            .iter()
            .map(|s| (s.name(), s.tcp_accepted()))
            .collect()
    }

    /// Answered UDP datagrams per backend name.
    pub fn udp_requests(&self) -> BTreeMap<String, usize> {
        self.list
            .iter()
            .map(|s| (s.name(), s.udp_requests()))
            .collect()
    }

    /// Sum of accepted TCP connections over all backends.
    pub fn total_tcp_accepted(&self) -> usize {
        self.list.iter().map(|s| s.tcp_accepted()).sum()
    }

    /// Sum of answered UDP datagrams over all backends.
    pub fn total_udp_requests(&self) -> usize {
        self.list.iter().map(|s| s.udp_requests()).sum()
    }
}
