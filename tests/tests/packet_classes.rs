//! Test 7: packet classes through BPF_PROG_TEST_RUN. Each class gets the
//! right verdict, and packets that must pass come out byte for byte as they
//! went in. Needs root (loads the eBPF object); no network namespace needed.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use proxy_user::datapath::ebpf::{Dataplane, EGRESS_PROG, INGRESS_PROG, LoadOptions};
use proxy_user::model::{DesiredService, DesiredState, Frontend, Proto};
use proxy_user::pktgen::{Frame, parse};
use proxy_user::reconcile::diff;

const UNSPEC: i32 = -1;
const OK: i32 = 0;
const REDIRECT: i32 = 7;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// A frontend whose only backend is `CLIENT` itself (hairpin).
const SELF_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(
    proxy_common::HAIRPIN_SNAT_IP[0],
    proxy_common::HAIRPIN_SNAT_IP[1],
    proxy_common::HAIRPIN_SNAT_IP[2],
    proxy_common::HAIRPIN_SNAT_IP[3],
);

fn backends() -> Vec<Ipv4Addr> {
    (1..=3).map(|i| Ipv4Addr::new(10, 0, 10 + i, 2)).collect()
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
    let mut state = DesiredState::default();
    let own = |port| {
        [proxy_user::model::BackendAddr::new(CLIENT, port)]
            .into_iter()
            .collect()
    };
    let bes = |port| {
        backends()
            .into_iter()
            .map(|ip| proxy_user::model::BackendAddr::new(ip, port))
            .collect()
    };
    for (ip, port, proto, backends) in [
        (VIP, 80, Proto::Tcp, bes(8080)),
        (VIP, 53, Proto::Udp, bes(5353)),
        (EMPTY_VIP, 80, Proto::Tcp, Default::default()),
        (EMPTY_VIP, 53, Proto::Udp, Default::default()),
        (SELF_VIP, 80, Proto::Tcp, own(8080)),
        (SELF_VIP, 53, Proto::Udp, own(5353)),
    ] {
        state.services.insert(
            Frontend {
                ip: ip.into(),
                port,
                proto,
            },
            DesiredService::new(format!("{ip}:{port}"), backends),
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
fn non_ipv4_frames_pass_untouched() {
    let dp = dataplane();
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 2, 0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    assert_passes_untouched(&dp, INGRESS_PROG, &arp, "ARP");
    let mut v6 = Frame::tcp(CLIENT, 40000, VIP, 80).build();
    v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    assert_passes_untouched(&dp, INGRESS_PROG, &v6, "IPv6 ethertype");
    assert_passes_untouched(&dp, EGRESS_PROG, &v6, "IPv6 ethertype (egress)");
    // Shorter than an Ethernet header.
    assert_passes_untouched(&dp, INGRESS_PROG, &arp[..14], "bare Ethernet header");
}

#[test]
fn traffic_not_for_a_frontend_passes_untouched() {
    let dp = dataplane();
    let direct = Frame::tcp(CLIENT, 40000, backends()[0], 8080).build();
    assert_passes_untouched(&dp, INGRESS_PROG, &direct, "direct to backend");
    let other_port = Frame::tcp(CLIENT, 40000, VIP, 81).build();
    assert_passes_untouched(&dp, INGRESS_PROG, &other_port, "ClusterIP, other port");
    let wrong_proto = Frame::udp(CLIENT, 40000, VIP, 80).build();
    assert_passes_untouched(
        &dp,
        INGRESS_PROG,
        &wrong_proto,
        "ClusterIP, UDP on a TCP port",
    );
    let mut icmp = Frame::tcp(CLIENT, 0, VIP, 0);
    icmp.proto = 1;
    icmp.payload = vec![8, 0, 0, 0, 0, 0, 0, 0];
    assert_passes_untouched(&dp, INGRESS_PROG, &icmp.build(), "ICMP to ClusterIP");
    let reply_unknown = Frame::tcp(backends()[0], 8080, CLIENT, 40000).build();
    assert_passes_untouched(&dp, EGRESS_PROG, &reply_unknown, "egress without conntrack");
}

#[test]
fn malformed_ipv4_passes_untouched_and_is_counted() {
    let dp = dataplane();
    let good = Frame::tcp(CLIENT, 40000, VIP, 80).build();

    let mut ihl4 = good.clone();
    ihl4[14] = 0x44;
    assert_passes_untouched(&dp, INGRESS_PROG, &ihl4, "IHL 4");

    let mut v5 = good.clone();
    v5[14] = 0x55;
    assert_passes_untouched(&dp, INGRESS_PROG, &v5, "version 5");

    // Total length claims more than the frame holds.
    let mut long = good.clone();
    long[16..18].copy_from_slice(&2000u16.to_be_bytes());
    assert_passes_untouched(&dp, INGRESS_PROG, &long, "total length beyond frame");

    // Cut inside the TCP header (total length consistent with the cut).
    let mut cut = good[..14 + 20 + 10].to_vec();
    cut[16..18].copy_from_slice(&30u16.to_be_bytes());
    assert_passes_untouched(&dp, INGRESS_PROG, &cut, "truncated TCP header");

    // Total length shorter than the IP header itself. (A frame cut inside
    // the IP header is refused by BPF_PROG_TEST_RUN itself with EINVAL, so
    // that class is covered by the same `linear()` check, not by a run.)
    let mut short = good.clone();
    short[16..18].copy_from_slice(&12u16.to_be_bytes());
    assert_passes_untouched(&dp, INGRESS_PROG, &short, "total length < header length");

    let counted = dp.global_counters().unwrap().malformed;
    assert_eq!(counted, 5, "every malformed IPv4 packet is counted");
}

fn assert_translated(out: &[u8], dport: u16) -> Ipv4Addr {
    let p = parse(out).expect("parse translated packet");
    assert!(backends().contains(&p.dst), "dst {} is a backend", p.dst);
    assert_eq!(p.dport, dport);
    assert_eq!(p.src, CLIENT);
    assert!(p.ip_csum_ok, "IPv4 checksum");
    p.dst
}

#[test]
fn frontend_traffic_is_translated_with_valid_checksums() {
    let dp = dataplane();
    for (i, options) in [vec![], vec![1, 1, 1, 1], vec![1; 40]]
        .into_iter()
        .enumerate()
    {
        let mut tcp = Frame::tcp(CLIENT, 41000 + i as u16, VIP, 80);
        tcp.ip_options = options.clone();
        let r = dp.test_run(INGRESS_PROG, &tcp.build(), 1).unwrap();
        assert_eq!(r.verdict, OK, "TCP, {} option bytes", options.len());
        assert_translated(&r.packet, 8080);
        assert_eq!(
            parse(&r.packet).unwrap().l4_csum_ok,
            Some(true),
            "TCP checksum"
        );

        let mut udp = Frame::udp(CLIENT, 42000 + i as u16, VIP, 53);
        udp.ip_options = options;
        let r = dp.test_run(INGRESS_PROG, &udp.build(), 1).unwrap();
        assert_eq!(r.verdict, OK);
        assert_translated(&r.packet, 5353);
        assert_eq!(
            parse(&r.packet).unwrap().l4_csum_ok,
            Some(true),
            "UDP checksum"
        );
    }
    // A UDP checksum of zero means "none" and must stay zero.
    let mut udp0 = Frame::udp(CLIENT, 43000, VIP, 53);
    udp0.udp_zero_csum = true;
    let r = dp.test_run(INGRESS_PROG, &udp0.build(), 1).unwrap();
    assert_eq!(r.verdict, OK);
    assert_translated(&r.packet, 5353);
    assert_eq!(
        parse(&r.packet).unwrap().l4_csum_ok,
        None,
        "zero UDP checksum kept"
    );
}

#[test]
fn new_flows_round_robin_exactly_and_established_flows_stick() {
    let dp = dataplane();
    let mut per_backend: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    let mut chosen = Vec::new();
    for i in 0..9u16 {
        let r = dp
            .test_run(
                INGRESS_PROG,
                &Frame::tcp(CLIENT, 44000 + i, VIP, 80).build(),
                1,
            )
            .unwrap();
        let be = assert_translated(&r.packet, 8080);
        *per_backend.entry(be).or_default() += 1;
        chosen.push(be);
    }
    assert_eq!(per_backend.values().copied().collect::<Vec<_>>(), [3, 3, 3]);
    // The same flows again: conntrack keeps each on its backend.
    for i in 0..9u16 {
        let r = dp
            .test_run(
                INGRESS_PROG,
                &Frame::tcp(CLIENT, 44000 + i, VIP, 80).build(),
                1,
            )
            .unwrap();
        assert_eq!(assert_translated(&r.packet, 8080), chosen[i as usize]);
    }
    assert_eq!(dp.global_counters().unwrap().new_flows, 9);
}

#[test]
fn replies_are_reverse_translated() {
    let dp = dataplane();
    for (frame, port, bport) in [
        (Frame::tcp(CLIENT, 45000, VIP, 80), 80, 8080),
        (Frame::udp(CLIENT, 45001, VIP, 53), 53, 5353),
    ] {
        let r = dp.test_run(INGRESS_PROG, &frame.build(), 1).unwrap();
        let be = assert_translated(&r.packet, bport);
        let reply = if frame.proto == 6 {
            Frame::tcp(be, bport, CLIENT, frame.sport)
        } else {
            Frame::udp(be, bport, CLIENT, frame.sport)
        };
        let r = dp.test_run(EGRESS_PROG, &reply.build(), 1).unwrap();
        assert_eq!(r.verdict, OK);
        let p = parse(&r.packet).unwrap();
        assert_eq!(
            (p.src, p.sport, p.dst, p.dport),
            (VIP, port, CLIENT, frame.sport)
        );
        assert!(p.ip_csum_ok);
        assert_eq!(p.l4_csum_ok, Some(true));
    }
}

#[test]
fn a_new_flow_is_unreplied_until_its_first_reply() {
    use proxy_common::{CT_F_UNREPLIED, CtKey, CtValue};
    let dp = dataplane();
    let flags = |dp: &Dataplane, sport: u16| -> Vec<(u8, u32)> {
        let mut v: Vec<(u8, u32)> = dp
            .conntrack_snapshot()
            .into_iter()
            .filter(|(k, _): &(CtKey, CtValue)| {
                k.sport == sport.to_be() || k.dport == sport.to_be()
            })
            .map(|(k, v)| (k.dir, v.flags & CT_F_UNREPLIED))
            .collect();
        v.sort();
        v
    };
    for (frame, bport) in [
        (Frame::tcp(CLIENT, 47000, VIP, 80), 8080),
        (Frame::udp(CLIENT, 47001, VIP, 53), 5353),
    ] {
        let r = dp.test_run(INGRESS_PROG, &frame.build(), 1).unwrap();
        let be = assert_translated(&r.packet, bport);
        // Forward and reply entry, both unreplied (the short timeouts).
        assert_eq!(
            flags(&dp, frame.sport),
            [(0, CT_F_UNREPLIED), (1, CT_F_UNREPLIED)]
        );
        // The client repeating itself changes nothing.
        dp.test_run(INGRESS_PROG, &frame.build(), 1).unwrap();
        assert_eq!(
            flags(&dp, frame.sport),
            [(0, CT_F_UNREPLIED), (1, CT_F_UNREPLIED)]
        );
        let reply = if frame.proto == 6 {
            Frame::tcp(be, bport, CLIENT, frame.sport)
        } else {
            Frame::udp(be, bport, CLIENT, frame.sport)
        };
        assert_eq!(
            dp.test_run(EGRESS_PROG, &reply.build(), 1).unwrap().verdict,
            OK
        );
        assert_eq!(flags(&dp, frame.sport), [(0, 0), (1, 0)], "replied");
    }
}

#[test]
fn fragments_follow_their_first_fragment() {
    let dp = dataplane();
    let mut first = Frame::udp(CLIENT, 46000, VIP, 53);
    first.frag = 0x2000; // MF, offset 0
    let r = dp.test_run(INGRESS_PROG, &first.build(), 1).unwrap();
    assert_eq!(r.verdict, OK);
    let be = assert_translated(&r.packet, 5353);

    // Later fragment: same id (pktgen uses 0x1234), offset 8 (×8 bytes).
    let mut later = Frame::udp(CLIENT, 0, VIP, 0);
    later.proto = 17;
    later.frag = 1;
    let mut later_bytes = later.build();
    // Replace the (fake) UDP header bytes with raw payload: non-first
    // fragments carry no L4 header.
    later_bytes.truncate(14 + 20);
    later_bytes.extend_from_slice(b"rest of the datagram");
    let tot = (later_bytes.len() - 14) as u16;
    later_bytes[16..18].copy_from_slice(&tot.to_be_bytes());
    later_bytes[24..26].copy_from_slice(&[0, 0]);
    let c = proxy_user::pktgen::checksum(&later_bytes[14..34], 0);
    later_bytes[24..26].copy_from_slice(&c.to_be_bytes());
    let r = dp.test_run(INGRESS_PROG, &later_bytes, 1).unwrap();
    assert_eq!(r.verdict, OK, "later fragment translated");
    assert_eq!(
        &r.packet[30..34],
        &be.octets(),
        "same backend as the first fragment"
    );
    assert_eq!(
        proxy_user::pktgen::checksum(&r.packet[14..34], 0),
        0,
        "IPv4 checksum"
    );
    assert_eq!(&r.packet[34..], b"rest of the datagram");

    // A later fragment of an unknown datagram passes untouched.
    let mut unknown = later_bytes.clone();
    unknown[18..20].copy_from_slice(&0x9999u16.to_be_bytes());
    unknown[24..26].copy_from_slice(&[0, 0]);
    let c = proxy_user::pktgen::checksum(&unknown[14..34], 0);
    unknown[24..26].copy_from_slice(&c.to_be_bytes());
    assert_passes_untouched(&dp, INGRESS_PROG, &unknown, "unmatched later fragment");
    let g = dp.global_counters().unwrap();
    assert_eq!((g.fragments, g.fragments_unmatched), (1, 1));
}

#[test]
fn service_without_endpoints_gets_icmp_port_unreachable() {
    let dp = dataplane();
    for frame in [
        Frame::tcp(CLIENT, 47000, EMPTY_VIP, 80),
        Frame::udp(CLIENT, 47001, EMPTY_VIP, 53),
    ] {
        let input = frame.build();
        let r = dp.test_run(INGRESS_PROG, &input, 1).unwrap();
        assert_eq!(
            r.verdict, REDIRECT,
            "sent back out of the ingress interface"
        );
        let p = parse(&r.packet).expect("ICMP reply parses");
        assert_eq!(
            p.icmp,
            Some((3, 3)),
            "destination unreachable / port unreachable"
        );
        assert_eq!((p.src, p.dst), (EMPTY_VIP, CLIENT));
        assert!(p.ip_csum_ok, "IPv4 checksum");
        assert_eq!(p.l4_csum_ok, Some(true), "ICMP checksum");
        // MACs swapped; the original IP header + 8 bytes quoted.
        assert_eq!(&r.packet[0..6], &input[6..12]);
        assert_eq!(&r.packet[6..12], &input[0..6]);
        assert_eq!(&r.packet[14 + 20 + 8..], &input[14..14 + 28]);
    }
    assert_eq!(dp.global_counters().unwrap().rejects, 2);
}

#[test]
fn a_backend_reaching_itself_gets_the_hairpin_source_and_its_reply_comes_back() {
    let dp = dataplane();
    for (frame, port, bport) in [
        (Frame::tcp(CLIENT, 48000, SELF_VIP, 80), 80, 8080),
        (Frame::udp(CLIENT, 48001, SELF_VIP, 53), 53, 5353),
    ] {
        let input = frame.build();
        let r = dp.test_run(INGRESS_PROG, &input, 1).unwrap();
        assert_eq!(
            r.verdict, REDIRECT,
            "sent back out of the ingress interface"
        );
        let p = parse(&r.packet).unwrap();
        assert_eq!(
            (p.src, p.sport, p.dst, p.dport),
            (HAIRPIN, frame.sport, CLIENT, bport),
            "DNAT to the backend (itself) and SNAT to the hairpin address"
        );
        assert!(p.ip_csum_ok, "IPv4 checksum");
        assert_eq!(p.l4_csum_ok, Some(true), "L4 checksum");
        assert_eq!(&r.packet[0..6], &input[6..12], "MACs swapped");
        assert_eq!(&r.packet[6..12], &input[0..6], "MACs swapped");

        // The backend answers the hairpin address through its gateway, so
        // the reply meets the ingress program too.
        let reply = if frame.proto == 6 {
            Frame::tcp(CLIENT, bport, HAIRPIN, frame.sport)
        } else {
            Frame::udp(CLIENT, bport, HAIRPIN, frame.sport)
        };
        let input = reply.build();
        let r = dp.test_run(INGRESS_PROG, &input, 1).unwrap();
        assert_eq!(r.verdict, REDIRECT);
        let p = parse(&r.packet).unwrap();
        assert_eq!(
            (p.src, p.sport, p.dst, p.dport),
            (SELF_VIP, port, CLIENT, frame.sport),
            "the reply comes from the frontend"
        );
        assert!(p.ip_csum_ok, "IPv4 checksum");
        assert_eq!(p.l4_csum_ok, Some(true), "L4 checksum");
        assert_eq!(&r.packet[0..6], &input[6..12], "MACs swapped");

        // The same flow again sticks to its conntrack entry.
        let r = dp.test_run(INGRESS_PROG, &frame.build(), 1).unwrap();
        assert_eq!(r.verdict, REDIRECT);
        assert_eq!(parse(&r.packet).unwrap().src, HAIRPIN);
    }
    let g = dp.global_counters().unwrap();
    assert_eq!(g.new_flows, 2, "one flow each for TCP and UDP");

    // Traffic to the hairpin address without a flow is not ours.
    assert_passes_untouched(
        &dp,
        INGRESS_PROG,
        &Frame::tcp(CLIENT, 8080, HAIRPIN, 1234).build(),
        "unknown flow to the hairpin address",
    );
    // A client that is not the backend is only DNATed, as before.
    let other = Ipv4Addr::new(10, 0, 2, 2);
    let r = dp
        .test_run(
            INGRESS_PROG,
            &Frame::tcp(other, 48002, SELF_VIP, 80).build(),
            1,
        )
        .unwrap();
    assert_eq!(r.verdict, OK);
    let p = parse(&r.packet).unwrap();
    assert_eq!((p.src, p.dst, p.dport), (other, CLIENT, 8080));
}
