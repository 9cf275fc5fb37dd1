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
//! Syncs are partial restores (`iptables-restore --noflush`), as kube-proxy
//! does since 1.26: the dispatch chains are rewritten, and of the per-service
//! and per-endpoint chains only those whose rules changed; chains that went
//! away are flushed and deleted in the same transaction. Chain names are
//! kube-proxy's: base32 of a SHA-256 of the service port name, protocol and
//! endpoint. On endpoint removal the matching UDP conntrack entries are
//! deleted with `conntrack -D`, as kube-proxy does.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::model::{BackendAddr, DesiredService, DesiredState, Frontend, Proto};
use crate::reconcile::{ApplyStats, Change};

const MASQ_MARK: &str = "0x4000/0x4000";

/// A CIDR given as `--cluster-cidr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (a.b.c.d/n)"))?;
        let addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let prefix = p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{p:?} is not a prefix length 0-32"))?;
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

struct Svc {
    name: String,
    /// Endpoints in kube-proxy's order (sorted).
    backends: Vec<BackendAddr>,
}

pub struct Iptables {
    cluster_cidr: Option<Cidr>,
    services: BTreeMap<Frontend, Svc>,
    /// Rules last written per per-service/per-endpoint chain.
    chains: BTreeMap<String, Vec<String>>,
    /// Base chains and hooks are in place.
    installed: bool,
}

fn hash_name(prefix: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
    }
    let enc = data_encoding::BASE32.encode(&h.finalize());
    format!("{prefix}{}", &enc[..16])
}

fn proto_arg(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

fn svc_chain(fe: &Frontend, name: &str) -> String {
    hash_name("KUBE-SVC-", &[name, proto_arg(fe.proto)])
}

fn sep_chain(fe: &Frontend, name: &str, b: &BackendAddr) -> String {
    hash_name("KUBE-SEP-", &[name, proto_arg(fe.proto), &b.to_string()])
}

/// Runs a command, with its stderr in the error.
fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(out)
}

fn ensure_jump(
    table: &str,
    chain: &str,
    comment: &str,
    target: &str,
    extra: &[&str],
) -> Result<()> {
    let mut rule: Vec<&str> = vec!["-m", "comment", "--comment", comment];
    rule.extend_from_slice(extra);
    rule.extend_from_slice(&["-j", target]);
    let check = run(Command::new("iptables")
        .args(["-w", "-t", table, "-C", chain])
        .args(&rule))?;
    if check.status.success() {
        return Ok(());
    }
    let out = run(Command::new("iptables")
        .args(["-w", "-t", table, "-I", chain])
        .args(&rule))?;
    if !out.status.success() {
        bail!(
            "iptables -t {table} -I {chain} … -j {target}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn delete_jump(table: &str, chain: &str, comment: &str, target: &str, extra: &[&str]) {
    let mut rule: Vec<&str> = vec!["-m", "comment", "--comment", comment];
    rule.extend_from_slice(extra);
    rule.extend_from_slice(&["-j", target]);
    // Delete every copy; stops when none is left.
    for _ in 0..8 {
        match run(Command::new("iptables")
            .args(["-w", "-t", table, "-D", chain])
            .args(&rule))
        {
            Ok(o) if o.status.success() => continue,
            _ => break,
        }
    }
}

const HOOKS: &[(&str, &str, &str, &str, &[&str])] = &[
    (
        "nat",
        "PREROUTING",
        "kubernetes service portals",
        "KUBE-SERVICES",
        &[],
    ),
    (
        "nat",
        "OUTPUT",
        "kubernetes service portals",
        "KUBE-SERVICES",
        &[],
    ),
    (
        "nat",
        "POSTROUTING",
        "kubernetes postrouting rules",
        "KUBE-POSTROUTING",
        &[],
    ),
    (
        "filter",
        "FORWARD",
        "kubernetes service portals",
        "KUBE-SERVICES",
        &["-m", "conntrack", "--ctstate", "NEW"],
    ),
    (
        "filter",
        "OUTPUT",
        "kubernetes service portals",
        "KUBE-SERVICES",
        &["-m", "conntrack", "--ctstate", "NEW"],
    ),
];

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

    fn render_svc(&self, fe: &Frontend, svc: &Svc, out: &mut BTreeMap<String, Vec<String>>) {
        if svc.backends.is_empty() {
            return;
        }
        let p = proto_arg(fe.proto);
        let chain = svc_chain(fe, &svc.name);
        let mut rules = Vec::new();
        if let Some(cidr) = self.cluster_cidr {
            rules.push(format!(
                "-A {chain} -m comment --comment \"{} cluster IP\" ! -s {cidr} -d {}/32 -p {p} -m {p} --dport {} -j KUBE-MARK-MASQ",
                svc.name, fe.ip, fe.port
            ));
        }
        let n = svc.backends.len();
        for (i, b) in svc.backends.iter().enumerate() {
            let sep = sep_chain(fe, &svc.name, b);
            let prob = if i + 1 < n {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            rules.push(format!(
                "-A {chain} -m comment --comment \"{} -> {b}\"{prob} -j {sep}",
                svc.name
            ));
            out.insert(
                sep.clone(),
                vec![
                    format!("-A {sep} -m comment --comment {} -s {}/32 -j KUBE-MARK-MASQ", svc.name, b.ip),
                    format!(
                        "-A {sep} -m comment --comment {} -p {p} -m {p} -j DNAT --to-destination {b}",
                        svc.name
                    ),
                ],
            );
        }
        out.insert(chain, rules);
    }

    /// The restore input for the current state: dispatch chains in full,
    /// per-service/per-endpoint chains only where they changed.
    fn build_restore(&self, new_chains: &BTreeMap<String, Vec<String>>) -> String {
        let mut filter = String::from("*filter\n:KUBE-SERVICES - [0:0]\n");
        let mut nat = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
        if !self.installed {
            nat.push_str(":KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
        }
        let changed: Vec<&String> = new_chains
            .iter()
            .filter(|(c, r)| self.chains.get(*c) != Some(r))
            .map(|(c, _)| c)
            .collect();
        let deleted: Vec<&String> = self
            .chains
            .keys()
            .filter(|c| !new_chains.contains_key(*c))
            .collect();
        for c in changed.iter().chain(deleted.iter()) {
            nat.push_str(&format!(":{c} - [0:0]\n"));
        }
        if !self.installed {
            nat.push_str(&format!(
                "-A KUBE-MARK-MASQ -j MARK --set-xmark {MASQ_MARK}\n"
            ));
            nat.push_str(&format!(
                "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK} -j RETURN\n"
            ));
            nat.push_str("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n");
            nat.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
        }
        for (fe, svc) in &self.services {
            let p = proto_arg(fe.proto);
            if svc.backends.is_empty() {
                filter.push_str(&format!(
                    "-A KUBE-SERVICES -m comment --comment \"{} has no endpoints\" -d {}/32 -p {p} -m {p} --dport {} -j REJECT --reject-with icmp-port-unreachable\n",
                    svc.name, fe.ip, fe.port
                ));
            } else {
                nat.push_str(&format!(
                    "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -d {}/32 -p {p} -m {p} --dport {} -j {}\n",
                    svc.name,
                    fe.ip,
                    fe.port,
                    svc_chain(fe, &svc.name)
                ));
            }
        }
        for c in &changed {
            for r in &new_chains[*c] {
                nat.push_str(r);
                nat.push('\n');
            }
        }
        for c in &deleted {
            nat.push_str(&format!("-X {c}\n"));
        }
        filter.push_str("COMMIT\n");
        nat.push_str("COMMIT\n");
        filter + &nat
    }

    fn restore(input: &str) -> Result<()> {
        let mut child = Command::new("iptables-restore")
            .args(["-w", "--noflush"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running iptables-restore")?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "iptables-restore failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
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
                } => {
                    stats.services_added += 1;
                    stats.backends_added += backends.len();
                    next.insert(
                        *frontend,
                        Svc {
                            name: name.clone(),
                            backends: backends.iter().copied().collect(),
                        },
                    );
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
        if let Err(e) = Self::restore(&input) {
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
                        DesiredService::new(s.name.clone(), s.backends.iter().copied().collect()),
                    )
                })
                .collect(),
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
        let mut input =
            String::from("*filter\n:KUBE-SERVICES - [0:0]\n-X KUBE-SERVICES\nCOMMIT\n*nat\n");
        let mut all: Vec<String> = self.chains.keys().cloned().collect();
        all.extend(["KUBE-SERVICES", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"].map(String::from));
        for c in &all {
            input.push_str(&format!(":{c} - [0:0]\n"));
        }
        for c in &all {
            input.push_str(&format!("-X {c}\n"));
        }
        input.push_str("COMMIT\n");
        let r = Self::restore(&input);
        self.chains.clear();
        self.services.clear();
        self.installed = false;
        r
    }
}

/// KUBE-SVC-/KUBE-SEP- chains present in the nat table.
fn existing_service_chains() -> Vec<String> {
    let Ok(out) = Command::new("iptables-save").args(["-t", "nat"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with("KUBE-SVC-") || c.starts_with("KUBE-SEP-"))
        .map(String::from)
        .collect()
}

/// `conntrack -D` for UDP flows DNATed to `backend` (or to any backend of
/// the frontend). Returns how many entries were deleted.
fn delete_udp_flows(fe: &Frontend, backend: Option<&BackendAddr>) -> usize {
    let mut cmd = Command::new("conntrack");
    cmd.args(["-D", "-p", "udp", "--orig-dst", &fe.ip.to_string()]);
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

    fn fe() -> Frontend {
        Frontend {
            ip: "10.96.0.10".parse().unwrap(),
            port: 80,
            proto: Proto::Tcp,
        }
    }

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
    fn chain_names_are_stable_and_kube_proxy_shaped() {
        let a = svc_chain(&fe(), "default/web:http");
        assert_eq!(a, svc_chain(&fe(), "default/web:http"));
        assert!(a.starts_with("KUBE-SVC-") && a.len() == 25, "{a}");
        assert_ne!(a, svc_chain(&fe(), "default/web:https"));
    }

    #[test]
    fn probabilities_give_an_even_spread() {
        let ipt = Iptables {
            cluster_cidr: Some("10.0.0.0/8".parse().unwrap()),
            services: BTreeMap::new(),
            chains: BTreeMap::new(),
            installed: true,
        };
        let svc = Svc {
            name: "default/web:http".into(),
            backends: (1..=3)
                .map(|i| BackendAddr {
                    ip: [10, 0, 0, i].into(),
                    port: 8080,
                })
                .collect(),
        };
        let mut out = BTreeMap::new();
        ipt.render_svc(&fe(), &svc, &mut out);
        let rules = &out[&svc_chain(&fe(), &svc.name)];
        assert!(rules[0].contains("! -s 10.0.0.0/8") && rules[0].ends_with("KUBE-MARK-MASQ"));
        assert!(rules[1].contains("--probability 0.3333333333"));
        assert!(rules[2].contains("--probability 0.5000000000"));
        assert!(!rules[3].contains("statistic"));
        assert_eq!(out.len(), 4, "one service chain and three endpoint chains");
        let sep = &out[&sep_chain(&fe(), &svc.name, &svc.backends[0])];
        assert!(
            sep[1].ends_with("DNAT --to-destination 10.0.0.1:8080"),
            "{}",
            sep[1]
        );
    }

    #[test]
    fn restore_rewrites_dispatch_and_only_changed_chains() {
        let mut ipt = Iptables {
            cluster_cidr: None,
            services: BTreeMap::new(),
            chains: BTreeMap::new(),
            installed: true,
        };
        let mk = |n: u8| Svc {
            name: format!("default/s{n}"),
            backends: vec![BackendAddr {
                ip: [10, 0, 0, n].into(),
                port: 80,
            }],
        };
        let fe2 = Frontend { port: 81, ..fe() };
        ipt.services.insert(fe(), mk(1));
        ipt.services.insert(fe2, mk(2));
        let mut chains = BTreeMap::new();
        for (f, s) in &ipt.services {
            ipt.render_svc(f, s, &mut chains);
        }
        ipt.chains = chains.clone();
        // Change only the second service.
        ipt.services.insert(fe2, mk(3));
        let mut next = BTreeMap::new();
        for (f, s) in &ipt.services {
            ipt.render_svc(f, s, &mut next);
        }
        let input = ipt.build_restore(&next);
        let first_chain = svc_chain(&fe(), "default/s1");
        assert!(
            input.contains(&format!("-j {first_chain}")),
            "dispatch rewritten in full"
        );
        assert!(
            !input.contains(&format!(":{first_chain}")),
            "unchanged chain not rewritten"
        );
        let old_sep = sep_chain(&fe2, "default/s2", &mk(2).backends[0]);
        assert!(
            input.contains(&format!("-X {old_sep}")),
            "stale endpoint chain deleted"
        );
    }
}
