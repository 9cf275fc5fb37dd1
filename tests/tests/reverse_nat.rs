//! Behaviour 2: replies reach the client from the ClusterIP and service port;
//! the backends see the client's own address (DNAT only).

use std::net::SocketAddr;

use anyhow::Result;
use kproxy_tests::fixture::{DNS_PORT, HTTP_PORT, IO_TIMEOUT, VIP, backend_index};
use kproxy_tests::{Fixture, Mode, mode};

/// Sessions to open so that every one of the 3 backends answers one: 3 with
/// round-robin (eBPF); with iptables' random choice, sessions are opened
/// until all 3 backends were seen, at most 60 (P(some backend missing after
/// 60) ≤ 3·(2/3)^60 = 8e-11).
fn max_sessions() -> usize {
    match mode() {
        Mode::Ebpf => 3,
        Mode::Iptables | Mode::Nftables => 60,
    }
}

/// Backends seen so far, sorted and without repeats.
fn distinct(seen: &[usize]) -> Vec<usize> {
    let mut d = seen.to_vec();
    d.sort();
    d.dedup();
    d
}

#[test]
fn tcp_replies_come_from_cluster_ip() -> Result<()> {
    let f = Fixture::start(3, &[1, 2, 3])?;
    let vip = SocketAddr::from((VIP, HTTP_PORT));
    let mut seen = Vec::new();
    while seen.len() < max_sessions() && distinct(&seen).len() < 3 {
        // The handshake only completes if the SYN-ACK comes back as VIP:80.
        let mut s = f.topo.tcp_session(VIP, HTTP_PORT, IO_TIMEOUT)?;
        let name = s.ask()?;
        assert_eq!(s.peer(), vip);
        // Data replies keep being translated on the same connection.
        assert_eq!(s.ask()?, name);
        let idx = backend_index(&name)?;
        assert!((1..=3).contains(&idx), "unexpected backend {name}");
        let peers = f.servers.backend(idx).tcp_peers();
        assert!(
            peers.contains(&s.local()),
            "{name} should see the client {} itself, saw {peers:?}",
            s.local()
        );
        seen.push(idx);
    }
    assert_eq!(
        distinct(&seen),
        [1, 2, 3],
        "connections should reach all 3 backends (3 different ones by round-robin): {seen:?}"
    );
    Ok(())
}

#[test]
fn udp_replies_come_from_cluster_ip() -> Result<()> {
    let f = Fixture::start(3, &[1, 2, 3])?;
    let vip = SocketAddr::from((VIP, DNS_PORT));
    let mut seen = Vec::new();
    while seen.len() < max_sessions() && distinct(&seen).len() < 3 {
        let mut u = f.topo.udp_session(VIP, DNS_PORT, IO_TIMEOUT)?;
        let (name, from) = u.ask()?;
        assert_eq!(
            from, vip,
            "reply to {name} came from {from}, not the ClusterIP"
        );
        let idx = backend_index(&name)?;
        let peers = f.servers.backend(idx).udp_peers();
        let client = SocketAddr::from((f.topo.client_ip(), u.local().port()));
        assert!(
            peers.contains(&client),
            "{name} should see the client's socket {client}, saw {peers:?}"
        );
        seen.push(idx);
    }
    assert_eq!(distinct(&seen), [1, 2, 3], "{seen:?}");
    Ok(())
}
