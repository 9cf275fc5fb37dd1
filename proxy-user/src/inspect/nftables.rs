//! nftables mode: the live `kube-proxy` tables of this network namespace
//! (`nft -j list table ip kube-proxy`, and `ip6`) turned back into
//! frontends and endpoints, netfilter's conntrack table and the affinity
//! sets. The parsing is pure (JSON in, values out) and unit-tested on
//! listings of tables the agent's own transactions built (`testdata/`);
//! [`read`] only runs the commands.
//!
//! How the tables are read (`datapath/nftables/rules.rs` writes them):
//! frontends are the elements of `service-ips` (ClusterIPs, externalIPs,
//! LoadBalancer addresses) and `service-nodeports`, named by their
//! comments, and those without endpoints the elements of
//! `no-endpoint-services` and `no-endpoint-nodeports` (`drop`: `Local`).
//! An element goes to an `external-` chain (external: `Cluster` when it
//! marks for masquerade, else `Local`) or a `service-` chain, whose `numgen`
//! verdict map lists the `endpoint-` chains in order, each ending in `dnat
//! to`; `ip saddr @affinity-…` rules name the affinity sets, the
//! `firewall-ips` elements the `firewall-` chains with the source ranges.
//! Rows are those of the iptables mode ([`super::iptables`]): the same
//! frontend model, the same conntrack reading.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::iptables::{
    Endpoint, Svc, backends_row, conntrack_rows, list_conntrack, parse_conntrack, service_row,
};
use super::{AffinityRow, InspectMode, Report, Rows, Subject};
use crate::model::{BackendAddr, Family, Frontend, Proto};

const TABLE: &str = "kube-proxy";

fn nft_family(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// Reads `subject` from this network namespace.
pub fn read(subject: Subject) -> Result<Report> {
    let mut tables = Vec::new();
    let mut read = Vec::new();
    for family in [Family::V4, Family::V6] {
        if let Some(json) = list_table(family)? {
            tables.push(Table::parse(&json)?);
            read.push(format!("nft -j list table {} {TABLE}", nft_family(family)));
        }
    }
    if tables.is_empty() {
        bail!(
            "no kube-proxy table in this network namespace's nftables (ip or ip6; is the agent \
             running here with --mode nftables?)"
        );
    }
    let mut svcs: Vec<Svc> = tables.iter().flat_map(Table::services).collect();
    svcs.sort_by_key(|s| s.fe);
    let source = read.join(", ");
    let (source, rows) = match subject {
        Subject::Services => (
            source,
            Rows::Services(svcs.iter().map(service_row).collect()),
        ),
        Subject::Backends => (
            source,
            Rows::Frontends(svcs.iter().map(backends_row).collect()),
        ),
        Subject::Conntrack => {
            let mut entries = parse_conntrack(&list_conntrack(Family::V4)?);
            entries.extend(parse_conntrack(&list_conntrack(Family::V6)?));
            (
                "conntrack -L -f ipv4, conntrack -L -f ipv6 (netfilter's table: the entries of \
                 flows to the frontends of the kube-proxy tables)"
                    .to_owned(),
                Rows::Entries(conntrack_rows(&svcs, &entries)),
            )
        }
        Subject::Affinity => (
            format!("{source} (the affinity-* sets of ClientIP affinity)"),
            Rows::Bindings(tables.iter().flat_map(|t| t.affinity_rows(&svcs)).collect()),
        ),
    };
    Ok(Report::new(subject, InspectMode::Nftables, source, rows))
}

/// `nft -j list table FAMILY kube-proxy`; `None` when there is no such
/// table.
fn list_table(family: Family) -> Result<Option<String>> {
    let fam = nft_family(family);
    let out = Command::new("nft")
        .args(["-j", "list", "table", fam, TABLE])
        .output()
        .context("running nft (is nftables installed?)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(None);
        }
        bail!("nft -j list table {fam} {TABLE}: {}", err.trim());
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// One family's table: its chains' rules (each a list of statements), its
/// maps' elements (key, comment, verdict) and its sets (timeout, elements).
#[derive(Debug, Default)]
pub struct Table {
    rules: BTreeMap<String, Vec<Vec<Value>>>,
    maps: BTreeMap<String, Vec<MapElement>>,
    sets: BTreeMap<String, AffinitySet>,
}

#[derive(Debug)]
struct MapElement {
    /// The key's parts: address, protocol, port (nodePorts: protocol,
    /// port).
    key: Vec<Value>,
    comment: Option<String>,
    verdict: Value,
}

#[derive(Debug, Default)]
struct AffinitySet {
    timeout: Option<u64>,
    /// (client, seconds until it expires).
    elements: Vec<(IpAddr, Option<u64>)>,
}

impl Table {
    /// Parses `nft -j list table …` output.
    pub fn parse(json: &str) -> Result<Table> {
        let doc: Value = serde_json::from_str(json).context("nft -j printed no JSON")?;
        let mut t = Table::default();
        for item in doc["nftables"].as_array().into_iter().flatten() {
            if let Some(rule) = item.get("rule") {
                let chain = rule["chain"].as_str().unwrap_or_default().to_owned();
                let expr = rule["expr"].as_array().cloned().unwrap_or_default();
                t.rules.entry(chain).or_default().push(expr);
            } else if let Some(map) = item.get("map") {
                let name = map["name"].as_str().unwrap_or_default().to_owned();
                let elems = map["elem"].as_array().into_iter().flatten();
                let parsed = elems.filter_map(|pair| {
                    let (key, verdict) = (pair.get(0)?, pair.get(1)?);
                    // `{"elem": {"val": …, "comment": …}}` with a comment,
                    // the bare value without.
                    let (val, comment) = match key.get("elem") {
                        Some(e) => (&e["val"], e["comment"].as_str().map(String::from)),
                        None => (key, None),
                    };
                    let key = match val.get("concat") {
                        Some(parts) => parts.as_array()?.clone(),
                        None => vec![val.clone()],
                    };
                    Some(MapElement {
                        key,
                        comment,
                        verdict: verdict.clone(),
                    })
                });
                t.maps.insert(name, parsed.collect());
            } else if let Some(set) = item.get("set") {
                let name = set["name"].as_str().unwrap_or_default();
                if !name.starts_with("affinity-") {
                    continue;
                }
                let elements = set["elem"].as_array().into_iter().flatten();
                let elements = elements.filter_map(|e| {
                    let (val, expires) = match e.get("elem") {
                        Some(e) => (&e["val"], e["expires"].as_u64()),
                        None => (e, None),
                    };
                    Some((val.as_str()?.parse().ok()?, expires))
                });
                t.sets.insert(
                    name.to_owned(),
                    AffinitySet {
                        timeout: set["timeout"].as_u64(),
                        elements: elements.collect(),
                    },
                );
            }
        }
        Ok(t)
    }

    fn rules(&self, chain: &str) -> &[Vec<Value>] {
        self.rules.get(chain).map_or(&[], Vec::as_slice)
    }

    fn elements(&self, map: &str) -> &[MapElement] {
        self.maps.get(map).map_or(&[], Vec::as_slice)
    }

    /// Every frontend of the table: with endpoints first, then without.
    pub fn services(&self) -> Vec<Svc> {
        let mut out: BTreeMap<Frontend, Svc> = BTreeMap::new();
        let firewalls: BTreeMap<Frontend, String> = self
            .elements("firewall-ips")
            .iter()
            .filter_map(|e| Some((frontend_of(&e.key)?, goto_target(&e.verdict)?.to_owned())))
            .collect();
        for map in ["service-ips", "service-nodeports"] {
            for e in self.elements(map) {
                let (Some(fe), Some(chain)) = (frontend_of(&e.key), goto_target(&e.verdict)) else {
                    continue;
                };
                let mut svc = Svc {
                    fe,
                    name: e.comment.clone(),
                    external: chain.starts_with("external-"),
                    local: false,
                    source_ranges: Vec::new(),
                    affinity: 0,
                    endpoints: Vec::new(),
                };
                if let Some(fw) = firewalls.get(&fe) {
                    svc.source_ranges = self.source_ranges(fw);
                }
                self.walk(chain, &mut svc);
                out.entry(fe).or_insert(svc);
            }
        }
        for map in ["no-endpoint-services", "no-endpoint-nodeports"] {
            for e in self.elements(map) {
                let Some(fe) = frontend_of(&e.key) else {
                    continue;
                };
                let local = e.verdict.get("drop").is_some();
                out.entry(fe).or_insert_with(|| Svc {
                    fe,
                    name: e.comment.clone(),
                    external: fe.is_nodeport() || local,
                    local,
                    source_ranges: Vec::new(),
                    affinity: 0,
                    endpoints: Vec::new(),
                });
            }
        }
        out.into_values().collect()
    }

    /// A service or external chain: masquerading, affinity, endpoints.
    fn walk(&self, chain: &str, svc: &mut Svc) {
        let rules = self.rules(chain);
        if svc.external {
            // `Cluster` marks everything (a rule that is only the jump).
            svc.local = !rules
                .iter()
                .any(|r| r.len() == 1 && jump_target(&r[0]) == Some("mark-for-masquerade"));
        }
        for r in rules {
            if let Some(set) = r.iter().find_map(affinity_match) {
                if let Some(secs) = self.sets.get(set).and_then(|s| s.timeout) {
                    svc.affinity = u32::try_from(secs).unwrap_or(u32::MAX);
                }
                continue;
            }
            let Some(targets) = r.iter().find_map(numgen_targets) else {
                continue;
            };
            for ep in targets {
                if let Some(addr) = self.dnat_of(&ep) {
                    svc.endpoints.push(Endpoint {
                        addr,
                        chain: ep,
                        probability: None,
                    });
                }
            }
        }
    }

    /// The `dnat to` of an endpoint chain.
    fn dnat_of(&self, chain: &str) -> Option<BackendAddr> {
        self.rules(chain).iter().flatten().find_map(|s| {
            let d = s.get("dnat")?;
            let ip: IpAddr = d["addr"].as_str()?.parse().ok()?;
            let port = u16::try_from(d["port"].as_u64()?).ok()?;
            Some(BackendAddr::new(ip, port))
        })
    }

    /// The sources a firewall chain lets through (`ip saddr != { … } drop`).
    fn source_ranges(&self, chain: &str) -> Vec<String> {
        let mut out = Vec::new();
        for m in self
            .rules(chain)
            .iter()
            .flatten()
            .filter_map(|s| s.get("match"))
        {
            if m["op"] != "!=" {
                continue;
            }
            let right = &m["right"];
            let items = match right.get("set").and_then(Value::as_array) {
                Some(items) => items.clone(),
                None => vec![right.clone()],
            };
            out.extend(items.iter().filter_map(cidr_of));
        }
        out
    }

    /// The bindings in the affinity sets, named by the frontend whose
    /// endpoint each set belongs to.
    fn affinity_rows(&self, svcs: &[Svc]) -> Vec<AffinityRow> {
        // set → endpoint chain, from the `ip saddr @set goto endpoint-…`
        // rules.
        let mut owner_chain: BTreeMap<&str, &str> = BTreeMap::new();
        for rule in self.rules.values().flatten() {
            let set = rule.iter().find_map(affinity_match);
            let target = rule.iter().find_map(goto_target);
            if let (Some(set), Some(target)) = (set, target) {
                owner_chain.insert(set, target);
            }
        }
        let mut rows = Vec::new();
        for (name, set) in &self.sets {
            let owner = owner_chain.get(name.as_str()).and_then(|chain| {
                svcs.iter().find_map(|s| {
                    s.endpoints
                        .iter()
                        .find(|e| e.chain == *chain)
                        .map(|e| (s, e.addr))
                })
            });
            for (client, expires) in &set.elements {
                let age_ms = match (set.timeout, expires) {
                    (Some(t), Some(e)) => Some(t.saturating_sub(*e) * 1000),
                    _ => None,
                };
                let timeout = owner.map(|(s, _)| s.affinity).filter(|t| *t != 0);
                rows.push(AffinityRow {
                    client: client.to_string(),
                    service_id: None,
                    frontend: owner.map(|(s, _)| s.fe.to_string()),
                    name: owner.and_then(|(s, _)| s.name.clone()),
                    backend: owner.map_or_else(|| "-".to_owned(), |(_, b)| b.to_string()),
                    age_ms,
                    timeout_seconds: timeout,
                    expired: super::expired(age_ms, timeout),
                    chain: Some(name.clone()),
                });
            }
        }
        rows.sort_by_key(|r| r.client.parse::<IpAddr>().ok());
        rows
    }
}

/// A map key: `[address, protocol, port]`, or a nodePort's `[protocol,
/// port]`.
fn frontend_of(key: &[Value]) -> Option<Frontend> {
    let (ip, proto, port) = match key {
        [ip, proto, port] => (Some(ip.as_str()?.parse::<IpAddr>().ok()?), proto, port),
        [proto, port] => (None, proto, port),
        _ => return None,
    };
    let proto = match proto.as_str()? {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return None,
    };
    let port = u16::try_from(port.as_u64()?).ok()?;
    Some(match ip {
        Some(ip) => Frontend { ip, port, proto },
        None => Frontend::nodeport(port, proto),
    })
}

fn goto_target(verdict: &Value) -> Option<&str> {
    verdict.get("goto")?["target"].as_str()
}

fn jump_target(statement: &Value) -> Option<&str> {
    statement.get("jump")?["target"].as_str()
}

/// `ip saddr @affinity-…`: the set's name.
fn affinity_match(statement: &Value) -> Option<&str> {
    let right = statement.get("match")?["right"].as_str()?;
    right
        .strip_prefix('@')
        .filter(|s| s.starts_with("affinity-"))
}

/// The endpoint chains of a `numgen random mod N vmap { i : goto … }`, in
/// the order of `i`.
fn numgen_targets(statement: &Value) -> Option<Vec<String>> {
    let vmap = statement.get("vmap")?;
    vmap["key"].get("numgen")?;
    let mut entries: Vec<(u64, String)> = vmap["data"]["set"]
        .as_array()?
        .iter()
        .filter_map(|pair| {
            Some((
                pair.get(0)?.as_u64()?,
                goto_target(pair.get(1)?)?.to_owned(),
            ))
        })
        .collect();
    entries.sort();
    Some(entries.into_iter().map(|(_, c)| c).collect())
}

/// `"192.0.2.1"` or `{"prefix": {"addr": …, "len": …}}` as a CIDR.
fn cidr_of(v: &Value) -> Option<String> {
    if let Some(p) = v.get("prefix") {
        return Some(format!("{}/{}", p["addr"].as_str()?, p["len"].as_u64()?));
    }
    let ip: IpAddr = v.as_str()?.parse().ok()?;
    Some(match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Listed from tables built by the agent's own first-sync transactions
    // (datapath/nftables/testdata/everything.nft) in a scratch namespace,
    // with one client bound in an affinity set of each family: Services
    // web (10.96.0.10, 80/TCP over three endpoints, 53/UDP), sticky (ClientIP
    // affinity, 600 s), np (nodePort 30080 under Cluster, externalIP
    // 203.0.113.7 under Local), local (nodePort 30081, Local, no endpoints),
    // lb (LoadBalancer 203.0.113.9 with two source ranges), empty (no
    // endpoints); web6 (IPv6, affinity), empty6 (IPv6, no endpoints).
    const IP: &str = include_str!("testdata/nft-j-list-table-ip.json");
    const IP6: &str = include_str!("testdata/nft-j-list-table-ip6.json");

    fn find<'a>(svcs: &'a [Svc], fe: &str) -> &'a Svc {
        svcs.iter()
            .find(|s| s.fe.to_string() == fe)
            .unwrap_or_else(|| panic!("no frontend {fe} in {svcs:#?}"))
    }

    fn endpoints(s: &Svc) -> Vec<String> {
        s.endpoints.iter().map(|e| e.addr.to_string()).collect()
    }

    #[test]
    fn frontends_and_endpoints_are_read_back() {
        let svcs = Table::parse(IP).unwrap().services();
        assert_eq!(svcs.len(), 8, "{svcs:#?}");
        let web = find(&svcs, "10.96.0.10:80/TCP");
        assert_eq!(web.name.as_deref(), Some("default/web:http"));
        assert!(!web.external);
        assert_eq!(
            endpoints(web),
            ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]
        );
        assert!(web.endpoints[0].chain.starts_with("endpoint-"));
        assert_eq!(find(&svcs, "10.96.0.20:80/TCP").affinity, 600);
        let np = find(&svcs, "nodePort 30080/TCP");
        assert!(np.external && !np.local, "{np:#?}");
        assert_eq!(endpoints(np), ["10.0.0.1:8080", "10.0.0.2:8080"]);
        let ext = find(&svcs, "203.0.113.7:80/TCP");
        assert!(ext.external && ext.local, "{ext:#?}");
        let lb = find(&svcs, "203.0.113.9:80/TCP");
        assert_eq!(lb.source_ranges, ["192.0.2.1/32", "198.51.100.0/24"]);
        let empty = find(&svcs, "10.96.0.30:80/TCP");
        assert!(empty.endpoints.is_empty() && !empty.external);
        assert_eq!(empty.name.as_deref(), Some("default/empty:http"));
        let local = find(&svcs, "nodePort 30081/TCP");
        assert!(local.external && local.local && local.endpoints.is_empty());
    }

    #[test]
    fn ipv6_frontends_are_read_the_same_way() {
        let svcs = Table::parse(IP6).unwrap().services();
        assert_eq!(svcs.len(), 3, "{svcs:#?}");
        let web6 = find(&svcs, "[fd00:10:96::10]:80/TCP");
        assert_eq!(web6.name.as_deref(), Some("default/web6:http"));
        assert_eq!(
            endpoints(web6),
            ["[fd00:10:244::2]:8080", "[fd00:10:244::3]:8080"]
        );
        assert_eq!(web6.affinity, 600);
        assert!(find(&svcs, "[fd00:10:96::20]:53/UDP").endpoints.is_empty());
    }

    #[test]
    fn affinity_bindings_name_their_endpoint() {
        let t = Table::parse(IP).unwrap();
        let svcs = t.services();
        let rows = t.affinity_rows(&svcs);
        assert_eq!(rows.len(), 1, "{rows:#?}");
        let r = &rows[0];
        assert_eq!(r.client, "10.0.1.2");
        assert_eq!(r.frontend.as_deref(), Some("10.96.0.20:80/TCP"));
        assert_eq!(r.name.as_deref(), Some("default/sticky:http"));
        assert_eq!(r.backend, "10.0.0.1:8080");
        assert_eq!(r.timeout_seconds, Some(600));
        // Added with 590 s left and listed a second later.
        assert!(
            r.age_ms.is_some_and(|a| (10_000..=20_000).contains(&a)),
            "{r:#?}"
        );
        assert_eq!(r.expired, Some(false));
        assert!(
            r.chain
                .as_deref()
                .is_some_and(|c| c.starts_with("affinity-") && c.ends_with("__10.0.0.1/8080")),
            "{r:#?}"
        );
        let t6 = Table::parse(IP6).unwrap();
        let rows6 = t6.affinity_rows(&t6.services());
        assert_eq!(rows6.len(), 1, "{rows6:#?}");
        assert_eq!(rows6[0].client, "fd00:10:1::2");
        assert_eq!(rows6[0].backend, "[fd00:10:244::2]:8080");
    }
}
