//! IPv6 packet classes through BPF_PROG_TEST_RUN: TCP and UDP to an IPv6
//! ClusterIP are translated with valid checksums and exact round-robin,
//! replies come back from the ClusterIP, a frontend without endpoints
//! answers TCP with a reset and UDP with ICMPv6 port unreachable, a
//! backend reaching itself gets the hairpin source, and what is not ours
//! (extension headers, ICMPv6, other addresses) or cannot be read passes
//! byte for byte. eBPF only; needs root, no namespace.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use proxy_user::datapath::ebpf::{Dataplane, EGRESS_PROG, INGRESS_PROG, LoadOptions};
use proxy_user::model::{BackendAddr, DesiredService, DesiredState, Frontend, Proto};
use proxy_user::pktgen::{Frame6, parse6};
use proxy_user::reconcile::diff;

const UNSPEC: i32 = -1;
const OK: i32 = 0;
const REDIRECT: i32 = 7;

const VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
const EMPTY_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x11);
const SELF_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x12);
const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 1, 0, 0, 0, 0, 2);
const HAIRPIN: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x6b70, 0x7278, 0, 0, 0, 0, 1);

fn backends() -> Vec<Ipv6Addr> {
    (1..=3)
        .map(|i| Ipv6Addr::new(0xfd00, 0, 0x10 + i, 0, 0, 0, 0, 2))
        .collect()
}

fn dataplane() -> Dataplane {
    let mut dp = Dataplane::load(&LoadOptions {
        max_services: 64,
        max_slots: 256,
        conntrack_size: 1024,
        bpf_log_level: 0,
        pin_dir: None,
        ..LoadOptions::default()
    })
    .expect("load eBPF object (tests must run as root)");
    let bes = |port| {
        backends()
            .into_iter()
            .map(|ip| BackendAddr::new(ip, port))
            .collect()
    };
    let own = |port| [BackendAddr::new(CLIENT, port)].into_iter().collect();
    let mut state = DesiredState::default();
    for (ip, port, proto, backends) in [
        (VIP, 80, Proto::Tcp, bes(8080)),
        (VIP, 53, Proto::Udp, bes(5353)),
        (EMPTY_VIP, 80, Proto::Tcp, Default::default()),
        (EMPTY_VIP, 53, Proto::Udp, Default::default()),
        (SELF_VIP, 80, Proto::Tcp, own(8080)),
    ] {
        state.services.insert(
            Frontend {
                ip: ip.into(),
                port,
                proto,
            },
            DesiredService::new(format!("[{ip}]:{port}"), backends),
        );
    }
    dp.apply(&diff(&DesiredState::default(), &state)).unwrap();
    dp
}

fn assert_passes_untouched(dp: &Dataplane, prog: &str, pkt: &[u8], what: &str) {
    let r = dp
        .test_run(prog, pkt, 1)
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert_eq!(r.verdict, UNSPEC, "{what}: verdict");
    assert_eq!(r.packet, pkt, "{what}: bytes must be unchanged");
}

#[test]
fn tcp_and_udp_are_translated_round_robin_with_valid_checksums() {
    let dp = dataplane();
    let mut per_backend: BTreeMap<Ipv6Addr, usize> = BTreeMap::new();
    let mut chosen = Vec::new();
    for i in 0..9u16 {
        let f = if i % 2 == 0 {
            Frame6::tcp(CLIENT, 40000 + i, VIP, 80)
        } else {
            Frame6::udp(CLIENT, 40000 + i, VIP, 53)
        };
        let r = dp.test_run(INGRESS_PROG, &f.build(), 1).unwrap();
        assert_eq!(r.verdict, OK, "flow {i}");
        let p = parse6(&r.packet).unwrap();
        assert!(backends().contains(&p.dst), "dst {} is a backend", p.dst);
        assert_eq!(p.src, CLIENT);
        assert_eq!(p.dport, if f.proto == 6 { 8080 } else { 5353 });
        assert!(p.l4_csum_ok, "L4 checksum of flow {i}");
        chosen.push(p.dst);
    }
    // TCP and UDP frontends have a cursor each: 5 TCP flows over 3
    // backends, 4 UDP ones.
    for (i, dst) in chosen.iter().enumerate() {
        *per_backend.entry(*dst).or_default() += usize::from(i % 2 == 0);
    }
    let mut tcp: Vec<usize> = per_backend.values().copied().collect();
    tcp.sort();
    assert_eq!(tcp, [1, 2, 2], "5 TCP flows round-robin: {chosen:?}");
    // Established flows stick.
    for i in 0..9u16 {
        let f = if i % 2 == 0 {
            Frame6::tcp(CLIENT, 40000 + i, VIP, 80)
        } else {
            Frame6::udp(CLIENT, 40000 + i, VIP, 53)
        };
        let r = dp.test_run(INGRESS_PROG, &f.build(), 1).unwrap();
        assert_eq!(parse6(&r.packet).unwrap().dst, chosen[usize::from(i)]);
    }
    assert_eq!(dp.global_counters().unwrap().new_flows, 9);
}

#[test]
fn replies_come_back_from_the_clusterip() {
    let dp = dataplane();
    for (frame, port, bport) in [
        (Frame6::tcp(CLIENT, 45000, VIP, 80), 80, 8080),
        (Frame6::udp(CLIENT, 45001, VIP, 53), 53, 5353),
    ] {
        let r = dp.test_run(INGRESS_PROG, &frame.build(), 1).unwrap();
        let be = parse6(&r.packet).unwrap().dst;
        let mut reply = Frame6 {
            src: be,
            sport: bport,
            dst: CLIENT,
            dport: frame.sport,
            ..frame.clone()
        };
        reply.tcp_flags = 0x12; // SYN-ACK
        let r = dp.test_run(EGRESS_PROG, &reply.build(), 1).unwrap();
        assert_eq!(r.verdict, OK);
        let p = parse6(&r.packet).unwrap();
        assert_eq!(
            (p.src, p.sport, p.dst, p.dport),
            (VIP, port, CLIENT, frame.sport)
        );
        assert!(p.l4_csum_ok, "L4 checksum of the reply");
    }
}

#[test]
fn a_frontend_without_endpoints_resets_tcp_and_refuses_udp() {
    let dp = dataplane();
    let syn = Frame6::tcp(CLIENT, 47000, EMPTY_VIP, 80);
    let input = syn.build();
    let r = dp.test_run(INGRESS_PROG, &input, 1).unwrap();
    assert_eq!(
        r.verdict, REDIRECT,
        "sent back out of the ingress interface"
    );
    let p = parse6(&r.packet).expect("the reset parses");
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (EMPTY_VIP, 80, CLIENT, 47000)
    );
    // RST|ACK, seq 0, ack = the SYN's seq (1) + SYN + 5 payload bytes.
    assert_eq!(p.tcp, Some((0x14, 0, 1 + 1 + 5)));
    assert!(p.l4_csum_ok, "TCP checksum");
    assert_eq!(&r.packet[0..6], &input[6..12], "MACs swapped");
    assert_eq!(&r.packet[6..12], &input[0..6], "MACs swapped");

    let udp = Frame6::udp(CLIENT, 47001, EMPTY_VIP, 53);
    let input = udp.build();
    let r = dp.test_run(INGRESS_PROG, &input, 1).unwrap();
    assert_eq!(r.verdict, REDIRECT);
    let p = parse6(&r.packet).expect("the ICMPv6 error parses");
    assert_eq!(
        p.icmp,
        Some((1, 4)),
        "destination unreachable / port unreachable"
    );
    assert_eq!((p.src, p.dst), (EMPTY_VIP, CLIENT));
    assert!(p.l4_csum_ok, "ICMPv6 checksum");
    // The original IPv6 header and 8 bytes of UDP are quoted.
    assert_eq!(&p.l4[8..], &input[14..14 + 48]);
    assert_eq!(dp.global_counters().unwrap().rejects, 2);
}

#[test]
fn a_backend_reaching_itself_gets_the_hairpin_source() {
    let dp = dataplane();
    let syn = Frame6::tcp(CLIENT, 48000, SELF_VIP, 80);
    let r = dp.test_run(INGRESS_PROG, &syn.build(), 1).unwrap();
    assert_eq!(r.verdict, REDIRECT);
    let p = parse6(&r.packet).unwrap();
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (HAIRPIN, 48000, CLIENT, 8080)
    );
    assert!(p.l4_csum_ok);
    let reply = Frame6 {
        src: CLIENT,
        sport: 8080,
        dst: HAIRPIN,
        dport: 48000,
        tcp_flags: 0x12,
        ..syn.clone()
    };
    let r = dp.test_run(INGRESS_PROG, &reply.build(), 1).unwrap();
    assert_eq!(r.verdict, REDIRECT);
    let p = parse6(&r.packet).unwrap();
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (SELF_VIP, 80, CLIENT, 48000),
        "the reply comes from the frontend"
    );
    assert!(p.l4_csum_ok);
}

#[test]
fn what_is_not_ours_passes_untouched() {
    let dp = dataplane();
    let mut hbh = Frame6::tcp(CLIENT, 49000, VIP, 80);
    hbh.hop_by_hop = true;
    assert_passes_untouched(&dp, INGRESS_PROG, &hbh.build(), "hop-by-hop header");
    let mut icmp = Frame6::tcp(CLIENT, 0, VIP, 0);
    icmp.proto = 58;
    icmp.payload = vec![128, 0, 0, 0, 0, 0, 0, 0];
    assert_passes_untouched(&dp, INGRESS_PROG, &icmp.build(), "ICMPv6 echo");
    let direct = Frame6::tcp(CLIENT, 49001, backends()[0], 8080).build();
    assert_passes_untouched(&dp, INGRESS_PROG, &direct, "direct to a backend");
    let other_port = Frame6::tcp(CLIENT, 49002, VIP, 81).build();
    assert_passes_untouched(&dp, INGRESS_PROG, &other_port, "other port");
    let unknown = Frame6::tcp(backends()[0], 8080, CLIENT, 49003).build();
    assert_passes_untouched(&dp, EGRESS_PROG, &unknown, "egress without conntrack");
    assert_passes_untouched(
        &dp,
        INGRESS_PROG,
        &Frame6::tcp(CLIENT, 8080, HAIRPIN, 1234).build(),
        "unknown flow to the hairpin address",
    );
    assert_eq!(dp.global_counters().unwrap().malformed, 0);
}

#[test]
fn malformed_ipv6_passes_untouched_and_is_counted() {
    let dp = dataplane();
    let good = Frame6::tcp(CLIENT, 50000, VIP, 80).build();
    let mut version = good.clone();
    version[14] = 0x40;
    assert_passes_untouched(&dp, INGRESS_PROG, &version, "version 4 under 0x86dd");
    let mut long = good.clone();
    long[18..20].copy_from_slice(&2000u16.to_be_bytes());
    assert_passes_untouched(&dp, INGRESS_PROG, &long, "payload length beyond frame");
    let mut cut = good[..14 + 40 + 10].to_vec();
    cut[18..20].copy_from_slice(&10u16.to_be_bytes());
    assert_passes_untouched(&dp, INGRESS_PROG, &cut, "TCP header cut");
    // (A frame shorter than an IPv6 header never reaches a program:
    // BPF_PROG_TEST_RUN refuses it, as the stack would.)
    assert_eq!(dp.global_counters().unwrap().malformed, 3);
}
