//! kube-proxy-equivalent nftables mode (`--mode nftables`), the structure of
//! kube-proxy's nftables proxier (GA in Kubernetes 1.33):
//!
//! * one table per family, `ip kube-proxy` and `ip6 kube-proxy`, with base
//!   chains hooked as kube-proxy's (filter chains at priority `dstnat - 10`,
//!   so they see the destination before DNAT);
//! * nat `services` (from prerouting and output): `ip daddr . meta l4proto .
//!   th dport vmap @service-ips`, one element per frontend with endpoints →
//!   `goto service-<hash>-<ns>/<name>/<proto>/<port>`; then `fib daddr type
//!   local` (every local address but loopback) `… vmap @service-nodeports`
//!   for nodePorts;
//! * per-service chains: masquerade marking for traffic from outside
//!   `--cluster-cidr`, then `numgen random mod N vmap { 0 : goto
//!   endpoint-…, … }`; per-endpoint chains: hairpin masquerade marking
//!   (`ip saddr <endpoint>`) and `dnat to`;
//! * `mark-for-masquerade` / `masquerading` (nat postrouting): mark 0x4000,
//!   `masquerade fully-random`;
//! * `no-endpoint-services` / `no-endpoint-nodeports` (looked up for new
//!   connections from filter input, forward and output): ICMP port
//!   unreachable through `reject-chain` (`reset-chain` for IPv6 TCP: see
//!   [`super::netfilter::Refusal`]), `drop` under `externalTrafficPolicy:
//!   Local`.
//!
//! North-south as the iptables mode: externalIP and LoadBalancer frontends
//! are `service-ips` elements and nodePorts `service-nodeports` elements
//! that go to one `external-` chain per frontend, which marks everything for
//! masquerade under `Cluster` and balances over the frontend's endpoints
//! (the local ones under `Local`). `loadBalancerSourceRanges`: a
//! `firewall-ips` element per LoadBalancer address, looked up from filter
//! prerouting and output, goes to a `firewall-` chain dropping other
//! sources. Session affinity: a timeout set per endpoint, `ip saddr
//! @affinity-… goto endpoint-…` in the service chain and `update
//! @affinity-… { ip saddr }` in the endpoint chain.
//!
//! Syncs are partial, as kube-proxy's: one `nft -f -` transaction per
//! family and round, holding only what changed — map elements deleted and
//! added, changed chains flushed and rewritten, unused chains and sets
//! deleted. The first sync deletes a table an earlier run left (crash,
//! kill -9) and builds the table afresh in the same transaction, so packets
//! never see it half-built; established flows keep their conntrack NAT.
//! SIGTERM deletes the tables. On endpoint removal the matching UDP
//! conntrack entries are deleted with `conntrack -D`, as in the iptables
//! mode ([`super::netfilter`]).
//!
//! [`rules`] renders the objects and the transactions; [`exec`] runs nft.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, bail};

use super::Datapath;
use super::netfilter::{PerFamily, Proxier, Svc, delete_stale_udp_flows, fold};
use crate::model::{BackendAddr, Cidr, DesiredState, Family, Frontend};
use crate::reconcile::{ApplyStats, Change};

mod exec;
mod rules;

use rules::Ruleset;

/// The nftables datapath: an [`Nftables`] proxier per address family the
/// node proxies, each with its own table.
pub struct NftablesDatapath(PerFamily<Nftables>);

impl NftablesDatapath {
    /// Checks `nft --version`. `cluster_cidr` (IPv4) applies to the IPv4
    /// proxier.
    pub fn new(cluster_cidr: Option<Cidr>, families: &BTreeSet<Family>) -> Result<Self> {
        let version = exec::version()?;
        log::info!("nftables mode: {version}");
        let proxiers: BTreeMap<Family, Nftables> = families
            .iter()
            .map(|&family| {
                let cidr = cluster_cidr.filter(|_| family == Family::V4);
                (family, Nftables::new(cidr))
            })
            .collect();
        if proxiers.is_empty() {
            bail!("nftables mode needs at least one address family (--ip-families)");
        }
        Ok(Self(PerFamily { proxiers }))
    }
}

/// One family's proxier: its frontends and what it last wrote to its table.
struct Nftables {
    /// Only for IPv4 (`--cluster-cidr` is an IPv4 network).
    cluster_cidr: Option<Cidr>,
    services: BTreeMap<Frontend, Svc>,
    written: Ruleset,
    /// The table is ours (built by this run).
    installed: bool,
}

impl Nftables {
    fn new(cluster_cidr: Option<Cidr>) -> Self {
        Self {
            cluster_cidr,
            services: BTreeMap::new(),
            written: Ruleset::default(),
            installed: false,
        }
    }

    /// The transaction `changes` need, and what the table holds after it;
    /// `self` is left as it was.
    fn plan(&self, family: Family, changes: &[&Change], stats: &mut ApplyStats) -> Result<Plan> {
        let mut services = self.services.clone();
        let stale = fold(&mut services, changes, stats)?;
        let next = rules::render(family, self.cluster_cidr, &services);
        let input = rules::transaction(family, !self.installed, &self.written, &next);
        Ok(Plan {
            services,
            next,
            input,
            stale,
        })
    }
}

/// One round for one family, worked out before anything is run.
struct Plan {
    /// The frontends after the changes.
    services: BTreeMap<Frontend, Svc>,
    /// What the table holds after the transaction.
    next: Ruleset,
    /// The `nft -f` input; empty when nothing changed.
    input: String,
    /// UDP flows to delete from conntrack afterwards.
    stale: Vec<(Frontend, Option<BackendAddr>)>,
}

impl Proxier for Nftables {
    fn apply(&mut self, family: Family, changes: &[&Change]) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        // A change that does not fit, or a transaction nft refuses, leaves
        // everything as it was.
        let plan = self.plan(family, changes, &mut stats)?;
        if !plan.input.is_empty()
            && let Err(e) = exec::nft(&plan.input)
        {
            // What the table holds may not be what this proxier last wrote
            // (someone flushed it, or it is gone): the next round rebuilds
            // it whole, as kube-proxy follows a failed partial sync with a
            // full one.
            self.installed = false;
            return Err(e);
        }
        self.services = plan.services;
        self.written = plan.next;
        self.installed = true;
        stats.flows_flushed += delete_stale_udp_flows(plan.stale);
        Ok(stats)
    }

    fn installed(&self) -> bool {
        self.installed
    }

    fn services(&self) -> &BTreeMap<Frontend, Svc> {
        &self.services
    }

    fn cleanup(&mut self, family: Family) -> Result<()> {
        let r = exec::nft(&rules::teardown(family));
        self.services.clear();
        self.written = Ruleset::default();
        self.installed = false;
        r
    }
}

impl Datapath for NftablesDatapath {
    fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats> {
        self.0.apply(changes)
    }

    fn programmed_state(&self) -> DesiredState {
        self.0.programmed_state()
    }

    fn service_count(&self) -> usize {
        self.0.service_count()
    }

    fn backend_count(&self) -> usize {
        self.0.backend_count()
    }

    fn shutdown(&mut self) -> Result<()> {
        self.0.cleanup()
    }
}

#[cfg(test)]
mod tests;
