//! Behaviour 1: new flows to the ClusterIP are spread over all backends: by
//! exact round-robin in eBPF mode (9 flows go 3/3/3, in a repeating order),
//! at random in iptables mode (kube-proxy's `statistic --mode random`).

use anyhow::Result;
use kproxy_tests::fixture::{DNS_PORT, HTTP_PORT, RandomSpread, VIP, assert_spread, counts, tally};
use kproxy_tests::kproxy::field_u64;
use kproxy_tests::{Fixture, Mode, mode};

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

/// How many flows to open: 9 for round-robin, enough for a statistical
/// check of the random choice (see [`RandomSpread`]).
fn flows() -> usize {
    match mode() {
        Mode::Ebpf => 9,
        Mode::Iptables | Mode::Nftables => RandomSpread::for_backends(3).flows,
    }
}

/// The replies spread over backends 1..3 as the mode promises.
fn assert_distribution(names: &[String], what: &str) {
    match mode() {
        Mode::Ebpf => assert_round_robin(names, what),
        Mode::Iptables | Mode::Nftables => assert_spread(names, &[1, 2, 3], what),
    }
}

#[test]
fn tcp_connections_spread_over_all_backends() -> Result<()> {
    let f = Fixture::start(3, &[1, 2, 3])?;
    // `kproxy: ready services=<N> backends=<M>` reports what it programmed.
    let ready = f.ready_line();
    assert!(field_u64(ready, "services")? >= 1, "{ready}");
    assert!(field_u64(ready, "backends")? >= 3, "{ready}");
    let n = flows();
    let names = f.tcp_round(VIP, HTTP_PORT, n)?;
    assert_distribution(&names, "TCP to 10.96.0.10:80");
    // The backends agree: each accepted exactly the connections it answered
    // (3 each with round-robin), and all of them arrived.
    assert_eq!(f.servers.tcp_accepted(), tally(&names));
    assert_eq!(f.servers.total_tcp_accepted(), n);
    Ok(())
}

#[test]
fn udp_requests_from_fresh_sockets_spread_over_all_backends() -> Result<()> {
    let f = Fixture::start(3, &[1, 2, 3])?;
    let n = flows();
    let replies = f.udp_round(VIP, DNS_PORT, n)?;
    let names: Vec<String> = replies.into_iter().map(|(name, _)| name).collect();
    assert_distribution(&names, "UDP to 10.96.0.10:53");
    assert_eq!(f.servers.udp_requests(), tally(&names));
    assert_eq!(f.servers.total_udp_requests(), n);
    Ok(())
}
