//! The rules kube-proxy would write for the current services, and the
//! `iptables-restore` input that moves the kernel from the chains last
//! written to them.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::{Iptables, Svc};
use crate::model::{BackendAddr, Frontend, Proto};

const MASQ_MARK: &str = "0x4000/0x4000";

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

pub(super) const HOOKS: &[(&str, &str, &str, &str, &[&str])] = &[
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
    pub(super) fn render_svc(
        &self,
        fe: &Frontend,
        svc: &Svc,
        out: &mut BTreeMap<String, Vec<String>>,
    ) {
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
    pub(super) fn build_restore(&self, new_chains: &BTreeMap<String, Vec<String>>) -> String {
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
