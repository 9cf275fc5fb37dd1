//! `kproxy_xdp`: the north-south fast path on the external interfaces.
//!
//! It runs before the stack and before TC, and does the service lookup
//! first (the same as TC, `flow.rs`):
//!
//! * a packet outside a LoadBalancer's source ranges, or for a `Local`
//!   frontend without local endpoints, is dropped here;
//! * a flow to a backend on another node (source NAT) is translated in both
//!   directions and sent straight back out (`XDP_TX`) or to the interface the
//!   FIB names (`XDP_REDIRECT`), MACs from the FIB's neighbour entry;
//! * a new flow to a local backend is chosen and recorded in conntrack here,
//!   then passed on: TC translates it from that entry, so round-robin stays
//!   exact with one cursor for both hooks;
//! * everything else (not a service, IP options, fragments, refusals, an
//!   unresolved neighbour) passes on untouched for TC or the stack.
//!
//! Checksums are updated incrementally, assuming complete checksums as
//! they arrive from a wire. (A veth peer sending from a local socket leaves
//! partial ones: the tests turn its TX checksum offload off, as a NIC
//! would deliver.)

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX};
use aya_ebpf::helpers::bpf_redirect;
use aya_ebpf::programs::XdpContext;
use proxy_common::*;

use crate::flow::{self, Route, Target, Tuple};
use crate::packet::{csum_replace2, csum_replace4, get, put};
use crate::{XDP_COUNTERS, count_global, count_packet, count_service};

const ETH_HLEN: usize = 14;
const IP_HLEN: usize = 20;
const L4_OFF: usize = ETH_HLEN + IP_HLEN;
const ETH_P_IP: u16 = 0x0800;
/// MF and the fragment offset: any fragment is left to TC.
const IP_FRAG_MASK: u16 = 0x3fff;

/// `len` bytes at `off`, bounds-checked for the verifier.
#[inline(always)]
fn at(ctx: &XdpContext, off: usize, len: usize) -> Option<usize> {
    let p = ctx.data() + off;
    (p + len <= ctx.data_end()).then_some(p)
}

#[inline(always)]
fn count(f: impl FnOnce(&mut XdpCounters)) {
    if let Some(c) = XDP_COUNTERS.get_ptr_mut(0) {
        f(unsafe { &mut *c });
    }
}

#[inline(always)]
fn pass() -> u32 {
    count(|c| c.passed += 1);
    XDP_PASS
}

#[inline(always)]
fn drop_packet(svc_id: u32) -> u32 {
    count(|c| c.dropped += 1);
    count_service(svc_id, |c| c.drops += 1);
    count_global(|c| c.drops += 1);
    XDP_DROP
}

/// An IPv4 TCP/UDP packet without options or fragmentation.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Option<Tuple> {
    // One constant-length check covers Ethernet, IPv4 and the ports (the
    // verifier tracks constant bounds; a check against the IP total length
    // alone would be optimised into a variable one it cannot follow).
    let eth = at(ctx, 0, L4_OFF + 8)?;
    if unsafe { get::<u16>(eth + 12) } != ETH_P_IP.to_be() {
        return None;
    }
    let iph = eth + ETH_HLEN;
    // Version 4, IHL 5: options (rare) take TC's general parser.
    if unsafe { get::<u8>(iph) } != 0x45 {
        return None;
    }
    if u16::from_be(unsafe { get(iph + 6) }) & IP_FRAG_MASK != 0 {
        return None;
    }
    let proto: u8 = unsafe { get(iph + 9) };
    let l4 = eth + L4_OFF;
    let tcp_flags = if proto == IPPROTO_TCP {
        let tcp = at(ctx, L4_OFF, 20)?;
        unsafe { get::<u8>(tcp + 13) }
    } else {
        0
    };
    let t = Tuple {
        saddr: unsafe { get(iph + 12) },
        daddr: unsafe { get(iph + 16) },
        sport: unsafe { get(l4) },
        dport: unsafe { get(l4 + 2) },
        proto,
        tcp_flags,
    };
    let l4_min = match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        _ => return None,
    };
    let tot_len = usize::from(u16::from_be(unsafe { get(iph + 2) }));
    // Compared as lengths, never added to a packet pointer: older
    // verifiers (6.1) do not bound a byte-swapped value and refuse the
    // pointer arithmetic; black_box keeps LLVM from folding it back.
    let frame_len = core::hint::black_box(ctx.data_end() - ctx.data());
    if tot_len < IP_HLEN + l4_min || ETH_HLEN + tot_len > frame_len {
        return None;
    }
    Some(t)
}

/// Rewrites source (`src`) or destination address and port, patching the
/// IPv4 and L4 checksums (a UDP checksum of 0, "none", stays 0).
#[inline(always)]
fn rewrite(ctx: &XdpContext, proto: u8, src: bool, addr: u32, port: u16) -> Option<()> {
    let iph = at(ctx, ETH_HLEN, IP_HLEN)?;
    let (l4_len, csum_off) = if proto == IPPROTO_TCP {
        (20, 16)
    } else {
        (8, 6)
    };
    let l4 = at(ctx, L4_OFF, l4_len)?;
    let (addr_p, port_p) = if src {
        (iph + 12, l4)
    } else {
        (iph + 16, l4 + 2)
    };
    unsafe {
        let old_addr: u32 = get(addr_p);
        let old_port: u16 = get(port_p);
        put(addr_p, addr);
        put(port_p, port);
        put(iph + 10, csum_replace4(get(iph + 10), old_addr, addr));
        let c: u16 = get(l4 + csum_off);
        if proto == IPPROTO_UDP && c == 0 {
            return Some(());
        }
        let mut c = csum_replace2(csum_replace4(c, old_addr, addr), old_port, port);
        if proto == IPPROTO_UDP && c == 0 {
            c = 0xffff;
        }
        put(l4 + csum_off, c);
    }
    Some(())
}

/// Sets the MACs from the FIB and sends the frame: back out (`XDP_TX`) or
/// to the route's interface.
#[inline(always)]
fn send(ctx: &XdpContext, route: &Route, in_ifindex: u32, svc_id: u32, new_flow: bool) -> u32 {
    let Some(eth) = at(ctx, 0, ETH_HLEN) else {
        return drop_packet(svc_id);
    };
    unsafe {
        put(eth, route.dmac);
        put(eth + 6, route.smac);
    }
    let len = (ctx.data_end() - ctx.data()) as u64;
    let flows = u64::from(new_flow);
    // The flow was counted in Counters when it was opened.
    count_packet(svc_id, len, 0);
    if route.ifindex == in_ifindex {
        count(|c| {
            c.tx += 1;
            c.bytes += len;
            c.new_flows += flows;
        });
        return XDP_TX;
    }
    count(|c| {
        c.redirected += 1;
        c.bytes += len;
        c.new_flows += flows;
    });
    unsafe { bpf_redirect(route.ifindex, 0) as u32 }
}

pub fn run(ctx: &XdpContext) -> u32 {
    let Some(t) = parse(ctx) else {
        return XDP_PASS;
    };
    let in_ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let raw = ctx.ctx as *mut _;
    match flow::target(&t) {
        Target::None => XDP_PASS,
        Target::SnatReply(ct) => {
            // Route first: a packet passed on must be untouched.
            let Some(route) =
                flow::route(raw, in_ifindex, t.proto, ct.addr, ct.nat_addr).filter(|r| r.resolved)
            else {
                return pass();
            };
            if rewrite(ctx, t.proto, true, ct.addr, ct.port).is_none()
                || rewrite(ctx, t.proto, false, ct.nat_addr, ct.nat_port).is_none()
            {
                return drop_packet(ct.svc_id);
            }
            send(ctx, &route, in_ifindex, ct.svc_id, false)
        }
        Target::Frontend(svc) => {
            if !flow::source_allowed(&svc, t.saddr) {
                return drop_packet(svc.id);
            }
            if svc.count == 0 {
                if svc.flags & SVC_F_DROP_EMPTY != 0 {
                    return drop_packet(svc.id);
                }
                // TC answers with ICMP port unreachable.
                return pass();
            }
            let mut to_backend: Option<Route> = None;
            let egress = |backend: u32| {
                to_backend = flow::route(raw, in_ifindex, t.proto, t.saddr, backend);
                to_backend.as_ref().map(|r| r.ifindex)
            };
            let f = match flow::flow(&t, svc, egress) {
                Ok(f) => f,
                Err(_) => return drop_packet(svc.id),
            };
            if f.new {
                count_service(svc.id, |c| c.new_flows += 1);
                count_global(|c| c.new_flows += 1);
            }
            if f.snat.0 == 0 {
                // A local backend: TC translates from the conntrack entry.
                if f.new {
                    count(|c| c.new_flows += 1);
                }
                return pass();
            }
            let route = match to_backend {
                Some(r) => Some(r),
                None => flow::route(raw, in_ifindex, t.proto, f.snat.0, f.backend.addr),
            };
            let Some(route) = route.filter(|r| r.resolved) else {
                // TC continues the flow and resolves the neighbour.
                return pass();
            };
            if rewrite(ctx, t.proto, false, f.backend.addr, f.backend.port).is_none()
                || rewrite(ctx, t.proto, true, f.snat.0, f.snat.1).is_none()
            {
                return drop_packet(svc.id);
            }
            send(ctx, &route, in_ifindex, svc.id, f.new)
        }
    }
}
