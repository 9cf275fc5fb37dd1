//! Shared by cleanup.rs and cleanup_netlink.rs: run kproxy (eBPF mode),
//! stop it with SIGTERM and check that nothing it attached or pinned is
//! left, and that the ClusterIP stops working while direct traffic does not.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, ensure};
use kproxy_tests::bpf::{self, tc_state};
use kproxy_tests::fixture::{
    DNS_PORT, HTTP_PORT, IO_TIMEOUT, STOP_TIMEOUT, TARGET_PORT, VIP, backend_index,
};
use kproxy_tests::{Fixture, backend_ip, poll_until};

/// Files and directories under /sys/fs/bpf (pins), recursively.
fn bpffs_entries() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            out.insert(p.display().to_string());
            if p.is_dir() {
                walk(&p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(Path::new("/sys/fs/bpf"), &mut out);
    out
}

/// Runs kproxy with `extra` arguments, checks that something is attached
/// (`expect_tc`: as tc filters), stops it and checks that nothing is left.
pub fn check_detach(extra: &[&str], expect_tc: bool) -> Result<()> {
    let mut f = Fixture::new(3, &[1, 2, 3])?;
    let iface = f.topo.client_iface_on_node().to_owned();
    ensure!(
        bpf::bpftool_available(),
        "bpftool is not installed, and the link and program checks need it \
         (cargo xtask setup installs Debian's bpftool)"
    );

    // Before kproxy: nothing attached, the ClusterIP goes nowhere.
    let tc = tc_state(&f.topo.node, &iface)?;
    assert!(
        !tc.has_clsact() && !tc.has_filters(),
        "fresh veth already has tc state: {tc:?}"
    );
    let links_before: BTreeSet<u64> = bpf::tcx_links()?.into_iter().map(|l| l.id).collect();
    let progs_before = bpf::prog_ids()?;
    let pins_before = bpffs_entries();

    f.start_kproxy_with(extra)?;
    backend_index(&f.topo.tcp_ask(VIP, HTTP_PORT, IO_TIMEOUT)?.0)?;
    backend_index(&f.topo.udp_ask(VIP, DNS_PORT, IO_TIMEOUT)?.0)?;
    let pid = f.kproxy().pid();

    // What kproxy attached while running.
    let tc_running = tc_state(&f.topo.node, &iface)?;
    if expect_tc {
        assert!(
            tc_running.has_clsact(),
            "no clsact qdisc on {iface} while running: {tc_running:?}"
        );
        assert!(
            !tc_running.ingress_filters.trim().is_empty()
                && !tc_running.egress_filters.trim().is_empty(),
            "expected ingress and egress filters on {iface} while running: {tc_running:?}"
        );
    }
    let mut our_links = BTreeSet::new();
    for l in bpf::tcx_links()? {
        let by_us = l.pids.as_ref().is_none_or(|p| p.contains(&u64::from(pid)));
        if !links_before.contains(&l.id) && by_us {
            our_links.insert(l.id);
        }
    }
    let our_progs = match bpf::prog_ids_of_pid(pid)? {
        Some(ids) => ids,
        None => bpf::prog_ids()?
            .difference(&progs_before)
            .copied()
            .collect(),
    };
    let net = bpf::bpftool_net_entries(&f.topo.node, &iface)?;
    eprintln!(
        "while running: tcx links {our_links:?}, programs {our_progs:?}, \
         bpftool net entries {net:?}, tc {tc_running:?}"
    );
    assert!(
        !our_links.is_empty() || !net.is_empty() || tc_running.has_filters(),
        "kproxy runs but nothing visible is attached to {iface}"
    );

    // Stop it.
    let status = f.kproxy().stop(STOP_TIMEOUT)?;
    assert_eq!(status.code(), Some(0), "kproxy exit status {status}");
    f.kproxy().wait_detached(Duration::from_secs(2))?;

    // Nothing left attached.
    let tc = tc_state(&f.topo.node, &iface)?;
    assert!(
        !tc.has_clsact(),
        "clsact qdisc left on {iface}: {}",
        tc.qdiscs
    );
    assert!(!tc.has_filters(), "tc filters left on {iface}: {tc:?}");
    // Links and programs are released when their last reference goes;
    // allow the kernel a moment to finish that.
    poll_until(
        "kproxy's tcx links to disappear",
        Duration::from_secs(3),
        || {
            let left: BTreeSet<u64> = bpf::tcx_links()?
                .into_iter()
                .map(|l| l.id)
                .filter(|id| our_links.contains(id))
                .collect();
            Ok(left.is_empty().then_some(()))
        },
    )?;
    poll_until(
        "kproxy's programs to be unloaded",
        Duration::from_secs(3),
        || {
            let live = bpf::prog_ids()?;
            Ok(our_progs.is_disjoint(&live).then_some(()))
        },
    )?;
    let net = bpf::bpftool_net_entries(&f.topo.node, &iface)?;
    assert!(
        net.is_empty(),
        "bpftool net show dev {iface} still lists {net:?}"
    );
    let pins_after = bpffs_entries();
    let new_pins: Vec<_> = pins_after.difference(&pins_before).collect();
    assert!(
        new_pins.is_empty(),
        "pins left in /sys/fs/bpf: {new_pins:?}"
    );

    assert_cluster_ip_dead_direct_alive(&f)
}

/// After kproxy stopped: the ClusterIP no longer reaches any backend; direct
/// traffic still works.
pub fn assert_cluster_ip_dead_direct_alive(f: &Fixture) -> Result<()> {
    let tcp_before = f.servers.total_tcp_accepted();
    let udp_before = f.servers.total_udp_requests();
    let (kind, _) = f
        .topo
        .tcp_connect_error(VIP, HTTP_PORT, Duration::from_secs(1))?;
    eprintln!("after stop, TCP to {VIP}:80 fails with {kind:?}");
    let (kind, _) = f
        .topo
        .udp_connect_error(VIP, DNS_PORT, Duration::from_millis(500))?;
    eprintln!("after stop, UDP to {VIP}:53 gets {kind:?}");
    assert_eq!(f.servers.total_tcp_accepted(), tcp_before);
    assert_eq!(f.servers.total_udp_requests(), udp_before);
    for i in 1..=3 {
        assert_eq!(
            f.topo.tcp_ask(backend_ip(i), TARGET_PORT, IO_TIMEOUT)?.0,
            format!("backend-{i}")
        );
        assert_eq!(
            f.topo.udp_ask(backend_ip(i), TARGET_PORT, IO_TIMEOUT)?.0,
            format!("backend-{i}")
        );
    }
    Ok(())
}
