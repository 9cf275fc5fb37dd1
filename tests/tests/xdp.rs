//! The XDP fast path itself (eBPF only): attached in driver mode to every
//! external interface (`ip -d link`, `bpftool net`), sending source-NATed flows itself and counting them
//! in /metrics, and gone after SIGTERM. Its correctness is the north-south
//! suite's (`north_south.rs` runs with it, `north_south_tc.rs` without).

#[path = "north_south/mod.rs"]
#[allow(dead_code)]
mod cases;

use std::time::Duration;

use anyhow::{Context, Result};
use cases::{NODE_IP, NorthSouth, REMOTE, Xdp, np_objects, slice};
use kproxy_tests::fixture::{STOP_TIMEOUT, assert_spread};
use kproxy_tests::kproxy::{metrics_get, sample};
use kproxy_tests::{Mode, Netns, mode};

/// Interfaces kproxy runs XDP on: both clients' and the remote node's.
const EXTERNAL: [&str; 3] = ["c0", "c1", "n2"];

/// The XDP program `ip -d link` shows on `iface`, if any ("xdp" = driver
/// mode, "xdpgeneric" = generic).
fn xdp_on(node: &Netns, iface: &str) -> Result<Option<String>> {
    let out = node.exec("ip", &["-d", "link", "show", "dev", iface])?;
    Ok(out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("prog/"))
        .map(str::to_owned))
}

/// The program ids `bpftool net` lists as attached in XDP driver mode on
/// `iface`.
fn bpftool_xdp_driver_ids(node: &Netns, iface: &str) -> Result<Vec<u64>> {
    let out = node.exec("bpftool", &["-j", "net", "show", "dev", iface])?;
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("bpftool net: {out}"))?;
    let sections = v.as_array().cloned().unwrap_or_default();
    Ok(sections
        .iter()
        .filter_map(|s| s.get("xdp").and_then(|x| x.as_array()))
        .flatten()
        .filter(|e| e.get("mode").and_then(|m| m.as_str()) == Some("driver"))
        .filter_map(|e| e.get("id").and_then(|i| i.as_u64()))
        .collect())
}

#[test]
fn xdp_is_attached_sends_remote_flows_counts_and_leaves_on_sigterm() -> Result<()> {
    assert_eq!(
        mode(),
        Mode::Ebpf,
        "XDP is part of the eBPF datapath: this file is generated for eBPF mode only \
         (cargo xtask test leaves it out of the iptables run)"
    );
    let mut ns = NorthSouth::start(&np_objects("Cluster"), Xdp::Default)?;
    for iface in EXTERNAL {
        assert_eq!(
            xdp_on(&ns.f.topo.node, iface)?.as_deref(),
            Some("xdp"),
            "{iface}: XDP in driver mode"
        );
        let ids = bpftool_xdp_driver_ids(&ns.f.topo.node, iface)?;
        assert_eq!(
            ids.len(),
            1,
            "{iface}: bpftool net lists one XDP program: {ids:?}"
        );
    }
    let eps = ns.all_endpoints();
    ns.f.manifests
        .write("np-slice.yaml", &serde_json::to_string(&slice("np", &eps))?)?;
    ns.f.kproxy().wait_applied(Duration::from_secs(10))?;
    let names = ns.tcp_round(NODE_IP, 30080, 9)?;
    assert_spread(&names, &[1, 2, REMOTE], "TCP to the nodePort through XDP");
    let (status, text) = metrics_get(&ns.f.topo.node, "/metrics")?;
    assert_eq!(status, 200);
    let redirected = sample(&text, "kproxy_xdp_redirected_total ").context("xdp_redirected")?;
    let passed = sample(&text, "kproxy_xdp_passed_total ").context("xdp_passed")?;
    let flows = sample(&text, "kproxy_xdp_new_flows_total ").context("xdp_new_flows")?;
    // Three connections to the remote endpoint: their packets both ways go
    // through XDP (the first may wait for a neighbour entry in TC); the six
    // local ones are opened in XDP and passed to TC.
    assert!(redirected >= 8.0, "redirected {redirected}:\n{text}");
    assert!(passed >= 6.0, "passed {passed}:\n{text}");
    assert!(flows >= 8.0, "new flows {flows}:\n{text}");
    let status = ns.f.kproxy().stop(STOP_TIMEOUT)?;
    assert!(status.success(), "kproxy exit status {status:?}");
    for iface in EXTERNAL {
        assert_eq!(
            xdp_on(&ns.f.topo.node, iface)?,
            None,
            "{iface}: XDP left attached"
        );
    }
    Ok(())
}
