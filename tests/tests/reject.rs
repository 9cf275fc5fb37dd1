//! Behaviour 5: a service without ready endpoints is refused at once
//! (ICMP port unreachable → connection refused for TCP and UDP).

use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Result;
use kproxy_tests::fixture::{DNS_PORT, HTTP_PORT, IO_TIMEOUT, TARGET_PORT, VIP, backend_index};
use kproxy_tests::{Fixture, backend_ip, endpointslice_yaml, service_yaml};

/// The refusal must arrive within this time.
const MAX_REFUSAL: Duration = Duration::from_millis(100);
/// How long a probe waits at most (a timeout is a failure, reported as such).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

fn write_service(f: &Fixture, name: &str, vip: Ipv4Addr) -> Result<()> {
    let yaml = service_yaml(
        name,
        &vip.to_string(),
        &[
            ("http", HTTP_PORT, TARGET_PORT, "TCP"),
            ("dns", DNS_PORT, TARGET_PORT, "UDP"),
        ],
    );
    f.manifests.write(&format!("{name}-service.yaml"), &yaml)?;
    Ok(())
}

fn write_slice(f: &Fixture, name: &str, endpoints: &[(&str, bool)]) -> Result<()> {
    let yaml = endpointslice_yaml(
        &format!("{name}-xyz"),
        name,
        endpoints,
        &[("http", TARGET_PORT, "TCP"), ("dns", TARGET_PORT, "UDP")],
    );
    f.manifests.write(&format!("{name}-slice.yaml"), &yaml)?;
    Ok(())
}

/// Starts kproxy, checks `web` works, then probes every `(name, vip)` with
/// TCP and UDP and expects a fast refusal and no traffic at the backends.
fn assert_refused(mut f: Fixture, services: &[(&str, Ipv4Addr)]) -> Result<()> {
    f.start_kproxy()?;
    // kproxy is active (and the client's gateway neighbour is resolved).
    let (name, _) = f.topo.tcp_ask(VIP, HTTP_PORT, IO_TIMEOUT)?;
    backend_index(&name)?;
    let tcp_before = f.servers.tcp_accepted();
    let udp_before = f.servers.udp_requests();

    for (svc, vip) in services {
        for _ in 0..2 {
            let (kind, took) = f.topo.tcp_connect_error(*vip, HTTP_PORT, PROBE_TIMEOUT)?;
            assert_eq!(
                kind,
                ErrorKind::ConnectionRefused,
                "TCP to {svc} ({vip}:80) after {took:?}"
            );
            assert!(
                took < MAX_REFUSAL,
                "TCP to {svc} refused only after {took:?}"
            );

            let (kind, took) = f.topo.udp_connect_error(*vip, DNS_PORT, PROBE_TIMEOUT)?;
            assert_eq!(
                kind,
                ErrorKind::ConnectionRefused,
                "UDP to {svc} ({vip}:53) after {took:?}"
            );
            assert!(
                took < MAX_REFUSAL,
                "UDP to {svc} refused only after {took:?}"
            );
        }
    }
    // Nothing reached any backend (backend 3 is a not-ready endpoint of `idle`).
    assert_eq!(f.servers.tcp_accepted(), tcp_before);
    assert_eq!(f.servers.udp_requests(), udp_before);
    // The service with endpoints is unaffected.
    let (name, _) = f.topo.udp_ask(VIP, DNS_PORT, IO_TIMEOUT)?;
    backend_index(&name)?;
    Ok(())
}

#[test]
fn service_whose_slice_has_no_ready_endpoint_is_refused() -> Result<()> {
    // `web` keeps backends 1 and 2; backend 3 is only a not-ready endpoint of `idle`.
    let f = Fixture::new(3, &[1, 2])?;
    let idle = Ipv4Addr::new(10, 96, 0, 11);
    let hollow = Ipv4Addr::new(10, 96, 0, 12);
    write_service(&f, "idle", idle)?;
    write_slice(&f, "idle", &[(&backend_ip(3).to_string(), false)])?;
    write_service(&f, "hollow", hollow)?;
    write_slice(&f, "hollow", &[])?;
    assert_refused(f, &[("idle", idle), ("hollow", hollow)])
}

#[test]
fn service_without_endpointslice_is_refused() -> Result<()> {
    let f = Fixture::new(3, &[1, 2, 3])?;
    let orphan = Ipv4Addr::new(10, 96, 0, 13);
    write_service(&f, "orphan", orphan)?;
    assert_refused(f, &[("orphan", orphan)])
}
