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
//! [`rules`] renders the chains and the restore input; [`exec`] runs
//! iptables, iptables-restore and conntrack.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::Datapath;
use crate::model::{BackendAddr, Cidr, DesiredService, DesiredState, Frontend, Policy, Proto};
use crate::reconcile::{ApplyStats, Change};

mod exec;
mod rules;

use exec::{delete_jump, delete_udp_flows, ensure_jump, existing_service_chains, run};
use rules::HOOKS;

struct Svc {
    name: String,
    /// Endpoints in kube-proxy's order (sorted).
    backends: Vec<BackendAddr>,
    /// Traffic policy (`None`: a ClusterIP), source ranges (`KUBE-FW-`),
    /// session affinity (`recent` lists).
    policy: Policy,
}

pub struct Iptables {
    cluster_cidr: Option<Cidr>,
    services: BTreeMap<Frontend, Svc>,
    /// Rules last written per per-service/per-endpoint chain.
    chains: BTreeMap<String, Vec<String>>,
    /// Base chains and hooks are in place.
    installed: bool,
}

impl Iptables {
    pub fn new(cluster_cidr: Option<Cidr>) -> Result<Self> {
        let v = run(Command::new("iptables").arg("--version"))
            .context("iptables not found: install the iptables package (cargo xtask setup does)")?;
        log::info!(
            "iptables mode: {}",
            String::from_utf8_lossy(&v.stdout).trim()
        );
        Ok(Self {
            cluster_cidr,
            services: BTreeMap::new(),
            chains: BTreeMap::new(),
            installed: false,
        })
    }

    pub fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        let mut next: BTreeMap<Frontend, Svc> = std::mem::take(&mut self.services);
        // UDP flows to delete from conntrack: (frontend, Some(backend)) or
        // (frontend, None) for a whole service.
        let mut stale: Vec<(Frontend, Option<BackendAddr>)> = Vec::new();
        for c in changes {
            match c {
                Change::RemoveService { frontend } => {
                    if let Some(s) = next.remove(frontend) {
                        stats.services_removed += 1;
                        stats.backends_removed += s.backends.len();
                        stale.push((*frontend, None));
                    }
                }
                Change::AddService {
                    frontend,
                    name,
                    backends,
                    policy,
                } => {
                    stats.services_added += 1;
                    stats.backends_added += backends.len();
                    next.insert(
                        *frontend,
                        Svc {
                            name: name.clone(),
                            backends: backends.iter().copied().collect(),
                            policy: policy.clone(),
                        },
                    );
                }
                // The chains are named after the service port: the next
                // render replaces them.
                Change::RenameService { frontend, name } => {
                    let Some(s) = next.get_mut(frontend) else {
                        bail!("service {frontend} is not programmed");
                    };
                    s.name.clone_from(name);
                }
                Change::UpdateBackends {
                    frontend,
                    added,
                    removed,
                    flush,
                } => {
                    let Some(s) = next.get_mut(frontend) else {
                        bail!("service {frontend} is not programmed");
                    };
                    let mut set: BTreeSet<BackendAddr> = s.backends.iter().copied().collect();
                    for b in removed {
                        set.remove(b);
                    }
                    // UDP flows of backends that are gone (not of draining
                    // ones), as kube-proxy does.
                    stale.extend(flush.iter().map(|b| (*frontend, Some(*b))));
                    set.extend(added.iter().copied());
                    s.backends = set.into_iter().collect();
                    stats.backends_added += added.len();
                    stats.backends_removed += removed.len();
                }
            }
        }
        let old_services = std::mem::replace(&mut self.services, next);
        if !self.installed {
            // Chains left by an earlier agent (crash, kill -9): adopt them as
            // "unknown content", so this sync rewrites the ones still needed
            // and deletes the rest, as kube-proxy does on start.
            for chain in existing_service_chains() {
                self.chains.entry(chain).or_default();
            }
        }
        let mut new_chains = BTreeMap::new();
        for (fe, svc) in &self.services {
            self.render_svc(fe, svc, &mut new_chains);
        }
        let input = self.build_restore(&new_chains);
        if let Err(e) = exec::restore(&input) {
            self.services = old_services;
            return Err(e);
        }
        self.chains = new_chains;
        if !self.installed {
            for (table, chain, comment, target, extra) in HOOKS {
                ensure_jump(table, chain, comment, target, extra)?;
            }
            self.installed = true;
        }
        for (fe, backend) in stale.into_iter().filter(|(fe, _)| fe.proto == Proto::Udp) {
            stats.flows_flushed += delete_udp_flows(&fe, backend.as_ref());
        }
        Ok(stats)
    }

    pub fn programmed_state(&self) -> DesiredState {
        DesiredState {
            services: self
                .services
                .iter()
                .map(|(fe, s)| {
                    (
                        *fe,
                        DesiredService {
                            policy: s.policy.clone(),
                            ..DesiredService::new(
                                s.name.clone(),
                                s.backends.iter().copied().collect(),
                            )
                        },
                    )
                })
                .collect(),
            health_checks: Default::default(),
        }
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn backend_count(&self) -> usize {
        self.services.values().map(|s| s.backends.len()).sum()
    }

    /// Removes every rule and chain of ours (as `kube-proxy --cleanup`).
    pub fn cleanup(&mut self) -> Result<()> {
        for (table, chain, comment, target, extra) in HOOKS {
            delete_jump(table, chain, comment, target, extra);
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
        let r = exec::restore(&input);
        self.chains.clear();
        self.services.clear();
        self.installed = false;
        r
    }
}

impl Datapath for Iptables {
    fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats> {
        Iptables::apply(self, changes)
    }

    fn programmed_state(&self) -> DesiredState {
        Iptables::programmed_state(self)
    }

    fn service_count(&self) -> usize {
        Iptables::service_count(self)
    }

    fn backend_count(&self) -> usize {
        Iptables::backend_count(self)
    }

    fn shutdown(&mut self) -> Result<()> {
        self.cleanup()
    }
}
