//! Behaviour 1: new flows to the ClusterIP are spread by exact round-robin.

use anyhow::Result;
use kproxy_tests::Fixture;
use kproxy_tests::fixture::{DNS_PORT, HTTP_PORT, VIP, counts, tally};
use kproxy_tests::kproxy::field_u64;

/// 9 flows over 3 backends in exact round-robin: 3 each, in a repeating order.
fn assert_round_robin(names: &[String], what: &str) {
    assert_eq!(
        tally(names),
        counts(&[(1, 3), (2, 3), (3, 3)]),
        "{what}: replies were {names:?}"
    );
    for k in 3..names.len() {
        assert_eq!(
            names[k],
            names[k - 3],
            "{what}: round-robin order does not repeat every 3 flows: {names:?}"
        );
    }
}

#[test]
fn tcp_connections_spread_3_3_3() -> Result<()> {
    let f = Fixture::start(3, &[1, 2, 3])?;
    // `kproxy: ready services=<N> backends=<M>` reports what it programmed.
    let ready = f.ready_line();
    assert!(field_u64(ready, "services")? >= 1, "{ready}");
    assert!(field_u64(ready, "backends")? >= 3, "{ready}");
    let names = f.tcp_round(VIP, HTTP_PORT, 9)?;
    assert_round_robin(&names, "TCP to 10.96.0.10:80");
    // The backends agree: each accepted exactly 3 connections.
    assert_eq!(f.servers.tcp_accepted(), counts(&[(1, 3), (2, 3), (3, 3)]));
    Ok(())
}

#[test]
fn udp_requests_from_fresh_sockets_spread_3_3_3() -> Result<()> {
    let f = Fixture::start(3, &[1, 2, 3])?;
    let replies = f.udp_round(VIP, DNS_PORT, 9)?;
    let names: Vec<String> = replies.into_iter().map(|(name, _)| name).collect();
    assert_round_robin(&names, "UDP to 10.96.0.10:53");
    assert_eq!(f.servers.udp_requests(), counts(&[(1, 3), (2, 3), (3, 3)]));
    Ok(())
}
