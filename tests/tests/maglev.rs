//! Maglev placement through BPF_PROG_TEST_RUN (no namespaces, no kproxy
//! process): the first packets of 10,000 flows to a Maglev frontend over 10
//! backends, run through `kproxy_ingress` of separately loaded datapaths —
//! as on different nodes, or after an agent lost its conntrack:
//! - two datapaths with the same backends place every flow alike;
//! - every backend gets its share;
//! - with one backend removed, the flows that move are the removed
//!   backend's 1/N plus at most a few percent;
//! - round-robin, for contrast, moves most flows (printed, not asserted).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result, bail, ensure};
use kproxy_tests::{Mode, mode};
use proxy_user::datapath::ebpf::{Dataplane, INGRESS_PROG, LoadOptions};
use proxy_user::model::{
    BackendAddr, DesiredService, DesiredState, Frontend, LbAlgorithm, Policy, Proto,
};
use proxy_user::pktgen::{Frame, parse};
use proxy_user::reconcile::diff;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const FLOWS: usize = 10_000;
const BACKENDS: u8 = 10;
/// What may move beyond the removed backend's share.
const SLACK: f64 = 0.03;

fn backend(i: u8) -> BackendAddr {
    BackendAddr::new(Ipv4Addr::new(10, 0, 10 + i, 2), 8080)
}

/// A fresh datapath (own maps, nothing pinned) with VIP:80/TCP over
/// `backends`, placed by `lb`.
fn datapath(backends: &[u8], lb: LbAlgorithm) -> Result<Dataplane> {
    let mut dp = Dataplane::load(&LoadOptions {
        max_services: 16,
        max_slots: 64,
        conntrack_size: 4 * FLOWS as u32,
        bpf_log_level: 0,
        pin_dir: None,
        ..LoadOptions::default()
    })
    .context("load eBPF object (tests must run as root)")?;
    let mut state = DesiredState::default();
    state.services.insert(
        Frontend {
            ip: VIP.into(),
            port: 80,
            proto: Proto::Tcp,
        },
        DesiredService {
            policy: Policy {
                lb,
                ..Policy::default()
            },
            ..DesiredService::new(
                "default/web:http",
                backends.iter().map(|i| backend(*i)).collect(),
            )
        },
    );
    dp.apply(&diff(&DesiredState::default(), &state))?;
    Ok(dp)
}

/// Flow `k`: one of 100 clients, one of 100 source ports each.
fn flow(k: usize) -> Frame {
    let client = Ipv4Addr::new(10, 1, (k / 100 % 100) as u8, 2 + (k % 100) as u8);
    Frame::tcp(
        client,
        30_000 + (k / 10_000) as u16 * 7 + (k % 97) as u16 * 301,
        VIP,
        80,
    )
}

/// The backend address each of the flows' first packets was sent to.
fn placements(dp: &Dataplane) -> Result<Vec<Ipv4Addr>> {
    (0..FLOWS)
        .map(|k| {
            let out = dp.test_run(INGRESS_PROG, &flow(k).build(), 1)?;
            ensure!(out.verdict == 0, "flow {k}: verdict {}", out.verdict);
            let p = parse(&out.packet).context("parse the translated packet")?;
            Ok(p.dst)
        })
        .collect()
}

fn moved(a: &[Ipv4Addr], b: &[Ipv4Addr]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

#[test]
fn maglev_places_flows_alike_everywhere_and_moves_few_when_a_backend_goes() -> Result<()> {
    assert_eq!(
        mode(),
        Mode::Ebpf,
        "Maglev is an eBPF-datapath selector: this file is generated for eBPF mode only \
         (cargo xtask test leaves it out of the iptables run)"
    );
    let all: Vec<u8> = (1..=BACKENDS).collect();
    // Distinct flows, or the figure means nothing.
    let tuples: std::collections::BTreeSet<(Ipv4Addr, u16)> = (0..FLOWS)
        .map(|k| {
            let f = flow(k);
            (f.src, f.sport)
        })
        .collect();
    assert_eq!(tuples.len(), FLOWS, "the simulated flows must be distinct");

    let here = placements(&datapath(&all, LbAlgorithm::Maglev)?)?;
    let there = placements(&datapath(&all, LbAlgorithm::Maglev)?)?;
    assert_eq!(
        moved(&here, &there),
        0.0,
        "two nodes placed flows differently"
    );

    let mut share: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for b in &here {
        *share.entry(*b).or_default() += 1;
    }
    let each = FLOWS / usize::from(BACKENDS);
    assert_eq!(share.len(), usize::from(BACKENDS), "{share:?}");
    // A binomial share has σ = 30 here; 200 is more than 6σ.
    for (b, n) in &share {
        assert!(
            n.abs_diff(each) <= 200,
            "{b} got {n} of {FLOWS} flows: {share:?}"
        );
    }

    let IpAddr::V4(gone) = backend(4).ip else {
        bail!("backend 4 is IPv4");
    };
    let rest: Vec<u8> = all.iter().copied().filter(|i| *i != 4).collect();
    let after = placements(&datapath(&rest, LbAlgorithm::Maglev)?)?;
    assert!(
        after.iter().all(|b| *b != gone),
        "a flow went to the removed backend"
    );
    let frac = moved(&here, &after);
    let on_gone = share[&gone] as f64 / FLOWS as f64;
    println!(
        "maglev: removing 1 of {BACKENDS} backends moved {:.2} % of {FLOWS} flows ({:.2} % were on it)",
        frac * 100.0,
        on_gone * 100.0
    );
    assert!(
        frac <= on_gone + SLACK,
        "{:.4} of flows moved; the removed backend held {on_gone:.4}",
        frac
    );

    let rr_before = placements(&datapath(&all, LbAlgorithm::RoundRobin)?)?;
    let rr_after = placements(&datapath(&rest, LbAlgorithm::RoundRobin)?)?;
    println!(
        "round-robin, for contrast: {:.2} % moved",
        moved(&rr_before, &rr_after) * 100.0
    );
    Ok(())
}
