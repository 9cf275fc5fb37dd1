//! The datapaths the agent can drive. Each takes the same
//! [`Change`]s and reports what it holds as a [`DesiredState`], so the agent
//! loop ([`crate::agent`]) and the diff know nothing of maps or rules.
//!
//! * [`ebpf`]: TC programs and BPF maps, attached per interface.
//! * [`iptables`]: kube-proxy's chains, for the whole network namespace.
//! * [`nftables`]: kube-proxy's nftables tables, for the whole network
//!   namespace (what the two share is in `netfilter`).
//! * [`memory`]: a model datapath that only keeps the state, for tests.
//!
//! [`Datapath`] holds what every datapath does. What only some do is a
//! small trait of its own, reached through a method that returns `None`
//! where it does not apply: [`PacketCounters`] (the eBPF maps count
//! packets; iptables rules are not read back) and [`FollowLinks`] (eBPF
//! attaches per interface; iptables rules cover the namespace and have
//! nothing to follow). The agent loop asks for them where it needs them
//! (a scrape, the exit report, an rtnetlink event) instead of every
//! datapath carrying no-op versions. Loading, pinning and attaching to the
//! interfaces named on the command line stay on the concrete type: they
//! happen before the loop starts, where the caller knows which datapath it
//! built.

use anyhow::Result;
use proxy_common::lifecycle::Event;

use crate::links::LinkEvent;
use crate::metrics::Snapshot;
use crate::model::DesiredState;
use crate::reconcile::{ApplyStats, Change};

pub mod ebpf;
pub mod iptables;
pub mod memory;
mod netfilter;
pub mod nftables;

/// A datapath the agent programs with [`Change`]s.
pub trait Datapath {
    /// Applies changes in order. On error the datapath holds a consistent
    /// prefix of them, and [`Datapath::programmed_state`] says which.
    fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats>;

    /// The state the datapath implements now: empty on a fresh start, what
    /// a previous agent left after a restart (eBPF with pinned maps).
    fn programmed_state(&self) -> DesiredState;

    /// Frontends programmed.
    fn service_count(&self) -> usize;

    /// Backends programmed, summed over frontends.
    fn backend_count(&self) -> usize;

    /// Removes everything this datapath put into the kernel.
    fn shutdown(&mut self) -> Result<()>;

    /// The packet counters, if this datapath keeps them.
    fn counters(&self) -> Option<&dyn PacketCounters> {
        None
    }

    /// Interface following, if this datapath attaches per interface and was
    /// asked to follow some.
    fn follow_links(&mut self) -> Option<&mut dyn FollowLinks> {
        None
    }

    /// The conntrack garbage collector, if this datapath keeps its own
    /// conntrack (eBPF; iptables relies on netfilter's).
    fn conntrack_gc(&mut self) -> Option<&mut dyn ConntrackGc> {
        None
    }
}

/// What one garbage-collection sweep found.
#[derive(Debug, Clone, Copy, Default)]
pub struct GcReport {
    /// Entries left.
    pub live: usize,
    /// Expired entries deleted.
    pub deleted: usize,
    /// The table's capacity.
    pub capacity: usize,
    /// How many entries it holds before it starts evicting (below the
    /// capacity when the table keeps free entries aside).
    pub usable: usize,
    pub took: std::time::Duration,
}

/// A datapath with a conntrack of its own to sweep.
pub trait ConntrackGc {
    /// Deletes expired entries.
    fn collect(&mut self) -> GcReport;
}

/// Packet counters kept by the datapath.
pub trait PacketCounters {
    /// The counters for a /metrics scrape; `None` (logged) if they cannot be
    /// read.
    fn snapshot(&self) -> Option<Snapshot>;

    /// The `kproxy: counters …` and `kproxy: service …` lines printed when
    /// the agent stops.
    fn report(&self) -> Vec<String>;
}

/// A datapath that attaches to interfaces as they appear.
pub trait FollowLinks {
    /// Attaches to matching interfaces that appeared, releases those that
    /// vanished; returns the lifecycle events to report.
    fn links_changed(&mut self, events: Vec<LinkEvent>) -> Vec<Event>;
}
