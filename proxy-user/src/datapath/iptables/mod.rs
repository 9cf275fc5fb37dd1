//! kube-proxy-equivalent iptables mode, so the two datapaths can be compared
//! on equal terms. The rule structure follows kube-proxy's iptables proxier:
//!
//! * nat `KUBE-SERVICES` (jumped to from PREROUTING and OUTPUT): one rule per
//!   frontend with endpoints → `KUBE-SVC-<hash>`;
//! * `KUBE-SVC-<hash>`: optional masquerade marking for traffic from outside
//!   `--cluster-cidr`, then one `statistic --mode random --probability 1/(n-i)`
//!   jump per endpoint → `KUBE-SEP-<hash>`, the last one unconditional;
//! * `KUBE-SEP-<hash>`: hairpin masquerade marking (`-s endpoint`), DNAT;
//! * `KUBE-MARK-MASQ` / `KUBE-POSTROUTING`: mark 0x4000, MASQUERADE marked
//!   traffic;
//! * filter `KUBE-SERVICES` (jumped to from FORWARD and OUTPUT for new
//!   connections): `REJECT --reject-with icmp-port-unreachable` for frontends
//!   without endpoints.
//!
//! North-south, as kube-proxy: externalIP and LoadBalancer frontends are
//! matched in nat `KUBE-SERVICES` and jump to `KUBE-EXT-<hash>`; the last rule
//! of `KUBE-SERVICES` sends traffic to local addresses (`-m addrtype
//! --dst-type LOCAL`) to `KUBE-NODEPORTS`, one rule per nodePort →
//! `KUBE-EXT-<hash>`. `KUBE-EXT-` marks the traffic for masquerade under
//! `externalTrafficPolicy: Cluster` (all of it, as kube-proxy; the eBPF
//! datapath source-NATs only flows to other nodes) and balances over the
//! frontend's endpoints (only the local ones under `Local`). External
//! frontends without endpoints are refused (`Cluster`) or dropped (`Local`)
//! in filter `KUBE-EXTERNAL-SERVICES`, jumped to from INPUT and FORWARD for
//! new connections. One `KUBE-EXT-` chain per frontend (kube-proxy has one per
//! service port): the model keeps each address a frontend of its own.
//!
//! Syncs are partial restores (`iptables-restore --noflush`), as kube-proxy
//! does since 1.26: the dispatch chains are rewritten, and of the per-service
//! and per-endpoint chains only those whose rules changed; chains that went
//! away are flushed and deleted in the same transaction. Chain names are
//! kube-proxy's: base32 of a SHA-256 of the service port name, protocol and
//! endpoint. On endpoint removal the matching UDP conntrack entries are
//! deleted with `conntrack -D`, as kube-proxy does.
//!
//! Dual-stack as kube-proxy: one proxier ([`Iptables`]) per family the
//! node proxies (`--ip-families`), each with the whole structure above in
//! its own tables — IPv4 frontends through `iptables-restore`, IPv6 ones
//! (ClusterIPs only: the model has no IPv6 external frontends) through
//! `ip6tables-restore` — with its own hooks, its own record of the chains
//! it wrote and its own `conntrack -D -f ipv6`. [`IptablesDatapath`] routes
//! each change to its family's proxier.
//!
//! [`rules`] renders the chains and the restore input; [`exec`] runs
//! iptables, iptables-restore and conntrack.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::Datapath;
use super::netfilter::{PerFamily, Proxier, Svc, delete_stale_udp_flows, fold, run};
use crate::model::{Cidr, DesiredState, Family, Frontend};
use crate::reconcile::{ApplyStats, Change};

mod exec;
mod rules;

use exec::{delete_jump, ensure_jump, existing_service_chains, iptables_bin};
use rules::HOOKS;

/// The iptables datapath: an [`Iptables`] proxier per address family the
/// node proxies, as kube-proxy's meta-proxier runs one per family.
pub struct IptablesDatapath(PerFamily<Iptables>);

impl IptablesDatapath {
    /// Checks `iptables --version` (and `ip6tables --version` when the
    /// node proxies IPv6). `cluster_cidr` (IPv4) applies to the IPv4
    /// proxier.
    pub fn new(cluster_cidr: Option<Cidr>, families: &BTreeSet<Family>) -> Result<Self> {
        let mut proxiers = BTreeMap::new();
        for &family in families {
            let cidr = cluster_cidr.filter(|_| family == Family::V4);
            proxiers.insert(family, Iptables::new(family, cidr)?);
        }
        if proxiers.is_empty() {
            bail!("iptables mode needs at least one address family (--ip-families)");
        }
        Ok(Self(PerFamily { proxiers }))
    }

    /// Removes every rule and chain of ours in every family (as
    /// `kube-proxy --cleanup`).
    pub fn cleanup(&mut self) -> Result<()> {
        self.0.cleanup()
    }
}

/// One family's proxier: its frontends and the chains last written to its
/// tables. The family it writes to is the caller's ([`IptablesDatapath`]
/// keys them by it); what the rules say follows from the frontends'
/// addresses.
struct Iptables {
    /// Only for IPv4 (`--cluster-cidr` is an IPv4 network).
    cluster_cidr: Option<Cidr>,
    services: BTreeMap<Frontend, Svc>,
    /// Rules last written per per-service/per-endpoint chain.
    chains: BTreeMap<String, Vec<String>>,
    /// Base chains and hooks are in place.
    installed: bool,
}

impl Iptables {
    fn new(family: Family, cluster_cidr: Option<Cidr>) -> Result<Self> {
        let bin = iptables_bin(family);
        let hint = match family {
            Family::V4 => "",
            Family::V6 => ", or leave IPv6 out of --ip-families",
        };
        let v = run(Command::new(bin).arg("--version")).with_context(|| {
            format!("{bin} not found: install the iptables package (cargo xtask setup does){hint}")
        })?;
        log::info!(
            "iptables mode, {family}: {}",
            String::from_utf8_lossy(&v.stdout).trim()
        );
        Ok(Self {
            cluster_cidr,
            services: BTreeMap::new(),
            chains: BTreeMap::new(),
            installed: false,
        })
    }
}

impl Proxier for Iptables {
    fn apply(&mut self, family: Family, changes: &[&Change]) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        // A change that does not fit leaves the frontends as they were.
        let mut next = self.services.clone();
        let stale = fold(&mut next, changes, &mut stats)?;
        let old_services = std::mem::replace(&mut self.services, next);
        if !self.installed {
            // Chains left by an earlier agent (crash, kill -9): adopt them as
            // "unknown content", so this sync rewrites the ones still needed
            // and deletes the rest, as kube-proxy does on start.
            for chain in existing_service_chains(family) {
                self.chains.entry(chain).or_default();
            }
        }
        let mut new_chains = BTreeMap::new();
        for (fe, svc) in &self.services {
            self.render_svc(fe, svc, &mut new_chains);
        }
        let input = self.build_restore(&new_chains);
        if let Err(e) = exec::restore(family, &input) {
            self.services = old_services;
            return Err(e);
        }
        self.chains = new_chains;
        if !self.installed {
            for (table, chain, comment, target, extra) in HOOKS {
                ensure_jump(family, table, chain, comment, target, extra)?;
            }
            self.installed = true;
        }
        stats.flows_flushed += delete_stale_udp_flows(stale);
        Ok(stats)
    }

    fn installed(&self) -> bool {
        self.installed
    }

    fn services(&self) -> &BTreeMap<Frontend, Svc> {
        &self.services
    }

    /// Removes every rule and chain of ours from `family`'s tables.
    fn cleanup(&mut self, family: Family) -> Result<()> {
        for (table, chain, comment, target, extra) in HOOKS {
            delete_jump(family, table, chain, comment, target, extra);
        }
        let mut input = String::from(
            "*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n\
             -X KUBE-SERVICES\n-X KUBE-EXTERNAL-SERVICES\nCOMMIT\n*nat\n",
        );
        let mut all: Vec<String> = self.chains.keys().cloned().collect();
        all.extend(
            [
                "KUBE-SERVICES",
                "KUBE-NODEPORTS",
                "KUBE-MARK-MASQ",
                "KUBE-MARK-DROP",
                "KUBE-POSTROUTING",
            ]
            .map(String::from),
        );
        for c in &all {
            input.push_str(&format!(":{c} - [0:0]\n"));
        }
        for c in &all {
            input.push_str(&format!("-X {c}\n"));
        }
        input.push_str("COMMIT\n");
        let r = exec::restore(family, &input);
        self.chains.clear();
        self.services.clear();
        self.installed = false;
        r
    }
}

impl Datapath for IptablesDatapath {
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
        self.cleanup()
    }
}
