//! kproxy datapath: ClusterIP DNAT with exact per-service round-robin, own
//! conntrack, reverse NAT of replies, ICMP reject for services without
//! endpoints.
//!
//! Two TC programs, attached to every interface that faces clients:
//!
//! * `kproxy_ingress` — client → frontend. Reads top to bottom:
//!   parse → frontend lookup → conntrack lookup / round-robin select →
//!   record → rewrite destination → count.
//! * `kproxy_egress` — backend → client. parse → reply conntrack lookup →
//!   rewrite source back to the frontend → count.
//!
//! Map layouts (keys, values, who writes, who reads) are documented in
//! `proxy-common/src/lib.rs`, next to the types.
//!
//! Hairpin: a backend that reaches itself through its own frontend gets the
//! flow's source rewritten to `HAIRPIN_SNAT_IP` too (else it would receive a
//! packet from its own address, a martian the kernel drops), and the packet
//! is sent straight back out of the interface it came in on. Its replies go
//! to `HAIRPIN_SNAT_IP` through its gateway, so they come back through the
//! *ingress* program, which restores frontend → client and sends them back
//! the same way.
//!
//! Verdicts: packets that are not ours return `TC_ACT_UNSPEC` (-1, "next"
//! for tcx, "continue" for cls_bpf) untouched, so other programs on the same
//! hook still see them. Translated packets return `TC_ACT_OK`; rejects are
//! turned into ICMP port unreachable and sent back out of the interface they
//! came in on (`TC_ACT_REDIRECT`).
//!
//! North-south (NodePort, externalIPs, LoadBalancer): a packet to one of
//! the node's addresses (`NODE_IPS`) that is not a frontend of its own is
//! first checked against the reply entries of source-NATed flows, then
//! looked up as a NodePort (`SvcKey` with address `NODEPORT_ADDR`). A
//! backend with `BACKEND_F_SNAT` (another node's endpoint of a `Cluster`
//! policy service) gets the flow's source rewritten to the node's address
//! on the egress interface and a per-flow port; both directions of such a
//! flow are sent out through a FIB lookup and `bpf_redirect_neigh`, because
//! the stack would drop a forwarded packet whose source is a local address.
//! A frontend with `SVC_F_DROP_EMPTY` (`externalTrafficPolicy: Local`
//! without local endpoints) drops instead of rejecting.
//!
//! IPv6 (`v6.rs`): ClusterIPs of the IPv6 family, with conntrack, reverse
//! NAT, affinity, Maglev, hairpin and ICMPv6 reject of their own; both
//! programs hand every packet that is not IPv4 to it.
//!
//! Fragments: the first fragment carries the ports and is translated like any
//! packet; its backend is remembered in `FRAGS` under (src, dst, IP id, proto)
//! so later fragments of the same datagram get the same destination address.
//! A later fragment that arrives before its first fragment (or after the
//! entry was evicted) is passed on untouched and counted as
//! `fragments_unmatched`.
#![no_std]
#![no_main]
// atomic_xadd: the BPF target exposes no AtomicU64::fetch_add; with
// target-cpu=v3 the intrinsic lowers to BPF_ATOMIC | BPF_FETCH | BPF_ADD.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod flow;
mod packet;
mod v6;
mod xdp;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_redirect_neigh},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::{debug, warn};
use flow::{Flow, FlowError, Target, Tuple};
use packet::{Ipv4, L4Kind, Parsed};
use proxy_common::*;

/// "Not ours": let the next program / the stack decide.
const TC_ACT_UNSPEC: i32 = -1;

#[map]
static SERVICES: HashMap<SvcKey, SvcValue> = HashMap::with_max_entries(MAX_SERVICES, 0);
#[map]
static SLOTS: HashMap<SlotKey, Backend> = HashMap::with_max_entries(MAX_SLOTS, 0);
#[map]
static RR_CURSOR: Array<u64> = Array::with_max_entries(MAX_SERVICES, 0);
#[map]
static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(MAX_CONNTRACK, 0);
#[map]
static FRAGS: LruHashMap<FragKey, Backend> = LruHashMap::with_max_entries(MAX_FRAGS, 0);
#[map]
static SVC_COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);
#[map]
static GLOBAL_COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);
#[map]
static NODE_IPS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_NODE_IPS, 0);
#[map]
static SNAT_ADDRS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_NODE_IPS, 0);
#[map]
static SOURCE_RANGES: LpmTrie<SrcRangeKey, u32> = LpmTrie::with_max_entries(MAX_SOURCE_RANGES, 0);
#[map]
static XDP_COUNTERS: PerCpuArray<XdpCounters> = PerCpuArray::with_max_entries(1, 0);
/// Not preallocated: a 128 KiB table exists only for Maglev frontends.
#[map]
static MAGLEV: HashMap<u32, MaglevTable> =
    HashMap::with_max_entries(MAX_MAGLEV, aya_ebpf::bindings::BPF_F_NO_PREALLOC);
#[map]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(MAX_AFFINITY, 0);
#[map]
static ROUTES: LruHashMap<RouteKey, RouteEntry> = LruHashMap::with_max_entries(MAX_ROUTES, 0);

#[xdp]
pub fn kproxy_xdp(ctx: XdpContext) -> u32 {
    xdp::run(&ctx)
}

#[classifier]
pub fn kproxy_ingress(ctx: TcContext) -> i32 {
    let ip = match packet::parse_ipv4(&ctx) {
        Parsed::NotIpv4 => return v6::ingress(&ctx),
        Parsed::Malformed => {
            count_global(|c| c.malformed += 1);
            return TC_ACT_UNSPEC;
        }
        Parsed::Ipv4(ip) => ip,
    };
    match ip.l4 {
        L4Kind::Other => TC_ACT_UNSPEC,
        L4Kind::LaterFragment => translate_later_fragment(&ctx, &ip),
        L4Kind::Ports { sport, dport } if ip.daddr == hairpin_addr() => {
            hairpin_reply(&ctx, &ip, sport, dport)
        }
        L4Kind::Ports { sport, dport } => {
            let t = tuple(&ip, sport, dport);
            let svc = match flow::target(&t) {
                Target::None => return TC_ACT_UNSPEC,
                Target::SnatReply(ct) => return snat_reply(&ctx, &ip, ct),
                Target::Frontend(svc) => svc,
            };
            if cfg!(feature = "broken-for-tests") {
                return TC_ACT_SHOT;
            }
            if !flow::source_allowed(&svc, ip.saddr) {
                return drop_packet(svc.id);
            }
            if svc.count == 0 {
                if svc.flags & SVC_F_DROP_EMPTY != 0 {
                    return drop_packet(svc.id);
                }
                return reject(&ctx, &ip, svc.id);
            }
            forward(&ctx, &ip, &t, svc)
        }
    }
}

#[classifier]
pub fn kproxy_egress(ctx: TcContext) -> i32 {
    let ip = match packet::parse_ipv4(&ctx) {
        Parsed::Ipv4(ip) => ip,
        Parsed::NotIpv4 => return v6::egress(&ctx),
        // Malformed packets are counted once, on ingress.
        Parsed::Malformed => return TC_ACT_UNSPEC,
    };
    let L4Kind::Ports { sport, dport } = ip.l4 else {
        return TC_ACT_UNSPEC;
    };
    let Some(ct) = tuple(&ip, sport, dport).reply_entry() else {
        return TC_ACT_UNSPEC;
    };
    // Replies of source-NATed flows are addressed to the node and handled
    // on ingress.
    if ct.nat_addr != 0 {
        return TC_ACT_UNSPEC;
    }
    if packet::rewrite(&ctx, &ip, packet::Side::Source, ct.addr, ct.port).is_err() {
        return drop_packet(ct.svc_id);
    }
    count_packet(ct.svc_id, u64::from(ctx.len()), 0);
    TC_ACT_OK
}

/// A TCP/UDP packet's tuple, for `flow.rs`.
#[inline(always)]
fn tuple(ip: &Ipv4, sport: u16, dport: u16) -> Tuple {
    Tuple {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        proto: ip.proto,
        tcp_flags: ip.tcp_flags,
    }
}

/// Counts a translated packet of `len` bytes, and the flows it opened
/// (0 or 1), for the service and globally.
#[inline(always)]
fn count_packet(svc_id: u32, len: u64, new_flows: u64) {
    count_service(svc_id, |c| {
        c.packets += 1;
        c.bytes += len;
        c.new_flows += new_flows;
    });
    count_global(|c| {
        c.packets += 1;
        c.bytes += len;
        c.new_flows += new_flows;
    });
}

/// Counts a packet of the service we could not translate and drops it.
#[inline(always)]
fn drop_packet(svc_id: u32) -> i32 {
    count_service(svc_id, |c| c.drops += 1);
    count_global(|c| c.drops += 1);
    TC_ACT_SHOT
}

/// Client → frontend with at least one backend: keep the flow's backend or
/// pick the next one round-robin, then rewrite the destination.
#[inline(always)]
fn forward(ctx: &TcContext, ip: &Ipv4, t: &Tuple, svc: SvcValue) -> i32 {
    let egress = |backend: u32| fib_ifindex(ctx, ip, ip.saddr, backend);
    let Flow {
        backend,
        snat,
        new: new_flow,
    } = match flow::flow(t, svc, egress) {
        Ok(f) => f,
        Err(e) => {
            if matches!(e, FlowError::NoBackend) {
                warn!(
                    ctx,
                    "kproxy: service {} has no backend in its slots", svc.id
                );
            }
            return drop_packet(svc.id);
        }
    };
    if new_flow {
        debug!(ctx, "kproxy: new flow for service {}", svc.id);
    }
    if snat.0 != 0 {
        return forward_snat(ctx, ip, svc.id, backend, snat, new_flow);
    }
    if ip.more_fragments {
        let frag = FragKey {
            saddr: ip.saddr,
            daddr: ip.daddr,
            id: ip.id,
            proto: ip.proto,
            _pad: 0,
        };
        // Best effort: without the entry later fragments pass untranslated.
        let _ = FRAGS.insert(
            frag,
            Backend {
                flags: 0,
                ..backend
            },
            0,
        );
    }
    if packet::rewrite(
        ctx,
        ip,
        packet::Side::Destination,
        backend.addr,
        backend.port,
    )
    .is_err()
    {
        return drop_packet(svc.id);
    }
    let hairpin = backend.addr == ip.saddr;
    if hairpin
        && (packet::rewrite(ctx, ip, packet::Side::Source, hairpin_addr(), t.sport).is_err()
            || packet::swap_macs(ctx).is_err())
    {
        return drop_packet(svc.id);
    }
    count_packet(svc.id, u64::from(ctx.len()), u64::from(new_flow));
    if hairpin {
        return back_where_it_came_from(ctx);
    }
    TC_ACT_OK
}

/// Client → backend on another node: destination to the backend, source to
/// the node, sent out of the interface the FIB names.
#[inline(always)]
fn forward_snat(
    ctx: &TcContext,
    ip: &Ipv4,
    svc_id: u32,
    backend: Backend,
    snat: (u32, u16),
    new_flow: bool,
) -> i32 {
    let Some(ifindex) = fib_ifindex(ctx, ip, snat.0, backend.addr) else {
        return drop_packet(svc_id);
    };
    if packet::rewrite(
        ctx,
        ip,
        packet::Side::Destination,
        backend.addr,
        backend.port,
    )
    .is_err()
        || packet::rewrite(ctx, ip, packet::Side::Source, snat.0, snat.1).is_err()
    {
        return drop_packet(svc_id);
    }
    count_packet(svc_id, u64::from(ctx.len()), u64::from(new_flow));
    redirect_neigh(ifindex)
}

/// A reply of a source-NATed flow (backend → node address, SNAT port):
/// source back to the frontend, destination back to the client, sent out
/// of the interface the FIB names.
#[inline(always)]
fn snat_reply(ctx: &TcContext, ip: &Ipv4, ct: CtValue) -> i32 {
    let Some(ifindex) = fib_ifindex(ctx, ip, ct.addr, ct.nat_addr) else {
        return drop_packet(ct.svc_id);
    };
    if packet::rewrite(ctx, ip, packet::Side::Source, ct.addr, ct.port).is_err()
        || packet::rewrite(ctx, ip, packet::Side::Destination, ct.nat_addr, ct.nat_port).is_err()
    {
        return drop_packet(ct.svc_id);
    }
    count_packet(ct.svc_id, u64::from(ctx.len()), 0);
    redirect_neigh(ifindex)
}

/// The interface the kernel would forward `saddr → daddr` out of, for a
/// packet that arrived on this one.
#[inline(always)]
fn fib_ifindex(ctx: &TcContext, ip: &Ipv4, saddr: u32, daddr: u32) -> Option<u32> {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    flow::route(ctx.skb.skb as *mut _, ifindex, ip.proto, saddr, daddr).map(|r| r.ifindex)
}

/// Sends the packet out of `ifindex`, the neighbour subsystem filling in
/// the MAC addresses.
#[inline(always)]
fn redirect_neigh(ifindex: u32) -> i32 {
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// `HAIRPIN_SNAT_IP` as the IPv4 header holds it.
#[inline(always)]
pub(crate) fn hairpin_addr() -> u32 {
    u32::from_ne_bytes(HAIRPIN_SNAT_IP)
}

/// Redirects the packet out of the interface it arrived on.
#[inline(always)]
fn back_where_it_came_from(ctx: &TcContext) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// A backend answering a hairpin flow (backend → `HAIRPIN_SNAT_IP`): the
/// reply leaves as frontend → backend (the backend is the client), back out
/// of the interface it came in on. Anything else sent to the hairpin
/// address is not ours.
#[inline(always)]
fn hairpin_reply(ctx: &TcContext, ip: &Ipv4, sport: u16, dport: u16) -> i32 {
    let Some(ct) = tuple(ip, sport, dport).reply_entry() else {
        return TC_ACT_UNSPEC;
    };
    if packet::rewrite(ctx, ip, packet::Side::Source, ct.addr, ct.port).is_err()
        || packet::rewrite(ctx, ip, packet::Side::Destination, ip.saddr, dport).is_err()
        || packet::swap_macs(ctx).is_err()
    {
        return drop_packet(ct.svc_id);
    }
    count_packet(ct.svc_id, u64::from(ctx.len()), 0);
    back_where_it_came_from(ctx)
}

/// A non-first fragment carries no ports: follow the first fragment's choice.
#[inline(always)]
fn translate_later_fragment(ctx: &TcContext, ip: &Ipv4) -> i32 {
    let key = FragKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        id: ip.id,
        proto: ip.proto,
        _pad: 0,
    };
    let Some(backend) = (unsafe { FRAGS.get(key) }) else {
        count_global(|c| c.fragments_unmatched += 1);
        return TC_ACT_UNSPEC;
    };
    let addr = backend.addr;
    if packet::rewrite_l3_only(ctx, addr).is_err() {
        count_global(|c| c.drops += 1);
        return TC_ACT_SHOT;
    }
    count_global(|c| c.fragments += 1);
    TC_ACT_OK
}

/// No ready endpoints: answer with ICMP port unreachable from the frontend,
/// sent straight back out of the interface the packet came in on. TCP and UDP
/// clients both see "connection refused" at once, as with kube-proxy's
/// REJECT rule.
#[inline(always)]
fn reject(ctx: &TcContext, ip: &Ipv4, svc_id: u32) -> i32 {
    let len = u64::from(ctx.len());
    match packet::build_port_unreachable(ctx, ip) {
        Ok(()) => {
            count_service(svc_id, |c| {
                c.packets += 1;
                c.bytes += len;
                c.rejects += 1;
            });
            count_global(|c| {
                c.packets += 1;
                c.bytes += len;
                c.rejects += 1;
            });
            debug!(ctx, "kproxy: rejected packet for service {}", svc_id);
            back_where_it_came_from(ctx)
        }
        Err(()) => drop_packet(svc_id),
    }
}

#[inline(always)]
fn count_service(id: u32, f: impl FnOnce(&mut Counters)) {
    if let Some(c) = SVC_COUNTERS.get_ptr_mut(id) {
        f(unsafe { &mut *c });
    }
}

#[inline(always)]
fn count_global(f: impl FnOnce(&mut Counters)) {
    if let Some(c) = GLOBAL_COUNTERS.get_ptr_mut(0) {
        f(unsafe { &mut *c });
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
