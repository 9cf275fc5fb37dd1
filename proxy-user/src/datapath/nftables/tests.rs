//! The nftables mode's rules: golden text for every kind of frontend, the
//! minimal transaction of a change, and the transactions run through the
//! real `nft` in a throwaway network namespace.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;

use super::rules::{self, Ruleset};
use crate::datapath::netfilter::Svc;
use crate::model::{BackendAddr, Cidr, Family, Frontend, Policy, Proto, TrafficPolicy};

fn b(i: u8) -> BackendAddr {
    BackendAddr::new(Ipv4Addr::from([10, 0, 0, i]), 8080)
}

fn b6(i: u16) -> BackendAddr {
    BackendAddr::new(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, i), 8080)
}

fn fe(ip: &str, port: u16, proto: Proto) -> Frontend {
    Frontend {
        ip: ip.parse::<IpAddr>().unwrap(),
        port,
        proto,
    }
}

fn svc(name: &str, backends: Vec<BackendAddr>, policy: Policy) -> Svc {
    Svc {
        name: name.into(),
        backends,
        policy,
    }
}

fn cidr() -> Option<Cidr> {
    Some("10.0.0.0/16".parse().unwrap())
}

/// Every kind of IPv4 frontend (the iptables mode's golden set).
fn ipv4_everything() -> BTreeMap<Frontend, Svc> {
    let cluster = Policy {
        external: Some(TrafficPolicy::Cluster),
        ..Policy::default()
    };
    let local = Policy {
        external: Some(TrafficPolicy::Local),
        ..Policy::default()
    };
    BTreeMap::from([
        (
            fe("10.96.0.10", 80, Proto::Tcp),
            svc(
                "default/web:http",
                vec![b(1), b(2), b(3)],
                Policy::default(),
            ),
        ),
        (
            fe("10.96.0.10", 53, Proto::Udp),
            svc("default/web:dns", vec![b(1)], Policy::default()),
        ),
        (
            fe("10.96.0.20", 80, Proto::Tcp),
            svc(
                "default/sticky:http",
                vec![b(1), b(2)],
                Policy {
                    affinity: Some(600),
                    ..Policy::default()
                },
            ),
        ),
        (
            fe("10.96.0.30", 80, Proto::Tcp),
            svc("default/empty:http", vec![], Policy::default()),
        ),
        (
            Frontend::nodeport(30080, Proto::Tcp),
            svc("default/np:http", vec![b(1), b(2)], cluster.clone()),
        ),
        (
            Frontend::nodeport(30081, Proto::Tcp),
            svc("default/local:http", vec![], local.clone()),
        ),
        (
            fe("203.0.113.7", 80, Proto::Tcp),
            svc("default/np:http", vec![b(3)], local),
        ),
        (
            fe("203.0.113.9", 80, Proto::Tcp),
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
        ),
    ])
}

/// IPv6 ClusterIPs: with affinity, without endpoints (TCP: a reset; UDP:
/// ICMPv6).
fn ipv6_everything() -> BTreeMap<Frontend, Svc> {
    BTreeMap::from([
        (
            fe("fd00:10:96::10", 80, Proto::Tcp),
            svc(
                "default/web6:http",
                vec![b6(2), b6(3)],
                Policy {
                    affinity: Some(600),
                    ..Policy::default()
                },
            ),
        ),
        (
            fe("fd00:10:96::20", 80, Proto::Tcp),
            svc("default/empty6:http", vec![], Policy::default()),
        ),
        (
            fe("fd00:10:96::20", 53, Proto::Udp),
            svc("default/empty6:dns", vec![], Policy::default()),
        ),
    ])
}

fn fresh(family: Family, services: &BTreeMap<Frontend, Svc>) -> (Ruleset, String) {
    let cidr = cidr().filter(|_| family == Family::V4);
    let next = rules::render(family, cidr, services);
    let input = rules::transaction(family, true, &Ruleset::default(), &next);
    (next, input)
}

/// The first sync's transaction for every kind of frontend, in each
/// family, is `testdata/everything.nft` (`KPROXY_BLESS_NFT=1` rewrites
/// it after a deliberate change; read the diff).
#[test]
fn first_sync_of_every_frontend_kind_is_golden() {
    let mut got = String::new();
    for (family, services) in [
        (Family::V4, ipv4_everything()),
        (Family::V6, ipv6_everything()),
    ] {
        got.push_str(&format!("# {family}\n"));
        got.push_str(&fresh(family, &services).1);
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/datapath/nftables/testdata/everything.nft");
    if std::env::var_os("KPROXY_BLESS_NFT").is_some() {
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap();
    for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
        assert_eq!(g, w, "line {}", i + 1);
    }
    assert_eq!(got, want);
}

#[test]
fn structure_is_kube_proxys() {
    let (set, input) = fresh(Family::V4, &ipv4_everything());
    let web = set
        .elements
        .get(&(rules::SERVICE_IPS, "10.96.0.10 . tcp . 80".to_owned()))
        .expect("ClusterIP in service-ips");
    assert_eq!(web.name, "default/web:http");
    let chain = web.verdict.strip_prefix("goto ").unwrap();
    assert!(
        chain.starts_with("service-") && chain.ends_with("-default/web/tcp/http"),
        "{chain}"
    );
    let rules = &set.chains[chain];
    assert_eq!(
        rules[0],
        "ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.0.0.0/16 jump mark-for-masquerade"
    );
    assert!(
        rules[1].starts_with("numgen random mod 3 vmap { 0 : goto endpoint-"),
        "{}",
        rules[1]
    );
    let ep = rules[1]
        .split("goto ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap();
    assert_eq!(
        set.chains[ep],
        [
            "ip saddr 10.0.0.1 jump mark-for-masquerade",
            "meta l4proto tcp dnat to 10.0.0.1:8080"
        ]
    );
    // No endpoints: refused; Local without local endpoints: dropped.
    assert_eq!(
        set.elements[&(
            rules::NO_ENDPOINT_SERVICES,
            "10.96.0.30 . tcp . 80".to_owned()
        )]
            .verdict,
        "goto reject-chain"
    );
    assert_eq!(
        set.elements[&(rules::NO_ENDPOINT_NODEPORTS, "tcp . 30081".to_owned())].verdict,
        "drop"
    );
    // A nodePort under Cluster: masquerade everything, then balance.
    let np = &set.elements[&(rules::SERVICE_NODEPORTS, "tcp . 30080".to_owned())];
    let np = np.verdict.strip_prefix("goto ").unwrap();
    assert!(np.starts_with("external-"), "{np}");
    assert_eq!(set.chains[np][0], "jump mark-for-masquerade");
    // Source ranges: a firewall element and chain for the LB address.
    let fw = &set.elements[&(rules::FIREWALL_IPS, "203.0.113.9 . tcp . 80".to_owned())];
    let fw = fw.verdict.strip_prefix("goto ").unwrap();
    assert!(
        set.chains[fw][0].starts_with("ip saddr != { 192.0.2.1/32, 198.51.100.0/24 } drop"),
        "{:?}",
        set.chains[fw]
    );
    // Affinity: one timeout set per endpoint, checked before numgen and
    // updated before DNAT.
    assert_eq!(set.sets.len(), 2, "{:?}", set.sets);
    assert!(
        set.sets
            .values()
            .all(|d| d == "type ipv4_addr; flags dynamic,timeout; timeout 600s;")
    );
    assert!(input.contains("fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"));
}

#[test]
fn ipv6_tcp_without_endpoints_gets_a_reset() {
    let (set, input) = fresh(Family::V6, &ipv6_everything());
    assert_eq!(
        set.elements[&(
            rules::NO_ENDPOINT_SERVICES,
            "fd00:10:96::20 . tcp . 80".to_owned()
        )]
            .verdict,
        "goto reset-chain"
    );
    assert_eq!(
        set.elements[&(
            rules::NO_ENDPOINT_SERVICES,
            "fd00:10:96::20 . udp . 53".to_owned()
        )]
            .verdict,
        "goto reject-chain"
    );
    assert!(
        input
            .contains("add rule ip6 kube-proxy reset-chain meta l4proto tcp reject with tcp reset")
    );
    assert!(input.contains("dnat to [fd00:10:244::2]:8080"), "{input}");
    assert!(
        !input.contains(" ip ") && !input.contains("ipv4_addr"),
        "{input}"
    );
}

/// One endpoint added to one of two services: the transaction creates its
/// chain and rewrites its service's chain, and nothing else.
#[test]
fn an_endpoint_change_is_a_minimal_transaction() {
    let mut services = BTreeMap::from([
        (
            fe("10.96.0.10", 80, Proto::Tcp),
            svc("default/a:http", vec![b(1)], Policy::default()),
        ),
        (
            fe("10.96.0.11", 80, Proto::Tcp),
            svc("default/b:http", vec![b(2)], Policy::default()),
        ),
    ]);
    let old = rules::render(Family::V4, None, &services);
    services
        .get_mut(&fe("10.96.0.10", 80, Proto::Tcp))
        .unwrap()
        .backends
        .push(b(3));
    let new = rules::render(Family::V4, None, &services);
    let got = rules::transaction(Family::V4, false, &old, &new);
    let svc_a = old.elements[&(rules::SERVICE_IPS, "10.96.0.10 . tcp . 80".to_owned())]
        .verdict
        .strip_prefix("goto ")
        .unwrap()
        .to_owned();
    let ep = |i: u8| -> String {
        new.chains[&svc_a][0]
            .split("goto ")
            .nth(usize::from(i))
            .unwrap()
            .split([',', ' '])
            .next()
            .unwrap()
            .to_owned()
    };
    let (ep1, ep3) = (ep(1), ep(2));
    assert!(ep3.ends_with("__10.0.0.3/8080"), "{ep3}");
    let t = "ip kube-proxy";
    // Chains are added in name order: endpoint-… before service-….
    assert_eq!(
        got,
        format!(
            "add chain {t} {ep3}\n\
             add chain {t} {svc_a}\n\
             add rule {t} {ep3} ip saddr 10.0.0.3 jump mark-for-masquerade\n\
             add rule {t} {ep3} meta l4proto tcp dnat to 10.0.0.3:8080\n\
             flush chain {t} {svc_a}\n\
             add rule {t} {svc_a} numgen random mod 2 vmap {{ 0 : goto {ep1}, 1 : goto {ep3} }}\n"
        )
    );
    // And back: the endpoint's chain goes, after the rule jumping to it.
    let back = rules::transaction(Family::V4, false, &new, &old);
    assert_eq!(
        back,
        format!(
            "add chain {t} {svc_a}\n\
             flush chain {t} {svc_a}\n\
             add rule {t} {svc_a} numgen random mod 1 vmap {{ 0 : goto {ep1} }}\n\
             flush chain {t} {ep3}\n\
             delete chain {t} {ep3}\n"
        )
    );
    // Nothing changed: nothing to send.
    assert_eq!(rules::transaction(Family::V4, false, &new, &new), "");
}

#[test]
fn losing_the_last_endpoint_moves_the_element_between_maps() {
    let key = (rules::SERVICE_IPS, "10.96.0.10 . udp . 53".to_owned());
    let mut services = BTreeMap::from([(
        fe("10.96.0.10", 53, Proto::Udp),
        svc("default/dns:dns", vec![b(1)], Policy::default()),
    )]);
    let old = rules::render(Family::V4, None, &services);
    assert!(old.elements.contains_key(&key));
    services.values_mut().next().unwrap().backends.clear();
    let new = rules::render(Family::V4, None, &services);
    let got = rules::transaction(Family::V4, false, &old, &new);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(
        &lines[..2],
        [
            "delete element ip kube-proxy service-ips { 10.96.0.10 . udp . 53 }",
            "add element ip kube-proxy no-endpoint-services { 10.96.0.10 . udp . 53 comment \"default/dns:dns\" : goto reject-chain }",
        ]
    );
    assert_eq!(lines.len(), 6, "{got}");
    assert!(lines[2..4].iter().all(|l| l.starts_with("flush chain")));
    assert!(lines[4..].iter().all(|l| l.starts_with("delete chain")));
}

/// Runs `steps` (nft inputs) one after another in a new network namespace
/// (`unshare -n`, gone when the command ends) and returns `nft list
/// ruleset` after the last.
fn run_in_throwaway_netns(steps: &[String]) -> String {
    let dir = std::env::temp_dir().join(format!("kproxy-nft-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files: Vec<String> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p = dir.join(format!("{i}-{:x}.nft", s.len()));
            std::fs::write(&p, s).unwrap();
            p.display().to_string()
        })
        .collect();
    let out = Command::new("unshare")
        .args([
            "--net",
            "--",
            "sh",
            "-ec",
            "for f in \"$@\"; do nft -c -f \"$f\"; nft -f \"$f\" || { echo \"in $f\" >&2; exit 1; }; done; nft list ruleset",
            "sh",
        ])
        .args(&files)
        .output()
        .expect("unshare (util-linux) runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "nft refused a transaction: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        steps.join("\n----\n")
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The real nft takes the first sync, a table an earlier run left, every
/// change back to nothing, and the teardown.
#[test]
fn transactions_load_into_the_real_nft() {
    let mut steps = Vec::new();
    for (family, services) in [
        (Family::V4, ipv4_everything()),
        (Family::V6, ipv6_everything()),
    ] {
        let (first, input) = fresh(family, &services);
        // Twice: the second run finds the first run's table and replaces it.
        steps.push(input.clone());
        steps.push(input);
        // Every frontend loses an endpoint or gains one, then everything
        // goes, in one transaction each.
        let mut changed = services.clone();
        for s in changed.values_mut() {
            if s.backends.len() > 1 {
                s.backends.pop();
            } else if s.backends.is_empty() {
                s.backends
                    .push(if family == Family::V4 { b(9) } else { b6(9) });
            }
        }
        let cidr = cidr().filter(|_| family == Family::V4);
        let second = rules::render(family, cidr, &changed);
        steps.push(rules::transaction(family, false, &first, &second));
        steps.push(rules::transaction(
            family,
            false,
            &second,
            &Ruleset::default(),
        ));
    }
    let listed = run_in_throwaway_netns(&steps);
    for want in [
        "table ip kube-proxy",
        "table ip6 kube-proxy",
        "map service-ips",
        "fib daddr type local",
        "masquerade fully-random",
        "reject with tcp reset",
    ] {
        assert!(listed.contains(want), "{want} missing from:\n{listed}");
    }
    assert!(
        !listed.contains("default/"),
        "per-service chains left once every frontend went:\n{listed}"
    );
    assert!(!listed.contains("set affinity-"), "{listed}");
    // The teardown leaves no table of ours.
    steps.push(rules::teardown(Family::V4));
    steps.push(rules::teardown(Family::V6));
    let listed = run_in_throwaway_netns(&steps);
    assert!(!listed.contains("kube-proxy"), "{listed}");
}

/// Runs `f` on a thread of its own in a new network namespace: the
/// namespace is the thread's (`unshare(CLONE_NEWNET)`), so `nft` started
/// from it works on that namespace's tables and the test's never reach the
/// host's; it goes away with the thread.
fn in_throwaway_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare changes only the calling thread's namespaces.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the namespace thread panicked")
}

fn nft_out(args: &[&str]) -> String {
    let out = Command::new("nft").args(args).output().expect("nft runs");
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The proxier through the real nft: it builds its table, applies a change
/// as a partial sync, rebuilds the table whole after a transaction failed
/// because the table was deleted behind its back, and deletes it on
/// cleanup.
#[test]
fn the_proxier_recovers_from_a_table_deleted_behind_its_back() {
    use super::super::netfilter::Proxier;
    use crate::reconcile::Change;
    use std::collections::BTreeSet;

    in_throwaway_netns(|| {
        let web = fe("10.96.0.10", 80, Proto::Tcp);
        let mut p = super::Nftables::new(None);
        let add = Change::AddService {
            frontend: web,
            name: "default/web:http".into(),
            backends: BTreeSet::from([b(1)]),
            policy: Policy::default(),
        };
        p.apply(Family::V4, &[&add]).expect("first sync");
        assert!(p.installed);
        assert!(nft_out(&["list", "tables"]).contains("table ip kube-proxy"));

        let grow = Change::UpdateBackends {
            frontend: web,
            added: BTreeSet::from([b(2)]),
            removed: BTreeSet::new(),
            flush: BTreeSet::new(),
        };
        nft_out(&["delete", "table", "ip", "kube-proxy"]);
        let err = p
            .apply(Family::V4, &[&grow])
            .expect_err("a partial sync into a missing table fails");
        assert!(err.to_string().contains("nft -f failed"), "{err:#}");
        assert!(!p.installed, "the next round rebuilds the table");
        assert_eq!(p.services[&web].backends, [b(1)], "state kept on failure");

        // The agent's next round sends the change again.
        p.apply(Family::V4, &[&grow]).expect("full sync");
        let listed = nft_out(&["list", "table", "ip", "kube-proxy"]);
        assert!(listed.contains("dnat to 10.0.0.2:8080"), "{listed}");
        assert!(listed.contains("numgen random mod 2"), "{listed}");

        p.cleanup(Family::V4).expect("cleanup");
        assert!(!nft_out(&["list", "tables"]).contains("kube-proxy"));
    });
}
