//! Packet parsing and rewriting for the TC programs.
//!
//! Reads use direct packet access (after `bpf_skb_pull_data` when the headers
//! are not in the linear part). Address and port writes are direct too; the
//! IPv4 header checksum is patched incrementally here, while the L4 checksum
//! goes through `bpf_l4_csum_replace`, because only the kernel knows whether
//! the skb carries a full checksum or a `CHECKSUM_PARTIAL` pseudo-header sum
//! (veth from a local socket) — the helper updates each correctly, and with
//! `BPF_F_MARK_MANGLED_0` it leaves a UDP checksum of zero ("none") alone.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_csum_diff, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes},
    programs::TcContext,
};
use proxy_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

const ETH_HLEN: usize = 14;
const IPV4_MIN_HLEN: usize = 20;
const ETH_P_IP: u16 = 0x0800;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// What the ingress and egress programs need of an IPv4 packet. Addresses,
/// ports and the IP id stay in network byte order.
pub struct Ipv4 {
    pub saddr: u32,
    pub daddr: u32,
    pub proto: u8,
    pub id: u16,
    /// IPv4 header length in bytes (20..=60).
    pub ihl: usize,
    pub more_fragments: bool,
    pub l4: L4Kind,
    /// TCP flags (0 for anything else).
    pub tcp_flags: u8,
}

pub enum L4Kind {
    /// Not TCP or UDP.
    Other,
    /// TCP or UDP, non-first fragment: no L4 header in this packet.
    LaterFragment,
    /// TCP or UDP with its header present.
    Ports { sport: u16, dport: u16 },
}

pub enum Parsed {
    NotIpv4,
    /// EtherType says IPv4 but the header cannot be trusted: version != 4,
    /// IHL < 5, total length shorter than the header or longer than the
    /// frame, or the L4 header cut off.
    Malformed,
    Ipv4(Ipv4),
}

/// Makes the first `len` bytes readable by direct access. `false` when the
/// packet is shorter than that.
#[inline(always)]
pub(crate) fn linear(ctx: &TcContext, len: usize) -> bool {
    if ctx.data() + len <= ctx.data_end() {
        return true;
    }
    if (ctx.len() as usize) < len {
        return false;
    }
    ctx.pull_data(len as u32).is_ok() && ctx.data() + len <= ctx.data_end()
}

/// Address of `len` bytes at `off` in the packet, bounds-checked for the
/// verifier. Fields are then read at constant offsets from it, so each
/// header costs one check (and no value is ever "maybe uninitialised").
#[inline(always)]
pub(crate) fn at(ctx: &TcContext, off: usize, len: usize) -> Option<usize> {
    let p = ctx.data() + off;
    if p + len > ctx.data_end() {
        return None;
    }
    Some(p)
}

/// Reads a `T` at a packet address already bounds-checked (shared with
/// `xdp.rs`).
#[inline(always)]
pub unsafe fn get<T: Copy>(p: usize) -> T {
    unsafe { *(p as *const T) }
}

/// Writes a `T` at a packet address already bounds-checked.
#[inline(always)]
pub unsafe fn put<T: Copy>(p: usize, v: T) {
    unsafe { *(p as *mut T) = v }
}

#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext) -> Parsed {
    if !linear(ctx, ETH_HLEN) {
        return Parsed::NotIpv4;
    }
    let Some(eth) = at(ctx, 0, ETH_HLEN) else {
        return Parsed::NotIpv4;
    };
    if unsafe { get::<u16>(eth + 12) } != ETH_P_IP.to_be() {
        return Parsed::NotIpv4;
    }
    if !linear(ctx, ETH_HLEN + IPV4_MIN_HLEN) {
        return Parsed::Malformed;
    }
    let Some(iph) = at(ctx, ETH_HLEN, IPV4_MIN_HLEN) else {
        return Parsed::Malformed;
    };
    let vihl: u8 = unsafe { get(iph) };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Parsed::Malformed;
    }
    let tot_len = usize::from(u16::from_be(unsafe { get(iph + 2) }));
    if tot_len < ihl || (ctx.len() as usize) < ETH_HLEN + tot_len {
        return Parsed::Malformed;
    }
    let frag = u16::from_be(unsafe { get(iph + 6) });
    let proto: u8 = unsafe { get(iph + 9) };
    let mut ip = Ipv4 {
        saddr: unsafe { get(iph + 12) },
        daddr: unsafe { get(iph + 16) },
        proto,
        id: unsafe { get(iph + 4) },
        ihl,
        more_fragments: frag & IP_MF != 0,
        l4: L4Kind::Other,
        tcp_flags: 0,
    };
    let l4_min = match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        _ => return Parsed::Ipv4(ip),
    };
    if frag & IP_OFFSET_MASK != 0 {
        ip.l4 = L4Kind::LaterFragment;
        return Parsed::Ipv4(ip);
    }
    if tot_len < ihl + l4_min || !linear(ctx, ETH_HLEN + ihl + l4_min) {
        return Parsed::Malformed;
    }
    let Some(l4) = at(ctx, ETH_HLEN + (ihl & 0x3c), 4) else {
        return Parsed::Malformed;
    };
    ip.l4 = L4Kind::Ports {
        sport: unsafe { get(l4) },
        dport: unsafe { get(l4 + 2) },
    };
    if proto == IPPROTO_TCP {
        // The whole TCP header is linear (l4_min above).
        let Some(flags) = at(ctx, ETH_HLEN + (ihl & 0x3c) + 13, 1) else {
            return Parsed::Malformed;
        };
        ip.tcp_flags = unsafe { get(flags) };
    }
    Parsed::Ipv4(ip)
}

#[derive(Clone, Copy)]
pub enum Side {
    Source,
    Destination,
}

/// Rewrites the source or destination address and port, fixing the IPv4 and
/// L4 checksums.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, ip: &Ipv4, side: Side, addr: u32, port: u16) -> Result<(), ()> {
    let l4 = ETH_HLEN + (ip.ihl & 0x3c);
    let (csum_off, flags) = if ip.proto == IPPROTO_TCP {
        (l4 + 16, 0)
    } else {
        (l4 + 6, u64::from(BPF_F_MARK_MANGLED_0))
    };
    let iph = at(ctx, ETH_HLEN, IPV4_MIN_HLEN).ok_or(())?;
    let ports = at(ctx, l4, 4).ok_or(())?;
    let (addr_p, port_p) = match side {
        Side::Source => (iph + 12, ports),
        Side::Destination => (iph + 16, ports + 2),
    };
    let old_addr: u32;
    let old_port: u16;
    unsafe {
        old_addr = get(addr_p);
        old_port = get(port_p);
        let ip_csum: u16 = get(iph + 10);
        put(addr_p, addr);
        put(port_p, port);
        put(iph + 10, csum_replace4(ip_csum, old_addr, addr));
    }
    // The helpers below invalidate packet pointers; nothing reads after them.
    ctx.l4_csum_replace(
        csum_off,
        u64::from(old_addr),
        u64::from(addr),
        u64::from(BPF_F_PSEUDO_HDR) | flags | 4,
    )
    .map_err(|_| ())?;
    ctx.l4_csum_replace(csum_off, u64::from(old_port), u64::from(port), flags | 2)
        .map_err(|_| ())
}

/// Swaps the source and destination MAC addresses, so that the frame can be
/// sent back out of the interface it came in on, to the host that sent it.
#[inline(always)]
pub fn swap_macs(ctx: &TcContext) -> Result<(), ()> {
    let eth = at(ctx, 0, ETH_HLEN).ok_or(())?;
    unsafe {
        let dst: [u8; 6] = get(eth);
        let src: [u8; 6] = get(eth + 6);
        put(eth, src);
        put(eth + 6, dst);
    }
    Ok(())
}

/// Rewrites only the destination address (non-first fragments carry no L4
/// header; the first fragment's L4 checksum already covers the new address).
#[inline(always)]
pub fn rewrite_l3_only(ctx: &TcContext, addr: u32) -> Result<(), ()> {
    let iph = at(ctx, ETH_HLEN, IPV4_MIN_HLEN).ok_or(())?;
    unsafe {
        let old: u32 = get(iph + 16);
        let csum: u16 = get(iph + 10);
        put(iph + 16, addr);
        put(iph + 10, csum_replace4(csum, old, addr));
    }
    Ok(())
}

/// Turns the packet into an ICMP "port unreachable" from the frontend back
/// to the client (RFC 792: quotes the IP header and the first 8 bytes of the
/// L4 header). The caller redirects it out of the interface it came in on.
#[inline(always)]
pub fn build_port_unreachable(ctx: &TcContext, ip: &Ipv4) -> Result<(), ()> {
    let skb = ctx.skb.skb;
    let quoted = (ip.ihl & 0x3c) + 8; // 28..=68 bytes
    // ICMP header (8) + quoted original bytes (at most 68).
    let mut icmp = [0u8; 76];
    let mut eth = [0u8; 14];
    unsafe {
        if bpf_skb_load_bytes(
            skb.cast(),
            ETH_HLEN as u32,
            icmp[8..].as_mut_ptr().cast(),
            quoted as u32,
        ) != 0
            || bpf_skb_load_bytes(skb.cast(), 0, eth.as_mut_ptr().cast(), 12) != 0
        {
            return Err(());
        }
    }
    icmp[0] = 3; // destination unreachable
    icmp[1] = 3; // port unreachable
    let icmp_len = 8 + quoted;
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            icmp.as_mut_ptr().cast(),
            icmp_len as u32,
            0,
        )
    };
    if sum < 0 {
        return Err(());
    }
    let icmp_csum = !fold(sum as u64);
    icmp[2..4].copy_from_slice(&icmp_csum.to_ne_bytes());

    let tot_len = (IPV4_MIN_HLEN + icmp_len) as u16;
    let mut iph = [0u8; 20];
    iph[0] = 0x45;
    iph[1] = 0xc0; // precedence "internetwork control", as the kernel's ICMP
    iph[2..4].copy_from_slice(&tot_len.to_be_bytes());
    iph[8] = 64;
    iph[9] = IPPROTO_ICMP;
    iph[12..16].copy_from_slice(&ip.daddr.to_ne_bytes());
    iph[16..20].copy_from_slice(&ip.saddr.to_ne_bytes());
    let mut sum = 0u64;
    let mut i = 0;
    while i < 20 {
        sum += u64::from(u16::from_ne_bytes([iph[i], iph[i + 1]]));
        i += 2;
    }
    iph[10..12].copy_from_slice(&(!fold(sum)).to_ne_bytes());

    // Back to where it came from: swap the MAC addresses.
    let mut new_eth = [0u8; 14];
    new_eth[0..6].copy_from_slice(&eth[6..12]);
    new_eth[6..12].copy_from_slice(&eth[0..6]);
    new_eth[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());

    let new_len = (ETH_HLEN + IPV4_MIN_HLEN + icmp_len) as u32;
    unsafe {
        if bpf_skb_change_tail(skb, new_len, 0) != 0
            || bpf_skb_store_bytes(skb, 0, new_eth.as_ptr().cast(), 14, 0) != 0
            || bpf_skb_store_bytes(skb, ETH_HLEN as u32, iph.as_ptr().cast(), 20, 0) != 0
            || bpf_skb_store_bytes(
                skb,
                (ETH_HLEN + IPV4_MIN_HLEN) as u32,
                icmp.as_ptr().cast(),
                icmp_len as u32,
                0,
            ) != 0
        {
            return Err(());
        }
    }
    Ok(())
}

/// RFC 1624 incremental update of a checksum for a 32-bit field change.
/// Works on the raw (network-order) values as loaded from the packet.
#[inline(always)]
pub fn csum_replace4(check: u16, from: u32, to: u32) -> u16 {
    let sum = u64::from(!check)
        + u64::from(!from >> 16)
        + u64::from(!from & 0xffff)
        + u64::from(to >> 16)
        + u64::from(to & 0xffff);
    !fold(sum)
}

/// [`csum_replace4`] for a 16-bit field.
#[inline(always)]
pub fn csum_replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = u64::from(!check) + u64::from(!from) + u64::from(to);
    !fold(sum)
}

#[inline(always)]
pub(crate) fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}
