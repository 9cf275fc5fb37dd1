//! Behaviour 8: after SIGTERM kproxy exits 0, prints `kproxy: detached` and
//! leaves nothing behind (eBPF mode: nothing attached, no tc state, links,
//! programs or pins; iptables mode: no `KUBE-` chain or rule; nftables mode:
//! no `kube-proxy` table); the ClusterIP
//! stops working, direct traffic not. `--attach netlink` (eBPF only) is
//! cleanup_netlink.rs.

mod detach;

use std::time::Duration;

use anyhow::Result;
use kproxy_tests::bpf::tc_state;
use kproxy_tests::fixture::{DNS_PORT, HTTP_PORT, IO_TIMEOUT, STOP_TIMEOUT, VIP, backend_index};
use kproxy_tests::{Fixture, Mode, iptables, mode, nftables};

use detach::{assert_cluster_ip_dead_direct_alive, check_detach};

/// Default attachment (tcx links on this kernel); in iptables mode, the
/// rules; in nftables mode, the tables.
#[test]
fn sigterm_detaches_everything() -> Result<()> {
    match mode() {
        Mode::Ebpf => check_detach(&[], false),
        Mode::Iptables => check_rules_removed(),
        Mode::Nftables => check_tables_removed(),
    }
}

/// nftables mode: kproxy creates the `ip` and `ip6` `kube-proxy` tables,
/// hooked and translating, while it runs and deletes both on SIGTERM.
fn check_tables_removed() -> Result<()> {
    let mut f = Fixture::new(3, &[1, 2, 3])?;
    let before = nftables::kube_proxy_tables(&f.topo.node)?;
    assert!(
        before.is_empty(),
        "fresh node namespace already has kube-proxy tables: {before:#?}"
    );

    f.start_kproxy()?;
    backend_index(&f.topo.tcp_ask(VIP, HTTP_PORT, IO_TIMEOUT)?.0)?;
    let mut udp = f.topo.udp_session(VIP, DNS_PORT, IO_TIMEOUT)?;
    backend_index(&udp.ask()?.0)?;

    assert_eq!(
        nftables::kube_proxy_tables(&f.topo.node)?,
        ["table ip kube-proxy", "table ip6 kube-proxy"],
        "one table per family while running"
    );
    let running = nftables::kube_proxy_lines(&f.topo.node)?;
    for expected in [
        "ip: type nat hook prerouting",
        "ip: type nat hook output",
        "ip: map service-ips {",
        "ip: numgen random mod 3 vmap {",
        "ip: meta l4proto tcp dnat to 10.0.1",
        "ip6: map service-ips {",
    ] {
        assert!(
            running.iter().any(|l| l.starts_with(expected)),
            "no {expected:?} in kproxy's tables while running: {running:#?}"
        );
    }

    let status = f.kproxy().stop(STOP_TIMEOUT)?;
    assert_eq!(status.code(), Some(0), "kproxy exit status {status}");
    f.kproxy().wait_detached(Duration::from_secs(2))?;

    let all = nftables::tables(&f.topo.node)?;
    assert!(
        nftables::kube_proxy_of(&all).is_empty(),
        "kube-proxy tables left after SIGTERM: {all:#?}"
    );
    assert_cluster_ip_dead_direct_alive(&f)?;
    drop(udp);
    Ok(())
}

/// iptables mode: kproxy programs `KUBE-` chains and their hooks while it
/// runs and removes every one of them on SIGTERM.
fn check_rules_removed() -> Result<()> {
    let mut f = Fixture::new(3, &[1, 2, 3])?;
    let iface = f.topo.client_iface_on_node().to_owned();
    let before = iptables::kube_rules(&f.topo.node)?;
    assert!(
        before.is_empty(),
        "fresh node namespace already has KUBE- rules: {before:#?}"
    );

    f.start_kproxy()?;
    backend_index(&f.topo.tcp_ask(VIP, HTTP_PORT, IO_TIMEOUT)?.0)?;
    // Kept bound until the end: the node's conntrack entry of this flow
    // outlives kproxy (as with kube-proxy), and the UDP probe after the stop
    // must not get the same source port by chance.
    let mut udp = f.topo.udp_session(VIP, DNS_PORT, IO_TIMEOUT)?;
    backend_index(&udp.ask()?.0)?;

    // What kproxy programmed while running: the dispatch chain, hooked
    // from the built-in chains, and DNAT chains.
    let running = iptables::kube_rules(&f.topo.node)?;
    eprintln!("while running: {running:#?}");
    for expected in [
        "nat: -A PREROUTING",
        "nat: -A OUTPUT",
        "filter: -A FORWARD",
        "nat: -A KUBE-SERVICES",
    ] {
        assert!(
            running
                .iter()
                .any(|l| l.starts_with(expected) && l.contains("KUBE-")),
            "no {expected:?} rule of kproxy while running: {running:#?}"
        );
    }
    assert!(
        running.iter().any(|l| l.contains("-j DNAT")),
        "no DNAT rule while running: {running:#?}"
    );

    let status = f.kproxy().stop(STOP_TIMEOUT)?;
    assert_eq!(status.code(), Some(0), "kproxy exit status {status}");
    f.kproxy().wait_detached(Duration::from_secs(2))?;

    let dump = iptables::save(&f.topo.node)?;
    let left = iptables::kube_lines(&dump);
    assert!(
        left.is_empty(),
        "KUBE- chains or rules left after SIGTERM: {left:#?}\n{dump}"
    );
    // Nor did iptables mode attach anything to the interfaces.
    let tc = tc_state(&f.topo.node, &iface)?;
    assert!(
        !tc.has_clsact() && !tc.has_filters(),
        "tc state on {iface}: {tc:?}"
    );

    assert_cluster_ip_dead_direct_alive(&f)?;
    drop(udp);
    Ok(())
}
