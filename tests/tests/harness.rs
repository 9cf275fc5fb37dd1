//! Checks of the harness itself; none of them needs kproxy.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use kproxy_tests::fixture::{
    DNS_PORT, HTTP_PORT, RANDOM_SPREADS, TARGET_PORT, VIP, web_service_yaml, web_slice_yaml_with,
};
use kproxy_tests::topology::{ICMP_RATEMASK_DEST_UNREACH, SERVICE_CIDR, SERVICE_CIDR_IFACE};
use kproxy_tests::{
    ManifestDir, Mode, Netns, SuiteLock, Topology, backend_ip, endpointslice_yaml, mode,
    service_yaml,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(3);

#[test]
fn topology_direct_traffic() -> Result<()> {
    let _lock = SuiteLock::acquire()?;
    let topo = Topology::new(3)?;
    let servers = topo.start_servers(TARGET_PORT)?;
    let names: Vec<String> = std::iter::once(topo.node.name().to_owned())
        .chain(topo.clients().iter().map(|c| c.ns.name().to_owned()))
        .chain(topo.backends().iter().map(|b| b.ns.name().to_owned()))
        .collect();
    assert_eq!(names.len(), 5);
    for n in &names {
        assert!(
            n.starts_with(&format!("kpt-{}-", std::process::id())),
            "{n}"
        );
        assert!(Netns::exists(n), "{n} should exist");
    }
    assert_eq!(topo.client_iface_on_node(), "c0");
    assert_eq!(topo.client_ip().to_string(), "10.0.1.2");
    assert_eq!(topo.node.sysctl_get("net.ipv4.ip_forward")?, "1");
    assert_eq!(topo.node.sysctl_get("net.ipv4.conf.c0.rp_filter")?, "0");
    // In the netfilter modes only: the service CIDR is routed (into a device that
    // drops) and ICMP destination-unreachable messages are not rate-limited.
    let route = topo.node.ip(&["route", "show", SERVICE_CIDR])?;
    let ratemask: u32 = topo.node.sysctl_get("net.ipv4.icmp_ratemask")?.parse()?;
    match mode() {
        Mode::Ebpf => {
            assert!(route.trim().is_empty(), "{route}");
            assert_ne!(ratemask & ICMP_RATEMASK_DEST_UNREACH, 0, "{ratemask}");
        }
        Mode::Iptables | Mode::Nftables => {
            assert!(route.contains(SERVICE_CIDR_IFACE), "{route}");
            assert_eq!(ratemask & ICMP_RATEMASK_DEST_UNREACH, 0, "{ratemask}");
        }
    }

    for i in 1..=3 {
        let ip = backend_ip(i);
        let addr = SocketAddr::from((ip, TARGET_PORT));
        let (reply, peer) = topo.tcp_ask(ip, TARGET_PORT, T)?;
        assert_eq!(reply, format!("backend-{i}"));
        assert_eq!(peer, addr);

        // A long-lived connection answers every line.
        let mut s = topo.tcp_session(ip, TARGET_PORT, T)?;
        for _ in 0..3 {
            assert_eq!(s.ask()?, format!("backend-{i}"));
        }

        let (reply, from) = topo.udp_ask(ip, TARGET_PORT, T)?;
        assert_eq!(reply, format!("backend-{i}"));
        assert_eq!(from, addr);

        let mut u = topo.udp_session(ip, TARGET_PORT, T)?;
        let port = u.local().port();
        for _ in 0..2 {
            assert_eq!(u.ask()?, (format!("backend-{i}"), addr));
        }

        let srv = servers.backend(i);
        assert_eq!(srv.tcp_accepted(), 2);
        assert_eq!(srv.tcp_requests(), 4);
        assert_eq!(srv.udp_requests(), 3);
        // No NAT between client and backend: the backend sees the client.
        assert!(srv.tcp_peers().iter().all(|p| p.ip() == topo.client_ip()));
        let udp_peers = srv.udp_peers();
        assert!(udp_peers.iter().all(|p| p.ip() == topo.client_ip()));
        assert_eq!(
            udp_peers[1..],
            [SocketAddr::from((topo.client_ip(), port)); 2]
        );
    }

    // A closed port gets a RST: connection refused, for TCP and UDP alike.
    let (kind, _) = topo.tcp_connect_error(backend_ip(1), 8081, T)?;
    assert_eq!(kind, ErrorKind::ConnectionRefused);
    let (kind, _) = topo.udp_connect_error(backend_ip(1), 8081, T)?;
    assert_eq!(kind, ErrorKind::ConnectionRefused);

    // Without kproxy the ClusterIP leads nowhere (no route in eBPF mode, a
    // route into a dropping device in iptables mode).
    let before = servers.total_tcp_accepted();
    assert!(
        topo.tcp_connect_error(VIP, HTTP_PORT, Duration::from_secs(1))
            .is_ok()
    );
    assert!(
        topo.udp_connect_error(VIP, DNS_PORT, Duration::from_millis(500))
            .is_ok()
    );
    assert_eq!(servers.total_tcp_accepted(), before);

    drop(servers);
    drop(topo);
    for n in &names {
        assert!(!Netns::exists(n), "{n} should be gone after drop");
    }
    let listed = kproxy_tests::util::cmd("ip", &["netns", "list"])?;
    for n in &names {
        assert!(!listed.contains(n.as_str()), "{n} still listed: {listed}");
    }
    Ok(())
}

#[test]
fn netns_is_deleted_on_panic_and_run_in_enters_it() -> Result<()> {
    let _lock = SuiteLock::acquire()?;
    let root_ino = std::fs::metadata("/proc/thread-self/ns/net").map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.ino()
    })?;
    let name = std::sync::Mutex::new(String::new());
    let res = std::panic::catch_unwind(|| {
        let ns = Netns::new("panic").expect("create netns");
        *name.lock().unwrap() = ns.name().to_owned();
        let inner_ino = ns
            .run(|| {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino())
            })
            .expect("run_in")
            .expect("stat netns");
        assert_ne!(inner_ino, root_ino, "run_in did not switch namespace");
        // Only the loopback exists in a fresh namespace.
        let links = ns.ip(&["-o", "link", "show"]).expect("ip link");
        assert_eq!(links.lines().count(), 1, "{links}");
        panic!("deliberate panic with a live netns");
    });
    assert!(res.is_err());
    let name = name.into_inner().unwrap();
    assert!(name.ends_with("-panic"), "{name}");
    assert!(!Netns::exists(&name), "{name} survived the panic");
    Ok(())
}

/// Reads YAML with YAML 1.2 booleans (only `true`/`false`), as kcontrol's
/// apiserver does (`yaml_from_slice`).
fn from_yaml(yaml: &str) -> Result<Value> {
    Ok(serde_saphyr::from_str_with_options(
        yaml,
        serde_saphyr::options! { strict_booleans: true },
    )?)
}

#[test]
fn manifests_have_the_kubernetes_shape() -> Result<()> {
    let svc = from_yaml(&service_yaml(
        "web",
        "10.96.0.10",
        &[("http", 80, 8080, "TCP"), ("dns", 53, 8080, "UDP")],
    ))?;
    assert_eq!(svc["apiVersion"], "v1");
    assert_eq!(svc["kind"], "Service");
    assert_eq!(svc["metadata"]["name"], "web");
    assert_eq!(svc["metadata"]["namespace"], "default");
    assert_eq!(svc["spec"]["clusterIP"], "10.96.0.10");
    assert_eq!(svc["spec"]["selector"]["app"], "web");
    assert_eq!(svc["spec"]["ports"][1]["name"], "dns");
    assert_eq!(svc["spec"]["ports"][1]["port"], 53);
    assert_eq!(svc["spec"]["ports"][1]["targetPort"], 8080);
    assert_eq!(svc["spec"]["ports"][1]["protocol"], "UDP");

    let slice = from_yaml(&endpointslice_yaml(
        "web-abc",
        "web",
        &[("10.0.11.2", true), ("10.0.12.2", false)],
        &[("http", 8080, "TCP")],
    ))?;
    assert_eq!(slice["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(slice["kind"], "EndpointSlice");
    assert_eq!(slice["metadata"]["name"], "web-abc");
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        "web"
    );
    assert_eq!(slice["addressType"], "IPv4");
    assert_eq!(slice["endpoints"][0]["addresses"][0], "10.0.11.2");
    assert_eq!(slice["endpoints"][0]["conditions"]["ready"], true);
    assert_eq!(slice["endpoints"][1]["conditions"]["ready"], false);
    assert_eq!(slice["ports"][0]["port"], 8080);
    assert_eq!(slice["ports"][0]["protocol"], "TCP");

    // An empty endpoint list is still a list.
    let empty = from_yaml(&web_slice_yaml_with(&[]))?;
    assert_eq!(empty["endpoints"].as_array().map(Vec::len), Some(0));

    let dir = ManifestDir::new()?;
    let root = dir.path().parent().unwrap().to_owned();
    dir.write("web-service.yaml", &web_service_yaml())?;
    dir.write("web-service.yaml", "replaced\n")?;
    let names: Vec<_> = std::fs::read_dir(dir.path())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        names,
        ["web-service.yaml"],
        "no temporary files in the watched dir"
    );
    assert_eq!(
        std::fs::read_to_string(dir.file("web-service.yaml"))?,
        "replaced\n"
    );
    dir.remove("web-service.yaml")?;
    assert!(!dir.file("web-service.yaml").exists());
    drop(dir);
    assert!(!root.exists(), "{} not removed", root.display());
    Ok(())
}

/// The iptables-mode spread checks fail a correct (uniformly random)
/// datapath with negligible probability, and still demand a real share.
#[test]
fn random_spread_checks_have_negligible_false_failure_probability() {
    for spread in RANDOM_SPREADS {
        let bound = spread.false_failure_bound();
        eprintln!("{spread:?}: P(false failure) <= {bound:.2e}");
        assert!(bound < 1e-9, "{spread:?}: {bound:e}");
        let fair = spread.flows / spread.backends;
        assert!(
            spread.min_each * 4 >= fair,
            "{spread:?}: at least a quarter of the fair share {fair}"
        );
    }
    // The bound itself, against exact values: Bin(60, 1/3), at least 8
    // each: 3·P(X ≤ 7) = 3.27e-4; Bin(2, 1/2), at least 1 each: 2·1/4.
    let check = |backends, flows, min_each, expected: f64| {
        let b = kproxy_tests::fixture::RandomSpread {
            backends,
            flows,
            min_each,
        }
        .false_failure_bound();
        assert!(
            (b - expected).abs() < expected * 1e-2,
            "{b:e} vs {expected:e}"
        );
    };
    check(3, 60, 8, 3.268e-4);
    check(2, 2, 1, 0.5);
}
