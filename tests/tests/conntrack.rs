//! Conntrack forgets a closed flow: after a TCP connection through the
//! ClusterIP has closed, its entries expire (eBPF: `--conntrack-tcp-close-seconds
//! 1`; iptables: netfilter's closing timeouts set to 1 s in the node
//! namespace, the knob kube-proxy users turn), so a later connection from
//! the same client port straight to the backend is answered by the backend
//! itself — not rewritten by the old flow's reply entry (the stale-entry
//! bug the benchmark found: 4 of 2,000 reused ports).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kproxy_tests::fixture::{HTTP_PORT, IO_TIMEOUT, TARGET_PORT, VIP};
use kproxy_tests::{Fixture, Mode, Netns, mode};

/// The close timeout both datapaths are given.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// The client port both connections use.
const CLIENT_PORT: u16 = 45_678;

/// A TCP connection from `port` (SO_REUSEADDR, so a port whose last
/// connection is in TIME_WAIT can be bound again) to `to`, made in `ns`.
fn connect_from(ns: &Netns, port: u16, to: SocketAddr) -> Result<TcpStream> {
    ns.try_run(move || {
        // SAFETY: plain socket calls on a descriptor owned by the stream
        // it becomes (or closed on error).
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            let stream = TcpStream::from_raw_fd(fd);
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
            let sin = |addr: Ipv4Addr, port: u16| libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(addr).to_be(),
                },
                sin_zero: [0; 8],
            };
            let local = sin(Ipv4Addr::UNSPECIFIED, port);
            let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
            if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
                bail!("bind :{port}: {}", std::io::Error::last_os_error());
            }
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            let SocketAddr::V4(to4) = to else {
                bail!("{to} is not IPv4")
            };
            let remote = sin(*to4.ip(), to4.port());
            if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
                bail!(
                    "connect {to} from :{port}: {}",
                    std::io::Error::last_os_error()
                );
            }
            Ok(stream)
        }
    })
}

/// Asks once: the backend's name.
fn ask(stream: &mut TcpStream) -> Result<String> {
    stream.write_all(b"who\n")?;
    let mut line = String::new();
    BufReader::new(&*stream).read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

#[test]
fn a_closed_flow_does_not_rewrite_a_later_direct_connection_from_its_port() -> Result<()> {
    let mut f = Fixture::new(1, &[1])?;
    let close = CLOSE_TIMEOUT.as_secs().to_string();
    match mode() {
        Mode::Ebpf => {
            f.start_kproxy_with(&["--conntrack-tcp-close-seconds", &close])?;
        }
        Mode::Iptables | Mode::Nftables => {
            for state in ["fin_wait", "close_wait", "last_ack", "time_wait", "close"] {
                f.topo.node.sysctl(
                    &format!("net.netfilter.nf_conntrack_tcp_timeout_{state}"),
                    &close,
                )?;
            }
            f.start_kproxy()?;
        }
    }
    let client = &f.topo.client().ns;
    let backend = SocketAddr::from((f.topo.backend(1).ip, TARGET_PORT));

    // Through the ClusterIP, then closed by both sides.
    let mut s = connect_from(client, CLIENT_PORT, SocketAddr::from((VIP, HTTP_PORT)))?;
    assert_eq!(ask(&mut s)?, "backend-1");
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .context("waiting for the backend's FIN")?;
    drop(s);

    // What is being tested is a timeout: the entries must be gone after it.
    std::thread::sleep(CLOSE_TIMEOUT + Duration::from_secs(1));

    // The same client port, straight to the backend.
    let mut s = connect_from(client, CLIENT_PORT, backend)
        .context("a direct connection from the port of a closed ClusterIP flow")?;
    assert_eq!(s.peer_addr()?, backend);
    assert_eq!(ask(&mut s)?, "backend-1");
    Ok(())
}
