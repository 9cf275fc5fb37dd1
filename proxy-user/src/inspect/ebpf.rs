//! eBPF mode: the maps a running (or exited, `--keep-datapath-on-exit`)
//! agent pinned under `<pin-dir>/<layout tag>/`, opened from their pins and
//! only read. No program is loaded. IPv6 ClusterIPs have maps of their own
//! (`SERVICES6`, `SLOTS6`, `CONNTRACK6`, `AFFINITY6`) but share the service
//! ids, so their rows mix with the IPv4 ones.

use std::collections::{BTreeMap, HashMap as StdHashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use aya::Pod;
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError};
use proxy_common::*;

use super::{
    AffinityRow, BackendsRow, ConntrackRow, FrontendId, InspectMode, Report, Rows, ServiceRow,
    SlotRow, Subject,
};
use crate::datapath::ebpf::gc::monotonic_ns;
use crate::datapath::ebpf::{ip6_from_raw, layout_tag_prefix};
use crate::model::{BackendAddr, Family, Frontend, Proto};

/// Reads `subject` from the datapath pinned under `pin_dir`.
pub fn read(subject: Subject, pin_dir: &Path) -> Result<Report> {
    let root = pinned_root(pin_dir)?;
    let pins = Pins { root: &root };
    let rows = match subject {
        Subject::Services => Rows::Services(services(&pins)?),
        Subject::Backends => Rows::Frontends(backends(&pins)?),
        Subject::Conntrack => Rows::Entries(conntrack(&pins)?),
        Subject::Affinity => Rows::Bindings(affinity(&pins)?),
    };
    Ok(Report::new(
        subject,
        InspectMode::Ebpf,
        root.display().to_string(),
        rows,
    ))
}

/// The one layout directory under `pin_dir`, if this binary reads its
/// layout: the tag's version and key/value sizes must be this binary's
/// ([`layout_tag_prefix`]); the capacities may be anything.
pub fn pinned_root(pin_dir: &Path) -> Result<PathBuf> {
    let none = || {
        anyhow!(
            "no pinned kproxy datapath under {} (is the agent running with pinning?)",
            pin_dir.display()
        )
    };
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(none()),
        Err(e) => bail!("cannot read the pin directory {}: {e}", pin_dir.display()),
    };
    let mut tags = Vec::new();
    for entry in entries {
        let entry = entry
            .with_context(|| format!("cannot read the pin directory {}", pin_dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_layout_tag(&name) && entry.file_type().is_ok_and(|t| t.is_dir()) {
            tags.push(name);
        }
    }
    tags.sort();
    let prefix = layout_tag_prefix();
    let ours: Vec<&String> = tags
        .iter()
        .filter(|t| {
            t.strip_prefix(&prefix)
                .is_some_and(|rest| rest.starts_with("-s"))
        })
        .collect();
    match ours.as_slice() {
        [one] => Ok(pin_dir.join(one)),
        [] if tags.is_empty() => Err(none()),
        [] => bail!(
            "the datapath pinned under {} has layout {}, this kproxy reads layout {prefix}-…: \
             inspect it with the kproxy binary the agent runs",
            pin_dir.display(),
            tags.join(", ")
        ),
        many => bail!(
            "several pinned kproxy layouts under {}: {}",
            pin_dir.display(),
            many.iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The agent's layout directories are named `v<version>-…`.
fn is_layout_tag(name: &str) -> bool {
    name.strip_prefix('v')
        .and_then(|rest| rest.split_once('-'))
        .is_some_and(|(v, _)| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
}

struct Pins<'a> {
    root: &'a Path,
}

impl Pins<'_> {
    /// Opens a pinned map as `T`, which checks its type and key/value sizes.
    fn open<T>(&self, name: &str) -> Result<T>
    where
        T: TryFrom<Map, Error = MapError>,
    {
        let path = self.root.join(name);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening the pinned map {}", path.display()))?;
        let map = Map::from_map_data(data)
            .with_context(|| format!("reading the pinned map {}", path.display()))?;
        T::try_from(map).with_context(|| {
            format!(
                "the pinned map {} is not of the type and sizes this kproxy reads",
                path.display()
            )
        })
    }
}

/// Every entry of a hash map; entries deleted during the walk (LRU
/// eviction, the agent) are skipped.
fn entries<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>, name: &str) -> Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    for e in map.iter() {
        match e {
            Ok(kv) => out.push(kv),
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {name}")),
        }
    }
    Ok(out)
}

/// An address as the maps hold it (network order in memory).
fn ip(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

fn proto(p: u8) -> Option<Proto> {
    match p {
        IPPROTO_TCP => Some(Proto::Tcp),
        IPPROTO_UDP => Some(Proto::Udp),
        _ => None,
    }
}

fn proto_name(p: u8) -> String {
    proto(p).map_or_else(|| format!("proto-{p}"), |p| p.to_string())
}

fn endpoint(addr: u32, port: u16) -> String {
    format!("{}:{}", ip(addr), u16::from_be(port))
}

/// An IPv6 address and network-order port as `[addr]:port`.
fn endpoint6(addr: [u32; 4], port: u16) -> String {
    SocketAddr::new(IpAddr::V6(ip6_from_raw(addr)), u16::from_be(port)).to_string()
}

/// A `SERVICES` frontend with the node addresses a nodePort is also keyed
/// under.
struct Entry {
    fe: Frontend,
    value: SvcValue,
    aliases: Vec<Ipv4Addr>,
}

/// The frontends of `SERVICES`, nodePort aliases folded into their
/// address-0 entry (the rule `Dataplane::adopt` uses: same port, protocol
/// and id), and of `SERVICES6`, sorted.
fn frontends(pins: &Pins) -> Result<Vec<Entry>> {
    let services: HashMap<MapData, SvcKey, SvcValue> = pins.open("SERVICES")?;
    let all = entries(&services, "SERVICES")?;
    let mut nodeports: BTreeMap<(u16, u8, u32), Vec<Ipv4Addr>> = all
        .iter()
        .filter(|(k, _)| k.addr == NODEPORT_ADDR)
        .map(|(k, v)| ((k.port, k.proto, v.id), Vec::new()))
        .collect();
    let mut own = Vec::new();
    for (k, v) in all {
        match nodeports.get_mut(&(k.port, k.proto, v.id)) {
            Some(aliases) if k.addr != NODEPORT_ADDR => aliases.push(ip(k.addr)),
            _ => own.push((k, v)),
        }
    }
    let mut out: Vec<Entry> = own
        .into_iter()
        .filter_map(|(k, value)| {
            let fe = Frontend {
                ip: std::net::IpAddr::V4(ip(k.addr)),
                port: u16::from_be(k.port),
                proto: proto(k.proto)?,
            };
            let mut aliases = if k.addr == NODEPORT_ADDR {
                nodeports.remove(&(k.port, k.proto, value.id))?
            } else {
                Vec::new()
            };
            aliases.sort();
            Some(Entry { fe, value, aliases })
        })
        .collect();
    let services6: HashMap<MapData, SvcKey6, SvcValue> = pins.open("SERVICES6")?;
    out.extend(
        entries(&services6, "SERVICES6")?
            .into_iter()
            .filter_map(|(k, value)| {
                let fe = Frontend {
                    ip: IpAddr::V6(ip6_from_raw(k.addr)),
                    port: u16::from_be(k.port),
                    proto: proto(k.proto)?,
                };
                Some(Entry {
                    fe,
                    value,
                    aliases: Vec::new(),
                })
            }),
    );
    out.sort_by_key(|e| e.fe);
    Ok(out)
}

fn services(pins: &Pins) -> Result<Vec<ServiceRow>> {
    let fes = frontends(pins)?;
    let ranges_map: LpmTrie<MapData, SrcRangeKey, u32> = pins.open("SOURCE_RANGES")?;
    let mut ranges: StdHashMap<u32, Vec<(Ipv4Addr, u32)>> = StdHashMap::new();
    for k in ranges_map.keys() {
        let k = match k {
            Ok(k) => k,
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(e).context("reading SOURCE_RANGES"),
        };
        let data = k.data();
        ranges
            .entry(u32::from_be(data.svc_id))
            .or_default()
            .push((ip(data.addr), k.prefix_len().saturating_sub(32)));
    }
    Ok(fes
        .into_iter()
        .map(|e| {
            let v = e.value;
            let (mut flags, traffic_policy) = super::flags(
                v.flags & SVC_F_EXTERNAL != 0,
                v.flags & SVC_F_DROP_EMPTY != 0,
                v.flags & SVC_F_SOURCE_RANGES != 0,
            );
            if v.flags & SVC_F_MAGLEV != 0 {
                flags.push("maglev");
            }
            let mut cidrs = if v.flags & SVC_F_SOURCE_RANGES != 0 {
                ranges.get(&v.id).cloned().unwrap_or_default()
            } else {
                Vec::new()
            };
            cidrs.sort();
            ServiceRow {
                id: FrontendId::from(&e.fe),
                node_addresses: e.aliases.iter().map(|a| a.to_string()).collect(),
                service_id: Some(v.id),
                name: None,
                backends: v.count as usize,
                flags,
                traffic_policy,
                source_ranges: cidrs.iter().map(|(a, p)| format!("{a}/{p}")).collect(),
                affinity_seconds: v.affinity_secs,
            }
        })
        .collect())
}

fn backends(pins: &Pins) -> Result<Vec<BackendsRow>> {
    let fes = frontends(pins)?;
    let slots: HashMap<MapData, SlotKey, Backend> = pins.open("SLOTS")?;
    let slots6: HashMap<MapData, SlotKey, Backend6> = pins.open("SLOTS6")?;
    let cursors: Array<MapData, u64> = pins.open("RR_CURSOR")?;
    let mut out = Vec::with_capacity(fes.len());
    for e in fes {
        let id = e.value.id;
        let mut rows = Vec::with_capacity(e.value.count as usize);
        for slot in 0..e.value.count {
            let key = SlotKey { svc_id: id, slot };
            // A slot the agent has not written yet (or a torn table) is
            // left out; `count` and the rows then differ.
            let b = match e.fe.family() {
                Family::V4 => slots
                    .get(&key, 0)
                    .map(|b| (BackendAddr::new(ip(b.addr), u16::from_be(b.port)), b.flags)),
                Family::V6 => slots6.get(&key, 0).map(|b| {
                    (
                        BackendAddr::new(ip6_from_raw(b.addr), u16::from_be(b.port)),
                        b.flags,
                    )
                }),
            };
            let (addr, flags) = match b {
                Ok(b) => b,
                Err(MapError::KeyNotFound) => continue,
                Err(err) => {
                    let map = if e.fe.family() == Family::V6 {
                        "SLOTS6"
                    } else {
                        "SLOTS"
                    };
                    return Err(err).with_context(|| format!("reading {map}"));
                }
            };
            rows.push(SlotRow {
                snat: Some(flags & BACKEND_F_SNAT != 0),
                ..SlotRow::new(slot, &addr)
            });
        }
        out.push(BackendsRow {
            id: FrontendId::from(&e.fe),
            service_id: Some(id),
            name: None,
            rr_cursor: cursors.get(&id, 0).ok(),
            backends: rows,
        });
    }
    Ok(out)
}

/// Service id → frontend, for the rows that only hold the id.
fn frontend_names(pins: &Pins) -> Result<StdHashMap<u32, (String, u32)>> {
    Ok(frontends(pins)?
        .into_iter()
        .map(|e| (e.value.id, (e.fe.to_string(), e.value.affinity_secs)))
        .collect())
}

fn direction(dir: u8) -> &'static str {
    if dir == CT_DIR_REPLY {
        "reply"
    } else {
        "forward"
    }
}

/// How conntrack rows are ordered: by service, then by client, a flow's
/// forward entry before its reply.
type CtOrder = (u32, u8, IpAddr, u16, u8, IpAddr, u16);

fn conntrack(pins: &Pins) -> Result<Vec<ConntrackRow>> {
    let names = frontend_names(pins)?;
    let now = monotonic_ns();
    let age_ms = |seen_ns: u64| Some(now.saturating_sub(seen_ns) / 1_000_000);
    let mut rows: Vec<(CtOrder, ConntrackRow)> = Vec::new();
    let ct: HashMap<MapData, CtKey, CtValue> = pins.open("CONNTRACK")?;
    for (k, v) in entries(&ct, "CONNTRACK")? {
        let client = if k.dir != CT_DIR_REPLY {
            (k.saddr, k.sport)
        } else if v.nat_addr != 0 {
            (v.nat_addr, v.nat_port)
        } else {
            (k.daddr, k.dport)
        };
        let order = (
            v.svc_id,
            k.proto,
            IpAddr::V4(ip(client.0)),
            u16::from_be(client.1),
            k.dir,
            IpAddr::V4(ip(k.saddr)),
            u16::from_be(k.sport),
        );
        let row = ConntrackRow {
            direction: direction(k.dir),
            protocol: proto_name(k.proto),
            source: endpoint(k.saddr, k.sport),
            destination: endpoint(k.daddr, k.dport),
            translated: endpoint(v.addr, v.port),
            frontend: names.get(&v.svc_id).map(|(n, _)| n.clone()),
            service_id: Some(v.svc_id),
            nat: (v.nat_addr != 0).then(|| endpoint(v.nat_addr, v.nat_port)),
            age_ms: age_ms(v.seen_ns),
            closing: Some(v.flags & CT_F_CLOSING != 0),
            state: (v.flags & CT_F_UNREPLIED != 0).then(|| "unreplied".to_owned()),
            timeout_seconds: None,
        };
        rows.push((order, row));
    }
    // IPv6 flows are never source-NATed: the client is the forward entry's
    // source, the reply entry's destination.
    let ct6: HashMap<MapData, CtKey6, CtValue6> = pins.open("CONNTRACK6")?;
    for (k, v) in entries(&ct6, "CONNTRACK6")? {
        let client = if k.dir != CT_DIR_REPLY {
            (k.saddr, k.sport)
        } else {
            (k.daddr, k.dport)
        };
        let order = (
            v.svc_id,
            k.proto,
            IpAddr::V6(ip6_from_raw(client.0)),
            u16::from_be(client.1),
            k.dir,
            IpAddr::V6(ip6_from_raw(k.saddr)),
            u16::from_be(k.sport),
        );
        let row = ConntrackRow {
            direction: direction(k.dir),
            protocol: proto_name(k.proto),
            source: endpoint6(k.saddr, k.sport),
            destination: endpoint6(k.daddr, k.dport),
            translated: endpoint6(v.addr, v.port),
            frontend: names.get(&v.svc_id).map(|(n, _)| n.clone()),
            service_id: Some(v.svc_id),
            nat: None,
            age_ms: age_ms(v.seen_ns),
            closing: Some(v.flags & CT_F_CLOSING != 0),
            state: (v.flags & CT_F_UNREPLIED != 0).then(|| "unreplied".to_owned()),
            timeout_seconds: None,
        };
        rows.push((order, row));
    }
    rows.sort_by_key(|(order, _)| *order);
    Ok(rows.into_iter().map(|(_, r)| r).collect())
}

fn affinity(pins: &Pins) -> Result<Vec<AffinityRow>> {
    let names = frontend_names(pins)?;
    let now = monotonic_ns();
    // One binding of `client` to `backend` (`ip:port`) of service `id`.
    let row = |client: IpAddr, id: u32, backend: String, seen_ns: u64| {
        let fe = names.get(&id);
        let timeout = fe.map(|(_, secs)| *secs).filter(|s| *s != 0);
        let age_ms = Some(now.saturating_sub(seen_ns) / 1_000_000);
        AffinityRow {
            client: client.to_string(),
            service_id: Some(id),
            frontend: fe.map(|(n, _)| n.clone()),
            name: None,
            backend,
            age_ms,
            timeout_seconds: timeout,
            expired: super::expired(age_ms, timeout),
            chain: None,
        }
    };
    let map: HashMap<MapData, AffinityKey, AffinityValue> = pins.open("AFFINITY")?;
    let mut rows: Vec<AffinityRow> = entries(&map, "AFFINITY")?
        .into_iter()
        .map(|(k, v)| {
            row(
                IpAddr::V4(ip(k.client)),
                k.svc_id,
                endpoint(v.backend.addr, v.backend.port),
                v.seen_ns,
            )
        })
        .collect();
    let map6: HashMap<MapData, AffinityKey6, AffinityValue6> = pins.open("AFFINITY6")?;
    rows.extend(entries(&map6, "AFFINITY6")?.into_iter().map(|(k, v)| {
        row(
            IpAddr::V6(ip6_from_raw(k.client)),
            k.svc_id,
            endpoint6(v.backend.addr, v.backend.port),
            v.seen_ns,
        )
    }));
    rows.sort_by_key(|r| (r.service_id, r.client.parse::<IpAddr>().ok()));
    Ok(rows)
}
