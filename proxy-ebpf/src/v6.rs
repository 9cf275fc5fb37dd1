//! IPv6 ClusterIPs: the same steps as the IPv4 path in `main.rs` and
//! `flow.rs` — frontend lookup, conntrack or a new flow (session affinity,
//! Maglev or exact round-robin on the cursor both families share), DNAT,
//! reverse NAT of replies, ICMPv6 port unreachable for a frontend without
//! endpoints, hairpin — over `SERVICES6`, `SLOTS6`, `CONNTRACK6` and
//! `AFFINITY6`. Only TCP or UDP directly after the fixed header is ours: a
//! packet with extension headers is passed on untouched (as are ICMPv6
//! and everything else), so neighbour discovery never meets a lookup.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    helpers::{bpf_csum_diff, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes},
    macros::map,
    maps::{HashMap, LruHashMap},
    programs::TcContext,
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};
use proxy_common::*;

use crate::packet::{at, fold, get, linear, put, swap_macs};
use crate::{MAGLEV, RR_CURSOR, TC_ACT_UNSPEC};

#[map]
static SERVICES6: HashMap<SvcKey6, SvcValue> =
    HashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);
#[map]
static SLOTS6: HashMap<SlotKey, Backend6> = HashMap::with_max_entries(MAX_SLOTS, BPF_F_NO_PREALLOC);
#[map]
static CONNTRACK6: LruHashMap<CtKey6, CtValue6> = LruHashMap::with_max_entries(MAX_CONNTRACK6, 0);
#[map]
static AFFINITY6: LruHashMap<AffinityKey6, AffinityValue6> =
    LruHashMap::with_max_entries(MAX_AFFINITY6, 0);

const ETH_HLEN: usize = 14;
const IPV6_HLEN: usize = 40;
const L4: usize = ETH_HLEN + IPV6_HLEN;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// What the programs need of a TCP or UDP packet over IPv6. Addresses
/// and ports in network order.
pub struct Ipv6 {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
}

enum Parsed {
    /// Not IPv6, or not TCP/UDP right after the fixed header.
    NotOurs,
    /// EtherType IPv6, but version != 6, a payload length past the frame
    /// or a cut L4 header.
    Malformed,
    Ipv6(Ipv6),
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Parsed {
    let Some(eth) = at(ctx, 0, ETH_HLEN) else {
        return Parsed::NotOurs;
    };
    if unsafe { get::<u16>(eth + 12) } != ETH_P_IPV6.to_be() {
        return Parsed::NotOurs;
    }
    if !linear(ctx, L4) {
        return Parsed::Malformed;
    }
    let Some(ip6) = at(ctx, ETH_HLEN, IPV6_HLEN) else {
        return Parsed::Malformed;
    };
    let version: u8 = unsafe { get(ip6) };
    let payload = usize::from(u16::from_be(unsafe { get(ip6 + 4) }));
    if version >> 4 != 6 || (ctx.len() as usize) < L4 + payload {
        return Parsed::Malformed;
    }
    let proto: u8 = unsafe { get(ip6 + 6) };
    let l4_min = match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        _ => return Parsed::NotOurs,
    };
    let saddr: [u32; 4] = unsafe { get(ip6 + 8) };
    let daddr: [u32; 4] = unsafe { get(ip6 + 24) };
    if payload < l4_min || !linear(ctx, L4 + l4_min) {
        return Parsed::Malformed;
    }
    let Some(l4) = at(ctx, L4, 14) else {
        // A UDP header is 8 bytes; read the ports only.
        let Some(l4) = at(ctx, L4, 4) else {
            return Parsed::Malformed;
        };
        return Parsed::Ipv6(Ipv6 {
            saddr,
            daddr,
            proto,
            sport: unsafe { get(l4) },
            dport: unsafe { get(l4 + 2) },
            tcp_flags: 0,
        });
    };
    Parsed::Ipv6(Ipv6 {
        saddr,
        daddr,
        proto,
        sport: unsafe { get(l4) },
        dport: unsafe { get(l4 + 2) },
        tcp_flags: if proto == IPPROTO_TCP {
            unsafe { get(l4 + 13) }
        } else {
            0
        },
    })
}

/// `HAIRPIN_SNAT_IP6` as the header holds it.
#[inline(always)]
fn hairpin_addr() -> [u32; 4] {
    let b = HAIRPIN_SNAT_IP6;
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// Client → ClusterIP (and hairpin replies); anything else is not ours.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    let ip = match parse(ctx) {
        Parsed::NotOurs => return TC_ACT_UNSPEC,
        Parsed::Malformed => {
            crate::count_global(|c| c.malformed += 1);
            return TC_ACT_UNSPEC;
        }
        Parsed::Ipv6(ip) => ip,
    };
    if ip.daddr == hairpin_addr() {
        return hairpin_reply(ctx, &ip);
    }
    let key = SvcKey6 {
        addr: ip.daddr,
        port: ip.dport,
        proto: ip.proto,
        _pad: 0,
    };
    let Some(svc) = (unsafe { SERVICES6.get(key) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    if svc.count == 0 {
        return reject(ctx, &ip, svc.id);
    }
    forward(ctx, &ip, svc)
}

/// Backend → client: the reply's source back to the ClusterIP.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    let Parsed::Ipv6(ip) = parse(ctx) else {
        return TC_ACT_UNSPEC;
    };
    let Some(ct) = ct_live(&key(&ip, CT_DIR_REPLY), ip.tcp_flags) else {
        return TC_ACT_UNSPEC;
    };
    if rewrite(ctx, &ip, Side::Source, ct.addr, ct.port).is_err() {
        return crate::drop_packet(ct.svc_id);
    }
    crate::count_packet(ct.svc_id, u64::from(ctx.len()), 0);
    TC_ACT_OK
}

#[inline(always)]
fn key(ip: &Ipv6, dir: u8) -> CtKey6 {
    CtKey6 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: ip.sport,
        dport: ip.dport,
        proto: ip.proto,
        dir,
        _pad: 0,
    }
}

/// As `flow::ct_live`, over `CONNTRACK6`.
#[inline(always)]
fn ct_live(key: &CtKey6, tcp_flags: u8) -> Option<CtValue6> {
    let p = CONNTRACK6.get_ptr_mut(key)?;
    let e = unsafe { &mut *p };
    let now = crate::flow::now();
    let close = crate::flow::tcp_close_ns();
    if now.wrapping_sub(e.seen_ns) > ct_timeout_ns(key.proto, e.flags, close) {
        let _ = CONNTRACK6.remove(key);
        return None;
    }
    e.seen_ns = now;
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        e.flags |= CT_F_CLOSING;
    }
    if key.dir == CT_DIR_REPLY && e.flags & CT_F_UNREPLIED != 0 {
        e.flags &= !CT_F_UNREPLIED;
        // The forward entry: client (the reply's destination, or the
        // hairpin backend itself) → frontend.
        let client = if key.daddr == hairpin_addr() {
            key.saddr
        } else {
            key.daddr
        };
        let fwd = CtKey6 {
            saddr: client,
            daddr: e.addr,
            sport: key.dport,
            dport: e.port,
            proto: key.proto,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        if let Some(f) = CONNTRACK6.get_ptr_mut(fwd) {
            unsafe { (*f).flags &= !CT_F_UNREPLIED };
        }
    }
    Some(*e)
}

/// The flow's backend (conntrack, or a new flow recorded both ways), then
/// DNAT; a backend reaching itself gets the hairpin source and is sent
/// back out of its own interface.
#[inline(always)]
fn forward(ctx: &TcContext, ip: &Ipv6, svc: SvcValue) -> i32 {
    let fwd = key(ip, CT_DIR_FORWARD);
    let (backend, new_flow) = match ct_live(&fwd, ip.tcp_flags) {
        Some(ct) => (
            Backend6 {
                addr: ct.addr,
                port: ct.port,
                flags: 0,
            },
            false,
        ),
        None => {
            let now = crate::flow::now();
            let Some(backend) = choose_backend(ip, svc, now) else {
                return crate::drop_packet(svc.id);
            };
            let reply = CtKey6 {
                saddr: backend.addr,
                daddr: if backend.addr == ip.saddr {
                    hairpin_addr()
                } else {
                    ip.saddr
                },
                sport: backend.port,
                dport: ip.sport,
                proto: ip.proto,
                dir: CT_DIR_REPLY,
                _pad: 0,
            };
            let entry = |addr, port| CtValue6 {
                addr,
                port,
                _pad0: 0,
                svc_id: svc.id,
                seen_ns: now,
                flags: CT_F_UNREPLIED,
                _pad: 0,
            };
            // Reply entry first, as for IPv4.
            if CONNTRACK6
                .insert(reply, entry(ip.daddr, ip.dport), 0)
                .is_err()
                || CONNTRACK6
                    .insert(fwd, entry(backend.addr, backend.port), 0)
                    .is_err()
            {
                return crate::drop_packet(svc.id);
            }
            (backend, true)
        }
    };
    if rewrite(ctx, ip, Side::Destination, backend.addr, backend.port).is_err() {
        return crate::drop_packet(svc.id);
    }
    let hairpin = backend.addr == ip.saddr;
    if hairpin
        && (rewrite(ctx, ip, Side::Source, hairpin_addr(), ip.sport).is_err()
            || swap_macs(ctx).is_err())
    {
        return crate::drop_packet(svc.id);
    }
    crate::count_packet(svc.id, u64::from(ctx.len()), u64::from(new_flow));
    if hairpin {
        return crate::back_where_it_came_from(ctx);
    }
    TC_ACT_OK
}

/// As `flow::choose_backend`, over `AFFINITY6`.
#[inline(always)]
fn choose_backend(ip: &Ipv6, svc: SvcValue, now: u64) -> Option<Backend6> {
    if svc.affinity_secs == 0 {
        return pick_backend(ip, svc);
    }
    let key = AffinityKey6 {
        client: ip.saddr,
        svc_id: svc.id,
    };
    if let Some(p) = AFFINITY6.get_ptr_mut(key) {
        let e = unsafe { &mut *p };
        if now.wrapping_sub(e.seen_ns) <= u64::from(svc.affinity_secs) * 1_000_000_000 {
            e.seen_ns = now;
            return Some(e.backend);
        }
    }
    let backend = pick_backend(ip, svc)?;
    let _ = AFFINITY6.insert(
        key,
        AffinityValue6 {
            backend,
            _pad: 0,
            seen_ns: now,
        },
        0,
    );
    Some(backend)
}

/// The slot of a new flow: the Maglev table's entry (which holds slot
/// numbers for IPv6 frontends), else the shared round-robin cursor.
#[inline(always)]
fn pick_backend(ip: &Ipv6, svc: SvcValue) -> Option<Backend6> {
    let slot = if svc.flags & SVC_F_MAGLEV != 0
        && let Some(table) = MAGLEV.get_ptr(svc.id)
    {
        let i = maglev_index(flow_hash6(ip.saddr, ip.daddr, ip.sport, ip.dport, ip.proto));
        // SAFETY: `i < MAGLEV_M` (maglev_index), inside the table.
        unsafe { (table as *const Backend).add(i as usize).read() }.addr
    } else {
        let cursor = RR_CURSOR.get_ptr_mut(svc.id)?;
        // SeqCst: see flow::select_backend.
        let turn = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(cursor, 1) };
        (turn % u64::from(svc.count)) as u32
    };
    unsafe {
        SLOTS6.get(SlotKey {
            svc_id: svc.id,
            slot,
        })
    }
    .copied()
}

/// A backend answering a hairpin flow (backend → hairpin address): leaves
/// as ClusterIP → backend, back out of the interface it came in on.
#[inline(always)]
fn hairpin_reply(ctx: &TcContext, ip: &Ipv6) -> i32 {
    let Some(ct) = ct_live(&key(ip, CT_DIR_REPLY), ip.tcp_flags) else {
        return TC_ACT_UNSPEC;
    };
    if rewrite(ctx, ip, Side::Source, ct.addr, ct.port).is_err()
        || rewrite(ctx, ip, Side::Destination, ip.saddr, ip.dport).is_err()
        || swap_macs(ctx).is_err()
    {
        return crate::drop_packet(ct.svc_id);
    }
    crate::count_packet(ct.svc_id, u64::from(ctx.len()), 0);
    crate::back_where_it_came_from(ctx)
}

#[derive(Clone, Copy)]
enum Side {
    Source,
    Destination,
}

/// Rewrites an address and port and patches the L4 checksum (IPv6 has no
/// header checksum; the pseudo-header's addresses are in the L4 one).
#[inline(always)]
fn rewrite(ctx: &TcContext, ip: &Ipv6, side: Side, addr: [u32; 4], port: u16) -> Result<(), ()> {
    let (csum_off, flags) = if ip.proto == IPPROTO_TCP {
        (L4 + 16, 0)
    } else {
        (L4 + 6, u64::from(BPF_F_MARK_MANGLED_0))
    };
    let ip6 = at(ctx, ETH_HLEN, IPV6_HLEN).ok_or(())?;
    let ports = at(ctx, L4, 4).ok_or(())?;
    let (addr_p, port_p) = match side {
        Side::Source => (ip6 + 8, ports),
        Side::Destination => (ip6 + 24, ports + 2),
    };
    let old: [u32; 4];
    let new = addr;
    let old_port: u16;
    unsafe {
        old = get(addr_p);
        old_port = get(port_p);
        put(addr_p, addr);
        put(port_p, port);
    }
    // The checksum difference of the address, summed here: cheaper than
    // the bpf_csum_diff helper (one call less per packet).
    let mut sum = 0u64;
    let mut i = 0;
    while i < 4 {
        sum += u64::from(!old[i]) + u64::from(new[i]);
        i += 1;
    }
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    // The helpers below invalidate packet pointers; nothing reads after them.
    ctx.l4_csum_replace(csum_off, 0, sum, u64::from(BPF_F_PSEUDO_HDR) | flags)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(csum_off, u64::from(old_port), u64::from(port), flags | 2)
        .map_err(|_| ())
}

/// No ready endpoints: refused at once, from the ClusterIP, sent back out
/// of the interface the packet came in on. UDP gets ICMPv6 destination
/// unreachable, port unreachable (RFC 4443: code 4). TCP gets a reset:
/// Linux's IPv6 TCP drops an ICMPv6 error that arrives while `connect()`
/// still holds the socket (`LockDroppedIcmps`), which it does when the
/// answer comes back within the SYN's own transmission, as over a veth,
/// so the client would see the refusal only with its retransmission a
/// second later; a reset is queued for the socket's owner instead.
#[inline(always)]
fn reject(ctx: &TcContext, ip: &Ipv6, svc_id: u32) -> i32 {
    let len = u64::from(ctx.len());
    let built = if ip.proto == IPPROTO_TCP {
        build_tcp_reset(ctx, ip)
    } else {
        build_port_unreachable(ctx, ip)
    };
    if built.is_err() {
        return crate::drop_packet(svc_id);
    }
    crate::count_service(svc_id, |c| {
        c.packets += 1;
        c.bytes += len;
        c.rejects += 1;
    });
    crate::count_global(|c| {
        c.packets += 1;
        c.bytes += len;
        c.rejects += 1;
    });
    crate::back_where_it_came_from(ctx)
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_HLEN: usize = 20;

/// Turns a TCP segment into the reset RFC 9293 answers it with in the
/// CLOSED state: `<SEQ=SEG.ACK><CTL=RST>` if it carries an ACK, else
/// `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`; ports and addresses
/// swapped, MAC addresses too.
#[inline(always)]
fn build_tcp_reset(ctx: &TcContext, ip: &Ipv6) -> Result<(), ()> {
    let skb = ctx.skb.skb;
    let ip6 = at(ctx, ETH_HLEN, IPV6_HLEN).ok_or(())?;
    let th = at(ctx, L4, TCP_HLEN).ok_or(())?;
    let eth = at(ctx, 0, ETH_HLEN).ok_or(())?;
    let (payload, seq, ack, doff, flags, dmac, smac) = unsafe {
        (
            u32::from(u16::from_be(get(ip6 + 4))),
            u32::from_be(get(th + 4)),
            u32::from_be(get(th + 8)),
            u32::from(get::<u8>(th + 12) >> 4) * 4,
            get::<u8>(th + 13),
            get::<[u8; 6]>(eth),
            get::<[u8; 6]>(eth + 6),
        )
    };
    let seg_len = payload.saturating_sub(doff)
        + u32::from(flags & TCP_SYN != 0)
        + u32::from(flags & TCP_FIN != 0);
    let (rseq, rack, rflags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        (0, seq.wrapping_add(seg_len), TCP_RST | TCP_ACK)
    };
    let mut tcp = [0u8; TCP_HLEN];
    tcp[0..2].copy_from_slice(&ip.dport.to_ne_bytes());
    tcp[2..4].copy_from_slice(&ip.sport.to_ne_bytes());
    tcp[4..8].copy_from_slice(&rseq.to_be_bytes());
    tcp[8..12].copy_from_slice(&rack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = rflags;
    let csum = l4_checksum(ip, IPPROTO_TCP, &mut tcp)?;
    tcp[16..18].copy_from_slice(&csum.to_ne_bytes());
    // Back to where it came from: the MAC addresses swapped.
    let hdr = reply_header(ip, dmac, smac, IPPROTO_TCP, TCP_HLEN as u16);
    unsafe {
        if bpf_skb_change_tail(skb, (L4 + TCP_HLEN) as u32, 0) != 0
            || bpf_skb_store_bytes(skb, 0, hdr.as_ptr().cast(), hdr.len() as u32, 0) != 0
            || bpf_skb_store_bytes(skb, L4 as u32, tcp.as_ptr().cast(), TCP_HLEN as u32, 0) != 0
        {
            return Err(());
        }
    }
    Ok(())
}

/// The checksum of an upper-layer message from the ClusterIP to the
/// client (RFC 8200 pseudo-header), ready to store.
#[inline(always)]
fn l4_checksum<const N: usize>(ip: &Ipv6, proto: u8, msg: &mut [u8; N]) -> Result<u16, ()> {
    let mut pseudo = [0u32; 10];
    pseudo[..4].copy_from_slice(&ip.daddr);
    pseudo[4..8].copy_from_slice(&ip.saddr);
    pseudo[8] = (N as u32).to_be();
    pseudo[9] = u32::from(proto).to_be();
    let sum = unsafe {
        let s = bpf_csum_diff(core::ptr::null_mut(), 0, pseudo.as_mut_ptr(), 40, 0);
        if s < 0 {
            return Err(());
        }
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            msg.as_mut_ptr().cast(),
            N as u32,
            s as u32,
        )
    };
    if sum < 0 {
        return Err(());
    }
    Ok(!fold(sum as u64))
}

/// Ethernet (from `smac` to `dmac`) and IPv6 header of a reply from the
/// ClusterIP to the client carrying `len` bytes of `proto`.
#[inline(always)]
fn reply_header(
    ip: &Ipv6,
    smac: [u8; 6],
    dmac: [u8; 6],
    proto: u8,
    len: u16,
) -> [u8; ETH_HLEN + IPV6_HLEN] {
    let mut hdr = [0u8; ETH_HLEN + IPV6_HLEN];
    hdr[0..6].copy_from_slice(&dmac);
    hdr[6..12].copy_from_slice(&smac);
    hdr[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    hdr[14] = 0x60;
    hdr[18..20].copy_from_slice(&len.to_be_bytes());
    hdr[20] = proto;
    hdr[21] = 64;
    let mut i = 0;
    while i < 4 {
        hdr[22 + 4 * i..26 + 4 * i].copy_from_slice(&ip.daddr[i].to_ne_bytes());
        hdr[38 + 4 * i..42 + 4 * i].copy_from_slice(&ip.saddr[i].to_ne_bytes());
        i += 1;
    }
    hdr
}

/// ICMPv6 header (8) and the quoted IPv6 header and 8 L4 bytes.
const ICMP_LEN: usize = 8 + IPV6_HLEN + 8;

#[inline(always)]
fn build_port_unreachable(ctx: &TcContext, ip: &Ipv6) -> Result<(), ()> {
    let skb = ctx.skb.skb;
    let mut msg = [0u8; ICMP_LEN];
    let mut eth = [0u8; 12];
    unsafe {
        if bpf_skb_load_bytes(
            skb.cast(),
            ETH_HLEN as u32,
            msg[8..].as_mut_ptr().cast(),
            (IPV6_HLEN + 8) as u32,
        ) != 0
            || bpf_skb_load_bytes(skb.cast(), 0, eth.as_mut_ptr().cast(), 12) != 0
        {
            return Err(());
        }
    }
    msg[0] = 1; // destination unreachable
    msg[1] = 4; // port unreachable
    let csum = l4_checksum(ip, IPPROTO_ICMPV6, &mut msg)?;
    msg[2..4].copy_from_slice(&csum.to_ne_bytes());
    let mut smac = [0u8; 6];
    let mut dmac = [0u8; 6];
    dmac.copy_from_slice(&eth[0..6]);
    smac.copy_from_slice(&eth[6..12]);
    // Back to where it came from: the MAC addresses swapped.
    let hdr = reply_header(ip, dmac, smac, IPPROTO_ICMPV6, ICMP_LEN as u16);
    unsafe {
        if bpf_skb_change_tail(skb, (L4 + ICMP_LEN) as u32, 0) != 0
            || bpf_skb_store_bytes(skb, 0, hdr.as_ptr().cast(), hdr.len() as u32, 0) != 0
            || bpf_skb_store_bytes(skb, L4 as u32, msg.as_ptr().cast(), ICMP_LEN as u32, 0) != 0
        {
            return Err(());
        }
    }
    Ok(())
}
