//! Hairpin: a backend reaches its own service and, by the turn of the
//! balancing, itself (kubernetes#20475). Without a new source address the
//! backend would receive a packet from its own address, which Linux drops.
//! eBPF mode gives such flows the link-local source `HAIRPIN_SNAT_IP`;
//! iptables mode masquerades them to the node's address, as kube-proxy does.
//! Either way the reply must come back from the ClusterIP and service port.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Result, bail};
use kproxy_tests::client::{TcpSession, UdpSession};
use kproxy_tests::fixture::{DNS_PORT, HTTP_PORT, IO_TIMEOUT, VIP, backend_index};
use kproxy_tests::{Fixture, Mode, mode};

/// Sessions to open until the asking backend got itself: round-robin over 3
/// backends reaches it within 3 (eBPF); iptables' random choice misses it
/// 60 times in a row with probability (2/3)^60 = 3e-11.
fn max_sessions() -> usize {
    match mode() {
        Mode::Ebpf => 3,
        Mode::Iptables | Mode::Nftables => 60,
    }
}

/// The source address the backend sees on a flow to itself.
fn expected_hairpin_source(f: &Fixture, index: usize) -> Ipv4Addr {
    match mode() {
        Mode::Ebpf => Ipv4Addr::from(proxy_common::HAIRPIN_SNAT_IP),
        // MASQUERADE picks the address of the interface towards the backend.
        Mode::Iptables | Mode::Nftables => f.topo.backend(index).gateway,
    }
}

#[test]
fn tcp_backend_reaches_itself_through_its_service() -> Result<()> {
    let mut f = Fixture::new(3, &[1, 2, 3])?;
    f.start_kproxy_on_backends_too()?;
    let me = f.topo.backend(1);
    let mut sessions = Vec::new();
    let mut seen = Vec::new();
    loop {
        if sessions.len() == max_sessions() {
            bail!("backend-1 never reached itself in {seen:?}");
        }
        let mut s = TcpSession::connect(&me.ns, VIP, HTTP_PORT, IO_TIMEOUT)?;
        let name = s.ask()?;
        // The handshake completed with VIP:80 as the peer, so the SYN-ACK
        // came back translated.
        assert_eq!(s.peer(), SocketAddr::from((VIP, HTTP_PORT)));
        // The connection keeps working after the handshake.
        assert_eq!(s.ask()?, name);
        let idx = backend_index(&name)?;
        seen.push(idx);
        let local = s.local();
        sessions.push(s);
        let peers = f.servers.backend(idx).tcp_peers();
        if idx != 1 {
            // Another backend: DNAT only, it sees backend-1's own address.
            assert!(
                peers.contains(&local),
                "{name} should see backend-1's socket {local}, saw {peers:?}"
            );
            continue;
        }
        let want = expected_hairpin_source(&f, 1);
        assert!(
            peers.iter().any(|p| p.ip() == want),
            "backend-1 should see its own flow from {want}, saw {peers:?}"
        );
        assert!(
            !peers.iter().any(|p| p.ip() == me.ip),
            "a flow from its own address would have been dropped: {peers:?}"
        );
        break;
    }
    if mode() == Mode::Ebpf {
        let mut distinct = seen.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            seen.len(),
            "round-robin repeats no backend: {seen:?}"
        );
    }
    Ok(())
}

#[test]
fn udp_backend_reaches_itself_through_its_service() -> Result<()> {
    let mut f = Fixture::new(3, &[1, 2, 3])?;
    f.start_kproxy_on_backends_too()?;
    let me = f.topo.backend(2);
    let mut sessions = Vec::new();
    let mut seen = Vec::new();
    loop {
        if sessions.len() == max_sessions() {
            bail!("backend-2 never reached itself in {seen:?}");
        }
        let mut u = UdpSession::open(&me.ns, VIP, DNS_PORT, IO_TIMEOUT)?;
        let (name, from) = u.ask()?;
        assert_eq!(
            from,
            SocketAddr::from((VIP, DNS_PORT)),
            "reply to {name} came from {from}, not the ClusterIP"
        );
        // Same socket, same flow: the same backend answers again.
        assert_eq!(u.ask()?.0, name);
        let idx = backend_index(&name)?;
        seen.push(idx);
        sessions.push(u);
        if idx == 2 {
            let want = expected_hairpin_source(&f, 2);
            let peers = f.servers.backend(2).udp_peers();
            assert!(
                peers.iter().any(|p| p.ip() == want),
                "backend-2 should see its own flow from {want}, saw {peers:?}"
            );
            assert!(
                !peers.iter().any(|p| p.ip() == me.ip),
                "a datagram from its own address would have been dropped: {peers:?}"
            );
            break;
        }
    }
    Ok(())
}
