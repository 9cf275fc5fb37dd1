//! The agent's conntrack sweep (eBPF only: iptables mode relies on
//! netfilter's conntrack): entries of closed flows that no packet meets
//! again are deleted within a sweep after their timeout, and /metrics says
//! so (`kproxy_conntrack_entries`, `kproxy_conntrack_gc_deleted_total`,
//! `kproxy_conntrack_capacity`).

use std::time::Duration;

use anyhow::{Context, Result};
use kproxy_tests::fixture::{DNS_PORT, HTTP_PORT, IO_TIMEOUT, VIP};
use kproxy_tests::kproxy::{metrics_get, sample};
use kproxy_tests::{Fixture, Mode, mode, poll_until};

const FLOWS: usize = 3;

#[test]
fn closed_flows_are_swept_and_counted() -> Result<()> {
    assert_eq!(
        mode(),
        Mode::Ebpf,
        "the sweep is the eBPF datapath's: this file is generated for eBPF mode only \
         (cargo xtask test leaves it out of the iptables run)"
    );
    let mut f = Fixture::new(1, &[1])?;
    f.start_kproxy_with(&[
        "--conntrack-tcp-close-seconds",
        "1",
        "--conntrack-gc-interval-seconds",
        "1",
        "--conntrack-size",
        "4096",
    ])?;
    // Opened, answered and closed when the sessions drop.
    let names = f.tcp_round(VIP, HTTP_PORT, FLOWS)?;
    assert_eq!(names.len(), FLOWS);
    let scrape = || -> Result<String> {
        let (status, text) = metrics_get(&f.topo.node, "/metrics")?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(text)
    };
    let text = poll_until(
        "the closed flows' conntrack entries to be swept",
        Duration::from_secs(10),
        || {
            let text = scrape()?;
            let entries = sample(&text, "kproxy_conntrack_entries ").context("entries")?;
            Ok((entries == 0.0).then_some(text))
        },
    )?;
    let deleted = sample(&text, "kproxy_conntrack_gc_deleted_total ").context("gc_deleted")?;
    assert!(
        deleted >= (2 * FLOWS) as f64,
        "the sweep deleted {deleted} entries, expected both directions of {FLOWS} flows:\n{text}"
    );
    assert!(sample(&text, "kproxy_conntrack_gc_runs_total ").unwrap_or(0.0) >= 1.0);
    assert_eq!(
        sample(&text, "kproxy_conntrack_capacity "),
        Some(4096.0),
        "{text}"
    );
    Ok(())
}

/// A tiny table, and more flows than it holds.
const TINY: usize = 1024;
const MANY: usize = 700;

#[test]
fn a_full_table_is_counted_and_new_flows_are_still_served() -> Result<()> {
    assert_eq!(
        mode(),
        Mode::Ebpf,
        "the conntrack table is the eBPF datapath's: this file is generated for eBPF mode only \
         (cargo xtask test leaves it out of the iptables run)"
    );
    let mut f = Fixture::new(1, &[1])?;
    f.start_kproxy_with(&[
        "--conntrack-gc-interval-seconds",
        "1",
        "--conntrack-size",
        &TINY.to_string(),
    ])?;
    // Two entries per flow: 1,400 for a table of 1,024. Each datagram is a
    // new flow (a new socket, a new port) and is answered.
    for k in 0..MANY {
        f.topo
            .udp_ask(VIP, DNS_PORT, IO_TIMEOUT)
            .with_context(|| format!("datagram #{k}"))?;
    }
    let text = poll_until(
        "a sweep to count the full table",
        Duration::from_secs(10),
        || {
            let (status, text) = metrics_get(&f.topo.node, "/metrics")?;
            anyhow::ensure!(status == 200, "/metrics answered {status}");
            let full = sample(&text, "kproxy_conntrack_full_total ").unwrap_or(0.0);
            Ok((full >= 1.0).then_some(text))
        },
    )?;
    let entries = sample(&text, "kproxy_conntrack_entries ").context("entries")?;
    assert!(
        entries <= TINY as f64,
        "{entries} entries in a table of {TINY}"
    );
    // Full, yet a new flow is served (the least recently used made room).
    for k in 0..10 {
        f.topo
            .udp_ask(VIP, DNS_PORT, IO_TIMEOUT)
            .with_context(|| format!("a new flow in the full table (#{k})"))?;
        let (name, _) = f.topo.tcp_ask(VIP, HTTP_PORT, IO_TIMEOUT)?;
        assert_eq!(name, "backend-1");
    }
    Ok(())
}
