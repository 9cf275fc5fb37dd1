//! /metrics, /healthz and /readyz of the agent, read from inside the node
//! namespace (the default address is 127.0.0.1:10249 there).

use anyhow::Result;
use kproxy_tests::fixture::{HTTP_PORT, VIP};
use kproxy_tests::kproxy::{metrics_get, sample};
use kproxy_tests::{Fixture, Mode, mode};

fn get(f: &Fixture, path: &str) -> Result<(u16, String)> {
    metrics_get(&f.topo.node, path)
}

#[test]
fn metrics_health_and_readiness() -> Result<()> {
    let f = Fixture::start(3, &[1, 2, 3])?;
    assert_eq!(get(&f, "/healthz")?.0, 200);
    assert_eq!(get(&f, "/readyz")?.0, 200, "ready after the first sync");
    let names = f.tcp_round(VIP, HTTP_PORT, 6)?;
    assert_eq!(names.len(), 6);

    let (status, text) = get(&f, "/metrics")?;
    assert_eq!(status, 200);
    assert_eq!(sample(&text, "kproxy_services "), Some(2.0), "{text}");
    assert_eq!(sample(&text, "kproxy_backends "), Some(6.0));
    assert!(sample(&text, "kproxy_sync_duration_seconds_count").unwrap_or(0.0) >= 1.0);
    if mode() == Mode::Ebpf {
        let http = "kproxy_service_new_flows_total{service=\"default/web:http\"";
        assert_eq!(
            sample(&text, http),
            Some(6.0),
            "six new flows counted:\n{text}"
        );
        let packets = "kproxy_service_packets_total{service=\"default/web:http\"";
        assert!(sample(&text, packets).unwrap_or(0.0) >= 24.0, "{text}");
        assert!(sample(&text, "kproxy_conntrack_entries").unwrap_or(0.0) >= 12.0);
    }
    assert_eq!(get(&f, "/nope")?.0, 404);
    Ok(())
}
