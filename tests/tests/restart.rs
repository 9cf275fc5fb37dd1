//! Restart without disruption, in every datapath: `kill -9` of the agent
//! during a running TCP connection and a UDP exchange. The flows keep working
//! through the gap and new ones are still balanced (eBPF: pinned links and
//! maps stay; iptables and nftables: the rules and netfilter's conntrack
//! stay, as with kube-proxy), the next agent adopts the datapath (nftables:
//! replaces the table in one transaction), applies a change, and leaves no
//! duplicate or orphaned entries (eBPF: the pinned tables; iptables: the
//! `KUBE-` rules; nftables: the `kube-proxy` tables); a clean stop then
//! removes everything.
//!
//! kproxy is started with `nsenter --net` (not `ip netns exec`, whose private
//! /sys would take the pins with it) and, in eBPF mode, a pin directory of its
//! own under the host's /sys/fs/bpf.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use kproxy_tests::fixture::{
    APPLY_TIMEOUT, DNS_PORT, HTTP_PORT, IO_TIMEOUT, SLICE_FILE, STOP_TIMEOUT, VIP, assert_spread,
    spread_flows, web_slice_yaml,
};
use kproxy_tests::kproxy::Launch;
use kproxy_tests::{Fixture, Kproxy, Mode, iptables, mode, nftables};
use proxy_common::{SlotKey, SvcKey, SvcValue};
use proxy_user::datapath::ebpf::{LoadOptions, layout_tag};

/// Removes the test's pin directory however the test ends.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(f: &Fixture, pin: &Path) -> Result<Kproxy> {
    let pin = pin.to_str().context("pin path is UTF-8")?;
    let extra: &[&str] = match mode() {
        Mode::Ebpf => &["--pin-dir", pin],
        Mode::Iptables | Mode::Nftables => &[],
    };
    let mut kp = Kproxy::start_with(
        &f.topo.node,
        f.manifests.path(),
        &[f.topo.client_iface_on_node()],
        extra,
        mode(),
        Launch::NsenterNet,
    )?;
    kp.wait_ready()?;
    Ok(kp)
}

/// Frontends and slots in the pinned maps: every frontend's slots are
/// exactly 0..count, and no slot belongs to anything else.
fn pinned_tables(root: &Path) -> Result<Vec<(SvcKey, SvcValue)>> {
    let services: HashMap<MapData, SvcKey, SvcValue> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(root.join("SERVICES"))?))?;
    let slots: HashMap<MapData, SlotKey, proxy_common::Backend> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(root.join("SLOTS"))?))?;
    let svcs: Vec<(SvcKey, SvcValue)> = services.iter().collect::<Result<_, _>>()?;
    let mut expected = BTreeSet::new();
    for (_, v) in &svcs {
        for slot in 0..v.count {
            expected.insert((v.id, slot));
        }
    }
    let actual: BTreeSet<(u32, u32)> = slots
        .keys()
        .map(|k| k.map(|k| (k.svc_id, k.slot)))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        actual, expected,
        "slots are exactly 0..count of each frontend"
    );
    let ids: BTreeSet<u32> = svcs.iter().map(|(_, v)| v.id).collect();
    assert_eq!(ids.len(), svcs.len(), "no two frontends share a service id");
    Ok(svcs)
}

/// What the datapath holds for the services, to compare across a restart:
/// eBPF, the pinned frontends and their slots (checked to be consistent);
/// iptables, kproxy's `KUBE-` rules, sorted; nftables, what the
/// `kube-proxy` tables hold, sorted.
fn datapath_state(f: &Fixture, root: &Path) -> Result<Vec<String>> {
    match mode() {
        Mode::Ebpf => {
            let mut frontends: Vec<String> = pinned_tables(root)?
                .iter()
                .map(|(k, v)| format!("{k:?} -> {} slots", v.count))
                .collect();
            frontends.sort();
            Ok(frontends)
        }
        Mode::Iptables => {
            let mut rules = iptables::kube_rules(&f.topo.node)?;
            rules.sort();
            Ok(rules)
        }
        Mode::Nftables => nftables::kube_proxy_lines(&f.topo.node),
    }
}

/// `n` new TCP flows to the ClusterIP, spread over `backends` as the mode
/// promises (exact round-robin, or a random spread checked statistically).
fn assert_new_flows_spread(
    f: &Fixture,
    backends: &[usize],
    ebpf_flows: usize,
    what: &str,
) -> Result<()> {
    let names = f.tcp_round(VIP, HTTP_PORT, spread_flows(backends.len(), ebpf_flows))?;
    assert_spread(&names, backends, what);
    Ok(())
}

#[test]
fn kill_9_keeps_flows_and_the_next_agent_adopts_the_datapath() -> Result<()> {
    let f = Fixture::new(3, &[1, 2])?;
    let pin = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/kpt-restart-{}",
        std::process::id()
    )));
    let root = pin.0.join(layout_tag(&LoadOptions::default()));

    let mut first = start(&f, &pin.0)?;
    let mut tcp = f.topo.tcp_session(VIP, HTTP_PORT, IO_TIMEOUT)?;
    let tcp_backend = tcp.ask()?;
    let mut udp = f.topo.udp_session(VIP, DNS_PORT, IO_TIMEOUT)?;
    let (udp_backend, from) = udp.ask()?;
    assert_eq!(from.ip(), std::net::IpAddr::V4(VIP));
    let programmed = datapath_state(&f, &root)?;
    assert!(!programmed.is_empty(), "nothing programmed while running");

    first.kill9()?;
    if mode() == Mode::Ebpf {
        assert!(
            root.join("SERVICES").exists(),
            "maps stay pinned after kill -9"
        );
    }
    assert_eq!(
        datapath_state(&f, &root)?,
        programmed,
        "the datapath stays as it was after kill -9"
    );

    // The gap: no agent. Established flows carry on, new ones are balanced.
    for _ in 0..5 {
        assert_eq!(tcp.ask()?, tcp_backend, "TCP stream during the gap");
        assert_eq!(udp.ask()?.0, udp_backend, "UDP exchange during the gap");
    }
    assert_new_flows_spread(&f, &[1, 2], 2, "new flows during the gap")?;

    // The next agent adopts; nothing moves and nothing is duplicated.
    let mut second = start(&f, &pin.0)?;
    for _ in 0..3 {
        assert_eq!(tcp.ask()?, tcp_backend, "TCP stream after restart");
        assert_eq!(udp.ask()?.0, udp_backend, "UDP exchange after restart");
    }
    assert_eq!(
        datapath_state(&f, &root)?,
        programmed,
        "the next agent's datapath: the same services, no duplicates"
    );
    if mode() == Mode::Ebpf {
        assert_eq!(
            pinned_tables(&root)?.len(),
            2,
            "two frontends, no duplicates"
        );
    }

    // A change after the restart is applied.
    f.manifests.write(SLICE_FILE, &web_slice_yaml(&[1, 2, 3]))?;
    second.wait_applied(APPLY_TIMEOUT)?;
    assert_new_flows_spread(&f, &[1, 2, 3], 3, "backend 3 added after restart")?;
    assert_eq!(tcp.ask()?, tcp_backend, "TCP stream after the change");
    if mode() == Mode::Ebpf {
        let svcs = pinned_tables(&root)?;
        assert_eq!(svcs.len(), 2);
        assert!(svcs.iter().all(|(_, v)| v.count == 3), "{svcs:?}");
    }

    // A clean stop removes the datapath: the pins, or the rules.
    let status = second.stop(STOP_TIMEOUT)?;
    assert!(status.success(), "kproxy exit status {status}");
    match mode() {
        Mode::Ebpf => assert!(!root.exists(), "pinned maps removed on a clean stop"),
        Mode::Iptables => {
            let left = iptables::kube_rules(&f.topo.node)?;
            assert!(
                left.is_empty(),
                "KUBE- rules left on a clean stop: {left:#?}"
            );
        }
        Mode::Nftables => {
            let left = nftables::kube_proxy_tables(&f.topo.node)?;
            assert!(
                left.is_empty(),
                "kube-proxy tables left on a clean stop: {left:#?}"
            );
        }
    }
    Ok(())
}
