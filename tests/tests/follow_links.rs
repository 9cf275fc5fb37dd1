//! `--iface-prefix`: kproxy attaches to interfaces as they appear (as the
//! kubelet creates pod veths) and releases them when they vanish, without
//! a restart. eBPF mode only (iptables rules cover the whole namespace).

use std::time::Duration;

use anyhow::{Result, ensure};
use kproxy_tests::fixture::{HTTP_PORT, IO_TIMEOUT, VIP, counts, tally};
use kproxy_tests::kproxy::Event;
use kproxy_tests::{Client, Fixture, Kproxy};

const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The interface a `kproxy: attached IF …` line names.
fn attached(line: &str) -> Option<String> {
    match Event::parse(line)? {
        Event::Attached { iface, .. } => Some(iface),
        _ => None,
    }
}

/// 9 connections from one client namespace, all kept open: round-robin
/// gives each of the 3 backends exactly 3.
fn nine_flows(client: &Client) -> Result<Vec<String>> {
    let mut sessions = Vec::new();
    let mut names = Vec::new();
    for _ in 0..9 {
        let mut s = client.tcp_session(VIP, HTTP_PORT, IO_TIMEOUT)?;
        names.push(s.ask()?);
        sessions.push(s);
    }
    Ok(names)
}

#[test]
fn interfaces_matching_the_prefix_are_followed() -> Result<()> {
    let mut f = Fixture::new(3, &[1, 2, 3])?;
    // Client veths on the node are c0, c1, …; backends' are b1.. (not followed).
    let mut kp = Kproxy::start(
        &f.topo.node,
        f.manifests.path(),
        &[],
        &["--iface-prefix", "c"],
    )?;
    kp.wait_ready()?;
    let seen = kp.lines_seen().to_vec();
    ensure!(
        seen.iter().any(|l| attached(l).as_deref() == Some("c0")),
        "the existing c0 was not attached at start: {seen:?}"
    );
    ensure!(
        !seen
            .iter()
            .any(|l| attached(l).is_some_and(|i| i.starts_with('b'))),
        "a backend veth was attached: {seen:?}"
    );
    let names = nine_flows(f.topo.client())?;
    assert_eq!(
        tally(&names),
        counts(&[(1, 3), (2, 3), (3, 3)]),
        "{names:?}"
    );

    // A new interface appears while kproxy runs: attached on its link event.
    let index = f.topo.add_client()?.index;
    let second = &f.topo.clients()[index];
    let want = second.node_iface.clone();
    kp.wait_event(
        &format!("attached {want}"),
        |e| matches!(e, Event::Attached { iface, .. } if *iface == want),
        EVENT_TIMEOUT,
    )?;
    let names = nine_flows(second)?;
    assert_eq!(
        tally(&names),
        counts(&[(1, 3), (2, 3), (3, 3)]),
        "{names:?}"
    );

    // It vanishes: released (its pinned links removed), kproxy keeps going.
    let gone = second.node_iface.clone();
    f.topo.node.ip(&["link", "del", "dev", gone.as_str()])?;
    kp.wait_event(
        &format!("released {gone}"),
        |e| matches!(e, Event::Released { iface } if *iface == gone),
        EVENT_TIMEOUT,
    )?;
    let names = nine_flows(f.topo.client())?;
    assert_eq!(
        tally(&names),
        counts(&[(1, 3), (2, 3), (3, 3)]),
        "{names:?}"
    );
    ensure!(kp.is_running(), "kproxy exited");
    kp.stop(Duration::from_secs(10))?;
    Ok(())
}
