//! In-cluster traffic policies: `internalTrafficPolicy: Local` sends
//! ClusterIP traffic only to this node's endpoints and refuses it at once
//! when there are none (kube-proxy drops it silently; kubernetes#121371
//! asked for a refusal); `trafficDistribution: PreferClose` keeps it in the
//! node's zone when the slice's hints allow, and uses every endpoint when
//! they do not.
//!
//! kproxy runs with `--node-name node1 --zone a`; backends 1 and 3 are on
//! node1 in zone a, backend 2 on node2 in zone b.

use std::io::ErrorKind;
use std::time::Duration;

use anyhow::Result;
use kproxy_tests::fixture::{
    APPLY_TIMEOUT, DNS_PORT, HTTP_PORT, SERVICE, SERVICE_FILE, SLICE_FILE, SLICE_NAME, TARGET_PORT,
    VIP, assert_spread, spread_flows, web_service_yaml_with,
};
use kproxy_tests::{Fixture, backend_ip};
use serde_json::{Value, json};

/// How long a refusal may take, and how long a probe waits at most.
const MAX_REFUSAL: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The `web` slice: `(backend, node, zone hint)`, all ready.
fn slice(endpoints: &[(usize, &str, Option<&str>)]) -> Result<String> {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(i, node, hint)| {
            let mut ep = json!({
                "addresses": [backend_ip(*i).to_string()],
                "conditions": {"ready": true},
                "nodeName": node,
            });
            if let Some(z) = hint {
                ep["zone"] = json!(z);
                ep["hints"] = json!({"forZones": [{"name": z}]});
            }
            ep
        })
        .collect();
    Ok(serde_json::to_string_pretty(&json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": SLICE_NAME,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": SERVICE},
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [
            {"name": "http", "port": TARGET_PORT, "protocol": "TCP"},
            {"name": "dns", "port": TARGET_PORT, "protocol": "UDP"},
        ],
    }))?)
}

const NODE_ARGS: [&str; 4] = ["--node-name", "node1", "--zone", "a"];
/// Backends 1 and 3 on node1 (zone a), backend 2 on node2 (zone b).
const ZONED: [(usize, &str, Option<&str>); 3] = [
    (1, "node1", Some("a")),
    (2, "node2", Some("b")),
    (3, "node1", Some("a")),
];

#[test]
fn internal_traffic_policy_local_reaches_only_local_endpoints_and_refuses_without_them()
-> Result<()> {
    let mut f = Fixture::new(3, &[1, 2, 3])?;
    f.manifests.write(
        SERVICE_FILE,
        &web_service_yaml_with(json!({"internalTrafficPolicy": "Local"})),
    )?;
    f.manifests.write(SLICE_FILE, &slice(&ZONED)?)?;
    f.start_kproxy_with(&NODE_ARGS)?;
    let names = f.tcp_round(VIP, HTTP_PORT, spread_flows(2, 12))?;
    assert_spread(&names, &[1, 3], "internalTrafficPolicy Local");

    // Only the remote endpoint is left: refused at once, TCP and UDP.
    f.manifests
        .write(SLICE_FILE, &slice(&[(2, "node2", None)])?)?;
    f.kproxy().wait_applied(APPLY_TIMEOUT)?;
    let tcp_before = f.servers.tcp_accepted();
    let (kind, took) = f.topo.tcp_connect_error(VIP, HTTP_PORT, PROBE_TIMEOUT)?;
    assert_eq!(kind, ErrorKind::ConnectionRefused, "TCP after {took:?}");
    assert!(took < MAX_REFUSAL, "TCP refusal took {took:?}");
    let (kind, took) = f.topo.udp_connect_error(VIP, DNS_PORT, PROBE_TIMEOUT)?;
    assert_eq!(kind, ErrorKind::ConnectionRefused, "UDP after {took:?}");
    assert!(took < MAX_REFUSAL, "UDP refusal took {took:?}");
    assert_eq!(
        f.servers.tcp_accepted(),
        tcp_before,
        "a remote endpoint was reached"
    );

    // A local endpoint is back: served again.
    f.manifests.write(
        SLICE_FILE,
        &slice(&[(2, "node2", None), (3, "node1", None)])?,
    )?;
    f.kproxy().wait_applied(APPLY_TIMEOUT)?;
    let names = f.tcp_round(VIP, HTTP_PORT, 4)?;
    assert_eq!(names, vec!["backend-3"; 4]);
    Ok(())
}

#[test]
fn prefer_close_keeps_traffic_in_the_zone_while_every_endpoint_is_hinted() -> Result<()> {
    let mut f = Fixture::new(3, &[1, 2, 3])?;
    f.manifests.write(
        SERVICE_FILE,
        &web_service_yaml_with(json!({"trafficDistribution": "PreferClose"})),
    )?;
    f.manifests.write(SLICE_FILE, &slice(&ZONED)?)?;
    f.start_kproxy_with(&NODE_ARGS)?;
    let names = f.tcp_round(VIP, HTTP_PORT, spread_flows(2, 12))?;
    assert_spread(&names, &[1, 3], "zone a's endpoints");

    // No endpoint for zone a: all of them, never none.
    let all_b: Vec<(usize, &str, Option<&str>)> =
        ZONED.iter().map(|(i, n, _)| (*i, *n, Some("b"))).collect();
    f.manifests.write(SLICE_FILE, &slice(&all_b)?)?;
    f.kproxy().wait_applied(APPLY_TIMEOUT)?;
    let names = f.tcp_round(VIP, HTTP_PORT, spread_flows(3, 12))?;
    assert_spread(&names, &[1, 2, 3], "no endpoint hinted for zone a");

    // Back to zone a; then one endpoint loses its hint: hints are not
    // usable, all three serve.
    f.manifests.write(SLICE_FILE, &slice(&ZONED)?)?;
    f.kproxy().wait_applied(APPLY_TIMEOUT)?;
    let names = f.tcp_round(VIP, HTTP_PORT, spread_flows(2, 12))?;
    assert_spread(&names, &[1, 3], "zone a's endpoints again");
    let mut half = ZONED;
    half[1].2 = None;
    f.manifests.write(SLICE_FILE, &slice(&half)?)?;
    f.kproxy().wait_applied(APPLY_TIMEOUT)?;
    let names = f.tcp_round(VIP, HTTP_PORT, spread_flows(3, 12))?;
    assert_spread(&names, &[1, 2, 3], "a half-hinted slice");
    Ok(())
}
