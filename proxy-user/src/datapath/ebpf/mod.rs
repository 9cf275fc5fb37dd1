//! The eBPF datapath: TC programs on client-facing interfaces, driven
//! through BPF maps.
//!
//! The agent keeps a mirror of what it wrote (`programmed`), so each change
//! touches only the map entries it concerns: O(changed backends), never a
//! rewrite of the tables. Map layouts are documented in `proxy-common`.
//!
//! One file per job: [`load`] (object, map sizes, pinning and adoption of a
//! previous agent's maps), [`attach`] (tcx links or clsact + cls_bpf),
//! [`follow`] (interfaces named by prefix, as they come and go), [`maps`]
//! (applying [`Change`](crate::reconcile::Change)s), [`counters`] and
//! [`test_run`] (BPF_PROG_TEST_RUN, for tests and benchmarks).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use aya::Ebpf;
use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray};
use proxy_common::*;

use crate::datapath::{ConntrackGc, Datapath, FollowLinks, PacketCounters};
use crate::model::{DesiredState, Frontend};
use crate::reconcile::{ApplyStats, Change};

pub mod attach;
pub mod batch;
pub mod counters;
pub mod follow;
pub mod gc;
pub mod load;
pub mod maglev;
pub mod maps;
pub mod test_run;
pub mod xdp;

pub use attach::AttachMode;
pub use follow::Following;
pub use load::{LoadOptions, layout_tag, layout_tag_prefix};
pub use maps::{backend_raw, ip_raw, ip6_from_raw, ip6_raw, svc_key, svc_key6};
pub use test_run::TestRunOutput;
pub use xdp::XdpAttach;

/// The eBPF object built by `cargo xtask build`, embedded at compile time.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("KPROXY_BPF_OBJ_PATH"));

pub const INGRESS_PROG: &str = "kproxy_ingress";
pub const EGRESS_PROG: &str = "kproxy_egress";
pub const XDP_PROG: &str = "kproxy_xdp";

pub struct Dataplane {
    bpf: Ebpf,
    services: HashMap<MapData, SvcKey, SvcValue>,
    slots: HashMap<MapData, SlotKey, Backend>,
    cursors: Array<MapData, u64>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    /// The same map, for [`batch::for_each`].
    conntrack_fd: std::os::fd::OwnedFd,
    svc_counters: PerCpuArray<MapData, Counters>,
    global_counters: PerCpuArray<MapData, Counters>,
    /// Written once at start ([`Dataplane::set_node_addrs`]), not pinned.
    node_ips: HashMap<MapData, u32, u32>,
    /// The node addresses as written to `NODE_IPS` (nodePorts get a
    /// `SERVICES` entry under each).
    node_addrs: Vec<u32>,
    snat_addrs: HashMap<MapData, u32, u32>,
    source_ranges: LpmTrie<MapData, SrcRangeKey, u32>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    maglev: HashMap<MapData, u32, MaglevTable>,
    /// The IPv6 family's frontends, slots, flows and bindings.
    services6: HashMap<MapData, SvcKey6, SvcValue>,
    slots6: HashMap<MapData, SlotKey, Backend6>,
    conntrack6: HashMap<MapData, CtKey6, CtValue6>,
    conntrack6_fd: std::os::fd::OwnedFd,
    affinity6: HashMap<MapData, AffinityKey6, AffinityValue6>,
    xdp_counters: PerCpuArray<MapData, XdpCounters>,
    programmed: BTreeMap<Frontend, maps::Programmed>,
    ids: maps::IdAllocator,
    attachments: Vec<attach::Attachment>,
    xdp_attachments: Vec<xdp::XdpAttachment>,
    /// The TCP close timeout the programs were loaded with, and the
    /// conntrack capacity (for the garbage collector).
    ct_tcp_close_ns: u64,
    ct_capacity: usize,
    /// `kproxy_xdp` is verified only when first needed, so a kernel that
    /// refuses it still runs everything else.
    xdp_loaded: bool,
    nr_cpus: usize,
    /// `<pin_dir>/<layout tag>` when pinning.
    pin_root: Option<PathBuf>,
    /// Leave links and pinned maps in place on drop (graceful handover).
    keep_on_exit: bool,
    /// Interfaces attached by name prefix as they appear.
    following: Option<Following>,
}

/// The node's addresses as the programs need them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddrs {
    /// Every address a NodePort answers on.
    pub node_ips: Vec<std::net::Ipv4Addr>,
    /// Per external interface (ifindex), the address flows to other nodes
    /// leaving through it are source-NATed to.
    pub snat: Vec<(u32, std::net::Ipv4Addr)>,
    /// Source-NAT address for any other interface.
    pub default_snat: Option<std::net::Ipv4Addr>,
}

impl Dataplane {
    /// Writes the node's addresses (NodePort matching and source NAT);
    /// replaces what an earlier call wrote.
    pub fn set_node_addrs(&mut self, addrs: &NodeAddrs) -> Result<()> {
        let old: Vec<u32> = self.node_ips.keys().filter_map(|k| k.ok()).collect();
        for k in old {
            self.node_ips.remove(&k).or_else(maps::ignore_missing)?;
        }
        let old: Vec<u32> = self.snat_addrs.keys().filter_map(|k| k.ok()).collect();
        for k in old {
            self.snat_addrs.remove(&k).or_else(maps::ignore_missing)?;
        }
        for ip in &addrs.node_ips {
            self.node_ips.insert(ip_raw(*ip), 1, 0)?;
        }
        for (ifindex, ip) in &addrs.snat {
            self.snat_addrs.insert(*ifindex, ip_raw(*ip), 0)?;
        }
        if let Some(ip) = addrs.default_snat {
            self.snat_addrs.insert(0, ip_raw(ip), 0)?;
        }
        self.node_addrs = addrs.node_ips.iter().map(|ip| ip_raw(*ip)).collect();
        // Entries under addresses no longer the node's go, new ones come.
        self.sync_nodeport_aliases()
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        if self.keep_on_exit {
            return;
        }
        if let Err(e) = self.detach_all() {
            log::warn!("detach on drop: {e:#}");
        }
    }
}

impl Datapath for Dataplane {
    fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats> {
        Dataplane::apply(self, changes)
    }

    fn programmed_state(&self) -> DesiredState {
        Dataplane::programmed_state(self)
    }

    fn service_count(&self) -> usize {
        Dataplane::service_count(self)
    }

    fn backend_count(&self) -> usize {
        Dataplane::backend_count(self)
    }

    fn shutdown(&mut self) -> Result<()> {
        self.detach_all()
    }

    fn counters(&self) -> Option<&dyn PacketCounters> {
        Some(self)
    }

    fn conntrack_gc(&mut self) -> Option<&mut dyn ConntrackGc> {
        Some(self)
    }

    fn follow_links(&mut self) -> Option<&mut dyn FollowLinks> {
        if self.following.is_some() {
            Some(self)
        } else {
            None
        }
    }
}
