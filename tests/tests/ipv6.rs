//! IPv6 and dual-stack Services: an IPv6 ClusterIP balances TCP and UDP
//! over the endpoints of its IPv6 EndpointSlice with replies from the
//! ClusterIP, a dual-stack Service answers on both of its addresses (each
//! with its own family's endpoints), an IPv6 Service without endpoints is
//! refused at once (ICMPv6 port unreachable), session affinity holds, and
//! a backend reaches itself (hairpin). On a [`Topology::dual_stack`]:
//! every namespace also has an IPv6 address.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Result, bail};
use kproxy_tests::client::TcpSession;
use kproxy_tests::fixture::{
    DNS_PORT, HTTP_PORT, IO_TIMEOUT, SERVICE, SERVICE_FILE, TARGET_PORT, VIP, VIP_STR,
    assert_spread, backend_index, spread_flows, web_service_yaml_with,
};
use kproxy_tests::manifest::service_yaml_with;
use kproxy_tests::topology::backend_ip6;
use kproxy_tests::{Fixture, Mode, endpointslice_yaml, mode};
use serde_json::json;

/// The IPv6 ClusterIP of the tests' Services.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
const VIP6_STR: &str = "fd00:10:96::10";
/// A refusal must arrive within this time.
const MAX_REFUSAL: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Service `name` on [`VIP6`] only (SingleStack IPv6), `http` and `dns`
/// to 8080, with more `spec` fields from `extra`.
fn service6(name: &str, extra: serde_json::Value) -> String {
    let mut spec = json!({ "ipFamilies": ["IPv6"], "ipFamilyPolicy": "SingleStack" });
    for (k, v) in extra.as_object().expect("an object") {
        spec[k] = v.clone();
    }
    service_yaml_with(
        name,
        VIP6_STR,
        &[
            ("http", HTTP_PORT, TARGET_PORT, "TCP"),
            ("dns", DNS_PORT, TARGET_PORT, "UDP"),
        ],
        spec,
    )
}

/// An IPv6 EndpointSlice of `service` over `backends` (1-based).
fn slice6(service: &str, backends: &[usize]) -> String {
    let ips: Vec<String> = backends
        .iter()
        .map(|i| backend_ip6(*i).to_string())
        .collect();
    let endpoints: Vec<(&str, bool)> = ips.iter().map(|ip| (ip.as_str(), true)).collect();
    endpointslice_yaml(
        &format!("{service}-v6"),
        service,
        &endpoints,
        &[("http", TARGET_PORT, "TCP"), ("dns", TARGET_PORT, "UDP")],
    )
}

/// The dual-stack fixture with Service `web6` (IPv6 only) over `backends`
/// written before kproxy starts.
fn with_web6(backends: &[usize], extra: serde_json::Value) -> Result<Fixture> {
    let mut f = Fixture::dual_stack(3, &[1, 2, 3])?;
    f.manifests
        .write("web6-service.yaml", &service6("web6", extra))?;
    f.manifests
        .write("web6-slice.yaml", &slice6("web6", backends))?;
    f.start_kproxy()?;
    Ok(f)
}

#[test]
fn ipv6_clusterip_balances_tcp_and_udp_and_replies_from_the_clusterip() -> Result<()> {
    let f = with_web6(&[1, 2, 3], json!({}))?;
    let n = spread_flows(3, 9);
    let names = f.tcp_round(VIP6, HTTP_PORT, n)?;
    assert_spread(&names, &[1, 2, 3], "TCP to [fd00:10:96::10]:80");
    let replies = f.udp_round(VIP6, DNS_PORT, n)?;
    for (name, from) in &replies {
        assert_eq!(
            *from,
            SocketAddr::new(IpAddr::V6(VIP6), DNS_PORT),
            "UDP reply of {name} did not come from the ClusterIP"
        );
    }
    let names: Vec<String> = replies.into_iter().map(|(n, _)| n).collect();
    assert_spread(&names, &[1, 2, 3], "UDP to [fd00:10:96::10]:53");
    // The backends saw the client's own IPv6 address (DNAT only).
    let client = f.topo.client().ip6.expect("dual-stack client");
    for i in 1..=3 {
        let peers = f.servers.backend(i).tcp_peers();
        assert!(
            !peers.is_empty() && peers.iter().all(|p| p.ip() == IpAddr::V6(client)),
            "backend-{i} saw {peers:?}, expected only {client}"
        );
    }
    Ok(())
}

#[test]
fn dual_stack_service_answers_on_both_addresses_with_its_families_endpoints() -> Result<()> {
    // IPv4 endpoints: backends 1 and 2 (the fixture's slice); IPv6: 3, 4.
    let mut f = Fixture::dual_stack(4, &[1, 2])?;
    f.manifests.write(
        SERVICE_FILE,
        &web_service_yaml_with(json!({
            "clusterIPs": [VIP_STR, VIP6_STR],
            "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack",
        })),
    )?;
    f.manifests
        .write("web-slice6.yaml", &slice6(SERVICE, &[3, 4]))?;
    f.start_kproxy()?;

    let v4 = f.tcp_round(VIP, HTTP_PORT, spread_flows(2, 4))?;
    assert_spread(&v4, &[1, 2], "TCP to 10.96.0.10:80");
    let v6 = f.tcp_round(VIP6, HTTP_PORT, spread_flows(2, 4))?;
    assert_spread(&v6, &[3, 4], "TCP to [fd00:10:96::10]:80");
    for (vip, backends) in [
        (IpAddr::V4(VIP), &[1usize, 2][..]),
        (IpAddr::V6(VIP6), &[3, 4]),
    ] {
        let replies = f.udp_round(vip, DNS_PORT, spread_flows(backends.len(), 2))?;
        let mut seen = BTreeSet::new();
        for (name, from) in &replies {
            assert_eq!(*from, SocketAddr::new(vip, DNS_PORT), "UDP reply of {name}");
            seen.insert(backend_index(name)?);
        }
        assert!(
            seen.iter().all(|b| backends.contains(b)),
            "UDP to {vip} reached {seen:?}, expected only {backends:?}"
        );
    }
    Ok(())
}

#[test]
fn ipv6_clusterip_without_endpoints_is_refused_at_once() -> Result<()> {
    let f = with_web6(&[], json!({}))?;
    for _ in 0..3 {
        let (kind, took) = f.topo.tcp_connect_error(VIP6, HTTP_PORT, PROBE_TIMEOUT)?;
        assert_eq!(kind, ErrorKind::ConnectionRefused, "TCP after {took:?}");
        assert!(took < MAX_REFUSAL, "TCP refused only after {took:?}");
        let (kind, took) = f.topo.udp_connect_error(VIP6, DNS_PORT, PROBE_TIMEOUT)?;
        assert_eq!(kind, ErrorKind::ConnectionRefused, "UDP after {took:?}");
        assert!(took < MAX_REFUSAL, "UDP refused only after {took:?}");
    }
    let tcp: usize = f.servers.tcp_accepted().values().sum();
    let udp: usize = f.servers.udp_requests().values().sum();
    assert_eq!((tcp, udp), (0, 0), "refused traffic reached a backend");
    Ok(())
}

#[test]
fn ipv6_session_affinity_keeps_a_client_on_one_endpoint() -> Result<()> {
    let f = with_web6(&[1, 2, 3], json!({ "sessionAffinity": "ClientIP" }))?;
    let names = f.tcp_round(VIP6, HTTP_PORT, 20)?;
    let first = &names[0];
    assert!(
        names.iter().all(|n| n == first),
        "20 TCP connections of one client went to {names:?}"
    );
    // Affinity is per service port (as kube-proxy's): the UDP port binds
    // the client on its own, and keeps it.
    let udp = f.udp_round(VIP6, DNS_PORT, 5)?;
    assert!(
        udp.iter().all(|(n, _)| *n == udp[0].0),
        "5 UDP requests of one client went to {udp:?}"
    );
    Ok(())
}

#[test]
fn ipv6_backend_reaches_itself_through_its_service() -> Result<()> {
    let mut f = Fixture::dual_stack(3, &[1, 2, 3])?;
    f.manifests
        .write("web6-service.yaml", &service6("web6", json!({})))?;
    f.manifests
        .write("web6-slice.yaml", &slice6("web6", &[1, 2, 3]))?;
    f.start_kproxy_on_backends_too()?;
    let me = f.topo.backend(1);
    // Round-robin reaches backend 1 within 3 flows; a random choice misses
    // it 60 times in a row with probability (2/3)^60 = 3e-11.
    let max = match mode() {
        Mode::Ebpf => 3,
        Mode::Iptables | Mode::Nftables => 60,
    };
    let expected_source = match mode() {
        Mode::Ebpf => IpAddr::V6(Ipv6Addr::from(proxy_common::HAIRPIN_SNAT_IP6)),
        // MASQUERADE: the node's address on the link to the backend.
        Mode::Iptables | Mode::Nftables => {
            let mut gw = backend_ip6(1).segments();
            gw[7] = 1;
            IpAddr::V6(Ipv6Addr::from(gw))
        }
    };
    let mut sessions = Vec::new();
    let mut seen = Vec::new();
    loop {
        if sessions.len() == max {
            bail!("backend-1 never reached itself in {seen:?}");
        }
        let mut s = TcpSession::connect(&me.ns, VIP6, HTTP_PORT, IO_TIMEOUT)?;
        let name = s.ask()?;
        assert_eq!(s.peer(), SocketAddr::new(IpAddr::V6(VIP6), HTTP_PORT));
        assert_eq!(s.ask()?, name, "the flow keeps its backend");
        let idx = backend_index(&name)?;
        seen.push(idx);
        sessions.push(s);
        if idx == 1 {
            let peers = f.servers.backend(1).tcp_peers();
            assert!(
                peers.iter().any(|p| p.ip() == expected_source),
                "backend-1 saw {peers:?} on its flow to itself, expected {expected_source}"
            );
            return Ok(());
        }
    }
}
