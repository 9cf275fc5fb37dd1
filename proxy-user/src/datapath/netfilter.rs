//! What kube-proxy's two netfilter datapaths share: the iptables mode
//! ([`super::iptables`]) and the nftables mode ([`super::nftables`]) keep the
//! same per-frontend view of the model, run one proxier per address family,
//! take the same decisions (which traffic is masqueraded, how a frontend
//! without endpoints refuses) and delete the same stale UDP flows with
//! `conntrack -D`. Only the rendering of the rules differs.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::model::{
    BackendAddr, Cidr, DesiredService, DesiredState, Family, Frontend, Policy, Proto, TrafficPolicy,
};
use crate::reconcile::{ApplyStats, Change};

/// One frontend as a netfilter proxier renders it.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Svc {
    pub(super) name: String,
    /// Endpoints in kube-proxy's order (sorted).
    pub(super) backends: Vec<BackendAddr>,
    /// Traffic policy (`None`: a ClusterIP), source ranges (the firewall
    /// check), session affinity.
    pub(super) policy: Policy,
}

/// One family's proxier, as the [`PerFamily`] front end drives it.
pub(super) trait Proxier {
    /// Applies `changes` (all of `family`) to `family`'s tables.
    fn apply(&mut self, family: Family, changes: &[&Change]) -> Result<ApplyStats>;
    /// Its base chains and hooks are in place: a round without changes for
    /// it can skip it.
    fn installed(&self) -> bool;
    /// The frontends it holds.
    fn services(&self) -> &BTreeMap<Frontend, Svc>;
    /// Removes everything of ours from `family`'s tables.
    fn cleanup(&mut self, family: Family) -> Result<()>;
}

/// A proxier per address family the node proxies, as kube-proxy's
/// meta-proxier runs one per family; each change goes to its frontend's
/// family.
pub(super) struct PerFamily<P> {
    pub(super) proxiers: BTreeMap<Family, P>,
}

impl<P: Proxier> PerFamily<P> {
    pub(super) fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats> {
        let mut by_family = by_family(changes);
        if let Some((family, c)) = by_family
            .iter()
            .find(|(f, _)| !self.proxiers.contains_key(f))
        {
            bail!(
                "frontend {} is {family}, which this node does not proxy (--ip-families)",
                frontend_of(c[0])
            );
        }
        // Each family is one transaction of its own; a failed one keeps its
        // previous state (the next round re-diffs it) and does not hold the
        // other back. A family without changes is left alone once its
        // chains and hooks are in place.
        let mut stats = ApplyStats::default();
        let mut first_err = None;
        for (&family, p) in &mut self.proxiers {
            let mine = by_family.remove(&family).unwrap_or_default();
            if mine.is_empty() && p.installed() {
                continue;
            }
            match p.apply(family, &mine) {
                Ok(s) => {
                    stats.services_added += s.services_added;
                    stats.services_removed += s.services_removed;
                    stats.backends_added += s.backends_added;
                    stats.backends_removed += s.backends_removed;
                    stats.flows_flushed += s.flows_flushed;
                }
                Err(e) if first_err.is_none() => {
                    first_err = Some(e.context(format!("{family} rules")));
                }
                Err(e) => log::warn!("{family} rules: {e:#}"),
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }

    pub(super) fn programmed_state(&self) -> DesiredState {
        DesiredState {
            services: self
                .proxiers
                .values()
                .flat_map(|p| p.services())
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

    pub(super) fn service_count(&self) -> usize {
        self.proxiers.values().map(|p| p.services().len()).sum()
    }

    pub(super) fn backend_count(&self) -> usize {
        self.proxiers
            .values()
            .flat_map(|p| p.services().values())
            .map(|s| s.backends.len())
            .sum()
    }

    /// Removes every rule, chain or table of ours in every family (as
    /// `kube-proxy --cleanup`).
    pub(super) fn cleanup(&mut self) -> Result<()> {
        let mut first_err = None;
        for (&family, p) in &mut self.proxiers {
            if let Err(e) = p.cleanup(family) {
                let e = e.context(format!("removing the {family} rules"));
                match first_err {
                    None => first_err = Some(e),
                    Some(_) => log::warn!("{e:#}"),
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// `changes` grouped by their frontends' family, in order.
pub(super) fn by_family(changes: &[Change]) -> BTreeMap<Family, Vec<&Change>> {
    let mut out: BTreeMap<Family, Vec<&Change>> = BTreeMap::new();
    for c in changes {
        out.entry(frontend_of(c).family()).or_default().push(c);
    }
    out
}

pub(super) fn frontend_of(c: &Change) -> &Frontend {
    match c {
        Change::AddService { frontend, .. }
        | Change::UpdateBackends { frontend, .. }
        | Change::RenameService { frontend, .. }
        | Change::RemoveService { frontend } => frontend,
    }
}

/// Applies `changes` to `services`, counting them in `stats`; returns the
/// UDP flows to delete from conntrack: (frontend, Some(backend)) or
/// (frontend, None) for a whole service.
pub(super) fn fold(
    services: &mut BTreeMap<Frontend, Svc>,
    changes: &[&Change],
    stats: &mut ApplyStats,
) -> Result<Vec<(Frontend, Option<BackendAddr>)>> {
    let mut stale = Vec::new();
    for c in changes {
        match c {
            Change::RemoveService { frontend } => {
                if let Some(s) = services.remove(frontend) {
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
                services.insert(
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
                let Some(s) = services.get_mut(frontend) else {
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
                let Some(s) = services.get_mut(frontend) else {
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
    Ok(stale)
}

/// Deletes the UDP conntrack entries `fold` found stale; returns how many.
pub(super) fn delete_stale_udp_flows(stale: Vec<(Frontend, Option<BackendAddr>)>) -> usize {
    stale
        .into_iter()
        .filter(|(fe, _)| fe.proto == Proto::Udp)
        .map(|(fe, backend)| delete_udp_flows(&fe, backend.as_ref()))
        .sum()
}

/// Which new connections to a frontend with endpoints are marked for
/// masquerade before one is chosen (hairpin traffic, an endpoint reaching
/// itself, is marked in every case, in the endpoint's chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Masquerade {
    /// `externalTrafficPolicy: Cluster`: all of it, as kube-proxy (the eBPF
    /// datapath source-NATs only flows to other nodes).
    All,
    /// A ClusterIP with `--cluster-cidr`: traffic from outside the pod
    /// network.
    NotFrom(Cidr),
    /// `Local` (the client's address is kept), or a ClusterIP without
    /// `--cluster-cidr`.
    HairpinOnly,
}

/// The masquerade decision for `fe`. `--cluster-cidr` is an IPv4 network:
/// IPv6 ClusterIP traffic is masqueraded only when it hairpins.
pub(super) fn masquerade(fe: &Frontend, svc: &Svc, cluster_cidr: Option<Cidr>) -> Masquerade {
    match svc.policy.external {
        Some(TrafficPolicy::Cluster) => Masquerade::All,
        Some(TrafficPolicy::Local) => Masquerade::HairpinOnly,
        None => match cluster_cidr.filter(|_| fe.family() == Family::V4) {
            Some(cidr) => Masquerade::NotFrom(cidr),
            None => Masquerade::HairpinOnly,
        },
    }
}

/// What a frontend without endpoints does to a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// ICMP (ICMPv6) port unreachable: "connection refused", as kube-proxy.
    PortUnreachable,
    /// A TCP reset, for IPv6 TCP: Linux's IPv6 TCP drops an ICMPv6 error
    /// that arrives while `connect()` still holds the socket (as it does
    /// when the node answers within the SYN's own transmission over a
    /// veth), so the client would see the refusal only a second later, with
    /// its retransmission; the eBPF datapath answers the same way.
    TcpReset,
    /// `externalTrafficPolicy: Local` without local endpoints.
    Drop,
}

/// How `fe` (with `policy`) refuses when it has no endpoints.
pub(super) fn refusal(fe: &Frontend, policy: &Policy) -> Refusal {
    match (policy.external, fe.family(), fe.proto) {
        (Some(TrafficPolicy::Local), _, _) => Refusal::Drop,
        (_, Family::V6, Proto::Tcp) => Refusal::TcpReset,
        _ => Refusal::PortUnreachable,
    }
}

/// Runs a command, with its stderr in the error.
pub(super) fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(out)
}

/// `conntrack -D` for UDP flows DNATed to `backend` (or to any backend of
/// the frontend). Returns how many entries were deleted.
pub(super) fn delete_udp_flows(fe: &Frontend, backend: Option<&BackendAddr>) -> usize {
    let mut cmd = Command::new("conntrack");
    cmd.arg("-D");
    // conntrack-tools works on IPv4 entries unless told otherwise.
    if fe.family() == Family::V6 {
        cmd.args(["-f", "ipv6"]);
    }
    cmd.args(["-p", "udp"]);
    // A NodePort's flows are to any node address on its port.
    if !fe.is_nodeport() {
        cmd.args(["--orig-dst", &fe.ip.to_string()]);
    }
    cmd.args(["--orig-port-dst", &fe.port.to_string()]);
    if let Some(b) = backend {
        cmd.args([
            "--reply-src",
            &b.ip.to_string(),
            "--reply-port-src",
            &b.port.to_string(),
        ]);
    }
    match cmd.output() {
        // Exit 1 when none.
        Ok(out) => deleted_count(&String::from_utf8_lossy(&out.stderr)),
        Err(e) => {
            log::warn!("conntrack not available, stale UDP flows stay: {e}");
            0
        }
    }
}

/// The N of conntrack's "conntrack v1.4.7 (conntrack-tools): N flow entries
/// have been deleted." (stderr).
fn deleted_count(stderr: &str) -> usize {
    let words: Vec<&str> = stderr.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[1] == "flow")
        .and_then(|w| w[0].parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_deletion_count_is_parsed() {
        assert_eq!(
            deleted_count(
                "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been deleted.\n"
            ),
            2
        );
        assert_eq!(
            deleted_count(
                "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n"
            ),
            0
        );
        assert_eq!(deleted_count(""), 0);
    }

    #[test]
    fn refusals_follow_family_protocol_and_policy() {
        let fe = |ip: &str, proto| Frontend {
            ip: ip.parse().unwrap(),
            port: 80,
            proto,
        };
        let cluster_ip = Policy::default();
        let local = Policy {
            external: Some(TrafficPolicy::Local),
            ..Policy::default()
        };
        assert_eq!(
            refusal(&fe("10.96.0.1", Proto::Tcp), &cluster_ip),
            Refusal::PortUnreachable
        );
        assert_eq!(
            refusal(&fe("fd00::1", Proto::Tcp), &cluster_ip),
            Refusal::TcpReset
        );
        assert_eq!(
            refusal(&fe("fd00::1", Proto::Udp), &cluster_ip),
            Refusal::PortUnreachable
        );
        assert_eq!(
            refusal(&fe("203.0.113.1", Proto::Tcp), &local),
            Refusal::Drop
        );
    }
}
