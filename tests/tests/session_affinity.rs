//! `sessionAffinity: ClientIP`: every new connection (TCP) and socket (UDP)
//! from one client address goes to the same endpoint while another client
//! gets its own; the binding ends when its endpoint leaves the slice and
//! when the timeout passes without a new connection. eBPF: the `AFFINITY`
//! map; iptables: kube-proxy's `recent` lists.

use std::time::Duration;

use anyhow::{Context, Result};
use kproxy_tests::fixture::{
    APPLY_TIMEOUT, DNS_PORT, HTTP_PORT, IO_TIMEOUT, SERVICE_FILE, VIP, backend_index, tally,
    web_service_yaml_with,
};
use kproxy_tests::topology::Client;
use kproxy_tests::{Fixture, Mode, mode};
use serde_json::json;

/// Connections each client opens in a row.
const CONNECTIONS: usize = 20;

/// The `web` Service with `sessionAffinity: ClientIP` and `timeout`.
fn affinity_service(timeout: u32) -> String {
    web_service_yaml_with(json!({
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": timeout}},
    }))
}

/// `n` TCP connections from `client`, one after the other (each closed
/// before the next): the backend index that answered each.
fn tcp_in_a_row(client: &Client, n: usize) -> Result<Vec<usize>> {
    (0..n)
        .map(|k| {
            let (name, _) = client
                .tcp_ask(VIP, HTTP_PORT, IO_TIMEOUT)
                .with_context(|| format!("connection #{k} from {}", client.ip))?;
            backend_index(&name)
        })
        .collect()
}

/// `n` UDP requests from `client`, each from a new socket (a new port).
fn udp_in_a_row(client: &Client, n: usize) -> Result<Vec<usize>> {
    (0..n)
        .map(|k| {
            let (name, _) = client
                .udp_ask(VIP, DNS_PORT, IO_TIMEOUT)
                .with_context(|| format!("datagram #{k} from {}", client.ip))?;
            backend_index(&name)
        })
        .collect()
}

/// The one backend all of `got` went to.
fn one_backend(got: &[usize], what: &str) -> usize {
    let t = tally(got.iter().map(|i| i.to_string()));
    assert_eq!(
        t.len(),
        1,
        "{what}: spread over {t:?}, expected one backend"
    );
    got[0]
}

#[test]
fn each_client_sticks_to_one_endpoint_until_that_endpoint_leaves() -> Result<()> {
    let mut f = Fixture::new(3, &[1, 2, 3])?;
    f.manifests.write(SERVICE_FILE, &affinity_service(10_800))?;
    for _ in 0..2 {
        f.topo.add_client()?;
    }
    f.start_kproxy()?;

    let mut bound = Vec::new();
    for c in f.topo.clients() {
        let tcp = one_backend(
            &tcp_in_a_row(c, CONNECTIONS)?,
            &format!("TCP from {}", c.ip),
        );
        let udp = one_backend(&udp_in_a_row(c, 5)?, &format!("UDP from {}", c.ip));
        // One binding per protocol port: each is balanced on its own.
        bound.push((tcp, udp));
    }
    if mode() == Mode::Ebpf {
        // Exact round-robin: each client's first connection takes the next
        // endpoint, so three clients hold three different ones.
        let mut tcp: Vec<usize> = bound.iter().map(|b| b.0).collect();
        tcp.sort();
        assert_eq!(tcp, [1, 2, 3], "three clients, three endpoints: {bound:?}");
    }

    // The first client's endpoint leaves the slice: its clients move, and
    // stick to the new one.
    let gone = bound[0].0;
    let rest: Vec<usize> = (1..=3).filter(|i| *i != gone).collect();
    f.set_slice(&rest)?;
    f.kproxy().wait_applied(APPLY_TIMEOUT)?;
    let client = &f.topo.clients()[0];
    let moved = one_backend(
        &tcp_in_a_row(client, CONNECTIONS)?,
        "after its endpoint left",
    );
    assert_ne!(moved, gone, "bound to an endpoint that left the slice");

    // It comes back: the binding made since holds.
    f.set_slice(&[1, 2, 3])?;
    f.kproxy().wait_applied(APPLY_TIMEOUT)?;
    let client = &f.topo.clients()[0];
    let after = one_backend(&tcp_in_a_row(client, CONNECTIONS)?, "after it came back");
    assert_eq!(
        after, moved,
        "the binding changed although its endpoint stayed"
    );
    Ok(())
}

/// The affinity timeout of the expiry test, and the pause that outlasts it.
const SHORT_TIMEOUT: u32 = 1;
const PAUSE: Duration = Duration::from_millis(1_500);
/// Pauses in the expiry test. With 8 endpoints chosen at random (iptables),
/// all 11 choices land on one endpoint with probability 8·(1/8)^11 < 1e-9.
const EXPIRIES: usize = 10;

#[test]
fn affinity_ends_when_the_timeout_passes_without_a_new_connection() -> Result<()> {
    let backends: Vec<usize> = (1..=8).collect();
    let mut f = Fixture::new(8, &backends)?;
    f.manifests
        .write(SERVICE_FILE, &affinity_service(SHORT_TIMEOUT))?;
    f.start_kproxy()?;
    let client = f.topo.client();
    // Within the timeout: one endpoint (connections follow each other far
    // faster than a second).
    let mut chosen = vec![one_backend(&tcp_in_a_row(client, 5)?, "within the timeout")];
    for _ in 0..EXPIRIES {
        // The pause is the behaviour under test: the binding must lapse.
        std::thread::sleep(PAUSE);
        chosen.push(tcp_in_a_row(client, 1)?[0]);
    }
    match mode() {
        // Exact round-robin: every expiry moves the client on.
        Mode::Ebpf => {
            for w in chosen.windows(2) {
                assert_ne!(w[0], w[1], "the binding outlived its timeout: {chosen:?}");
            }
        }
        Mode::Iptables | Mode::Nftables => {
            let t = tally(chosen.iter().map(|i| i.to_string()));
            assert!(t.len() > 1, "the binding outlived its timeout: {chosen:?}");
        }
    }
    Ok(())
}
