//! What the TC and the XDP programs share: which frontend a packet is for,
//! the flow it belongs to (conntrack, or a new one chosen round-robin and
//! recorded), source-NAT port claims and FIB lookups. Packet access stays in
//! each program (`packet.rs` for TC, `xdp.rs`), so a flow opened by XDP is
//! continued by TC from conntrack and the other way round.

use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, bpf_fib_lookup as FibParams,
};
use aya_ebpf::cty::c_void;
use aya_ebpf::helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns};
use aya_ebpf::maps::lpm_trie::Key;
use core::intrinsics::{AtomicOrdering, atomic_xadd};
use proxy_common::*;

use crate::{
    AFFINITY, CONNTRACK, MAGLEV, NODE_IPS, ROUTES, RR_CURSOR, SERVICES, SLOTS, SNAT_ADDRS,
    SOURCE_RANGES,
};

/// `AF_INET`, for the FIB lookup.
const AF_INET: u8 = 2;
/// How many SNAT ports a new flow tries before it is dropped.
const SNAT_ATTEMPTS: u32 = 8;

/// A packet's addresses, ports and protocol, network order, and its TCP
/// flags (0 for UDP).
#[derive(Clone, Copy)]
pub struct Tuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
}

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// The TCP close timeout the agent set (`--conntrack-tcp-close-seconds`).
#[unsafe(no_mangle)]
static KPROXY_CT_TCP_CLOSE_NS: u64 = CT_TCP_CLOSE_TIMEOUT_NS;

/// The TCP close timeout, as the agent set it.
#[inline(always)]
pub fn tcp_close_ns() -> u64 {
    unsafe { core::ptr::read_volatile(&KPROXY_CT_TCP_CLOSE_NS) }
}

/// The live conntrack entry under `key`: refreshed by this packet (and
/// marked closing on a FIN or RST), or — past its timeout — deleted and
/// `None`, so an expired flow never translates a packet again. The first
/// packet through a reply entry marks both entries of the flow replied.
#[inline(always)]
pub fn ct_live(key: &CtKey, tcp_flags: u8) -> Option<CtValue> {
    let p = CONNTRACK.get_ptr_mut(key)?;
    let e = unsafe { &mut *p };
    let now = now();
    let close = tcp_close_ns();
    if now.wrapping_sub(e.seen_ns) > ct_timeout_ns(key.proto, e.flags, close) {
        let _ = CONNTRACK.remove(key);
        return None;
    }
    e.seen_ns = now;
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        e.flags |= CT_F_CLOSING;
    }
    if key.dir == CT_DIR_REPLY && e.flags & CT_F_UNREPLIED != 0 {
        e.flags &= !CT_F_UNREPLIED;
        mark_replied(key, e);
    }
    Some(*e)
}

/// Clears the unreplied flag of the forward entry that goes with reply
/// entry `key` → `v`: client → frontend, the client being the SNAT
/// client, the hairpin backend itself, or the reply's destination.
#[inline(always)]
fn mark_replied(key: &CtKey, v: &CtValue) {
    let (saddr, sport) = if v.nat_addr != 0 {
        (v.nat_addr, v.nat_port)
    } else if key.daddr == crate::hairpin_addr() {
        (key.saddr, key.dport)
    } else {
        (key.daddr, key.dport)
    };
    let fwd = CtKey {
        saddr,
        daddr: v.addr,
        sport,
        dport: v.port,
        proto: key.proto,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    };
    if let Some(f) = CONNTRACK.get_ptr_mut(fwd) {
        unsafe { (*f).flags &= !CT_F_UNREPLIED };
    }
}

impl Tuple {
    fn key(&self, dir: u8) -> CtKey {
        CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            dir,
            _pad: 0,
        }
    }

    /// The live reply-direction entry of this packet, if it is a reply of
    /// ours.
    #[inline(always)]
    pub fn reply_entry(&self) -> Option<CtValue> {
        ct_live(&self.key(CT_DIR_REPLY), self.tcp_flags)
    }
}

/// What a packet is for.
pub enum Target {
    /// Not ours.
    None,
    /// A frontend (ClusterIP, externalIP, LoadBalancer address, nodePort).
    Frontend(SvcValue),
    /// The reply of a source-NATed flow, addressed to the node.
    SnatReply(CtValue),
}

/// Frontend lookup: the address itself, else — for a node address — a
/// source-NAT reply, then the nodePort.
#[inline(always)]
pub fn target(t: &Tuple) -> Target {
    let key = SvcKey {
        addr: t.daddr,
        port: t.dport,
        proto: t.proto,
        _pad: 0,
    };
    if let Some(svc) = unsafe { SERVICES.get(key) } {
        return Target::Frontend(*svc);
    }
    // Short path: anything that is not a frontend and not for the node.
    if unsafe { NODE_IPS.get(t.daddr) }.is_none() {
        return Target::None;
    }
    if let Some(ct) = t.reply_entry()
        && ct.nat_addr != 0
    {
        return Target::SnatReply(ct);
    }
    let nodeport = SvcKey {
        addr: NODEPORT_ADDR,
        ..key
    };
    match unsafe { SERVICES.get(nodeport) } {
        Some(svc) => Target::Frontend(*svc),
        None => Target::None,
    }
}

/// Whether the client may reach the frontend (`loadBalancerSourceRanges`).
#[inline(always)]
pub fn source_allowed(svc: &SvcValue, saddr: u32) -> bool {
    if svc.flags & SVC_F_SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        64,
        SrcRangeKey {
            svc_id: svc.id.to_be(),
            addr: saddr,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// A flow to a frontend.
pub struct Flow {
    pub backend: Backend,
    /// (address, port) it is source-NATed to; address 0: none.
    pub snat: (u32, u16),
    /// Opened by this packet.
    pub new: bool,
}

pub enum FlowError {
    /// `count > 0` but the slot is missing (never with a consistent table).
    NoBackend,
    /// No route to a remote backend, or no free source-NAT port.
    NoSnat,
    /// Conntrack refused an entry.
    Conntrack,
}

/// The flow of a packet to `svc`: its conntrack entry, or a new flow — the
/// next backend round-robin, recorded in both directions. `egress` names
/// the interface a source-NATed flow to that backend address leaves by.
#[inline(always)]
pub fn flow(
    t: &Tuple,
    svc: SvcValue,
    egress: impl FnOnce(u32) -> Option<u32>,
) -> Result<Flow, FlowError> {
    let fwd = t.key(CT_DIR_FORWARD);
    if let Some(ct) = ct_live(&fwd, t.tcp_flags) {
        return Ok(Flow {
            backend: Backend {
                addr: ct.addr,
                port: ct.port,
                flags: 0,
            },
            snat: (ct.nat_addr, ct.nat_port),
            new: false,
        });
    }
    // One clock read for the whole new flow (each costs tens of ns here).
    let now = now();
    let backend = choose_backend(t, svc, now).ok_or(FlowError::NoBackend)?;
    let snat = if backend.flags & BACKEND_F_SNAT != 0 {
        let ifindex = egress(backend.addr).ok_or(FlowError::NoSnat)?;
        claim_snat(t, svc.id, backend, ifindex, now).ok_or(FlowError::NoSnat)?
    } else {
        // A hairpin flow's replies are addressed to the hairpin source.
        let reply = CtKey {
            saddr: backend.addr,
            daddr: if backend.addr == t.saddr {
                crate::hairpin_addr()
            } else {
                t.saddr
            },
            sport: backend.port,
            dport: t.sport,
            proto: t.proto,
            dir: CT_DIR_REPLY,
            _pad: 0,
        };
        let to_frontend = CtValue {
            addr: t.daddr,
            port: t.dport,
            nat_port: 0,
            svc_id: svc.id,
            nat_addr: 0,
            seen_ns: now,
            flags: CT_F_UNREPLIED,
            _pad: 0,
        };
        // Reply entry first: once the forward entry exists a reply can come
        // back, and it must find its way home.
        CONNTRACK
            .insert(reply, to_frontend, 0)
            .map_err(|_| FlowError::Conntrack)?;
        (0, 0)
    };
    let to_backend = CtValue {
        addr: backend.addr,
        port: backend.port,
        nat_port: snat.1,
        svc_id: svc.id,
        nat_addr: snat.0,
        seen_ns: now,
        flags: CT_F_UNREPLIED,
        _pad: 0,
    };
    CONNTRACK
        .insert(fwd, to_backend, 0)
        .map_err(|_| FlowError::Conntrack)?;
    Ok(Flow {
        backend,
        snat,
        new: true,
    })
}

#[inline(always)]
pub fn now() -> u64 {
    // The coarse clock (CLOCK_MONOTONIC_COARSE, a tick's resolution): a
    // cached value, where bpf_ktime_get_ns reads the clock source — 34 ns
    // per packet on a kvm-clock VM. Timeouts are seconds; a tick is ms.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The backend of a new flow: with session affinity, the one this client
/// was bound to within the timeout (refreshed), else [`pick_backend`]'s
/// (and, with affinity, recorded as the client's).
#[inline(always)]
fn choose_backend(t: &Tuple, svc: SvcValue, now: u64) -> Option<Backend> {
    if svc.affinity_secs == 0 {
        return pick_backend(t, svc);
    }
    let key = AffinityKey {
        client: t.saddr,
        svc_id: svc.id,
    };
    if let Some(p) = AFFINITY.get_ptr_mut(key) {
        let e = unsafe { &mut *p };
        if now.wrapping_sub(e.seen_ns) <= u64::from(svc.affinity_secs) * 1_000_000_000 {
            e.seen_ns = now;
            return Some(e.backend);
        }
    }
    let backend = pick_backend(t, svc)?;
    // Best effort: without the entry the client's next flow is simply
    // balanced again.
    let _ = AFFINITY.insert(
        key,
        AffinityValue {
            backend,
            seen_ns: now,
        },
        0,
    );
    Some(backend)
}

/// A new flow's backend by the frontend's algorithm: its Maglev table entry
/// for the flow's hash, else (or while the table is missing) round-robin.
#[inline(always)]
fn pick_backend(t: &Tuple, svc: SvcValue) -> Option<Backend> {
    if svc.flags & SVC_F_MAGLEV != 0
        && let Some(table) = MAGLEV.get_ptr(svc.id)
    {
        let i = maglev_index(flow_hash(t.saddr, t.daddr, t.sport, t.dport, t.proto));
        // SAFETY: `i < MAGLEV_M` (maglev_index), inside the table.
        return Some(unsafe { (table as *const Backend).add(i as usize).read() });
    }
    select_backend(svc)
}

/// Exact round-robin: one atomic cursor per service, shared by all CPUs.
#[inline(always)]
fn select_backend(svc: SvcValue) -> Option<Backend> {
    let cursor = RR_CURSOR.get_ptr_mut(svc.id)?;
    // SeqCst, not Relaxed: a Relaxed fetch-add whose result is used is
    // miscompiled for BPF (returns the addend; llvm issue 210280).
    let turn = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(cursor, 1) };
    let slot = (turn % u64::from(svc.count)) as u32;
    let key = SlotKey {
        svc_id: svc.id,
        slot,
    };
    unsafe { SLOTS.get(key) }.copied()
}

/// A new flow to a backend on another node: the node address of the egress
/// interface and a source port no other flow to that backend uses (the
/// client's own port first), with the reply entry recorded under it.
#[inline(always)]
fn claim_snat(
    t: &Tuple,
    svc_id: u32,
    backend: Backend,
    ifindex: u32,
    now: u64,
) -> Option<(u32, u16)> {
    let addr = match unsafe { SNAT_ADDRS.get(ifindex) } {
        Some(a) => *a,
        None => *unsafe { SNAT_ADDRS.get(0u32) }?,
    };
    let to_client = CtValue {
        addr: t.daddr,
        port: t.dport,
        nat_port: t.sport,
        svc_id,
        nat_addr: t.saddr,
        seen_ns: now,
        flags: CT_F_UNREPLIED,
        _pad: 0,
    };
    let span = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
    // The client's own port only from the SNAT range: below it live the
    // nodePorts, which a reply to the node must never be mistaken for.
    let own = u16::from_be(t.sport) >= SNAT_PORT_MIN;
    let mut attempt = if own { 0 } else { 1 };
    while attempt < SNAT_ATTEMPTS {
        let port = if attempt == 0 {
            t.sport
        } else {
            let h = (t.saddr ^ (u32::from(t.sport) << 16) ^ attempt.wrapping_mul(0x9e37_79b9))
                .wrapping_mul(0x85eb_ca6b);
            (SNAT_PORT_MIN + ((h >> 8) % span) as u16).to_be()
        };
        let reply = CtKey {
            saddr: backend.addr,
            daddr: addr,
            sport: backend.port,
            dport: port,
            proto: t.proto,
            dir: CT_DIR_REPLY,
            _pad: 0,
        };
        if CONNTRACK
            .insert(reply, to_client, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Some((addr, port));
        }
        attempt += 1;
    }
    None
}

/// Where the kernel would forward `saddr → daddr` to: the interface and, if
/// the neighbour is known, the MAC addresses.
pub struct Route {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The neighbour entry exists (the MACs are valid).
    pub resolved: bool,
}

/// Where a packet that arrived on `in_ifindex` goes: a resolved result of
/// the FIB cached in `ROUTES` for [`ROUTE_CACHE_NS`], else the FIB itself
/// (a lookup costs more than the rest of the XDP path together); `ctx` is
/// the program's context (skb or xdp_md).
#[inline(always)]
pub fn route(
    ctx: *mut c_void,
    in_ifindex: u32,
    proto: u8,
    saddr: u32,
    daddr: u32,
) -> Option<Route> {
    let key = RouteKey { daddr, in_ifindex };
    let now = now();
    if let Some(e) = unsafe { ROUTES.get(key) }
        && now.wrapping_sub(e.stamp_ns) < ROUTE_CACHE_NS
    {
        return Some(Route {
            ifindex: e.ifindex,
            smac: e.smac,
            dmac: e.dmac,
            resolved: true,
        });
    }
    let r = fib(ctx, in_ifindex, proto, saddr, daddr)?;
    if r.resolved {
        let entry = RouteEntry {
            ifindex: r.ifindex,
            smac: r.smac,
            dmac: r.dmac,
            _pad: 0,
            stamp_ns: now,
        };
        // Best effort: without the entry the next packet asks the FIB.
        let _ = ROUTES.insert(key, entry, 0);
    }
    Some(r)
}

/// The FIB lookup itself.
#[inline(always)]
fn fib(ctx: *mut c_void, in_ifindex: u32, proto: u8, saddr: u32, daddr: u32) -> Option<Route> {
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.ifindex = in_ifindex;
    p.__bindgen_anon_3.ipv4_src = saddr;
    p.__bindgen_anon_4.ipv4_dst = daddr;
    let rc = unsafe { bpf_fib_lookup(ctx, &mut p, core::mem::size_of::<FibParams>() as i32, 0) };
    let resolved = rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
    // NO_NEIGH still names the interface; TC's redirect_neigh resolves it.
    (resolved || rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH)).then_some(Route {
        ifindex: p.ifindex,
        smac: p.smac,
        dmac: p.dmac,
        resolved,
    })
}
