//! Behaviour 6: traffic that is not addressed to a service port is left alone.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use kproxy_tests::fixture::{DNS_PORT, HTTP_PORT, IO_TIMEOUT, TARGET_PORT, VIP, backend_index};
use kproxy_tests::{Fixture, backend_ip};

#[test]
fn direct_traffic_to_backends_is_untouched() -> Result<()> {
    let f = Fixture::start(3, &[1, 2, 3])?;
    for i in 1..=3 {
        let addr = SocketAddr::from((backend_ip(i), TARGET_PORT));
        // Repeated new flows all reach the addressed backend: no balancing.
        for _ in 0..3 {
            let (reply, peer) = f.topo.tcp_ask(backend_ip(i), TARGET_PORT, IO_TIMEOUT)?;
            assert_eq!(reply, format!("backend-{i}"), "TCP to {addr}");
            assert_eq!(peer, addr);
            let (reply, from) = f.topo.udp_ask(backend_ip(i), TARGET_PORT, IO_TIMEOUT)?;
            assert_eq!(reply, format!("backend-{i}"), "UDP to {addr}");
            assert_eq!(from, addr, "UDP reply from backend-{i} was rewritten");
        }
        let srv = f.servers.backend(i);
        assert_eq!(srv.tcp_accepted(), 3);
        assert_eq!(srv.udp_requests(), 3);
        assert!(srv.tcp_peers().iter().all(|p| p.ip() == f.topo.client_ip()));
        assert!(srv.udp_peers().iter().all(|p| p.ip() == f.topo.client_ip()));
    }
    Ok(())
}

#[test]
fn cluster_ip_ports_and_protocols_outside_the_service_are_not_translated() -> Result<()> {
    let f = Fixture::start(3, &[1, 2, 3])?;
    let port81 = f.topo.start_servers(81)?;
    // The port-81 servers do answer when addressed directly…
    for i in 1..=3 {
        assert_eq!(
            f.topo.tcp_ask(backend_ip(i), 81, IO_TIMEOUT)?.0,
            format!("backend-{i}")
        );
        assert_eq!(
            f.topo.udp_ask(backend_ip(i), 81, IO_TIMEOUT)?.0,
            format!("backend-{i}")
        );
    }
    let snapshot = |f: &Fixture| {
        (
            f.servers.total_tcp_accepted(),
            f.servers.total_udp_requests(),
            port81.total_tcp_accepted(),
            port81.total_udp_requests(),
        )
    };
    let before = snapshot(&f);

    // …but not through the ClusterIP on a port that is no service port,
    let connect = Duration::from_secs(1);
    let wait = Duration::from_millis(500);
    let (kind, _) = f.topo.tcp_connect_error(VIP, 81, connect)?;
    eprintln!("TCP to {VIP}:81 failed with {kind:?}");
    let (kind, _) = f.topo.udp_connect_error(VIP, 81, wait)?;
    eprintln!("UDP to {VIP}:81 got {kind:?}");
    // nor with the other protocol on a service port (80 is TCP-only, 53 UDP-only).
    let (kind, _) = f.topo.udp_connect_error(VIP, HTTP_PORT, wait)?;
    eprintln!("UDP to {VIP}:80 got {kind:?}");
    let (kind, _) = f.topo.tcp_connect_error(VIP, DNS_PORT, connect)?;
    eprintln!("TCP to {VIP}:53 failed with {kind:?}");

    assert_eq!(
        snapshot(&f),
        before,
        "(tcp:8080, udp:8080, tcp:81, udp:81) accepted counts changed"
    );
    // The service ports themselves are balanced as usual.
    backend_index(&f.topo.tcp_ask(VIP, HTTP_PORT, IO_TIMEOUT)?.0)?;
    backend_index(&f.topo.udp_ask(VIP, DNS_PORT, IO_TIMEOUT)?.0)?;
    Ok(())
}
