//! Behaviour 4: removing a backend takes effect within a second; new flows
//! avoid it and a UDP flow pinned to it moves to another backend (eBPF: its
//! own conntrack entries are deleted; iptables: `conntrack -D`, as
//! kube-proxy does).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use kproxy_tests::Fixture;
use kproxy_tests::fixture::{
    APPLY_TIMEOUT, DNS_PORT, HTTP_PORT, IO_TIMEOUT, VIP, assert_spread, backend_index, spread_flows,
};
use kproxy_tests::kproxy::field_u64;

const MAX_APPLY: Duration = Duration::from_secs(1);

#[test]
fn removed_backend_gets_no_new_flows_and_udp_session_moves() -> Result<()> {
    let mut f = Fixture::start(3, &[1, 2, 3])?;

    // A UDP "session": one socket, one source port, same 5-tuple each time.
    let mut udp = f.topo.udp_session(VIP, DNS_PORT, IO_TIMEOUT)?;
    let (name, from) = udp.ask()?;
    assert_eq!(from, SocketAddr::from((VIP, DNS_PORT)));
    let removed = backend_index(&name)?;
    // Pinned: the same 5-tuple keeps its backend.
    assert_eq!(udp.ask()?.0, name);
    let kept: Vec<usize> = (1..=3).filter(|i| *i != removed).collect();

    let renamed_at = f.set_slice(&kept)?;
    let line = f.kproxy().wait_applied(APPLY_TIMEOUT)?;
    let took = line.at.duration_since(renamed_at);
    eprintln!(
        "removal of backend-{removed}: applied {took:?} after the rename ({})",
        line.text
    );
    assert!(
        took < MAX_APPLY,
        "applied {took:?} after the rename, limit {MAX_APPLY:?}"
    );
    if let Ok(us) = field_u64(&line.text, "took_us") {
        assert!(
            Duration::from_micros(us) < MAX_APPLY,
            "kproxy reports took_us={us}"
        );
    }

    let accepted_before = f.servers.backend(removed).tcp_accepted();
    // 12 flows (6 each by round-robin), more with iptables' random choice.
    let names = f.tcp_round(VIP, HTTP_PORT, spread_flows(2, 12))?;
    assert!(
        !names.contains(&name),
        "new TCP flows reached removed {name}: {names:?}"
    );
    assert_spread(&names, &kept, "new flows over the 2 remaining backends");
    assert_eq!(f.servers.backend(removed).tcp_accepted(), accepted_before);

    // The UDP flow that was on the removed backend is answered by another.
    let (next, from) = udp.ask()?;
    assert_ne!(next, name, "UDP session still answered by removed {name}");
    assert!(kept.contains(&backend_index(&next)?), "{next}");
    assert_eq!(from, SocketAddr::from((VIP, DNS_PORT)));
    // …and then stays there.
    assert_eq!(udp.ask()?.0, next);
    Ok(())
}
