//! Graceful termination (kubernetes#85643): an endpoint that is terminating
//! but still serving (ready=false, serving=true, terminating=true — a pod in
//! its grace period) gets no new flows, while the TCP connections and UDP
//! sessions it already has keep being answered by it. Once it leaves the
//! slice its UDP sessions move to a live backend; its TCP connections are
//! cut in eBPF mode (the next packet meets a live backend, which resets
//! it), and left to netfilter's conntrack in iptables mode, as with
//! kube-proxy.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use kproxy_tests::fixture::{
    APPLY_TIMEOUT, DNS_PORT, HTTP_PORT, IO_TIMEOUT, SLICE_FILE, VIP, assert_spread, backend_index,
    spread_flows, web_slice_yaml_draining,
};
use kproxy_tests::{Fixture, Mode, mode};

#[test]
fn draining_backend_keeps_its_flows_and_gets_no_new_ones() -> Result<()> {
    let mut f = Fixture::start(3, &[1, 2, 3])?;

    let mut tcp = f.topo.tcp_session(VIP, HTTP_PORT, IO_TIMEOUT)?;
    let tcp_name = tcp.ask()?;
    // A UDP session on the same backend: round-robin gives one within 3
    // sessions, iptables' random choice within 60 with probability
    // 1 - (2/3)^60.
    let mut udp = None;
    for _ in 0..60 {
        let mut u = f.topo.udp_session(VIP, DNS_PORT, IO_TIMEOUT)?;
        if u.ask()?.0 == tcp_name {
            udp = Some(u);
            break;
        }
    }
    let mut udp = udp.context("no UDP session reached the TCP session's backend")?;
    let udp_name = tcp_name.clone();
    let draining = vec![backend_index(&tcp_name)?];
    let ready: Vec<usize> = (1..=3).filter(|i| !draining.contains(i)).collect();

    // That backend starts terminating.
    f.manifests
        .write(SLICE_FILE, &web_slice_yaml_draining(&ready, &draining))?;
    f.kproxy().wait_applied(APPLY_TIMEOUT)?;

    // Their sessions are still answered by them, from the ClusterIP…
    assert_eq!(tcp.ask()?, tcp_name, "TCP connection to a draining backend");
    assert_eq!(
        udp.ask()?,
        (udp_name.clone(), SocketAddr::from((VIP, DNS_PORT))),
        "UDP session on a draining backend"
    );
    // …while new flows only reach the ready ones.
    let names = f.tcp_round(VIP, HTTP_PORT, spread_flows(ready.len(), 6))?;
    assert_spread(&names, &ready, "new flows while draining");
    for d in &draining {
        let n = kproxy_tests::backend_name(*d);
        assert!(
            !names.contains(&n),
            "a new flow reached draining {n}: {names:?}"
        );
    }

    // They leave the slice (the pods are gone).
    f.set_slice(&ready)?;
    f.kproxy().wait_applied(APPLY_TIMEOUT)?;
    let (moved, from) = udp.ask()?;
    assert_ne!(
        moved, udp_name,
        "the UDP session should move to a live backend"
    );
    assert!(ready.contains(&backend_index(&moved)?), "{moved}");
    assert_eq!(from, SocketAddr::from((VIP, DNS_PORT)));
    match mode() {
        Mode::Ebpf => assert!(
            tcp.ask().is_err(),
            "the TCP connection to the removed {tcp_name} should be cut"
        ),
        Mode::Iptables | Mode::Nftables => {
            assert_eq!(tcp.ask()?, tcp_name, "netfilter keeps the connection")
        }
    }
    Ok(())
}
