//! Applying changes to the maps, and rebuilding the mirror from maps a
//! previous agent left pinned.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use anyhow::{Context, Result, anyhow, bail};
use proxy_common::*;

use super::Dataplane;
use aya::maps::lpm_trie::Key as LpmKey;

use crate::model::{
    BackendAddr, Cidr, DesiredService, DesiredState, Frontend, LbAlgorithm, Policy, Proto,
    TrafficPolicy,
};
use crate::reconcile::{ApplyStats, Change};

/// What the agent wrote for one frontend.
pub(super) struct Programmed {
    pub(super) id: u32,
    pub(super) name: String,
    /// Slot i of the service holds `slots[i]`; `slots.len()` is the count.
    pub(super) slots: Vec<BackendAddr>,
    pub(super) policy: Policy,
}

/// The `SERVICES` value of frontend `id` with `count` slots.
pub fn svc_value(id: u32, count: usize, policy: &Policy) -> SvcValue {
    SvcValue {
        id,
        count: count as u32,
        flags: svc_flags(policy),
        affinity_secs: policy.affinity.unwrap_or(0),
    }
}

/// `SvcValue::flags` of a frontend.
pub fn svc_flags(policy: &Policy) -> u32 {
    let ranges = if policy.source_ranges.is_empty() {
        0
    } else {
        SVC_F_SOURCE_RANGES
    };
    let maglev = match policy.lb {
        LbAlgorithm::Maglev => SVC_F_MAGLEV,
        LbAlgorithm::RoundRobin => 0,
    };
    ranges
        | maglev
        | match policy.external {
            None => 0,
            Some(TrafficPolicy::Cluster) => SVC_F_EXTERNAL,
            Some(TrafficPolicy::Local) => SVC_F_EXTERNAL | SVC_F_DROP_EMPTY,
        }
}

/// The `SOURCE_RANGES` key of one range of frontend `id`.
fn range_key(id: u32, r: &Cidr) -> LpmKey<SrcRangeKey> {
    LpmKey::new(
        32 + u32::from(r.prefix),
        SrcRangeKey {
            svc_id: id.to_be(),
            addr: ip_raw(r.addr),
        },
    )
}

/// The traffic policy `SvcValue::flags` say.
fn policy_of(flags: u32) -> Option<TrafficPolicy> {
    if flags & SVC_F_EXTERNAL == 0 {
        None
    } else if flags & SVC_F_DROP_EMPTY != 0 {
        Some(TrafficPolicy::Local)
    } else {
        Some(TrafficPolicy::Cluster)
    }
}

/// Service ids: dense indexes into the per-service arrays, reused after a
/// service is removed.
pub(super) struct IdAllocator {
    pub(super) next: u32,
    pub(super) free: Vec<u32>,
    pub(super) max: u32,
}

impl IdAllocator {
    pub(super) fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop() {
            return Some(id);
        }
        (self.next < self.max).then(|| {
            self.next += 1;
            self.next - 1
        })
    }
}

pub fn svc_key(fe: &Frontend) -> SvcKey {
    SvcKey {
        addr: ip_raw(fe.ip),
        port: fe.port.to_be(),
        proto: fe.proto.number(),
        _pad: 0,
    }
}

pub fn backend_raw(b: &BackendAddr) -> Backend {
    Backend {
        addr: ip_raw(b.ip),
        port: b.port.to_be(),
        flags: if b.snat { BACKEND_F_SNAT } else { 0 },
    }
}

/// A backend as conntrack names it (address and port, no flags).
fn flow_backend(b: &BackendAddr) -> Backend {
    Backend {
        flags: 0,
        ..backend_raw(b)
    }
}

/// An address as the datapath stores it: network order in memory.
pub fn ip_raw(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

impl Dataplane {
    /// The `SERVICES` keys of a frontend: its own, and for a nodePort one
    /// per node address too, so a packet to the node finds it in one lookup
    /// like a ClusterIP (the address-0 entry stays as the fallback).
    pub(super) fn frontend_keys(&self, fe: &Frontend) -> Vec<SvcKey> {
        let key = svc_key(fe);
        let mut keys = vec![key];
        if fe.is_nodeport() {
            keys.extend(self.node_addrs.iter().map(|&addr| SvcKey { addr, ..key }));
        }
        keys
    }

    /// Rewrites the node-address entries of every nodePort after the node
    /// addresses changed (and drops those a previous agent left for
    /// addresses that are no longer the node's).
    pub(super) fn sync_nodeport_aliases(&mut self) -> Result<()> {
        let nodeports: std::collections::HashMap<(u16, u8), u32> = self
            .programmed
            .iter()
            .filter(|(fe, _)| fe.is_nodeport())
            .map(|(fe, p)| {
                let k = svc_key(fe);
                ((k.port, k.proto), p.id)
            })
            .collect();
        let stale: Vec<SvcKey> = self
            .services
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(k, v)| {
                k.addr != NODEPORT_ADDR
                    && !self.node_addrs.contains(&k.addr)
                    && nodeports.get(&(k.port, k.proto)) == Some(&v.id)
            })
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            self.services.remove(k).or_else(ignore_missing)?;
        }
        let fes: Vec<Frontend> = self
            .programmed
            .keys()
            .filter(|fe| fe.is_nodeport())
            .copied()
            .collect();
        for fe in fes {
            let value = self.services.get(&svc_key(&fe), 0)?;
            for key in self.frontend_keys(&fe) {
                self.services.insert(key, value, 0)?;
            }
        }
        Ok(())
    }

    /// Rebuilds the agent's mirror from pinned maps left by a previous agent,
    /// dropping anything inconsistent (a service whose slots are incomplete,
    /// slots of no service or past a service's count). Conntrack is kept:
    /// established flows stay on their backends.
    pub(super) fn adopt(&mut self) -> Result<()> {
        let mut services = Vec::new();
        for entry in self.services.iter() {
            match entry {
                Ok(kv) => services.push(kv),
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let mut ranges: std::collections::BTreeMap<u32, Vec<Cidr>> = Default::default();
        let mut range_keys = Vec::new();
        for k in self.source_ranges.keys() {
            let k = k?;
            let data = k.data();
            let id = u32::from_be(data.svc_id);
            let prefix = k.prefix_len().saturating_sub(32).min(32) as u8;
            ranges.entry(id).or_default().push(Cidr {
                addr: Ipv4Addr::from(data.addr.to_ne_bytes()),
                prefix,
            });
            range_keys.push(k);
        }
        let mut live: HashSet<(u32, u32)> = HashSet::new();
        let mut used_ids = HashSet::new();
        let mut dropped = 0usize;
        // A nodePort's entries under each node address share its id: they
        // are aliases of the address-0 entry, rewritten by set_node_addrs.
        let nodeports: HashSet<(u16, u8, u32)> = services
            .iter()
            .filter(|(k, _)| k.addr == NODEPORT_ADDR)
            .map(|(k, v)| (k.port, k.proto, v.id))
            .collect();
        let services: Vec<(SvcKey, SvcValue)> = services
            .into_iter()
            .filter(|(k, v)| {
                k.addr == NODEPORT_ADDR || !nodeports.contains(&(k.port, k.proto, v.id))
            })
            .collect();
        for (key, val) in services {
            let fe = Frontend {
                ip: Ipv4Addr::from(key.addr.to_ne_bytes()),
                port: u16::from_be(key.port),
                proto: match key.proto {
                    IPPROTO_TCP => Proto::Tcp,
                    IPPROTO_UDP => Proto::Udp,
                    _ => {
                        self.services.remove(&key).or_else(ignore_missing)?;
                        dropped += 1;
                        continue;
                    }
                },
            };
            let mut slots = Vec::with_capacity(val.count as usize);
            for slot in 0..val.count {
                match self.slots.get(
                    &SlotKey {
                        svc_id: val.id,
                        slot,
                    },
                    0,
                ) {
                    Ok(b) => slots.push(BackendAddr {
                        ip: Ipv4Addr::from(b.addr.to_ne_bytes()),
                        port: u16::from_be(b.port),
                        snat: b.flags & BACKEND_F_SNAT != 0,
                    }),
                    Err(_) => break,
                }
            }
            if slots.len() != val.count as usize
                || val.id >= self.ids.max
                || !used_ids.insert(val.id)
            {
                // Half-written or clashing: remove; the reconcile re-adds it.
                self.services.remove(&key).or_else(ignore_missing)?;
                dropped += 1;
                continue;
            }
            for slot in 0..val.count {
                live.insert((val.id, slot));
            }
            self.programmed.insert(
                fe,
                Programmed {
                    id: val.id,
                    name: format!("{fe} (adopted)"),
                    slots,
                    policy: Policy {
                        external: policy_of(val.flags),
                        source_ranges: if val.flags & SVC_F_SOURCE_RANGES != 0 {
                            let mut r = ranges.get(&val.id).cloned().unwrap_or_default();
                            r.sort();
                            r
                        } else {
                            Vec::new()
                        },
                        affinity: (val.affinity_secs != 0).then_some(val.affinity_secs),
                        lb: if val.flags & SVC_F_MAGLEV != 0 {
                            LbAlgorithm::Maglev
                        } else {
                            LbAlgorithm::RoundRobin
                        },
                    },
                },
            );
        }
        // A Maglev frontend whose table is missing gets it back (the
        // programs fall back to round-robin meanwhile).
        let maglev: Vec<(u32, Vec<BackendAddr>)> = self
            .programmed
            .values()
            .filter(|p| p.policy.lb == LbAlgorithm::Maglev)
            .map(|p| (p.id, p.slots.clone()))
            .collect();
        for (id, slots) in maglev {
            if self.maglev.get(&id, 0).is_err() {
                self.write_maglev(id, &slots)?;
            }
        }
        let orphans: Vec<SlotKey> = self
            .slots
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !live.contains(&(k.svc_id, k.slot)))
            .collect();
        for k in &orphans {
            self.slots.remove(k).or_else(ignore_missing)?;
        }
        for k in &range_keys {
            let id = u32::from_be(k.data().svc_id);
            if !self
                .programmed
                .values()
                .any(|p| p.id == id && !p.policy.source_ranges.is_empty())
            {
                self.source_ranges.remove(k).or_else(ignore_missing)?;
            }
        }
        let max_id = used_ids.iter().copied().max().map_or(0, |m| m + 1);
        self.ids.next = max_id;
        self.ids.free = (0..max_id)
            .filter(|i| !used_ids.contains(i))
            .rev()
            .collect();
        if !self.programmed.is_empty() || dropped > 0 || !orphans.is_empty() {
            log::info!(
                "adopted pinned datapath: {} frontends, {} backends, {} conntrack entries; \
                 dropped {dropped} inconsistent frontends and {} orphaned slots",
                self.programmed.len(),
                self.backend_count(),
                self.conntrack_entries(),
                orphans.len()
            );
        }
        Ok(())
    }

    /// The desired state the maps currently implement.
    pub fn programmed_state(&self) -> DesiredState {
        DesiredState {
            services: self
                .programmed
                .iter()
                .map(|(fe, p)| {
                    let svc = DesiredService {
                        policy: p.policy.clone(),
                        ..DesiredService::new(p.name.clone(), p.slots.iter().copied().collect())
                    };
                    (*fe, svc)
                })
                .collect(),
            health_checks: Default::default(),
        }
    }

    pub fn service_count(&self) -> usize {
        self.programmed.len()
    }

    pub fn backend_count(&self) -> usize {
        self.programmed.values().map(|p| p.slots.len()).sum()
    }

    /// Applies changes in order. Each change leaves the maps consistent for
    /// packets in flight; flows whose backend went away are flushed from
    /// conntrack at the end, after no slot points at those backends any more.
    pub fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        // (service id, backend) pairs whose flows must go.
        let mut gone_backends: HashSet<(u32, Backend)> = HashSet::new();
        // Ids of removed services: their flows go, then the ids are freed.
        let mut gone_ids: HashSet<u32> = HashSet::new();
        // (service id, backend) pairs whose clients lose their affinity.
        let mut unbound: HashSet<(u32, Backend)> = HashSet::new();
        for change in changes {
            match change {
                Change::RemoveService { frontend } => {
                    let Some(p) = self.programmed.remove(frontend) else {
                        continue;
                    };
                    // Frontend first: from here packets pass untouched.
                    for key in self.frontend_keys(frontend) {
                        self.services.remove(&key).or_else(ignore_missing)?;
                    }
                    for slot in 0..p.slots.len() as u32 {
                        self.slots
                            .remove(&SlotKey { svc_id: p.id, slot })
                            .or_else(ignore_missing)?;
                    }
                    for r in &p.policy.source_ranges {
                        self.source_ranges
                            .remove(&range_key(p.id, r))
                            .or_else(ignore_missing)?;
                    }
                    if p.policy.lb == LbAlgorithm::Maglev {
                        self.maglev.remove(&p.id).or_else(ignore_missing)?;
                    }
                    gone_ids.insert(p.id);
                    stats.services_removed += 1;
                    stats.backends_removed += p.slots.len();
                }
                Change::AddService {
                    frontend,
                    name,
                    backends,
                    policy,
                } => {
                    if self.programmed.contains_key(frontend) {
                        bail!("service {frontend} is already programmed");
                    }
                    let id = self.ids.alloc().ok_or_else(|| {
                        anyhow!(
                            "service table full ({} frontends): raise --max-services",
                            self.ids.max
                        )
                    })?;
                    // A reused id starts with a fresh cursor and counters.
                    self.cursors.set(id, 0, 0)?;
                    let zero = self.zeroed_counters();
                    self.svc_counters.set(id, zero, 0)?;
                    let slots: Vec<BackendAddr> = backends.iter().copied().collect();
                    for (i, b) in slots.iter().enumerate() {
                        self.slots
                            .insert(
                                SlotKey {
                                    svc_id: id,
                                    slot: i as u32,
                                },
                                backend_raw(b),
                                0,
                            )
                            .with_context(|| slot_table_hint(frontend))?;
                    }
                    // Ranges before the frontend: it never admits everyone.
                    for r in &policy.source_ranges {
                        self.source_ranges
                            .insert(&range_key(id, r), 1, 0)
                            .with_context(|| {
                                format!("writing loadBalancerSourceRanges of {frontend}")
                            })?;
                    }
                    if policy.lb == LbAlgorithm::Maglev {
                        self.write_maglev(id, &slots)
                            .with_context(|| format!("writing the Maglev table of {frontend}"))?;
                    }
                    let value = svc_value(id, slots.len(), policy);
                    for key in self.frontend_keys(frontend) {
                        self.services.insert(key, value, 0)?;
                    }
                    stats.services_added += 1;
                    stats.backends_added += slots.len();
                    self.programmed.insert(
                        *frontend,
                        Programmed {
                            id,
                            name: name.clone(),
                            slots,
                            policy: policy.clone(),
                        },
                    );
                }
                Change::RenameService { frontend, name } => {
                    // Names live in the mirror only; the maps key on ids.
                    let Some(p) = self.programmed.get_mut(frontend) else {
                        bail!("service {frontend} is not programmed");
                    };
                    p.name.clone_from(name);
                }
                Change::UpdateBackends {
                    frontend,
                    added,
                    removed,
                    flush,
                } => {
                    let keys = self.frontend_keys(frontend);
                    let Some(p) = self.programmed.get_mut(frontend) else {
                        bail!("service {frontend} is not programmed");
                    };
                    let old = p.slots.clone();
                    let mut new = old.clone();
                    // Swap-remove keeps the table dense: the last backend
                    // moves into the hole. Round-robin stays exact over the
                    // new count; existing flows live in conntrack and do not
                    // depend on slots.
                    for b in removed {
                        if let Some(i) = new.iter().position(|x| x == b) {
                            new.swap_remove(i);
                        }
                    }
                    // Draining backends keep their flows (they are in
                    // `removed` but not in `flush`).
                    gone_backends.extend(flush.iter().map(|b| (p.id, flow_backend(b))));
                    // Affinity ends as soon as the backend leaves the
                    // rotation (draining or gone).
                    if p.policy.affinity.is_some() {
                        unbound.extend(removed.iter().map(|b| (p.id, flow_backend(b))));
                    }
                    new.extend(added.iter().copied());
                    // 1. Slots that change or appear (beyond the old count
                    //    they are invisible until step 2).
                    for (i, b) in new.iter().enumerate() {
                        if old.get(i) != Some(b) {
                            self.slots
                                .insert(
                                    SlotKey {
                                        svc_id: p.id,
                                        slot: i as u32,
                                    },
                                    backend_raw(b),
                                    0,
                                )
                                .with_context(|| slot_table_hint(frontend))?;
                        }
                    }
                    // 2. The new count makes them live; a Maglev table is
                    //    replaced whole just before (it names backends, not
                    //    slots, so either table is valid with either count).
                    let (id, policy) = (p.id, p.policy.clone());
                    if policy.lb == LbAlgorithm::Maglev {
                        self.write_maglev(id, &new)
                            .with_context(|| format!("writing the Maglev table of {frontend}"))?;
                    }
                    let Some(p) = self.programmed.get_mut(frontend) else {
                        bail!("service {frontend} is not programmed");
                    };
                    let value = svc_value(p.id, new.len(), &p.policy);
                    for key in keys {
                        self.services.insert(key, value, 0)?;
                    }
                    // 3. Slots past the new count are unreachable now.
                    for i in new.len()..old.len() {
                        self.slots
                            .remove(&SlotKey {
                                svc_id: p.id,
                                slot: i as u32,
                            })
                            .or_else(ignore_missing)?;
                    }
                    stats.backends_added += added.len();
                    stats.backends_removed += removed.len();
                    p.slots = new;
                }
            }
        }
        if !gone_backends.is_empty() || !gone_ids.is_empty() {
            stats.flows_flushed = self.flush_flows(&gone_backends, &gone_ids)?;
        }
        if !unbound.is_empty() || !gone_ids.is_empty() {
            self.unbind_clients(&unbound, &gone_ids)?;
        }
        for id in gone_ids {
            self.ids.free.push(id);
        }
        Ok(stats)
    }

    /// Deletes conntrack entries (both directions) of flows on removed
    /// backends or removed services, so UDP flows move to a live backend on
    /// their next packet and TCP flows get a reset instead of hanging.
    fn flush_flows(
        &mut self,
        backends: &HashSet<(u32, Backend)>,
        ids: &HashSet<u32>,
    ) -> Result<usize> {
        let mut doomed = Vec::new();
        for entry in self.conntrack.iter() {
            let (k, v) = match entry {
                Ok(kv) => kv,
                // An LRU entry evicted while we walk: nothing to flush.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(e.into()),
            };
            let backend = if k.dir == CT_DIR_FORWARD {
                Backend {
                    addr: v.addr,
                    port: v.port,
                    flags: 0,
                }
            } else {
                Backend {
                    addr: k.saddr,
                    port: k.sport,
                    flags: 0,
                }
            };
            if ids.contains(&v.svc_id) || backends.contains(&(v.svc_id, backend)) {
                doomed.push(k);
            }
        }
        for k in &doomed {
            self.conntrack.remove(k).or_else(ignore_missing)?;
        }
        Ok(doomed.len())
    }
}

impl Dataplane {
    /// Writes frontend `id`'s Maglev table for `backends` in one update
    /// (none: the table goes; such a frontend refuses before it looks).
    fn write_maglev(&mut self, id: u32, backends: &[BackendAddr]) -> Result<()> {
        let (sorted, entries) = super::maglev::table(backends);
        if sorted.is_empty() {
            self.maglev.remove(&id).or_else(ignore_missing)?;
            return Ok(());
        }
        let raw: Vec<Backend> = sorted.iter().map(backend_raw).collect();
        let mut t = Box::new(MaglevTable {
            backends: [raw[0]; MAGLEV_M as usize],
            _slack: [raw[0]; MAGLEV_SLACK],
        });
        for (slot, owner) in t.backends.iter_mut().zip(&entries) {
            *slot = raw[*owner as usize];
        }
        self.maglev.insert(id, *t, 0)?;
        Ok(())
    }

    /// Deletes the `AFFINITY` entries that bind clients to `backends` (of
    /// their service id) or to removed services, so a client's next flow
    /// is balanced again and a reused id starts with no bindings.
    fn unbind_clients(
        &mut self,
        backends: &HashSet<(u32, Backend)>,
        ids: &HashSet<u32>,
    ) -> Result<()> {
        let mut doomed = Vec::new();
        for entry in self.affinity.iter() {
            let (k, v) = match entry {
                Ok(kv) => kv,
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(e.into()),
            };
            let b = Backend {
                flags: 0,
                ..v.backend
            };
            if ids.contains(&k.svc_id) || backends.contains(&(k.svc_id, b)) {
                doomed.push(k);
            }
        }
        for k in &doomed {
            self.affinity.remove(k).or_else(ignore_missing)?;
        }
        Ok(())
    }
}

pub(super) fn ignore_missing(e: aya::maps::MapError) -> Result<(), aya::maps::MapError> {
    match e {
        aya::maps::MapError::KeyNotFound => Ok(()),
        e => Err(e),
    }
}

fn slot_table_hint(fe: &Frontend) -> String {
    format!("writing backend slots of {fe} (slot table full? raise --max-backends)")
}
