//! Map layouts shared by the kproxy eBPF programs (`proxy-ebpf`) and the agent
//! (`proxy-user`). Every key and value is `#[repr(C)]` with explicit padding
//! fields so that kernel and user side agree byte for byte and no
//! uninitialised padding ever reaches a hash.
//!
//! Addresses and ports are stored in **network byte order** exactly as they
//! appear in the packet, so the datapath never swaps bytes.
//!
//! # Maps (who writes, who reads)
//!
//! | map | type | key → value | written by | read by |
//! |---|---|---|---|---|
//! | `SERVICES` | hash | [`SvcKey`] → [`SvcValue`] | agent | ingress |
//! | `SLOTS` | hash | [`SlotKey`] → [`Backend`] | agent | ingress |
//! | `RR_CURSOR` | array | service id → `u64` | ingress (atomic add); agent zeroes on id reuse | ingress |
//! | `CONNTRACK` | LRU hash | [`CtKey`] → [`CtValue`] | ingress (new flows); agent deletes flows of removed backends | ingress, egress, agent |
//! | `FRAGS` | LRU hash | [`FragKey`] → [`Backend`] | ingress (first fragment) | ingress (later fragments) |
//! | `SVC_COUNTERS` | per-CPU array | service id → [`Counters`] | ingress | agent |
//! | `GLOBAL_COUNTERS` | per-CPU array | `0` → [`Counters`] | ingress, egress | agent |
//! | `NODE_IPS` | hash | node address (`u32`) → `u32` (unused, `1`) | agent (at start) | ingress |
//! | `SNAT_ADDRS` | hash | ifindex (`u32`) → address (`u32`) | agent (at start) | ingress |
//! | `ROUTES` | LRU hash | [`RouteKey`] → [`RouteEntry`] | ingress, XDP (a cache of FIB lookups) | ingress, XDP |
//! | `XDP_COUNTERS` | per-CPU array | `0` → [`XdpCounters`] | XDP | agent |
//! | `SOURCE_RANGES` | LPM trie | (prefix `32 + len`, [`SrcRangeKey`]) → `u32` (unused, `1`) | agent | ingress |
//! | `MAGLEV` | hash, not preallocated | service id → [`MaglevTable`] | agent (frontends with [`SVC_F_MAGLEV`]) | ingress, XDP |
//! | `AFFINITY` | LRU hash | [`AffinityKey`] → [`AffinityValue`] | ingress, XDP (new flows of a frontend with `affinity_secs`); agent deletes entries of removed backends and services | ingress, XDP, agent |
//! | `SERVICES6` | hash, not preallocated | [`SvcKey6`] → [`SvcValue`] | agent | ingress |
//! | `SLOTS6` | hash, not preallocated | [`SlotKey`] → [`Backend6`] | agent | ingress |
//! | `CONNTRACK6` | LRU hash | [`CtKey6`] → [`CtValue6`] | ingress (new flows); agent | ingress, egress, agent |
//! | `AFFINITY6` | LRU hash | [`AffinityKey6`] → [`AffinityValue6`] | ingress; agent | ingress, agent |
//!
//! IPv6: a ClusterIP of the IPv6 family is a `SERVICES6` entry whose
//! [`SvcValue`] draws its id from the same space as IPv4 frontends, so
//! `RR_CURSOR`, `SVC_COUNTERS` and `MAGLEV` serve both families; its
//! backends live in `SLOTS6`. The IPv6 path translates ClusterIPs only
//! (no nodePort, source NAT, fragments or XDP) and, like the IPv4 one,
//! keeps its own conntrack (`CONNTRACK6`) and affinity (`AFFINITY6`). A
//! Maglev table of an IPv6 frontend holds slot numbers in
//! `Backend::addr` (the program then reads `SLOTS6`), because a
//! [`Backend`] has no room for an IPv6 address.
//!
//! North-south: a NodePort frontend is stored with address `0`
//! ([`NODEPORT_ADDR`]) and, with the same value (one id, one cursor, one set
//! of slots), under every node address, so a packet to the node finds it in
//! one lookup like a ClusterIP; the address-0 entry is the fallback for a
//! packet to an address in `NODE_IPS` without an entry of its own. externalIPs and LoadBalancer ingress addresses are ordinary
//! frontends with [`SVC_F_EXTERNAL`]. A backend of an external frontend that
//! lives on another node carries [`BACKEND_F_SNAT`]: its flows leave with
//! the node's address on the egress interface (`SNAT_ADDRS`, key `0` is the
//! fallback) and a port chosen per flow, so replies come back through this
//! node, and both directions are sent with a FIB lookup instead of through
//! the stack (whose martian check would drop a forwarded packet carrying a
//! local source address).
//!
//! A service frontend (ClusterIP, port, protocol) has one `SERVICES` entry. Its
//! value holds a service id (index into `RR_CURSOR` and `SVC_COUNTERS`) and the
//! number of backend slots in use. Slots `0..count` of that id live in `SLOTS`.
//! `count == 0` means "known service without ready endpoints": the ingress
//! program rejects such packets with ICMP port unreachable.
//!
//! Round-robin: the ingress program does an atomic fetch-add on the service's
//! cursor and takes slot `cursor % count`. One cursor per service makes the
//! choice exact across CPUs (9 new flows over 3 backends go 3/3/3).
//!
//! Session affinity (`sessionAffinity: ClientIP`): a frontend with
//! `SvcValue::affinity_secs > 0` looks a new flow's client up in
//! `AFFINITY` first; an entry younger than the timeout names the backend
//! (and is refreshed), else the round-robin choice is recorded there. As
//! kube-proxy's `recent` match, the timeout runs from the client's last new
//! connection. The agent deletes the entries of a backend that leaves the
//! rotation and of a removed frontend, so affinity never outlives its
//! endpoint or reaches a reused service id.
//!
//! Maglev (`--lb-algorithm maglev`, or per Service): a frontend with
//! [`SVC_F_MAGLEV`] picks a new flow's backend from its `MAGLEV` table at
//! [`maglev_index`]`(`[`flow_hash`]`(tuple))` instead of the cursor, so every
//! node (and an agent that lost its conntrack) sends a flow to the same
//! backend, and removing one of N backends moves little more than the
//! 1/N of flows that were on it. The agent computes the table (Eisenbud et
//! al., NSDI 2016) from the sorted backends and replaces it whole in one
//! update, so a reader sees either the old or the new table.
//!
//! Slot compaction (agent): a backend is added by writing slot `count` and
//! then `count + 1`; removed by copying the last slot over it and then
//! writing `count - 1`. Each step leaves a consistent table for concurrent
//! readers (at worst one backend is briefly listed twice).
#![no_std]

#[cfg(feature = "lifecycle")]
extern crate std;

#[cfg(feature = "lifecycle")]
pub mod lifecycle;

/// Version of the map layout below. Bump it whenever a key or value type
/// changes meaning (sizes are checked separately): the agent refuses to reuse
/// pinned maps of another version and recreates them.
pub const LAYOUT_VERSION: u32 = 5;

/// Default capacity of `SERVICES` (frontends) and of the per-service arrays.
pub const MAX_SERVICES: u32 = 131_072;
/// Default capacity of `SLOTS` (backend slots over all services).
pub const MAX_SLOTS: u32 = 524_288;
/// Default capacity of the LRU `CONNTRACK` map (two entries per flow).
pub const MAX_CONNTRACK: u32 = 262_144;
/// Capacity of the LRU `FRAGS` map.
pub const MAX_FRAGS: u32 = 8_192;
/// Default capacity of the LRU `AFFINITY` map (one entry per client and
/// frontend with session affinity).
pub const MAX_AFFINITY: u32 = 131_072;
/// Default capacity of the LRU `CONNTRACK6` map.
pub const MAX_CONNTRACK6: u32 = 65_536;
/// Default capacity of the LRU `AFFINITY6` map.
pub const MAX_AFFINITY6: u32 = 32_768;
/// Capacity of `NODE_IPS` and `SNAT_ADDRS`.
pub const MAX_NODE_IPS: u32 = 256;

/// `SvcKey::addr` of a NodePort frontend: any address in `NODE_IPS`.
pub const NODEPORT_ADDR: u32 = 0;

/// `SvcValue::flags`: the frontend is reached from outside the node
/// (NodePort, externalIP, LoadBalancer).
pub const SVC_F_EXTERNAL: u32 = 1;
/// `SvcValue::flags`: with no backends, drop instead of rejecting
/// (`externalTrafficPolicy: Local` on a node without local endpoints).
pub const SVC_F_DROP_EMPTY: u32 = 2;

/// `SvcValue::flags`: only clients in the frontend's `SOURCE_RANGES`
/// entries reach it (`loadBalancerSourceRanges`); others are dropped.
pub const SVC_F_SOURCE_RANGES: u32 = 4;

/// `SvcValue::flags`: new flows are placed by the frontend's Maglev table
/// (`MAGLEV`), not round-robin.
pub const SVC_F_MAGLEV: u32 = 8;

/// Entries of a Maglev table: a prime, ≥ 100× the backends of a service
/// with up to 163 of them (the paper's bound for an even spread).
pub const MAGLEV_M: u32 = 16_381;
/// Default capacity of `MAGLEV` (frontends with a table). The map is not
/// preallocated: a table costs its 128 KiB only while it exists.
pub const MAX_MAGLEV: u32 = 4_096;

/// One frontend's Maglev lookup table: entry `i` is the backend of the
/// flows whose [`maglev_index`] is `i`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MaglevTable {
    pub backends: [Backend; MAGLEV_M as usize],
    /// Never read: pads the table to 2^14 entries. LLVM turns the lookup's
    /// byte offset `(h·M >> 32)·8` into `h·M >> 29 & 0x1fff8`; a verifier
    /// that loses the index's bound (6.1 does, through the hash's XOR)
    /// only knows that mask, so every offset it allows must be inside.
    pub _slack: [Backend; MAGLEV_SLACK],
}

/// Entries that pad a [`MaglevTable`] to 2^14.
pub const MAGLEV_SLACK: usize = (1 << 14) - MAGLEV_M as usize;

/// The hash Maglev places a flow by: its 5-tuple as on the wire (network
/// order), mixed with splitmix64's finalizer. The same on every node and in
/// the agent, so placement can be predicted and checked.
#[inline(always)]
pub fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = (u64::from(saddr) << 32) | u64::from(daddr);
    h ^= ((u64::from(sport) << 24) | (u64::from(dport) << 8) | u64::from(proto))
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h as u32) ^ ((h >> 32) as u32)
}

/// The table entry of a flow hash: `hash · M / 2^32`, in `0..MAGLEV_M`
/// (a multiply and a shift: cheaper than a modulo, and bounds the verifier
/// can follow).
#[inline(always)]
pub fn maglev_index(hash: u32) -> u32 {
    ((u64::from(hash) * u64::from(MAGLEV_M)) >> 32) as u32
}

/// Capacity of `SOURCE_RANGES` (CIDRs over all LoadBalancer frontends).
pub const MAX_SOURCE_RANGES: u32 = 16_384;

/// `Backend::flags`: flows to this backend are source-NATed to the node
/// (external traffic, `Cluster` policy, endpoint on another node).
pub const BACKEND_F_SNAT: u16 = 1;

/// Source ports of SNAT flows: the client's own port if it lies in this
/// range (the kernel's default ephemeral range), else drawn from it. The
/// nodePort range must stay below it, or a reply to the node could look
/// like a packet to a nodePort.
pub const SNAT_PORT_MIN: u16 = 32_768;
pub const SNAT_PORT_MAX: u16 = 60_999;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Source address of hairpin flows: a backend that reaches itself through
/// its own service (pod → ClusterIP → the same pod). Without a new source
/// the backend would receive a packet from its own address, which Linux
/// drops as a martian. Link-local, so it is never routed off the node; the
/// backend answers it through its default gateway, where the ingress
/// program translates the reply back. kube-proxy masquerades such flows to
/// the node's address instead.
pub const HAIRPIN_SNAT_IP: [u8; 4] = [169, 254, 42, 1];
/// [`HAIRPIN_SNAT_IP`] of IPv6 flows: a unique local address (fd00::/8
/// is never routed on the internet), `fd00:6b70:7278::1` ("kpx").
pub const HAIRPIN_SNAT_IP6: [u8; 16] = [
    0xfd, 0x00, 0x6b, 0x70, 0x72, 0x78, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
];
pub const IPPROTO_ICMPV6: u8 = 58;

/// Conntrack timeouts, after the last packet of the direction an entry
/// serves (netfilter's defaults): an expired entry is deleted when a packet
/// meets it and never translates again — a client port reused later for
/// another connection must not be rewritten by a flow long gone.
pub const CT_TCP_TIMEOUT_NS: u64 = 432_000 * 1_000_000_000;
/// UDP once a reply went back (netfilter's stream timeout).
pub const CT_UDP_TIMEOUT_NS: u64 = 120 * 1_000_000_000;
/// UDP without a reply yet (netfilter: 30 s).
pub const CT_UDP_UNREPLIED_TIMEOUT_NS: u64 = 30 * 1_000_000_000;
/// TCP without a reply yet: a SYN nobody answered (netfilter's SYN_RECV,
/// Cilium's SYN timeout), so a SYN flood or a dead backend does not hold
/// entries for days.
pub const CT_TCP_SYN_TIMEOUT_NS: u64 = 60 * 1_000_000_000;
/// Default TCP timeout once a FIN or RST was seen (`--conntrack-tcp-close-seconds`).
pub const CT_TCP_CLOSE_TIMEOUT_NS: u64 = 10 * 1_000_000_000;
/// Name of the read-only global the agent sets to the TCP close timeout.
pub const CT_TCP_CLOSE_GLOBAL: &str = "KPROXY_CT_TCP_CLOSE_NS";
/// `CtValue::flags`: a FIN or RST went through; the short timeout applies.
pub const CT_F_CLOSING: u32 = 1;
/// `CtValue::flags`: set on both entries of a new flow, cleared by its
/// first reply; the unreplied timeouts apply meanwhile.
pub const CT_F_UNREPLIED: u32 = 2;

/// How long an entry lives after its last packet, by protocol and state
/// (the one rule of the programs' lookups and the agent's sweep).
#[inline(always)]
pub fn ct_timeout_ns(proto: u8, flags: u32, tcp_close_ns: u64) -> u64 {
    if proto == IPPROTO_TCP {
        if flags & CT_F_CLOSING != 0 {
            tcp_close_ns
        } else if flags & CT_F_UNREPLIED != 0 {
            CT_TCP_SYN_TIMEOUT_NS
        } else {
            CT_TCP_TIMEOUT_NS
        }
    } else if flags & CT_F_UNREPLIED != 0 {
        CT_UDP_UNREPLIED_TIMEOUT_NS
    } else {
        CT_UDP_TIMEOUT_NS
    }
}

/// `CtKey::dir` of an entry keyed by the client → frontend tuple.
pub const CT_DIR_FORWARD: u8 = 0;
/// `CtKey::dir` of an entry keyed by the backend → client tuple.
pub const CT_DIR_REPLY: u8 = 1;

/// Name of the read-only global that sets the in-kernel log level
/// (0 = off, 1 = error, 2 = warn, 3 = info, 4 = debug). Checked before every
/// aya-log call, so logging costs nothing on the hot path when off.
pub const LOG_LEVEL_GLOBAL: &str = "KPROXY_LOG_LEVEL";

/// A service frontend: ClusterIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    /// IPv4 address, network order.
    pub addr: u32,
    /// Port, network order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}

/// What the datapath needs to know about a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvcValue {
    /// Service id: index into `RR_CURSOR` and `SVC_COUNTERS`, and the first
    /// half of every `SlotKey` of this frontend. Assigned by the agent.
    pub id: u32,
    /// Number of backend slots in use (`0` = reject, or drop with
    /// [`SVC_F_DROP_EMPTY`]).
    pub count: u32,
    /// `SVC_F_*` bits.
    pub flags: u32,
    /// `sessionAffinity: ClientIP` timeout in seconds; `0`: no affinity.
    pub affinity_secs: u32,
}

/// Key of an `AFFINITY` entry: a client of a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// Client address, network order.
    pub client: u32,
    pub svc_id: u32,
}

/// The backend a client is bound to, and when it last opened a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend: Backend,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) of the client's last new flow to the frontend.
    pub seen_ns: u64,
}

/// One backend slot of a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub svc_id: u32,
    pub slot: u32,
}

/// A backend address (also the value of a fragment entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// IPv4 address, network order.
    pub addr: u32,
    /// Port, network order.
    pub port: u16,
    /// `BACKEND_F_*` bits (always `0` in `FRAGS`).
    pub flags: u16,
}

/// How long a cached FIB result (`ROUTES`) is used before the FIB is asked
/// again: a route or neighbour change reaches source-NATed flows within this.
pub const ROUTE_CACHE_NS: u64 = 1_000_000_000;
/// Capacity of `ROUTES`.
pub const MAX_ROUTES: u32 = 65_536;

/// Key of a cached FIB result: where to and from which interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteKey {
    /// Destination address, network order.
    pub daddr: u32,
    pub in_ifindex: u32,
}

/// A cached FIB result with a resolved neighbour.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns` when the FIB was asked.
    pub stamp_ns: u64,
}

/// Data of a `SOURCE_RANGES` key: a frontend's service id, then a client
/// network. Entries have prefix length `32 + cidr length`, so the service
/// id always matches in full; a packet is looked up with prefix 64.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SrcRangeKey {
    /// Service id, big-endian (the trie matches bytes from the first).
    pub svc_id: u32,
    /// Client address, network order.
    pub addr: u32,
}

/// Connection-tracking key: the packet's 5-tuple as seen on the wire plus the
/// direction of the entry.
///
/// * forward (`CT_DIR_FORWARD`): client → frontend, value holds the backend;
/// * reply (`CT_DIR_REPLY`): backend → client, value holds the frontend to
///   restore as the reply's source. For a source-NATed flow the reply is
///   keyed backend → (node address, SNAT port) and the value also holds the
///   client to restore as its destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: u16,
}

/// Connection-tracking value: the address to translate to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue {
    /// Forward entry: backend address; reply entry: frontend address.
    pub addr: u32,
    /// Forward entry: backend port; reply entry: frontend port.
    pub port: u16,
    /// With `nat_addr`: forward entry: SNAT source port; reply entry: the
    /// client's port. Network order.
    pub nat_port: u16,
    /// Service id the flow belongs to (for counters).
    pub svc_id: u32,
    /// `0`: no source NAT. Forward entry: the node address the flow is
    /// source-NATed to; reply entry: the client's address, restored as the
    /// reply's destination.
    pub nat_addr: u32,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) of the last packet
    /// through this entry.
    pub seen_ns: u64,
    /// `CT_F_*` bits.
    pub flags: u32,
    pub _pad: u32,
}

/// An IPv6 frontend: ClusterIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey6 {
    /// IPv6 address as on the wire.
    pub addr: [u32; 4],
    /// Port, network order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// An IPv6 backend slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend6 {
    pub addr: [u32; 4],
    /// Port, network order.
    pub port: u16,
    /// Always `0` (no source NAT for IPv6).
    pub flags: u16,
}

/// [`CtKey`] of an IPv6 flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey6 {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: u16,
}

/// [`CtValue`] of an IPv6 flow (no source NAT).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue6 {
    /// Forward entry: backend address; reply entry: frontend address.
    pub addr: [u32; 4],
    /// Forward entry: backend port; reply entry: frontend port.
    pub port: u16,
    pub _pad0: u16,
    pub svc_id: u32,
    /// As [`CtValue::seen_ns`].
    pub seen_ns: u64,
    /// `CT_F_*` bits.
    pub flags: u32,
    pub _pad: u32,
}

/// Key of an `AFFINITY6` entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey6 {
    pub client: [u32; 4],
    pub svc_id: u32,
}

/// Value of an `AFFINITY6` entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue6 {
    pub backend: Backend6,
    pub _pad: u32,
    pub seen_ns: u64,
}

/// The flow hash of an IPv6 5-tuple: the addresses folded to 32 bits,
/// then [`flow_hash`].
#[inline(always)]
pub fn flow_hash6(saddr: [u32; 4], daddr: [u32; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let s =
        saddr[0] ^ saddr[1].rotate_left(8) ^ saddr[2].rotate_left(16) ^ saddr[3].rotate_left(24);
    let d =
        daddr[0] ^ daddr[1].rotate_left(8) ^ daddr[2].rotate_left(16) ^ daddr[3].rotate_left(24);
    flow_hash(s, d, sport, dport, proto)
}

/// Key of a fragmented datagram in `FRAGS`: only the first fragment carries
/// ports, so later fragments are matched by (source, destination, IP id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Packet counters, per CPU. Per-service entries use the first five fields;
/// the global entry uses all of them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets translated (forward or reverse) or rejected.
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
    /// New flows (conntrack entries created).
    pub new_flows: u64,
    /// Packets answered with ICMP port unreachable (no ready endpoints).
    pub rejects: u64,
    /// Packets dropped (no backend although count > 0, failed rewrite).
    pub drops: u64,
    /// IPv4 packets the parser could not read (IHL < 5, truncated); passed on
    /// untouched for the kernel to judge. Global only.
    pub malformed: u64,
    /// Non-first fragments translated through `FRAGS`. Global only.
    pub fragments: u64,
    /// Non-first fragments with no `FRAGS` entry, passed on untouched.
    /// Global only.
    pub fragments_unmatched: u64,
}

impl Counters {
    /// Adds `other` field by field (used to sum per-CPU values).
    pub fn add(&mut self, other: &Counters) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
        self.rejects += other.rejects;
        self.drops += other.drops;
        self.malformed += other.malformed;
        self.fragments += other.fragments;
        self.fragments_unmatched += other.fragments_unmatched;
    }
}

/// What the XDP program did, per CPU. The packets it sends itself are also
/// counted per service and globally in [`Counters`]; those it passes on are
/// counted there by TC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpCounters {
    /// Translated and sent back out of the interface they came in on
    /// (`XDP_TX`).
    pub tx: u64,
    /// Translated and redirected to another interface (`XDP_REDIRECT`).
    pub redirected: u64,
    /// Bytes of `tx` and `redirected` packets.
    pub bytes: u64,
    /// Service packets passed on to TC: a local endpoint, a refusal (TC
    /// builds the ICMP error), an unresolved neighbour.
    pub passed: u64,
    /// Dropped: outside `loadBalancerSourceRanges`, `Local` policy without
    /// local endpoints, or a flow that could not be opened.
    pub dropped: u64,
    /// Flows opened by XDP (its choice is recorded in conntrack; TC follows).
    pub new_flows: u64,
}

impl XdpCounters {
    /// Adds `other` field by field (used to sum per-CPU values).
    pub fn add(&mut self, other: &XdpCounters) {
        self.tx += other.tx;
        self.redirected += other.redirected;
        self.bytes += other.bytes;
        self.passed += other.passed;
        self.dropped += other.dropped;
        self.new_flows += other.new_flows;
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are repr(C), Copy, contain only integers and have
    // explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for SvcKey {}
    unsafe impl aya::Pod for SvcValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for SrcRangeKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for XdpCounters {}
    unsafe impl aya::Pod for RouteKey {}
    unsafe impl aya::Pod for RouteEntry {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for SvcKey6 {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for CtKey6 {}
    unsafe impl aya::Pod for CtValue6 {}
    unsafe impl aya::Pod for AffinityKey6 {}
    unsafe impl aya::Pod for AffinityValue6 {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<SvcKey>(), 8);
        assert_eq!(size_of::<SvcValue>(), 16);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtValue>(), 32);
        assert_eq!(size_of::<FragKey>(), 12);
        assert_eq!(size_of::<SrcRangeKey>(), 8);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<MaglevTable>(), 8 << 14);
        assert_eq!(size_of::<SvcKey6>(), 20);
        assert_eq!(size_of::<Backend6>(), 20);
        assert_eq!(size_of::<CtKey6>(), 40);
        assert_eq!(size_of::<CtValue6>(), 40);
        assert_eq!(size_of::<AffinityKey6>(), 20);
        assert_eq!(size_of::<AffinityValue6>(), 32);
    }

    #[test]
    fn maglev_index_covers_the_table_and_no_more() {
        assert_eq!(maglev_index(0), 0);
        assert_eq!(maglev_index(u32::MAX), MAGLEV_M - 1);
        // Hashes of neighbouring ports spread over the table.
        let mut seen = [false; MAGLEV_M as usize];
        for port in 0..50_000u16 {
            let i = maglev_index(flow_hash(
                0x0a00_0102,
                0x0a60_000a,
                port.to_be(),
                80u16.to_be(),
                6,
            ));
            seen[i as usize] = true;
        }
        let covered = seen.iter().filter(|s| **s).count();
        assert!(
            covered > (MAGLEV_M as usize) * 9 / 10,
            "{covered} of {MAGLEV_M}"
        );
        assert_eq!(size_of::<XdpCounters>(), 48);
        assert_eq!(size_of::<RouteKey>(), 8);
        assert_eq!(size_of::<RouteEntry>(), 32);
        assert_eq!(size_of::<Counters>(), 64);
    }
}
