//! Behaviour 3: an established TCP connection keeps its backend while
//! endpoints are added and removed.

use anyhow::Result;
use kproxy_tests::Fixture;
use kproxy_tests::fixture::{
    APPLY_TIMEOUT, HTTP_PORT, IO_TIMEOUT, VIP, assert_spread, backend_index, spread_flows,
};
use kproxy_tests::kproxy::field_u64;

#[test]
fn long_lived_tcp_connection_keeps_its_backend() -> Result<()> {
    // Four backends exist, only 1..3 are in the slice at first.
    let mut f = Fixture::start(4, &[1, 2, 3])?;
    let mut session = f.topo.tcp_session(VIP, HTTP_PORT, IO_TIMEOUT)?;
    let first = session.ask()?;
    let mine = backend_index(&first)?;
    assert!((1..=3).contains(&mine), "{first} is not in the slice");
    assert_eq!(session.ask()?, first);

    // Add backend 4.
    f.set_slice(&[1, 2, 3, 4])?;
    let added = f.kproxy().wait_applied(APPLY_TIMEOUT)?;
    let gen_added = field_u64(&added.text, "generation")?;
    for _ in 0..3 {
        assert_eq!(
            session.ask()?,
            first,
            "session moved after backend 4 was added"
        );
    }
    // The addition took effect: new flows reach all 4 backends (4 flows,
    // one each, by round-robin; more with iptables' random choice).
    let names = f.tcp_round(VIP, HTTP_PORT, spread_flows(4, 4))?;
    assert_spread(&names, &[1, 2, 3, 4], "new flows after backend 4 was added");

    // Remove a backend that is not the session's.
    let removed = (1..=4).find(|i| *i != mine).expect("another backend");
    let keep: Vec<usize> = (1..=4).filter(|i| *i != removed).collect();
    f.set_slice(&keep)?;
    let removed_line = f.kproxy().wait_applied(APPLY_TIMEOUT)?;
    let gen_removed = field_u64(&removed_line.text, "generation")?;
    assert!(
        gen_removed > gen_added,
        "generation did not advance: {gen_added} -> {gen_removed}"
    );
    for _ in 0..3 {
        assert_eq!(
            session.ask()?,
            first,
            "session moved after backend {removed} was removed"
        );
    }
    // The removal took effect too.
    let names = f.tcp_round(VIP, HTTP_PORT, 6)?;
    assert!(
        !names.contains(&format!("backend-{removed}")),
        "new flows still reach removed backend-{removed}: {names:?}"
    );
    // The connection is the same one throughout.
    assert_eq!(
        f.servers
            .backend(mine)
            .tcp_peers()
            .iter()
            .filter(|p| **p == session.local())
            .count(),
        1
    );
    Ok(())
}
