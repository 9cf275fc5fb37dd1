//! The nftables objects kube-proxy's nftables proxier would hold for the
//! current frontends ([`Ruleset`]), and the `nft -f` transaction that moves
//! the kernel from the objects last written to them ([`transaction`]).
//!
//! One ruleset holds one family's frontends, in its own table (`ip
//! kube-proxy` or `ip6 kube-proxy`); what differs between the two follows
//! from the family: `ip`/`ip6` matches, `ipv4_addr`/`ipv6_addr` keys,
//! `[addr]:port` DNAT destinations and ICMP or ICMPv6 refusals.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::datapath::netfilter::{Masquerade, Refusal, Svc, masquerade, refusal};
use crate::model::{BackendAddr, Cidr, Family, Frontend, Proto};

/// The table of each family.
pub(super) const TABLE: &str = "kube-proxy";

/// Set on traffic to masquerade, as kube-proxy's.
const MASQ_BIT: &str = "0x00004000";

/// The verdict maps the dispatch chains look up, and the key of each.
pub(super) const SERVICE_IPS: &str = "service-ips";
pub(super) const SERVICE_NODEPORTS: &str = "service-nodeports";
pub(super) const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
pub(super) const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
pub(super) const FIREWALL_IPS: &str = "firewall-ips";

/// Where the verdicts of frontends without endpoints go.
const REJECT_CHAIN: &str = "reject-chain";
const RESET_CHAIN: &str = "reset-chain";

/// `ip` or `ip6`: the table's family and the address match's keyword.
pub(super) fn nft_family(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn addr_type(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

fn loopback(family: Family) -> &'static str {
    match family {
        Family::V4 => "127.0.0.0/8",
        Family::V6 => "::1",
    }
}

fn proto(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

/// What kproxy wrote (or would write) into one family's table besides its
/// fixed skeleton: per-service and per-endpoint chains with their rules,
/// affinity sets with their declarations, and the dispatch maps' elements.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Ruleset {
    pub(super) chains: BTreeMap<String, Vec<String>>,
    pub(super) sets: BTreeMap<String, String>,
    /// (map, key) → element.
    pub(super) elements: BTreeMap<(&'static str, String), Element>,
}

/// A dispatch map's element: its verdict, and the service port's name in
/// its comment (as kube-proxy's), which `kproxy inspect` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Element {
    pub(super) name: String,
    pub(super) verdict: String,
}

impl Element {
    fn new(name: &str, verdict: String) -> Element {
        Element {
            name: name.to_owned(),
            verdict,
        }
    }
}

impl std::fmt::Display for Element {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "comment \"{}\" : {}", self.name, self.verdict)
    }
}

/// kube-proxy's chain name: a kind, a hash that makes it unique, and the
/// service port (and endpoint) in readable form, e.g.
/// `service-ULMVA6XW-default/web/tcp/http`. nft names may hold letters,
/// digits and `/-_.`: the rest becomes `_`, IPv6 colons `.`.
fn chain_name(kind: &str, hashed: &[&str], readable: &str) -> String {
    let mut h = Sha256::new();
    for p in hashed {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let enc = data_encoding::BASE32.encode(&h.finalize());
    let readable: String = readable
        .chars()
        .map(|c| match c {
            ':' => '.',
            c if c.is_ascii_alphanumeric() || "/-_.".contains(c) => c,
            _ => '_',
        })
        .collect();
    format!("{kind}-{}-{readable}", &enc[..8])
}

/// `namespace/name/protocol/port-name`, from the model's
/// `namespace/name:port-name`.
fn port_base(fe: &Frontend, name: &str) -> String {
    let (svc, port) = name.rsplit_once(':').unwrap_or((name, ""));
    format!("{svc}/{}/{port}", proto(fe.proto))
}

fn service_chain(fe: &Frontend, name: &str) -> String {
    chain_name("service", &[name, proto(fe.proto)], &port_base(fe, name))
}

/// The chain of one external frontend (nodePort, externalIP, LoadBalancer
/// address): one per frontend, as the iptables mode's `KUBE-EXT-`.
fn external_chain(fe: &Frontend, name: &str) -> String {
    let (ip, port) = (fe.ip.to_string(), fe.port.to_string());
    chain_name(
        "external",
        &[name, proto(fe.proto), &ip, &port],
        &format!("{}/{ip}/{port}", port_base(fe, name)),
    )
}

fn firewall_chain(fe: &Frontend, name: &str) -> String {
    let (ip, port) = (fe.ip.to_string(), fe.port.to_string());
    chain_name(
        "firewall",
        &[name, proto(fe.proto), &ip, &port],
        &format!("{}/{ip}/{port}", port_base(fe, name)),
    )
}

fn endpoint_readable(fe: &Frontend, name: &str, b: &BackendAddr) -> String {
    format!("{}__{}/{}", port_base(fe, name), b.ip, b.port)
}

fn endpoint_chain(fe: &Frontend, name: &str, b: &BackendAddr) -> String {
    chain_name(
        "endpoint",
        &[name, proto(fe.proto), &b.to_string()],
        &endpoint_readable(fe, name, b),
    )
}

/// The set of clients bound to endpoint `b` for `secs` (part of the name:
/// a new timeout is a new set).
fn affinity_set(fe: &Frontend, name: &str, b: &BackendAddr, secs: u32) -> String {
    chain_name(
        "affinity",
        &[name, proto(fe.proto), &b.to_string(), &secs.to_string()],
        &endpoint_readable(fe, name, b),
    )
}

/// The verdict of a frontend without endpoints.
fn refusal_verdict(how: Refusal) -> String {
    match how {
        Refusal::PortUnreachable => format!("goto {REJECT_CHAIN}"),
        Refusal::TcpReset => format!("goto {RESET_CHAIN}"),
        Refusal::Drop => "drop".to_owned(),
    }
}

/// The objects for `services` (all of `family`).
pub(super) fn render(
    family: Family,
    cluster_cidr: Option<Cidr>,
    services: &BTreeMap<Frontend, Svc>,
) -> Ruleset {
    let mut out = Ruleset::default();
    for (fe, svc) in services {
        render_svc(family, cluster_cidr, fe, svc, &mut out);
    }
    out
}

fn render_svc(
    family: Family,
    cluster_cidr: Option<Cidr>,
    fe: &Frontend,
    svc: &Svc,
    out: &mut Ruleset,
) {
    let ip = nft_family(family);
    let p = proto(fe.proto);
    let key = format!("{} . {p} . {}", fe.ip, fe.port);
    let port_key = format!("{p} . {}", fe.port);
    if svc.backends.is_empty() {
        let verdict = refusal_verdict(refusal(fe, &svc.policy));
        let element = Element::new(&svc.name, verdict);
        if fe.is_nodeport() {
            out.elements
                .insert((NO_ENDPOINT_NODEPORTS, port_key), element);
        } else {
            out.elements.insert((NO_ENDPOINT_SERVICES, key), element);
        }
        return;
    }
    let chain = if svc.policy.external.is_some() {
        external_chain(fe, &svc.name)
    } else {
        service_chain(fe, &svc.name)
    };
    let element = Element::new(&svc.name, format!("goto {chain}"));
    if fe.is_nodeport() {
        out.elements.insert((SERVICE_NODEPORTS, port_key), element);
    } else {
        out.elements.insert((SERVICE_IPS, key.clone()), element);
    }
    if !svc.policy.source_ranges.is_empty() {
        let fw = firewall_chain(fe, &svc.name);
        let ranges: Vec<String> = svc
            .policy
            .source_ranges
            .iter()
            .map(ToString::to_string)
            .collect();
        out.chains.insert(
            fw.clone(),
            vec![format!(
                "{ip} saddr != {{ {} }} drop comment \"other traffic to {} will be dropped\"",
                ranges.join(", "),
                svc.name
            )],
        );
        out.elements.insert(
            (FIREWALL_IPS, key),
            Element::new(&svc.name, format!("goto {fw}")),
        );
    }
    let mut rules = Vec::new();
    match masquerade(fe, svc, cluster_cidr) {
        Masquerade::All => rules.push("jump mark-for-masquerade".to_owned()),
        Masquerade::NotFrom(cidr) => rules.push(format!(
            "{ip} daddr {} {p} dport {} {ip} saddr != {cidr} jump mark-for-masquerade",
            fe.ip, fe.port
        )),
        Masquerade::HairpinOnly => {}
    }
    // Session affinity, as kube-proxy: a client in an endpoint's set goes
    // back to it; every new connection DNATed to an endpoint (re)adds its
    // client there, with the timeout.
    let affinity = svc.policy.affinity;
    if let Some(secs) = affinity {
        for b in &svc.backends {
            let set = affinity_set(fe, &svc.name, b, secs);
            rules.push(format!(
                "{ip} saddr @{set} goto {}",
                endpoint_chain(fe, &svc.name, b)
            ));
            out.sets.insert(
                set,
                format!(
                    "type {}; flags dynamic,timeout; timeout {secs}s;",
                    addr_type(family)
                ),
            );
        }
    }
    let targets: Vec<String> = svc
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{i} : goto {}", endpoint_chain(fe, &svc.name, b)))
        .collect();
    rules.push(format!(
        "numgen random mod {} vmap {{ {} }}",
        svc.backends.len(),
        targets.join(", ")
    ));
    out.chains.insert(chain, rules);
    for b in &svc.backends {
        let ep = endpoint_chain(fe, &svc.name, b);
        let mut rules = vec![format!("{ip} saddr {} jump mark-for-masquerade", b.ip)];
        if let Some(secs) = affinity {
            rules.push(format!(
                "update @{} {{ {ip} saddr }}",
                affinity_set(fe, &svc.name, b, secs)
            ));
        }
        // `BackendAddr`'s display: `10.0.0.1:8080`, `[fd00::2]:8080`.
        rules.push(format!("meta l4proto {p} dnat to {b}"));
        out.chains.insert(ep, rules);
    }
}

/// The table's fixed skeleton, written on the first sync after the table
/// of an earlier run (if any) is deleted in the same transaction: the base
/// chains hooked where kube-proxy hooks them, masquerading, the refusals,
/// the dispatch maps and the chains that look them up.
fn skeleton(family: Family) -> String {
    let ip = nft_family(family);
    let t = format!("{ip} {TABLE}");
    let addr = addr_type(family);
    let lo = loopback(family);
    let icmp = match family {
        Family::V4 => "icmp type port-unreachable",
        Family::V6 => "icmpv6 type port-unreachable",
    };
    let mut s = String::new();
    // `add` then `delete`: the table is gone whether or not an earlier run
    // left it; the rest of the transaction builds it afresh, atomically.
    let _ = writeln!(s, "add table {t}");
    let _ = writeln!(s, "delete table {t}");
    let _ = writeln!(s, "add table {t} {{ comment \"rules for kube-proxy\"; }}");
    // Filter chains see the destination before DNAT (priority dstnat - 10),
    // as kube-proxy's. Numbers: nft before 1.0.7 takes the names `dstnat`
    // and `srcnat` only in the hooks where NAT of that kind happens.
    for (chain, kind, hook, prio) in [
        ("filter-prerouting", "filter", "prerouting", "-110"),
        ("filter-input", "filter", "input", "-110"),
        ("filter-forward", "filter", "forward", "-110"),
        ("filter-output", "filter", "output", "-110"),
        ("nat-prerouting", "nat", "prerouting", "-100"),
        ("nat-output", "nat", "output", "-100"),
        ("nat-postrouting", "nat", "postrouting", "100"),
    ] {
        let _ = writeln!(
            s,
            "add chain {t} {chain} {{ type {kind} hook {hook} priority {prio}; }}"
        );
    }
    for chain in [
        "services",
        "masquerading",
        "mark-for-masquerade",
        "service-endpoints-check",
        "nodeport-endpoints-check",
        "firewall-check",
        REJECT_CHAIN,
        RESET_CHAIN,
    ] {
        let _ = writeln!(s, "add chain {t} {chain}");
    }
    for (map, key) in [
        (SERVICE_IPS, format!("{addr} . inet_proto . inet_service")),
        (SERVICE_NODEPORTS, "inet_proto . inet_service".to_owned()),
        (
            NO_ENDPOINT_SERVICES,
            format!("{addr} . inet_proto . inet_service"),
        ),
        (
            NO_ENDPOINT_NODEPORTS,
            "inet_proto . inet_service".to_owned(),
        ),
        (FIREWALL_IPS, format!("{addr} . inet_proto . inet_service")),
    ] {
        let _ = writeln!(s, "add map {t} {map} {{ type {key} : verdict; }}");
    }
    for (chain, rule) in [
        (
            "filter-prerouting",
            "ct state new jump firewall-check".to_owned(),
        ),
        (
            "filter-input",
            "ct state new jump nodeport-endpoints-check".to_owned(),
        ),
        (
            "filter-input",
            "ct state new jump service-endpoints-check".to_owned(),
        ),
        (
            "filter-forward",
            "ct state new jump service-endpoints-check".to_owned(),
        ),
        (
            "filter-output",
            "ct state new jump service-endpoints-check".to_owned(),
        ),
        (
            "filter-output",
            "ct state new jump firewall-check".to_owned(),
        ),
        ("nat-prerouting", "jump services".to_owned()),
        ("nat-output", "jump services".to_owned()),
        ("nat-postrouting", "jump masquerading".to_owned()),
        (
            "mark-for-masquerade",
            format!("meta mark set meta mark or {MASQ_BIT}"),
        ),
        (
            "masquerading",
            format!("meta mark and {MASQ_BIT} == 0 return"),
        ),
        (
            "masquerading",
            format!("meta mark set meta mark xor {MASQ_BIT}"),
        ),
        ("masquerading", "masquerade fully-random".to_owned()),
        (
            "services",
            format!("{ip} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}"),
        ),
        // nodePorts: every local address but loopback, as kube-proxy.
        (
            "services",
            format!(
                "fib daddr type local {ip} daddr != {lo} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}"
            ),
        ),
        (
            "service-endpoints-check",
            format!("{ip} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}"),
        ),
        (
            "nodeport-endpoints-check",
            format!("{ip} daddr != {lo} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"),
        ),
        (
            "firewall-check",
            format!("{ip} daddr . meta l4proto . th dport vmap @{FIREWALL_IPS}"),
        ),
        (REJECT_CHAIN, format!("reject with {icmp}")),
        (
            RESET_CHAIN,
            "meta l4proto tcp reject with tcp reset".to_owned(),
        ),
        (RESET_CHAIN, format!("reject with {icmp}")),
    ] {
        let _ = writeln!(s, "add rule {t} {chain} {rule}");
    }
    s
}

/// The `nft -f` input that moves `family`'s table from `old` (what the
/// last sync wrote; ignored when `fresh`: the table is rebuilt from its
/// skeleton) to `new`, in one transaction: new sets and chains first, then
/// the changed chains flushed and rewritten, the maps' changed elements
/// deleted and added, and last the chains and sets nothing refers to any
/// more. Unchanged chains, sets and elements are not mentioned.
pub(super) fn transaction(family: Family, fresh: bool, old: &Ruleset, new: &Ruleset) -> String {
    let empty = Ruleset::default();
    let old = if fresh { &empty } else { old };
    let t = format!("{} {TABLE}", nft_family(family));
    let mut s = if fresh {
        skeleton(family)
    } else {
        String::new()
    };
    for (set, decl) in &new.sets {
        if old.sets.get(set) != Some(decl) {
            let _ = writeln!(s, "add set {t} {set} {{ {decl} }}");
        }
    }
    let changed: Vec<(&String, &Vec<String>)> = new
        .chains
        .iter()
        .filter(|(c, r)| old.chains.get(*c) != Some(*r))
        .collect();
    let gone: Vec<&String> = old
        .chains
        .keys()
        .filter(|c| !new.chains.contains_key(*c))
        .collect();
    for (c, _) in &changed {
        let _ = writeln!(s, "add chain {t} {c}");
    }
    for (c, rules) in &changed {
        if old.chains.contains_key(*c) {
            let _ = writeln!(s, "flush chain {t} {c}");
        }
        for r in *rules {
            let _ = writeln!(s, "add rule {t} {c} {r}");
        }
    }
    for ((map, key), element) in &old.elements {
        if new.elements.get(&(*map, key.clone())) != Some(element) {
            let _ = writeln!(s, "delete element {t} {map} {{ {key} }}");
        }
    }
    for ((map, key), element) in &new.elements {
        if old.elements.get(&(*map, key.clone())) != Some(element) {
            let _ = writeln!(s, "add element {t} {map} {{ {key} {element} }}");
        }
    }
    // Rules first, so no chain still jumps to another one being deleted.
    for c in &gone {
        let _ = writeln!(s, "flush chain {t} {c}");
    }
    for c in &gone {
        let _ = writeln!(s, "delete chain {t} {c}");
    }
    for set in old.sets.keys().filter(|k| !new.sets.contains_key(*k)) {
        let _ = writeln!(s, "delete set {t} {set}");
    }
    s
}

/// Deletes `family`'s table (`kube-proxy --cleanup`); `add` first, so the
/// transaction also succeeds when there is none.
pub(super) fn teardown(family: Family) -> String {
    let t = format!("{} {TABLE}", nft_family(family));
    format!("add table {t}\ndelete table {t}\n")
}
