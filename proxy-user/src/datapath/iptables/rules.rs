//! The rules kube-proxy would write for the current services, and the
//! `iptables-restore` input that moves the kernel from the chains last
//! written to them.
//!
//! One ruleset holds one family's frontends (`iptables-restore` the IPv4
//! ones, `ip6tables-restore` the IPv6 ones); what differs between the two
//! follows from the addresses: `/32` or `/128` host matches, `[addr]:port`
//! DNAT destinations (`BackendAddr`'s display), the `recent` lists' mask
//! and ICMP or ICMPv6 refusals. Chain names are the same in both, as
//! kube-proxy's: a dual-stack service port has one `KUBE-SVC-` chain in
//! each family's nat table.

use std::collections::BTreeMap;
use std::net::IpAddr;

use sha2::{Digest, Sha256};

use super::Iptables;
use crate::datapath::netfilter::{Masquerade, Refusal, Svc, masquerade, refusal};
use crate::model::{BackendAddr, Family, Frontend, Proto, TrafficPolicy};

const MASQ_MARK: &str = "0x4000/0x4000";
/// Set in nat on traffic `loadBalancerSourceRanges` refuse; dropped in filter.
const DROP_MARK: &str = "0x8000/0x8000";

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

/// `-d`/`-s` of one address: `10.96.0.10/32`, `fd00:10:96::10/128`.
fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// The `recent` match's `--mask` of a family: the whole client address.
fn recent_mask(family: Family) -> &'static str {
    match family {
        Family::V4 => "255.255.255.255",
        Family::V6 => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    }
}

/// The verdict of a [`Refusal`] in `family`.
fn reject_with(family: Family, how: Refusal) -> &'static str {
    match (family, how) {
        (_, Refusal::Drop) => "DROP",
        (_, Refusal::TcpReset) => "REJECT --reject-with tcp-reset",
        (Family::V4, Refusal::PortUnreachable) => "REJECT --reject-with icmp-port-unreachable",
        (Family::V6, Refusal::PortUnreachable) => "REJECT --reject-with icmp6-port-unreachable",
    }
}

fn svc_chain(fe: &Frontend, name: &str) -> String {
    hash_name("KUBE-SVC-", &[name, proto_arg(fe.proto)])
}

/// The chain an external frontend (nodePort, externalIP, LoadBalancer
/// address) jumps to.
fn ext_chain(fe: &Frontend, name: &str) -> String {
    hash_name(
        "KUBE-EXT-",
        &[
            name,
            proto_arg(fe.proto),
            &fe.ip.to_string(),
            &fe.port.to_string(),
        ],
    )
}

/// The source-range check of a LoadBalancer address.
fn fw_chain(fe: &Frontend, name: &str) -> String {
    hash_name(
        "KUBE-FW-",
        &[
            name,
            proto_arg(fe.proto),
            &fe.ip.to_string(),
            &fe.port.to_string(),
        ],
    )
}

/// The chain a frontend's dispatch rule jumps to.
fn entry_chain(fe: &Frontend, svc: &Svc) -> String {
    if !svc.policy.source_ranges.is_empty() {
        fw_chain(fe, &svc.name)
    } else if svc.policy.external.is_some() {
        ext_chain(fe, &svc.name)
    } else {
        svc_chain(fe, &svc.name)
    }
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
    (
        "filter",
        "INPUT",
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
        &["-m", "conntrack", "--ctstate", "NEW"],
    ),
    (
        "filter",
        "FORWARD",
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
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
        let mut chain = entry_chain(fe, svc);
        if !svc.policy.source_ranges.is_empty() {
            let ext = ext_chain(fe, &svc.name);
            let mut fw: Vec<String> = svc
                .policy
                .source_ranges
                .iter()
                .map(|r| {
                    format!(
                        "-A {chain} -m comment --comment \"{} loadbalancer IP\" -s {r} -j {ext}",
                        svc.name
                    )
                })
                .collect();
            fw.push(format!(
                "-A {chain} -m comment --comment \"other traffic to {} will be dropped\" -j KUBE-MARK-DROP",
                svc.name
            ));
            out.insert(chain, fw);
            chain = ext;
        }
        let mut rules = Vec::new();
        match masquerade(fe, svc, self.cluster_cidr) {
            Masquerade::All => rules.push(format!(
                "-A {chain} -m comment --comment \"masquerade traffic for {} external destinations\" -j KUBE-MARK-MASQ",
                svc.name
            )),
            Masquerade::NotFrom(cidr) => rules.push(format!(
                "-A {chain} -m comment --comment \"{} cluster IP\" ! -s {cidr} -d {} -p {p} -m {p} --dport {} -j KUBE-MARK-MASQ",
                svc.name,
                host(fe.ip),
                fe.port
            )),
            Masquerade::HairpinOnly => {}
        }
        // Session affinity, as kube-proxy: a client seen by an endpoint's
        // `recent` list within the timeout goes back to it; every new
        // connection DNATed to an endpoint (re)sets its client there.
        let mask = recent_mask(fe.family());
        let recent_set = match svc.policy.affinity {
            Some(secs) => {
                for b in &svc.backends {
                    let sep = sep_chain(fe, &svc.name, b);
                    rules.push(format!(
                        "-A {chain} -m comment --comment \"{} -> {b}\" -m recent --name {sep} --mask {mask} --rsource --rcheck --seconds {secs} --reap -j {sep}",
                        svc.name
                    ));
                }
                true
            }
            None => false,
        };
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
            let recent = if recent_set {
                format!(" -m recent --name {sep} --mask {mask} --rsource --set")
            } else {
                String::new()
            };
            out.insert(
                sep.clone(),
                vec![
                    format!(
                        "-A {sep} -m comment --comment {} -s {} -j KUBE-MARK-MASQ",
                        svc.name,
                        host(b.ip)
                    ),
                    format!(
                        "-A {sep} -m comment --comment {} -p {p} -m {p}{recent} -j DNAT --to-destination {b}",
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
        let mut filter =
            String::from("*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n");
        let mut nat = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n");
        if !self.installed {
            nat.push_str(
                ":KUBE-MARK-MASQ - [0:0]\n:KUBE-MARK-DROP - [0:0]\n:KUBE-POSTROUTING - [0:0]\n",
            );
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
                "-A KUBE-MARK-DROP -j MARK --set-xmark {DROP_MARK}\n"
            ));
            nat.push_str(&format!(
                "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK} -j RETURN\n"
            ));
            nat.push_str("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n");
            nat.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
        }
        filter.push_str(&format!(
            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"loadBalancerSourceRanges refused\" -m mark --mark {DROP_MARK} -j DROP\n"
        ));
        let mut nodeports = String::new();
        for (fe, svc) in &self.services {
            let p = proto_arg(fe.proto);
            // How the frontend is matched: its address, or any local one.
            let (dst, what) = if fe.is_nodeport() {
                ("-m addrtype --dst-type LOCAL".to_owned(), "nodePort")
            } else if svc.policy.external.is_some() {
                (format!("-d {}", host(fe.ip)), "external IP")
            } else {
                (format!("-d {}", host(fe.ip)), "cluster IP")
            };
            if svc.backends.is_empty() {
                let verdict = reject_with(fe.family(), refusal(fe, &svc.policy));
                let (chain, why) = match svc.policy.external {
                    None => ("KUBE-SERVICES", "has no endpoints"),
                    Some(TrafficPolicy::Cluster) => ("KUBE-EXTERNAL-SERVICES", "has no endpoints"),
                    Some(TrafficPolicy::Local) => {
                        ("KUBE-EXTERNAL-SERVICES", "has no local endpoints")
                    }
                };
                filter.push_str(&format!(
                    "-A {chain} -m comment --comment \"{} {why}\" {dst} -p {p} -m {p} --dport {} -j {verdict}\n",
                    svc.name, fe.port
                ));
            } else if fe.is_nodeport() {
                nodeports.push_str(&format!(
                    "-A KUBE-NODEPORTS -m comment --comment \"{} nodePort\" -p {p} -m {p} --dport {} -j {}\n",
                    svc.name,
                    fe.port,
                    entry_chain(fe, svc)
                ));
            } else {
                nat.push_str(&format!(
                    "-A KUBE-SERVICES -m comment --comment \"{} {what}\" {dst} -p {p} -m {p} --dport {} -j {}\n",
                    svc.name,
                    fe.port,
                    entry_chain(fe, svc)
                ));
            }
        }
        nat.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
        nat.push_str(&nodeports);
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
    use crate::model::Policy;

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
                .map(|i| BackendAddr::new(std::net::Ipv4Addr::from([10, 0, 0, i]), 8080))
                .collect(),
            policy: Policy::default(),
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
            backends: vec![BackendAddr::new(
                std::net::Ipv4Addr::from([10, 0, 0, n]),
                80,
            )],
            policy: Policy::default(),
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

    #[test]
    fn external_frontends_follow_kube_proxys_chains() {
        let mut ipt = Iptables {
            cluster_cidr: None,
            services: BTreeMap::new(),
            chains: BTreeMap::new(),
            installed: true,
        };
        let np = Frontend::nodeport(30080, Proto::Tcp);
        let ext = Frontend {
            ip: "203.0.113.10".parse().unwrap(),
            ..fe()
        };
        let svc = |external, backends: Vec<BackendAddr>| Svc {
            name: "default/np:http".into(),
            backends,
            policy: Policy {
                external,
                ..Policy::default()
            },
        };
        let one = vec![BackendAddr::new(
            std::net::Ipv4Addr::from([10, 0, 0, 1]),
            8080,
        )];
        ipt.services
            .insert(np, svc(Some(TrafficPolicy::Cluster), one.clone()));
        ipt.services
            .insert(ext, svc(Some(TrafficPolicy::Local), one.clone()));
        let mut chains = BTreeMap::new();
        for (f, s) in &ipt.services {
            ipt.render_svc(f, s, &mut chains);
        }
        let np_chain = ext_chain(&np, "default/np:http");
        let ext_chain_name = ext_chain(&ext, "default/np:http");
        assert!(np_chain.starts_with("KUBE-EXT-") && np_chain != ext_chain_name);
        // Cluster: masquerade, then the endpoints; Local: the endpoints only.
        assert!(chains[&np_chain][0].ends_with("-j KUBE-MARK-MASQ"));
        assert!(chains[&ext_chain_name][0].contains("-j KUBE-SEP-"));
        let input = ipt.build_restore(&chains);
        let lines: Vec<&str> = input.lines().collect();
        let nodeports_jump = lines
            .iter()
            .position(|l| l.contains("--dst-type LOCAL -j KUBE-NODEPORTS"))
            .expect("KUBE-SERVICES jumps to KUBE-NODEPORTS");
        let last_service_rule = lines
            .iter()
            .rposition(|l| l.starts_with("-A KUBE-SERVICES"))
            .unwrap();
        assert_eq!(
            nodeports_jump, last_service_rule,
            "the nodeports jump is last"
        );
        assert!(input.contains(&format!(
            "-A KUBE-NODEPORTS -m comment --comment \"default/np:http nodePort\" -p tcp -m tcp --dport 30080 -j {np_chain}"
        )));
        assert!(input.contains(&format!(
            "-d 203.0.113.10/32 -p tcp -m tcp --dport 80 -j {ext_chain_name}"
        )));
        // Without endpoints: Cluster refuses, Local drops, both in the
        // external filter chain.
        ipt.services
            .insert(np, svc(Some(TrafficPolicy::Cluster), vec![]));
        ipt.services
            .insert(ext, svc(Some(TrafficPolicy::Local), vec![]));
        let input = ipt.build_restore(&BTreeMap::new());
        assert!(input.contains("-A KUBE-EXTERNAL-SERVICES -m comment --comment \"default/np:http has no endpoints\" -m addrtype --dst-type LOCAL -p tcp -m tcp --dport 30080 -j REJECT"));
        assert!(input.contains("-A KUBE-EXTERNAL-SERVICES -m comment --comment \"default/np:http has no local endpoints\" -d 203.0.113.10/32 -p tcp -m tcp --dport 80 -j DROP"));
    }

    /// Every kind of IPv4 frontend, rendered on a fresh node: the restore
    /// input and every chain, as one text.
    fn ipv4_everything() -> String {
        let b = |i: u8| BackendAddr::new(std::net::Ipv4Addr::from([10, 0, 0, i]), 8080);
        let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };
        let svc = |name: &str, backends: Vec<BackendAddr>, policy: Policy| Svc {
            name: name.into(),
            backends,
            policy,
        };
        let mut ipt = Iptables {
            cluster_cidr: Some("10.0.0.0/16".parse().unwrap()),
            services: BTreeMap::new(),
            chains: BTreeMap::new(),
            installed: false,
        };
        ipt.services.insert(
            fe(),
            svc(
                "default/web:http",
                vec![b(1), b(2), b(3)],
                Policy::default(),
            ),
        );
        ipt.services.insert(
            Frontend {
                proto: Proto::Udp,
                port: 53,
                ..fe()
            },
            svc("default/web:dns", vec![b(1)], Policy::default()),
        );
        ipt.services.insert(
            Frontend {
                ip: ip("10.96.0.20"),
                ..fe()
            },
            svc(
                "default/sticky:http",
                vec![b(1), b(2)],
                Policy {
                    affinity: Some(600),
                    ..Policy::default()
                },
            ),
        );
        ipt.services.insert(
            Frontend {
                ip: ip("10.96.0.30"),
                ..fe()
            },
            svc("default/empty:http", vec![], Policy::default()),
        );
        let cluster = Policy {
            external: Some(TrafficPolicy::Cluster),
            ..Policy::default()
        };
        let local = Policy {
            external: Some(TrafficPolicy::Local),
            ..Policy::default()
        };
        ipt.services.insert(
            Frontend::nodeport(30080, Proto::Tcp),
            svc("default/np:http", vec![b(1), b(2)], cluster.clone()),
        );
        ipt.services.insert(
            Frontend::nodeport(30081, Proto::Tcp),
            svc("default/local:http", vec![], local.clone()),
        );
        ipt.services.insert(
            Frontend {
                ip: ip("203.0.113.7"),
                ..fe()
            },
            svc("default/np:http", vec![b(3)], local),
        );
        ipt.services.insert(
            Frontend {
                ip: ip("203.0.113.9"),
                ..fe()
            },
            svc(
                "default/lb:http",
                vec![b(2)],
                Policy {
                    source_ranges: vec![
                        "192.0.2.1/32".parse().unwrap(),
                        "198.51.100.0/24".parse().unwrap(),
                    ],
                    ..cluster
                },
            ),
        );
        let mut chains = BTreeMap::new();
        for (f, s) in &ipt.services {
            ipt.render_svc(f, s, &mut chains);
        }
        let mut out = ipt.build_restore(&chains);
        for (c, rules) in &chains {
            out.push_str(&format!("# {c}\n"));
            for r in rules {
                out.push_str(r);
                out.push('\n');
            }
        }
        out
    }

    /// The IPv4 rules are byte for byte what they were before IPv6 came
    /// in (`testdata/ipv4-everything.txt`, rendered by the IPv4-only code).
    #[test]
    fn ipv4_rules_are_unchanged_by_dual_stack() {
        let got = ipv4_everything();
        let want = include_str!("testdata/ipv4-everything.txt");
        for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
            assert_eq!(g, w, "line {}", i + 1);
        }
        assert_eq!(got, want);
    }

    fn fe6() -> Frontend {
        Frontend {
            ip: "fd00:10:96::10".parse().unwrap(),
            port: 80,
            proto: Proto::Tcp,
        }
    }

    fn b6(i: u16) -> BackendAddr {
        BackendAddr::new(
            std::net::Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, i),
            8080,
        )
    }

    #[test]
    fn ipv6_frontend_gets_the_same_chains_in_ipv6_terms() {
        let mut ipt = Iptables {
            // IPv4: not for IPv6 ClusterIP traffic.
            cluster_cidr: Some("10.0.0.0/16".parse().unwrap()),
            services: BTreeMap::new(),
            chains: BTreeMap::new(),
            installed: false,
        };
        let name = "default/web6:http";
        ipt.services.insert(
            fe6(),
            Svc {
                name: name.into(),
                backends: vec![b6(2), b6(3)],
                policy: Policy {
                    affinity: Some(600),
                    ..Policy::default()
                },
            },
        );
        let empty = Frontend {
            ip: "fd00:10:96::20".parse().unwrap(),
            proto: Proto::Udp,
            port: 53,
        };
        ipt.services.insert(
            empty,
            Svc {
                name: "default/empty6:dns".into(),
                backends: vec![],
                policy: Policy::default(),
            },
        );
        let mut chains = BTreeMap::new();
        for (f, s) in &ipt.services {
            ipt.render_svc(f, s, &mut chains);
        }
        let svc = svc_chain(&fe6(), name);
        let sep2 = sep_chain(&fe6(), name, &b6(2));
        let sep3 = sep_chain(&fe6(), name, &b6(3));
        // kube-proxy's endpoint string: `[addr]:port`.
        assert_eq!(
            sep2,
            hash_name("KUBE-SEP-", &[name, "tcp", "[fd00:10:244::2]:8080"])
        );
        let mask = "--mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource";
        assert_eq!(
            chains[&svc],
            [
                format!(
                    "-A {svc} -m comment --comment \"{name} -> [fd00:10:244::2]:8080\" -m recent --name {sep2} {mask} --rcheck --seconds 600 --reap -j {sep2}"
                ),
                format!(
                    "-A {svc} -m comment --comment \"{name} -> [fd00:10:244::3]:8080\" -m recent --name {sep3} {mask} --rcheck --seconds 600 --reap -j {sep3}"
                ),
                format!(
                    "-A {svc} -m comment --comment \"{name} -> [fd00:10:244::2]:8080\" -m statistic --mode random --probability 0.5000000000 -j {sep2}"
                ),
                format!(
                    "-A {svc} -m comment --comment \"{name} -> [fd00:10:244::3]:8080\" -j {sep3}"
                ),
            ],
            "no IPv4 cluster-CIDR masquerade rule"
        );
        assert_eq!(
            chains[&sep2],
            [
                format!(
                    "-A {sep2} -m comment --comment {name} -s fd00:10:244::2/128 -j KUBE-MARK-MASQ"
                ),
                format!(
                    "-A {sep2} -m comment --comment {name} -p tcp -m tcp -m recent --name {sep2} {mask} --set -j DNAT --to-destination [fd00:10:244::2]:8080"
                ),
            ]
        );
        let input = ipt.build_restore(&chains);
        assert!(input.contains(&format!(
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -d fd00:10:96::10/128 -p tcp -m tcp --dport 80 -j {svc}\n"
        )), "{input}");
        assert!(input.contains(
            "-A KUBE-SERVICES -m comment --comment \"default/empty6:dns has no endpoints\" -d fd00:10:96::20/128 -p udp -m udp --dport 53 -j REJECT --reject-with icmp6-port-unreachable\n"
        ), "{input}");
        // The same base chains as IPv4: ip6tables gets the whole structure.
        for base in [
            ":KUBE-MARK-MASQ - [0:0]",
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
            "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
        ] {
            assert!(input.contains(base), "{base} missing from {input}");
        }
        assert!(!input.contains("/32"), "{input}");
    }

    /// A dual-stack Service, through the model and the diff: each family's
    /// proxier gets its own frontend and endpoints, under the same
    /// `KUBE-SVC-` name (each in its own nat table, as kube-proxy's).
    #[test]
    fn dual_stack_service_fills_both_families() {
        let service: k8s_openapi::api::core::v1::Service = serde_saphyr::from_str(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:10:96::10"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
"#,
        )
        .unwrap();
        let slice = |family: &str, addr: &str| -> k8s_openapi::api::discovery::v1::EndpointSlice {
            serde_saphyr::from_str(&format!(
                r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-{family}, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: {family}
endpoints:
- addresses: ["{addr}"]
  conditions: {{ready: true}}
ports:
- {{name: http, port: 8080, protocol: TCP}}
"#
            ))
            .unwrap()
        };
        let state = crate::model::build(
            &crate::model::Node::default(),
            &[service],
            &[slice("IPv4", "10.0.0.1"), slice("IPv6", "fd00:10:244::2")],
        )
        .unwrap();
        let changes = crate::reconcile::diff(&Default::default(), &state);
        let by_family = crate::datapath::netfilter::by_family(&changes);
        assert_eq!(
            by_family.keys().copied().collect::<Vec<_>>(),
            [Family::V4, Family::V6]
        );
        let mut inputs = BTreeMap::new();
        for (family, mine) in &by_family {
            let mut ipt = Iptables {
                cluster_cidr: None,
                services: BTreeMap::new(),
                chains: BTreeMap::new(),
                installed: true,
            };
            let mut stats = Default::default();
            crate::datapath::netfilter::fold(&mut ipt.services, mine, &mut stats).unwrap();
            assert_eq!(ipt.services.len(), 1, "{family}: one frontend");
            let mut chains = BTreeMap::new();
            for (f, s) in &ipt.services {
                ipt.render_svc(f, s, &mut chains);
            }
            inputs.insert(*family, ipt.build_restore(&chains));
        }
        let svc4 = svc_chain(&fe(), "default/web:http");
        assert_eq!(svc4, svc_chain(&fe6(), "default/web:http"));
        let v4 = &inputs[&Family::V4];
        let v6 = &inputs[&Family::V6];
        assert!(v4.contains(&format!(
            "-d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j {svc4}"
        )));
        assert!(v4.contains("--to-destination 10.0.0.1:8080"));
        assert!(!v4.contains("fd00"), "{v4}");
        assert!(v6.contains(&format!(
            "-d fd00:10:96::10/128 -p tcp -m tcp --dport 80 -j {svc4}"
        )));
        assert!(v6.contains("--to-destination [fd00:10:244::2]:8080"));
        assert!(!v6.contains("10.96.0.10") && !v6.contains("/32"), "{v6}");
    }
}
