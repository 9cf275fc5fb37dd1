//! iptables mode: the live ruleset of this network namespace turned back
//! into frontends and endpoints, netfilter's conntrack table and the
//! `recent` lists of session affinity. The parsing is pure (text in,
//! values out) and unit-tested on text captured from a running agent
//! (`testdata/`); [`read`] only runs the commands and reads the files.
//!
//! How the rules are read (`datapath/iptables/rules.rs` writes them):
//! frontends are the dispatch rules of nat `KUBE-SERVICES` (ClusterIPs,
//! externalIPs, LoadBalancer addresses) and `KUBE-NODEPORTS`, and those
//! without endpoints the REJECT/DROP rules of filter `KUBE-SERVICES` and
//! `KUBE-EXTERNAL-SERVICES`; a dispatch rule jumps to `KUBE-FW-` (source
//! ranges: `-s` rules), `KUBE-EXT-` (external: `Cluster` when it marks for
//! masquerade, else `Local`) or `KUBE-SVC-`, whose `KUBE-SEP-` jumps (in
//! order, with their `statistic` probabilities; the `recent --rcheck` ones
//! carry the affinity timeout) end in a `DNAT --to-destination`.
//!
//! Both families: the agent writes IPv6 ClusterIPs into the ip6tables
//! tables with the same structure, so both rulesets are read the same way
//! (`ip6tables-save`, `conntrack -L -f ipv6`; the `recent` lists of both
//! families share `/proc/net/xt_recent`, one list per endpoint chain).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{
    AffinityRow, BackendsRow, ConntrackRow, FrontendId, InspectMode, Report, Rows, ServiceRow,
    SlotRow, Subject,
};
use crate::model::{BackendAddr, Family, Frontend, Proto};

/// Where the `recent` match keeps its lists (per network namespace).
const XT_RECENT: &str = "/proc/net/xt_recent";

/// Reads `subject` from this network namespace.
pub fn read(subject: Subject) -> Result<Report> {
    let mut svcs = Vec::new();
    let mut found = false;
    let mut read = Vec::new();
    for family in [Family::V4, Family::V6] {
        let (Some(nat), Some(filter)) = (save(family, "nat")?, save(family, "filter")?) else {
            continue;
        };
        let (nat, filter) = (Tables::parse(&nat), Tables::parse(&filter));
        found |=
            nat.chains.contains_key("KUBE-SERVICES") || filter.chains.contains_key("KUBE-SERVICES");
        svcs.extend(services(&nat, &filter));
        let bin = save_bin(family);
        read.push(format!("{bin} -t nat, {bin} -t filter"));
    }
    if !found {
        bail!(
            "no KUBE-SERVICES chain in this network namespace's iptables or ip6tables rules \
             (is the agent running here with --mode iptables?)"
        );
    }
    svcs.sort_by_key(|s| s.fe);
    let rules = read.join(", ");
    let (source, rows) = match subject {
        Subject::Services => (
            rules,
            Rows::Services(svcs.iter().map(service_row).collect()),
        ),
        Subject::Backends => (
            rules,
            Rows::Frontends(svcs.iter().map(backends_row).collect()),
        ),
        Subject::Conntrack => {
            let mut entries = parse_conntrack(&list_conntrack(Family::V4)?);
            entries.extend(parse_conntrack(&list_conntrack(Family::V6)?));
            (
                "conntrack -L -f ipv4, conntrack -L -f ipv6 (netfilter's table: the entries of \
                 flows to the frontends of iptables-save and ip6tables-save)"
                    .to_owned(),
                Rows::Entries(conntrack_rows(&svcs, &entries)),
            )
        }
        Subject::Affinity => {
            let clock = JiffiesClock::read();
            let mut rows = Vec::new();
            for (chain, text) in recent_lists()? {
                rows.extend(affinity_rows(&svcs, &chain, &text, clock));
            }
            (
                format!("{XT_RECENT}/KUBE-SEP-* (the recent lists of ClientIP affinity)"),
                Rows::Bindings(rows),
            )
        }
    };
    Ok(Report::new(subject, InspectMode::Iptables, source, rows))
}

fn save_bin(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables-save",
        Family::V6 => "ip6tables-save",
    }
}

/// One table of the family's rules; `None` for IPv6 when ip6tables is not
/// installed (a node that proxies IPv4 only need not have it).
fn save(family: Family, table: &str) -> Result<Option<String>> {
    let bin = save_bin(family);
    let out = match Command::new(bin).args(["-t", table]).output() {
        Ok(out) => out,
        Err(e) if family == Family::V6 && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(e) => {
            return Err(e).with_context(|| format!("running {bin} (is iptables installed?)"));
        }
    };
    if !out.status.success() {
        bail!(
            "{bin} -t {table}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// `conntrack -L` of one family (it lists IPv4 unless told otherwise).
pub(super) fn list_conntrack(family: Family) -> Result<String> {
    let f = match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    };
    let out = Command::new("conntrack")
        .args(["-L", "-f", f])
        .output()
        .context("running conntrack -L (is conntrack-tools installed?)")?;
    if !out.status.success() {
        bail!(
            "conntrack -L -f {f}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// (list name, content) of every `KUBE-SEP-` recent list; none when the
/// `recent` match was never used in this namespace.
fn recent_lists() -> Result<Vec<(String, String)>> {
    let dir = match std::fs::read_dir(XT_RECENT) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => bail!("cannot read {XT_RECENT}: {e}"),
    };
    let mut out = Vec::new();
    for entry in dir {
        let entry = entry.with_context(|| format!("cannot read {XT_RECENT}"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("KUBE-SEP-") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path())
            .with_context(|| format!("reading {XT_RECENT}/{name}"))?;
        out.push((name, text));
    }
    out.sort();
    Ok(out)
}

/// One `-A CHAIN …` line of `iptables-save`, split as a shell would.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub chain: String,
    args: Vec<String>,
}

impl Rule {
    fn parse(line: &str) -> Option<Rule> {
        let mut words = split_words(line.strip_prefix("-A ")?);
        if words.is_empty() {
            return None;
        }
        let chain = words.remove(0);
        Some(Rule { chain, args: words })
    }

    /// The value after the first `flag` that is not negated (`! flag`).
    fn value(&self, flag: &str) -> Option<&str> {
        self.args.windows(2).enumerate().find_map(|(i, w)| {
            let negated = i > 0 && self.args[i - 1] == "!";
            (w[0] == flag && !negated).then_some(w[1].as_str())
        })
    }

    fn has(&self, flag: &str) -> bool {
        self.args.iter().any(|a| a == flag)
    }

    /// The jump (`-j`) or goto (`-g`) target.
    fn target(&self) -> Option<&str> {
        self.value("-j").or_else(|| self.value("-g"))
    }
}

/// Splits on blanks; `"…"` groups (with `\"` and `\\` escapes), as
/// iptables-save quotes comments.
fn split_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// One table of `iptables-save` output: its chains and their rules in order.
#[derive(Debug, Default)]
pub struct Tables {
    pub chains: BTreeMap<String, Vec<Rule>>,
}

impl Tables {
    /// Parses `iptables-save -t TABLE` output (one table; a second `*table`
    /// section would be merged in).
    pub fn parse(text: &str) -> Tables {
        let mut t = Tables::default();
        for line in text.lines() {
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    t.chains.entry(name.to_owned()).or_default();
                }
            } else if let Some(rule) = Rule::parse(line) {
                t.chains.entry(rule.chain.clone()).or_default().push(rule);
            }
        }
        t
    }

    fn rules(&self, chain: &str) -> &[Rule] {
        self.chains.get(chain).map_or(&[], Vec::as_slice)
    }
}

/// A frontend as the rules implement it.
#[derive(Debug, Clone, PartialEq)]
pub struct Svc {
    pub fe: Frontend,
    /// The service port name of the rule's comment.
    pub name: Option<String>,
    pub external: bool,
    /// `externalTrafficPolicy: Local` (no masquerade; dropped when empty).
    pub local: bool,
    pub source_ranges: Vec<String>,
    /// ClientIP affinity timeout, 0 without.
    pub affinity: u32,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub addr: BackendAddr,
    /// Its `KUBE-SEP-` chain (and `recent` list).
    pub chain: String,
    pub probability: Option<f64>,
}

fn proto_of(rule: &Rule) -> Option<Proto> {
    match rule.value("-p")? {
        "tcp" => Some(Proto::Tcp),
        "udp" => Some(Proto::Udp),
        _ => None,
    }
}

/// The frontend a dispatch rule matches; `nodeport` for the rules of
/// `KUBE-NODEPORTS` (and `--dst-type LOCAL` ones in filter).
fn frontend_of(rule: &Rule, nodeport: bool) -> Option<Frontend> {
    let proto = proto_of(rule)?;
    let port: u16 = rule.value("--dport")?.parse().ok()?;
    if nodeport || rule.value("--dst-type") == Some("LOCAL") {
        return Some(Frontend::nodeport(port, proto));
    }
    // `10.96.0.10/32`, `fd00:10:96::10/128`: one address.
    let d = rule.value("-d")?;
    let ip: IpAddr = match d.split_once('/') {
        Some((ip, "32" | "128")) => ip,
        Some(_) => return None,
        None => d,
    }
    .parse()
    .ok()?;
    Some(Frontend { ip, port, proto })
}

/// The service port name of a dispatch rule's comment.
fn name_of(rule: &Rule) -> Option<String> {
    let c = rule.value("--comment")?;
    let name = [
        " cluster IP",
        " external IP",
        " loadbalancer IP",
        " nodePort",
        " has no endpoints",
        " has no local endpoints",
    ]
    .iter()
    .find_map(|suffix| c.strip_suffix(suffix))
    .unwrap_or(c);
    Some(name.to_owned())
}

fn is_service_chain(c: &str) -> bool {
    ["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-"]
        .iter()
        .any(|p| c.starts_with(p))
}

/// Every frontend of the ruleset, sorted; the nat rules first, then the
/// filter rules of frontends without endpoints.
pub fn services(nat: &Tables, filter: &Tables) -> Vec<Svc> {
    let mut out: BTreeMap<Frontend, Svc> = BTreeMap::new();
    let dispatch = nat
        .rules("KUBE-SERVICES")
        .iter()
        .map(|r| (r, false))
        .chain(nat.rules("KUBE-NODEPORTS").iter().map(|r| (r, true)));
    for (rule, nodeport) in dispatch {
        let Some(target) = rule.target().filter(|t| is_service_chain(t)) else {
            continue;
        };
        let Some(fe) = frontend_of(rule, nodeport) else {
            continue;
        };
        if out.contains_key(&fe) {
            continue;
        }
        let mut svc = Svc {
            fe,
            name: name_of(rule),
            external: nodeport,
            local: false,
            source_ranges: Vec::new(),
            affinity: 0,
            endpoints: Vec::new(),
        };
        walk(nat, target, &mut svc, 0);
        out.insert(fe, svc);
    }
    for chain in ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES"] {
        for rule in filter.rules(chain) {
            let verdict = rule.target();
            if !matches!(verdict, Some("REJECT" | "DROP")) {
                continue;
            }
            let Some(fe) = frontend_of(rule, false) else {
                continue;
            };
            out.entry(fe).or_insert_with(|| Svc {
                fe,
                name: name_of(rule),
                external: chain == "KUBE-EXTERNAL-SERVICES",
                local: verdict == Some("DROP"),
                source_ranges: Vec::new(),
                affinity: 0,
                endpoints: Vec::new(),
            });
        }
    }
    out.into_values().collect()
}

/// Follows a frontend's chain down to its endpoints.
fn walk(nat: &Tables, chain: &str, svc: &mut Svc, depth: usize) {
    // FW → EXT → SVC at most; more is a loop or not ours.
    if depth > 3 {
        return;
    }
    let rules = nat.rules(chain);
    if chain.starts_with("KUBE-FW-") {
        let mut next = None;
        for r in rules {
            if let Some(t) = r.target().filter(|t| is_service_chain(t)) {
                if let Some(src) = r.value("-s") {
                    svc.source_ranges.push(src.to_owned());
                }
                next.get_or_insert_with(|| t.to_owned());
            }
        }
        if let Some(next) = next {
            walk(nat, &next, svc, depth + 1);
        }
        return;
    }
    if chain.starts_with("KUBE-EXT-") {
        svc.external = true;
        svc.local = !rules.iter().any(|r| r.target() == Some("KUBE-MARK-MASQ"));
    }
    for r in rules {
        let Some(t) = r.target() else { continue };
        if t.starts_with("KUBE-SEP-") {
            if r.has("--rcheck") {
                if let Some(secs) = r.value("--seconds").and_then(|s| s.parse().ok()) {
                    svc.affinity = secs;
                }
                continue;
            }
            if let Some(addr) = dnat_of(nat, t) {
                svc.endpoints.push(Endpoint {
                    addr,
                    chain: t.to_owned(),
                    probability: r.value("--probability").and_then(|p| p.parse().ok()),
                });
            }
        } else if t.starts_with("KUBE-SVC-") || t.starts_with("KUBE-SVL-") {
            // kube-proxy's own KUBE-EXT- chains jump on to the service chain.
            walk(nat, t, svc, depth + 1);
        }
    }
}

/// The `DNAT --to-destination` of an endpoint chain.
fn dnat_of(nat: &Tables, sep: &str) -> Option<BackendAddr> {
    let to = nat
        .rules(sep)
        .iter()
        .find(|r| r.target() == Some("DNAT"))?
        .value("--to-destination")?;
    // `10.0.0.1:8080`, or `[fd00::1]:8080` in ip6tables.
    let (ip, port) = to.rsplit_once(':')?;
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    Some(BackendAddr::new(
        ip.parse::<std::net::IpAddr>().ok()?,
        port.parse().ok()?,
    ))
}

pub(super) fn service_row(s: &Svc) -> ServiceRow {
    let (flags, traffic_policy) = super::flags(
        s.external,
        s.external && s.local,
        !s.source_ranges.is_empty(),
    );
    ServiceRow {
        id: FrontendId::from(&s.fe),
        node_addresses: Vec::new(),
        service_id: None,
        name: s.name.clone(),
        backends: s.endpoints.len(),
        flags,
        traffic_policy,
        source_ranges: s.source_ranges.clone(),
        affinity_seconds: s.affinity,
    }
}

pub(super) fn backends_row(s: &Svc) -> BackendsRow {
    BackendsRow {
        id: FrontendId::from(&s.fe),
        service_id: None,
        name: s.name.clone(),
        rr_cursor: None,
        backends: s
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| SlotRow {
                chain: Some(e.chain.clone()),
                probability: e.probability,
                ..SlotRow::new(i as u32, &e.addr)
            })
            .collect(),
    }
}

/// One direction of a netfilter conntrack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

impl Tuple {
    fn source(&self) -> SocketAddr {
        SocketAddr::new(self.src, self.sport)
    }

    fn destination(&self) -> SocketAddr {
        SocketAddr::new(self.dst, self.dport)
    }
}

/// One line of `conntrack -L` (TCP and UDP over IPv4 or IPv6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfEntry {
    pub proto: Proto,
    pub timeout: u64,
    /// The TCP state, then the `[FLAGS]`.
    pub state: Vec<String>,
    pub original: Tuple,
    pub reply: Tuple,
}

/// Parses `conntrack -L` output: `tcp 6 431999 ESTABLISHED src=… dst=…
/// sport=… dport=… src=… dst=… sport=… dport=… [ASSURED] mark=0 use=1`.
/// Other protocols and families are skipped.
pub fn parse_conntrack(text: &str) -> Vec<NfEntry> {
    text.lines().filter_map(parse_conntrack_line).collect()
}

fn parse_conntrack_line(line: &str) -> Option<NfEntry> {
    let mut words = line.split_whitespace();
    let proto = match words.next()? {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return None,
    };
    let _number = words.next()?;
    let timeout = words.next()?.parse().ok()?;
    let mut state = Vec::new();
    // src, dst, sport, dport of the original, then of the reply direction.
    let mut tuples: Vec<[Option<String>; 4]> = Vec::new();
    for w in words {
        if let Some(flag) = w.strip_prefix('[').and_then(|w| w.strip_suffix(']')) {
            state.push(flag.to_owned());
            continue;
        }
        let Some((k, v)) = w.split_once('=') else {
            state.push(w.to_owned());
            continue;
        };
        let slot = match k {
            "src" => 0,
            "dst" => 1,
            "sport" => 2,
            "dport" => 3,
            _ => continue,
        };
        if slot == 0 {
            tuples.push(Default::default());
        }
        if let Some(t) = tuples.last_mut() {
            t[slot] = Some(v.to_owned());
        }
    }
    let tuple = |t: &[Option<String>; 4]| -> Option<Tuple> {
        Some(Tuple {
            src: t[0].as_deref()?.parse().ok()?,
            dst: t[1].as_deref()?.parse().ok()?,
            sport: t[2].as_deref()?.parse().ok()?,
            dport: t[3].as_deref()?.parse().ok()?,
        })
    };
    Some(NfEntry {
        proto,
        timeout,
        state,
        original: tuple(tuples.first()?)?,
        reply: tuple(tuples.get(1)?)?,
    })
}

/// The frontend a netfilter entry was translated for: its original
/// destination is a frontend (a nodePort: any address of its family on its
/// port, and translated).
fn frontend_of_flow<'a>(svcs: &'a [Svc], e: &NfEntry) -> Option<&'a Svc> {
    let o = &e.original;
    let translated = e.reply.src != o.dst || e.reply.sport != o.dport;
    svcs.iter()
        .filter(|s| s.fe.proto == e.proto && s.fe.port == o.dport)
        .filter(|s| s.fe.family() == Family::of(o.dst))
        .find(|s| s.fe.ip == o.dst || (s.fe.is_nodeport() && translated))
}

/// The netfilter entries of flows to frontends, as rows.
pub fn conntrack_rows(svcs: &[Svc], entries: &[NfEntry]) -> Vec<ConntrackRow> {
    let mut rows: Vec<(Frontend, Tuple, ConntrackRow)> = entries
        .iter()
        .filter_map(|e| {
            let svc = frontend_of_flow(svcs, e)?;
            let (o, r) = (e.original, e.reply);
            let row = ConntrackRow {
                direction: "original",
                protocol: e.proto.to_string(),
                source: o.source().to_string(),
                destination: o.destination().to_string(),
                translated: r.source().to_string(),
                frontend: Some(svc.fe.to_string()),
                service_id: None,
                // Masqueraded: the reply goes to the address the flow left with.
                nat: (r.dst != o.src || r.dport != o.sport).then(|| r.destination().to_string()),
                age_ms: None,
                closing: None,
                state: (!e.state.is_empty()).then(|| e.state.join(",")),
                timeout_seconds: Some(e.timeout),
            };
            Some((svc.fe, o, row))
        })
        .collect();
    rows.sort_by_key(|(fe, o, _)| (*fe, o.src, o.sport));
    rows.into_iter().map(|(_, _, r)| r).collect()
}

/// The kernel's jiffies now and their rate, to age `recent` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JiffiesClock {
    pub now: u64,
    pub hz: u64,
}

impl JiffiesClock {
    /// From `/proc/timer_list` (`jiffies: N`, root only) and `/proc/uptime`;
    /// `None` when either cannot be read.
    fn read() -> Option<JiffiesClock> {
        let timers = std::fs::read_to_string("/proc/timer_list").ok()?;
        let now = timers
            .lines()
            .find_map(|l| l.strip_prefix("jiffies: "))?
            .trim()
            .parse()
            .ok()?;
        let uptime: f64 = std::fs::read_to_string("/proc/uptime")
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(JiffiesClock {
            now,
            hz: hz_of(now, uptime),
        })
    }
}

/// The kernel's HZ from jiffies and uptime: jiffies start 300 s before
/// wrapping 32 bits (`INITIAL_JIFFIES`), so jiffies = 2^32 + (uptime −
/// 300)·HZ; the nearest of the HZ values the kernel can be built with.
pub fn hz_of(jiffies: u64, uptime_secs: f64) -> u64 {
    let predicted = |hz: u64| (1u64 << 32) as f64 + (uptime_secs - 300.0) * hz as f64;
    [100, 250, 300, 1000]
        .into_iter()
        .min_by(|a, b| {
            let da = (predicted(*a) - jiffies as f64).abs();
            let db = (predicted(*b) - jiffies as f64).abs();
            da.total_cmp(&db)
        })
        .unwrap_or(250)
}

/// One entry of a `recent` list: `src=10.0.1.2 ttl: 64 last_seen:
/// 4309372427 oldest_pkt: 1 4309372427` (IPv6: `src=` in full,
/// `fd00:0010:0001:0000:…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentEntry {
    pub src: IpAddr,
    /// Jiffies of the last packet that (re)set the entry.
    pub last_seen: u64,
}

pub fn parse_recent(text: &str) -> Vec<RecentEntry> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let src = words.next()?.strip_prefix("src=")?.parse().ok()?;
            let mut last_seen = None;
            while let Some(w) = words.next() {
                if w == "last_seen:" {
                    last_seen = words.next()?.parse().ok();
                    break;
                }
            }
            Some(RecentEntry {
                src,
                last_seen: last_seen?,
            })
        })
        .collect()
}

/// The bindings of the `recent` list `chain` (an endpoint chain), named by
/// the frontend whose endpoint it is when the rules still hold it.
pub fn affinity_rows(
    svcs: &[Svc],
    chain: &str,
    text: &str,
    clock: Option<JiffiesClock>,
) -> Vec<AffinityRow> {
    let owner = svcs.iter().find_map(|s| {
        s.endpoints
            .iter()
            .find(|e| e.chain == chain)
            .map(|e| (s, e.addr))
    });
    let mut rows: Vec<AffinityRow> = parse_recent(text)
        .into_iter()
        .map(|e| {
            let age_ms = clock.map(|c| c.now.saturating_sub(e.last_seen) * 1000 / c.hz.max(1));
            let timeout = owner.map(|(s, _)| s.affinity).filter(|t| *t != 0);
            AffinityRow {
                client: e.src.to_string(),
                service_id: None,
                frontend: owner.map(|(s, _)| s.fe.to_string()),
                name: owner.and_then(|(s, _)| s.name.clone()),
                backend: owner.map_or_else(|| "-".to_owned(), |(_, b)| b.to_string()),
                age_ms,
                timeout_seconds: timeout,
                expired: super::expired(age_ms, timeout),
                chain: Some(chain.to_owned()),
            }
        })
        .collect();
    rows.sort_by_key(|r| r.client.parse::<IpAddr>().ok());
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(
            split_words(r#"KUBE-SERVICES -m comment --comment "default/web:http cluster IP" -j X"#),
            [
                "KUBE-SERVICES",
                "-m",
                "comment",
                "--comment",
                "default/web:http cluster IP",
                "-j",
                "X"
            ]
        );
        assert_eq!(
            split_words(r#"a "say \"hi\"" b"#),
            ["a", r#"say "hi""#, "b"]
        );
        assert_eq!(split_words(r#"a "" b"#), ["a", "", "b"]);
    }

    #[test]
    fn negated_options_are_not_values() {
        let r = Rule::parse("-A KUBE-SVC-X ! -s 10.0.0.0/8 -d 10.96.0.10/32 -j KUBE-MARK-MASQ")
            .unwrap();
        assert_eq!(r.chain, "KUBE-SVC-X");
        assert_eq!(r.value("-s"), None);
        assert_eq!(r.value("-d"), Some("10.96.0.10/32"));
        assert_eq!(r.target(), Some("KUBE-MARK-MASQ"));
    }

    #[test]
    fn hz_is_recovered_from_jiffies_and_uptime() {
        // Read on the development VM: HZ 250.
        assert_eq!(hz_of(4_309_372_427, 57_918.42), 250);
        assert_eq!(hz_of((1 << 32) + 1000 * 1000, 1300.0), 1000);
        // Before the 32-bit wrap (uptime under 300 s).
        assert_eq!(hz_of((1 << 32) - 100 * 200, 100.0), 100);
    }

    #[test]
    fn recent_entries_are_parsed() {
        let got = parse_recent(
            "src=10.0.1.2 ttl: 64 last_seen: 4309372427 oldest_pkt: 2 4309371000, 4309372427\n\
             src=10.0.1.3 ttl: 63 last_seen: 12 oldest_pkt: 1 12\n\
             garbage\n",
        );
        assert_eq!(
            got,
            [
                RecentEntry {
                    src: [10, 0, 1, 2].into(),
                    last_seen: 4_309_372_427
                },
                RecentEntry {
                    src: [10, 0, 1, 3].into(),
                    last_seen: 12
                }
            ]
        );
    }

    // Captured from `kproxy --mode iptables --cluster-cidr 10.0.0.0/16
    // --node-name node1` in a scratch namespace, with Services web
    // (10.96.0.10, 80/TCP + 53/UDP, three endpoints), sticky (ClientIP
    // affinity, 600 s), np (nodePort 30080, externalIP 203.0.113.7), local
    // (the same with `Local`), lb (LoadBalancer 203.0.113.9 with two source
    // ranges), empty and emptylocal (no endpoints), and a few connections
    // open from the namespace itself.
    const NAT: &str = include_str!("testdata/iptables-save-nat.txt");
    const FILTER: &str = include_str!("testdata/iptables-save-filter.txt");
    const CONNTRACK: &str = include_str!("testdata/conntrack-L.txt");
    const RECENT: &str = include_str!("testdata/xt_recent-KUBE-SEP-EM4G22Y5J7RIHLGC.txt");

    fn captured() -> Vec<Svc> {
        services(&Tables::parse(NAT), &Tables::parse(FILTER))
    }

    fn find<'a>(svcs: &'a [Svc], fe: &str) -> &'a Svc {
        svcs.iter()
            .find(|s| s.fe.to_string() == fe)
            .unwrap_or_else(|| panic!("no frontend {fe} in {svcs:#?}"))
    }

    fn endpoints(s: &Svc) -> Vec<String> {
        s.endpoints.iter().map(|e| e.addr.to_string()).collect()
    }

    #[test]
    fn captured_rules_give_every_frontend_and_its_endpoints() {
        let svcs = captured();
        let names: Vec<String> = svcs.iter().map(|s| s.fe.to_string()).collect();
        assert_eq!(
            names,
            [
                "nodePort 30080/TCP",
                "nodePort 30081/TCP",
                "nodePort 30082/TCP",
                "nodePort 30083/TCP",
                "10.96.0.10:53/UDP",
                "10.96.0.10:80/TCP",
                "10.96.0.20:80/TCP",
                "10.96.0.30:80/TCP",
                "10.96.0.40:80/TCP",
                "10.96.0.50:80/TCP",
                "10.96.0.60:80/TCP",
                "10.96.0.70:80/TCP",
                "203.0.113.7:80/TCP",
                "203.0.113.8:80/TCP",
                "203.0.113.9:80/TCP",
            ]
        );
        let web = find(&svcs, "10.96.0.10:80/TCP");
        assert_eq!(web.name.as_deref(), Some("default/web:http"));
        assert_eq!(
            endpoints(web),
            ["10.0.11.2:8080", "10.0.12.2:8080", "10.0.13.2:8080"]
        );
        let probs: Vec<Option<f64>> = web.endpoints.iter().map(|e| e.probability).collect();
        assert_eq!(probs, [Some(0.33333333349), Some(0.5), None]);
        assert_eq!(web.endpoints[0].chain, "KUBE-SEP-2NCWTJFXBZWKZJT4");
        // `! -s 10.0.0.0/16 … -j KUBE-MARK-MASQ` is neither a source range
        // nor an endpoint.
        assert!(!web.external && web.source_ranges.is_empty() && web.affinity == 0);
        assert_eq!(endpoints(find(&svcs, "10.96.0.10:53/UDP")).len(), 3);
    }

    #[test]
    fn captured_rules_give_policies_ranges_and_affinity() {
        let svcs = captured();
        // The `recent --rcheck` jumps carry the timeout, not endpoints.
        let sticky = find(&svcs, "10.96.0.20:80/TCP");
        assert_eq!(sticky.affinity, 600);
        assert_eq!(endpoints(sticky), ["10.0.11.2:8080", "10.0.12.2:8080"]);
        let np = find(&svcs, "nodePort 30080/TCP");
        assert!(np.external && !np.local, "{np:?}");
        assert_eq!(np.name.as_deref(), Some("default/np:http"));
        assert_eq!(endpoints(np), ["10.0.11.2:8080"]);
        let ext = find(&svcs, "203.0.113.7:80/TCP");
        assert!(ext.external && !ext.local);
        let local = find(&svcs, "203.0.113.8:80/TCP");
        assert!(local.external && local.local, "{local:?}");
        assert_eq!(endpoints(local), ["10.0.12.2:8080"]);
        // Its ClusterIP is no external frontend.
        assert!(!find(&svcs, "10.96.0.40:80/TCP").external);
        let lb = find(&svcs, "203.0.113.9:80/TCP");
        assert_eq!(lb.source_ranges, ["192.0.2.1/32", "198.51.100.0/24"]);
        assert!(lb.external && !lb.local);
        assert_eq!(endpoints(lb), ["10.0.13.2:8080"]);
        // Without endpoints: only the filter rules know them.
        let empty = find(&svcs, "10.96.0.60:80/TCP");
        assert!(empty.endpoints.is_empty() && !empty.external);
        assert_eq!(empty.name.as_deref(), Some("default/empty:http"));
        let dropped = find(&svcs, "nodePort 30083/TCP");
        assert!(dropped.endpoints.is_empty() && dropped.external && dropped.local);
        let rows: Vec<ServiceRow> = svcs.iter().map(service_row).collect();
        let lb_row = rows
            .iter()
            .find(|r| r.id.frontend == "203.0.113.9:80/TCP")
            .unwrap();
        assert_eq!(lb_row.flags, ["external", "source-ranges"]);
        assert_eq!(lb_row.traffic_policy, Some("Cluster"));
        let local_row = rows
            .iter()
            .find(|r| r.id.frontend == "nodePort 30081/TCP")
            .unwrap();
        assert_eq!(local_row.flags, ["external", "drop-empty"]);
        assert_eq!(local_row.traffic_policy, Some("Local"));
    }

    #[test]
    fn captured_conntrack_entries_are_matched_to_frontends() {
        let entries = parse_conntrack(CONNTRACK);
        assert_eq!(entries.len(), 7, "{entries:#?}");
        assert_eq!(entries[0].proto, Proto::Udp);
        assert!(entries[0].state.is_empty());
        assert_eq!(entries[1].state, ["ESTABLISHED", "ASSURED"]);
        assert_eq!(entries[1].timeout, 431_996);
        let rows = conntrack_rows(&captured(), &entries);
        assert_eq!(rows.len(), 7, "every captured flow is to a frontend");
        let udp = rows.iter().find(|r| r.protocol == "UDP").unwrap();
        assert_eq!(udp.source, "10.0.1.1:44385");
        assert_eq!(udp.destination, "10.96.0.10:53");
        assert_eq!(udp.translated, "10.0.11.2:8080");
        assert_eq!(udp.frontend.as_deref(), Some("10.96.0.10:53/UDP"));
        assert_eq!(udp.nat, None);
        // The nodePort flow from the node itself was masqueraded.
        let np = rows
            .iter()
            .find(|r| r.frontend.as_deref() == Some("nodePort 30080/TCP"))
            .unwrap();
        assert_eq!(np.destination, "10.0.1.1:30080");
        assert_eq!(np.translated, "10.0.11.2:8080");
        assert_eq!(np.nat.as_deref(), Some("10.0.11.2:42112"));
        assert_eq!(np.state.as_deref(), Some("ESTABLISHED,ASSURED"));
        // Flows to other addresses are not service flows.
        let other = parse_conntrack(
            "tcp      6 431999 ESTABLISHED src=10.0.1.1 dst=10.0.1.9 sport=40000 dport=80 \
             src=10.0.1.9 dst=10.0.1.1 sport=80 dport=40000 [ASSURED] mark=0 use=1\n\
             icmp     1 29 src=10.0.1.1 dst=10.0.1.9 type=8 code=0 id=7 src=10.0.1.9 \
             dst=10.0.1.1 type=0 code=0 id=7 mark=0 use=1\n",
        );
        assert_eq!(other.len(), 1, "ICMP is skipped");
        assert!(conntrack_rows(&captured(), &other).is_empty());
    }

    #[test]
    fn captured_recent_list_names_client_frontend_and_backend() {
        let svcs = captured();
        let clock = JiffiesClock {
            now: 4_309_521_895 + 77 * 250,
            hz: 250,
        };
        let rows = affinity_rows(&svcs, "KUBE-SEP-EM4G22Y5J7RIHLGC", RECENT, Some(clock));
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.client, "10.0.1.1");
        assert_eq!(r.frontend.as_deref(), Some("10.96.0.20:80/TCP"));
        assert_eq!(r.name.as_deref(), Some("default/sticky:http"));
        assert_eq!(r.backend, "10.0.11.2:8080");
        assert_eq!(r.age_ms, Some(77_000));
        assert_eq!(r.timeout_seconds, Some(600));
        assert_eq!(r.expired, Some(false));
        let late = JiffiesClock {
            now: 4_309_521_895 + 601 * 250,
            hz: 250,
        };
        let rows = affinity_rows(&svcs, "KUBE-SEP-EM4G22Y5J7RIHLGC", RECENT, Some(late));
        assert_eq!(rows[0].expired, Some(true));
        // A list whose endpoint is gone from the rules still shows its clients.
        let rows = affinity_rows(&svcs, "KUBE-SEP-GONE", RECENT, None);
        assert_eq!(rows[0].frontend, None);
        assert_eq!((rows[0].age_ms, rows[0].expired), (None, None));
    }

    // Captured from the same agent with IPv6 Services in a scratch
    // namespace: web (dual-stack, fd00:10:96::10, 80/TCP + 53/UDP, two IPv6
    // endpoints), sticky6 (fd00:10:96::20, ClientIP affinity, 600 s) and
    // empty6 (fd00:10:96::30, no endpoints), with flows from fd00:10:1::1.
    const NAT6: &str = include_str!("testdata/ip6tables-save-nat.txt");
    const FILTER6: &str = include_str!("testdata/ip6tables-save-filter.txt");
    const CONNTRACK6: &str = include_str!("testdata/conntrack-L-ipv6.txt");
    const RECENT6: &str = include_str!("testdata/xt_recent-KUBE-SEP-LCYQX5MHQUIP7GOF.txt");

    fn captured6() -> Vec<Svc> {
        services(&Tables::parse(NAT6), &Tables::parse(FILTER6))
    }

    #[test]
    fn captured_ip6tables_rules_give_ipv6_frontends_and_endpoints() {
        let svcs = captured6();
        let names: Vec<String> = svcs.iter().map(|s| s.fe.to_string()).collect();
        assert_eq!(
            names,
            [
                "[fd00:10:96::10]:53/UDP",
                "[fd00:10:96::10]:80/TCP",
                "[fd00:10:96::20]:80/TCP",
                "[fd00:10:96::30]:80/TCP",
            ]
        );
        let web = find(&svcs, "[fd00:10:96::10]:80/TCP");
        assert_eq!(web.name.as_deref(), Some("default/web:http"));
        assert_eq!(
            endpoints(web),
            ["[fd00:10:244::2]:8080", "[fd00:10:244::3]:8080"]
        );
        let sticky = find(&svcs, "[fd00:10:96::20]:80/TCP");
        assert_eq!(sticky.affinity, 600);
        assert_eq!(endpoints(sticky), ["[fd00:10:244::2]:8080"]);
        let empty = find(&svcs, "[fd00:10:96::30]:80/TCP");
        assert!(empty.endpoints.is_empty() && !empty.external);
        // Address columns without brackets, endpoints with.
        let row = backends_row(web);
        assert_eq!(row.id.address, "fd00:10:96::10");
        assert_eq!(row.backends[0].address, "fd00:10:244::2");
        assert_eq!(row.backends[0].endpoint, "[fd00:10:244::2]:8080");
    }

    #[test]
    fn captured_ipv6_conntrack_and_recent_list_are_matched() {
        // Both families' frontends, as `read` merges them.
        let mut svcs = captured();
        svcs.extend(captured6());
        let entries = parse_conntrack(CONNTRACK6);
        assert_eq!(entries.len(), 4, "{entries:#?}");
        let rows = conntrack_rows(&svcs, &entries);
        assert_eq!(rows.len(), 4, "every captured flow is to a frontend");
        let udp = rows.iter().find(|r| r.protocol == "UDP").unwrap();
        assert_eq!(udp.source, "[fd00:10:1::1]:53764");
        assert_eq!(udp.destination, "[fd00:10:96::10]:53");
        assert_eq!(udp.translated, "[fd00:10:244::2]:8080");
        assert_eq!(udp.frontend.as_deref(), Some("[fd00:10:96::10]:53/UDP"));
        assert_eq!(udp.nat, None);
        assert_eq!(udp.state.as_deref(), Some("UNREPLIED"));
        let sticky: Vec<_> = rows
            .iter()
            .filter(|r| r.frontend.as_deref() == Some("[fd00:10:96::20]:80/TCP"))
            .collect();
        assert_eq!(sticky.len(), 2);

        let clock = JiffiesClock {
            now: 4_312_448_700 + 5 * 250,
            hz: 250,
        };
        let rows = affinity_rows(&svcs, "KUBE-SEP-LCYQX5MHQUIP7GOF", RECENT6, Some(clock));
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        // The kernel writes the address in full; shown as std prints it.
        assert_eq!(r.client, "fd00:10:1::1");
        assert_eq!(r.frontend.as_deref(), Some("[fd00:10:96::20]:80/TCP"));
        assert_eq!(r.name.as_deref(), Some("default/sticky6:http"));
        assert_eq!(r.backend, "[fd00:10:244::2]:8080");
        assert_eq!(r.age_ms, Some(5_000));
        assert_eq!((r.timeout_seconds, r.expired), (Some(600), Some(false)));
    }
}
