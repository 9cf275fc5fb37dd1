//! Applying changes to the maps, and rebuilding the mirror from maps a
//! previous agent left pinned.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

/// The `SERVICES` key of an IPv4 frontend (an IPv6 one is never asked).
pub fn svc_key(fe: &Frontend) -> SvcKey {
    SvcKey {
        addr: match fe.ip {
            IpAddr::V4(ip) => ip_raw(ip),
            IpAddr::V6(_) => u32::MAX,
        },
        port: fe.port.to_be(),
        proto: fe.proto.number(),
        _pad: 0,
    }
}

/// The `SERVICES6` key of an IPv6 frontend.
pub fn svc_key6(ip: Ipv6Addr, fe: &Frontend) -> SvcKey6 {
    SvcKey6 {
        addr: ip6_raw(ip),
        port: fe.port.to_be(),
        proto: fe.proto.number(),
        _pad: 0,
    }
}

/// The `SLOTS` value of an IPv4 backend.
pub fn backend_raw(b: &BackendAddr) -> Backend {
    Backend {
        addr: match b.ip {
            IpAddr::V4(ip) => ip_raw(ip),
            IpAddr::V6(_) => u32::MAX,
        },
        port: b.port.to_be(),
        flags: if b.snat { BACKEND_F_SNAT } else { 0 },
    }
}

/// The `SLOTS6` value of an IPv6 backend.
fn backend6_raw(ip: Ipv6Addr, b: &BackendAddr) -> Backend6 {
    Backend6 {
        addr: ip6_raw(ip),
        port: b.port.to_be(),
        flags: 0,
    }
}

/// A backend as conntrack and affinity name it (address and port).
fn flow_backend(b: &BackendAddr) -> BackendAddr {
    BackendAddr { snat: false, ..*b }
}

/// An address as the datapath stores it: network order in memory.
pub fn ip_raw(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// An IPv6 address as the datapath stores it (as on the wire).
pub fn ip6_raw(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The address [`ip6_raw`] stored.
pub fn ip6_from_raw(raw: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, w) in raw.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

fn v4_backend(addr: u32, port: u16) -> BackendAddr {
    BackendAddr::new(Ipv4Addr::from(addr.to_ne_bytes()), u16::from_be(port))
}

fn v6_backend(addr: [u32; 4], port: u16) -> BackendAddr {
    BackendAddr::new(ip6_from_raw(addr), u16::from_be(port))
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

    /// Writes a frontend's value under every key it has.
    fn put_frontend(&mut self, fe: &Frontend, value: SvcValue) -> Result<()> {
        if let IpAddr::V6(ip) = fe.ip {
            self.services6.insert(svc_key6(ip, fe), value, 0)?;
            return Ok(());
        }
        for key in self.frontend_keys(fe) {
            self.services.insert(key, value, 0)?;
        }
        Ok(())
    }

    /// Removes a frontend's keys: from here its packets pass untouched.
    fn remove_frontend(&mut self, fe: &Frontend) -> Result<()> {
        if let IpAddr::V6(ip) = fe.ip {
            self.services6
                .remove(&svc_key6(ip, fe))
                .or_else(ignore_missing)?;
            return Ok(());
        }
        for key in self.frontend_keys(fe) {
            self.services.remove(&key).or_else(ignore_missing)?;
        }
        Ok(())
    }

    /// Writes slot `slot` of frontend `id` (of `fe`'s family).
    fn put_slot(&mut self, fe: &Frontend, id: u32, slot: u32, b: &BackendAddr) -> Result<()> {
        let key = SlotKey { svc_id: id, slot };
        match b.ip {
            IpAddr::V6(ip) => self.slots6.insert(key, backend6_raw(ip, b), 0),
            IpAddr::V4(_) => self.slots.insert(key, backend_raw(b), 0),
        }
        .with_context(|| slot_table_hint(fe))
    }

    fn remove_slot(&mut self, fe: &Frontend, id: u32, slot: u32) -> Result<()> {
        let key = SlotKey { svc_id: id, slot };
        if fe.ip.is_ipv6() {
            self.slots6.remove(&key).or_else(ignore_missing)?;
        } else {
            self.slots.remove(&key).or_else(ignore_missing)?;
        }
        Ok(())
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
        // (IPv6, service id, slot) of every slot in use.
        let mut live: HashSet<(bool, u32, u32)> = HashSet::new();
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
        let proto_of = |p: u8| match p {
            IPPROTO_TCP => Some(Proto::Tcp),
            IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        };
        let mut candidates: Vec<(Frontend, SvcValue)> = Vec::new();
        for (key, val) in services {
            let Some(proto) = proto_of(key.proto) else {
                self.services.remove(&key).or_else(ignore_missing)?;
                dropped += 1;
                continue;
            };
            let ip = IpAddr::V4(Ipv4Addr::from(key.addr.to_ne_bytes()));
            let port = u16::from_be(key.port);
            candidates.push((Frontend { ip, port, proto }, val));
        }
        let mut services6 = Vec::new();
        for entry in self.services6.iter() {
            match entry {
                Ok(kv) => services6.push(kv),
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        for (key, val) in services6 {
            let Some(proto) = proto_of(key.proto) else {
                self.services6.remove(&key).or_else(ignore_missing)?;
                dropped += 1;
                continue;
            };
            let ip = IpAddr::V6(ip6_from_raw(key.addr));
            let port = u16::from_be(key.port);
            candidates.push((Frontend { ip, port, proto }, val));
        }
        for (fe, val) in candidates {
            let v6 = fe.ip.is_ipv6();
            let mut slots = Vec::with_capacity(val.count as usize);
            for slot in 0..val.count {
                let key = SlotKey {
                    svc_id: val.id,
                    slot,
                };
                let b = if v6 {
                    self.slots6.get(&key, 0).map(|b| v6_backend(b.addr, b.port))
                } else {
                    self.slots.get(&key, 0).map(|b| BackendAddr {
                        snat: b.flags & BACKEND_F_SNAT != 0,
                        ..v4_backend(b.addr, b.port)
                    })
                };
                match b {
                    Ok(b) => slots.push(b),
                    Err(_) => break,
                }
            }
            if slots.len() != val.count as usize
                || val.id >= self.ids.max
                || !used_ids.insert(val.id)
            {
                // Half-written or clashing: remove; the reconcile re-adds it.
                self.remove_frontend(&fe)?;
                dropped += 1;
                continue;
            }
            for slot in 0..val.count {
                live.insert((v6, val.id, slot));
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
            .filter(|k| !live.contains(&(false, k.svc_id, k.slot)))
            .collect();
        for k in &orphans {
            self.slots.remove(k).or_else(ignore_missing)?;
        }
        let orphans6: Vec<SlotKey> = self
            .slots6
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !live.contains(&(true, k.svc_id, k.slot)))
            .collect();
        for k in &orphans6 {
            self.slots6.remove(k).or_else(ignore_missing)?;
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
        if !self.programmed.is_empty() || dropped > 0 || !orphans.is_empty() || !orphans6.is_empty()
        {
            log::info!(
                "adopted pinned datapath: {} frontends, {} backends, {} conntrack entries; \
                 dropped {dropped} inconsistent frontends and {} orphaned slots",
                self.programmed.len(),
                self.backend_count(),
                self.conntrack_entries(),
                orphans.len() + orphans6.len()
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
        let mut gone_backends: HashSet<(u32, BackendAddr)> = HashSet::new();
        // Ids of removed services: their flows go, then the ids are freed.
        let mut gone_ids: HashSet<u32> = HashSet::new();
        // (service id, backend) pairs whose clients lose their affinity.
        let mut unbound: HashSet<(u32, BackendAddr)> = HashSet::new();
        for change in changes {
            match change {
                Change::RemoveService { frontend } => {
                    let Some(p) = self.programmed.remove(frontend) else {
                        continue;
                    };
                    // Frontend first: from here packets pass untouched.
                    self.remove_frontend(frontend)?;
                    for slot in 0..p.slots.len() as u32 {
                        self.remove_slot(frontend, p.id, slot)?;
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
                        self.put_slot(frontend, id, i as u32, b)?;
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
                    self.put_frontend(frontend, svc_value(id, slots.len(), policy))?;
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
                    let (id, policy) = (p.id, p.policy.clone());
                    for (i, b) in new.iter().enumerate() {
                        if old.get(i) != Some(b) {
                            self.put_slot(frontend, id, i as u32, b)?;
                        }
                    }
                    // 2. The new count makes them live; a Maglev table is
                    //    replaced whole just before (an IPv4 one names
                    //    backends, so either table is valid with either
                    //    count; an IPv6 one names slots, which may place a
                    //    flow on the slot's new backend in between).
                    if policy.lb == LbAlgorithm::Maglev {
                        self.write_maglev(id, &new)
                            .with_context(|| format!("writing the Maglev table of {frontend}"))?;
                    }
                    self.put_frontend(frontend, svc_value(id, new.len(), &policy))?;
                    // 3. Slots past the new count are unreachable now.
                    for i in new.len()..old.len() {
                        self.remove_slot(frontend, id, i as u32)?;
                    }
                    stats.backends_added += added.len();
                    stats.backends_removed += removed.len();
                    if let Some(p) = self.programmed.get_mut(frontend) {
                        p.slots = new;
                    }
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
        backends: &HashSet<(u32, BackendAddr)>,
        ids: &HashSet<u32>,
    ) -> Result<usize> {
        let doomed =
            |svc_id: u32, b: BackendAddr| ids.contains(&svc_id) || backends.contains(&(svc_id, b));
        let v4 = remove_where(&mut self.conntrack, |k, v| {
            let b = if k.dir == CT_DIR_FORWARD {
                v4_backend(v.addr, v.port)
            } else {
                v4_backend(k.saddr, k.sport)
            };
            doomed(v.svc_id, b)
        })?;
        let v6 = remove_where(&mut self.conntrack6, |k, v| {
            let b = if k.dir == CT_DIR_FORWARD {
                v6_backend(v.addr, v.port)
            } else {
                v6_backend(k.saddr, k.sport)
            };
            doomed(v.svc_id, b)
        })?;
        Ok(v4 + v6)
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
        // An IPv6 frontend's table names slots (a `Backend` cannot hold
        // an IPv6 address): the program reads `SLOTS6` at that number.
        let raw: Vec<Backend> = sorted
            .iter()
            .map(|b| match b.ip {
                IpAddr::V4(_) => backend_raw(b),
                IpAddr::V6(_) => Backend {
                    addr: backends.iter().position(|x| x == b).unwrap_or(0) as u32,
                    port: 0,
                    flags: 0,
                },
            })
            .collect();
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
        backends: &HashSet<(u32, BackendAddr)>,
        ids: &HashSet<u32>,
    ) -> Result<()> {
        let doomed =
            |svc_id: u32, b: BackendAddr| ids.contains(&svc_id) || backends.contains(&(svc_id, b));
        remove_where(&mut self.affinity, |k, v| {
            doomed(k.svc_id, v4_backend(v.backend.addr, v.backend.port))
        })?;
        remove_where(&mut self.affinity6, |k, v| {
            doomed(k.svc_id, v6_backend(v.backend.addr, v.backend.port))
        })?;
        Ok(())
    }
}

/// Deletes the entries of `map` for which `doomed` holds; returns how many.
/// An LRU entry evicted while the map is walked is simply not there.
fn remove_where<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    doomed: impl Fn(&K, &V) -> bool,
) -> Result<usize> {
    let mut gone = Vec::new();
    for entry in map.iter() {
        match entry {
            Ok((k, v)) if doomed(&k, &v) => gone.push(k),
            Ok(_) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    for k in &gone {
        map.remove(k).or_else(ignore_missing)?;
    }
    Ok(gone.len())
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
