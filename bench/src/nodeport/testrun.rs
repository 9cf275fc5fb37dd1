//! ns/packet through BPF_PROG_TEST_RUN, in a private network namespace that
//! gives the FIB lookups a route and a neighbour: the node address
//! 10.0.9.1 on `v0`, the remote endpoint 10.0.9.2 behind it (a permanent
//! neighbour entry, so XDP finds its MAC).
//!
//! A test run rewrites its packet in place and the kernel reuses it across
//! repeats, so a translated packet would leave the measured path after the
//! first repeat. Translated paths are therefore timed one run per call on a
//! fresh copy of the packet (the flow opened by a first run, or a new source
//! each time for first packets), and the kernel's per-call timing overhead —
//! a single run of a packet that misses, minus the same packet's cost
//! averaged over many repeats — is subtracted, as `kproxy-bench dataplane`
//! does.

use std::net::Ipv4Addr;

use anyhow::{Result, bail};
use kproxy_tests::Netns;
use proxy_user::datapath::ebpf::{Dataplane, INGRESS_PROG, LoadOptions, NodeAddrs, XDP_PROG};
use proxy_user::model::{
    BackendAddr, DesiredService, DesiredState, Frontend, Policy, Proto, TrafficPolicy,
};
use proxy_user::pktgen::Frame;
use proxy_user::reconcile::diff;

const NODE: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 2);
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 3);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// nodePort whose only endpoint is on another node (source NAT).
const NP_REMOTE: u16 = 30080;
/// nodePort whose only endpoint is local, like the ClusterIP's.
const NP_LOCAL: u16 = 30081;

/// XDP and TC verdicts the measured packets must get.
const XDP_PASS: i32 = 2;
const XDP_REDIRECT: i32 = 4;
const TC_ACT_OK: i32 = 0;
const TC_ACT_REDIRECT: i32 = 7;

/// Per-packet costs in ns.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Established nodePort flow to the remote endpoint: XDP rewrites and
    /// redirects it itself.
    pub xdp_remote: f64,
    /// Established nodePort flow to a local endpoint: XDP looks it up and
    /// passes it to TC (lookups only).
    pub xdp_local: f64,
    /// The same packet through TC alone (`--xdp off`).
    pub tc_remote: f64,
    /// First packet of a flow through TC: to the ClusterIP and to a nodePort
    /// (both with a local endpoint).
    pub tc_first_cluster_ip: f64,
    pub tc_first_nodeport: f64,
    /// A non-service packet, repeated: the floor of each hook.
    pub xdp_miss: f64,
    pub tc_miss: f64,
    /// Kernel timing overhead of one single-run call, subtracted above.
    pub overhead: f64,
}

fn state() -> DesiredState {
    let mut st = DesiredState::default();
    let external = |name: &str, backend: BackendAddr| DesiredService {
        policy: Policy {
            external: Some(TrafficPolicy::Cluster),
            ..Policy::default()
        },
        ..DesiredService::new(name, [backend].into())
    };
    st.services.insert(
        Frontend::nodeport(NP_REMOTE, Proto::Tcp),
        external(
            "bench/remote",
            BackendAddr {
                snat: true,
                ..BackendAddr::new(REMOTE, 8080)
            },
        ),
    );
    st.services.insert(
        Frontend::nodeport(NP_LOCAL, Proto::Tcp),
        external("bench/local", BackendAddr::new(LOCAL, 8080)),
    );
    st.services.insert(
        Frontend {
            ip: CLUSTER_IP.into(),
            port: 80,
            proto: Proto::Tcp,
        },
        DesiredService::new("bench/cluster-ip", [BackendAddr::new(LOCAL, 8080)].into()),
    );
    st
}

/// Sets up the namespace and measures inside it.
pub fn measure(single_runs: u32, repeat: u32) -> Result<Figures> {
    let ns = Netns::new("npbench")?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])?;
    ns.ip(&["addr", "add", "10.0.9.1/24", "dev", "v0"])?;
    ns.ip(&["link", "set", "v0", "up"])?;
    ns.ip(&["link", "set", "v1", "up"])?;
    ns.ip(&[
        "neigh",
        "replace",
        "10.0.9.2",
        "lladdr",
        "02:00:00:00:00:02",
        "dev",
        "v0",
        "nud",
        "permanent",
    ])?;
    ns.try_run(move || inside(single_runs, repeat))
}

fn inside(single_runs: u32, repeat: u32) -> Result<Figures> {
    let mut dp = Dataplane::load(&LoadOptions {
        max_services: 1024,
        max_slots: 4096,
        conntrack_size: 4 * single_runs + 1024,
        bpf_log_level: 0,
        pin_dir: None,
        ..LoadOptions::default()
    })?;
    let v0 = proxy_user::links::ipv4_addrs("v0")?.0;
    dp.set_node_addrs(&NodeAddrs {
        node_ips: vec![NODE],
        snat: vec![(v0, NODE)],
        default_snat: Some(NODE),
    })?;
    dp.apply(&diff(&DesiredState::default(), &state()))?;
    dp.load_xdp()?;

    let ns = |d: std::time::Duration| d.as_nanos() as f64;
    let best = |prog: &str, pkt: &[u8]| -> Result<f64> {
        let mut best = f64::MAX;
        for _ in 0..5 {
            best = best.min(ns(dp.test_run(prog, pkt, (repeat / 5).max(1))?.duration));
        }
        Ok(best)
    };
    let miss_pkt = Frame::tcp(
        Ipv4Addr::new(10, 1, 0, 1),
        40000,
        Ipv4Addr::new(10, 200, 0, 1),
        80,
    )
    .build();
    let xdp_miss = best(XDP_PROG, &miss_pkt)?;
    let tc_miss = best(INGRESS_PROG, &miss_pkt)?;
    let mut single_miss = 0.0;
    for _ in 0..single_runs {
        single_miss += ns(dp.test_run(INGRESS_PROG, &miss_pkt, 1)?.duration);
    }
    let runs = f64::from(single_runs);
    let overhead = (single_miss / runs - tc_miss).max(0.0);

    // Established remote flow: opened by a first XDP run, then timed.
    let est = Frame::tcp(Ipv4Addr::new(10, 1, 0, 1), 40000, NODE, NP_REMOTE).build();
    let check = |what: &str, got: i32, want: i32| -> Result<()> {
        if got != want {
            bail!("{what}: verdict {got}, expected {want}");
        }
        Ok(())
    };
    check(
        "first XDP run",
        dp.test_run(XDP_PROG, &est, 1)?.verdict,
        XDP_REDIRECT,
    )?;
    let mut xdp_total = 0.0;
    let mut tc_total = 0.0;
    for _ in 0..single_runs {
        let r = dp.test_run(XDP_PROG, &est, 1)?;
        check("XDP, established remote flow", r.verdict, XDP_REDIRECT)?;
        xdp_total += ns(r.duration);
        let r = dp.test_run(INGRESS_PROG, &est, 1)?;
        check("TC, established remote flow", r.verdict, TC_ACT_REDIRECT)?;
        tc_total += ns(r.duration);
    }

    // First packets: a new source address per run, ClusterIP and nodePort
    // alternating so both see the same table and the same cache state.
    let mut first_cip = 0.0;
    let mut first_np = 0.0;
    for i in 0..single_runs {
        // Which goes first alternates, so neither gains from the other's
        // cache state.
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 2, 0, 0)) + 2 * i);
        let cip = Frame::tcp(src, 30000, CLUSTER_IP, 80).build();
        let np = Frame::tcp(Ipv4Addr::from(u32::from(src) + 1), 30000, NODE, NP_LOCAL).build();
        for first in [i % 2 == 0, i % 2 == 1] {
            let (pkt, total, what) = if first {
                (&cip, &mut first_cip, "TC, first packet to the ClusterIP")
            } else {
                (&np, &mut first_np, "TC, first packet to the nodePort")
            };
            let r = dp.test_run(INGRESS_PROG, pkt, 1)?;
            check(what, r.verdict, TC_ACT_OK)?;
            *total += ns(r.duration);
        }
    }
    // A local flow goes through XDP untouched (TC translates it): its
    // established packets cost XDP the lookups alone, no FIB, no rewrite.
    let local = Frame::tcp(Ipv4Addr::new(10, 3, 0, 1), 40000, NODE, NP_LOCAL).build();
    check(
        "XDP, local endpoint",
        dp.test_run(XDP_PROG, &local, 1)?.verdict,
        XDP_PASS,
    )?;
    let mut xdp_local_total = 0.0;
    for _ in 0..single_runs {
        let r = dp.test_run(XDP_PROG, &local, 1)?;
        check("XDP, established local flow", r.verdict, XDP_PASS)?;
        xdp_local_total += ns(r.duration);
    }

    let per = |total: f64| (total / runs - overhead).max(0.0);
    Ok(Figures {
        xdp_remote: per(xdp_total),
        xdp_local: per(xdp_local_total),
        tc_remote: per(tc_total),
        tc_first_cluster_ip: per(first_cip),
        tc_first_nodeport: per(first_np),
        xdp_miss,
        tc_miss,
        overhead,
    })
}
