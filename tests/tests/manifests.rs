//! Behaviour 9: malformed manifests are rejected and the previous state stays.

use anyhow::Result;
use kproxy_tests::Fixture;
use kproxy_tests::fixture::{
    APPLY_TIMEOUT, DNS_PORT, HTTP_PORT, SLICE_FILE, VIP, assert_spread, spread_flows,
    web_slice_yaml_with,
};
use kproxy_tests::kproxy::Event;

/// New flows reach all of backends 1..3 and nothing else: 9 flows go 3/3/3
/// with round-robin (eBPF); see [`assert_spread`] for iptables mode.
fn assert_balanced_over_1_2_3(f: &Fixture, when: &str) -> Result<()> {
    let names = f.tcp_round(VIP, HTTP_PORT, spread_flows(3, 9))?;
    assert_spread(&names, &[1, 2, 3], &format!("TCP {when}"));
    let names: Vec<String> = f
        .udp_round(VIP, DNS_PORT, spread_flows(3, 9))?
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_spread(&names, &[1, 2, 3], &format!("UDP {when}"));
    Ok(())
}

#[test]
fn broken_yaml_file_is_rejected_and_state_kept() -> Result<()> {
    let mut f = Fixture::start(3, &[1, 2, 3])?;
    assert_balanced_over_1_2_3(&f, "before")?;

    f.manifests.write(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: [broken\n  namespace: default\n",
    )?;
    let line = f.kproxy().wait_rejected(APPLY_TIMEOUT)?;
    assert!(
        line.text.contains("broken.yaml"),
        "rejection does not name the file: {}",
        line.text
    );

    assert!(
        f.kproxy().is_running(),
        "kproxy exited after a bad manifest"
    );
    assert_balanced_over_1_2_3(&f, "after the rejection")?;
    Ok(())
}

#[test]
fn endpointslice_with_invalid_ip_is_rejected_and_state_kept() -> Result<()> {
    let mut f = Fixture::start(3, &[1, 2, 3])?;
    assert_balanced_over_1_2_3(&f, "before")?;

    // Applying this would drop backend 3; it must be rejected as a whole.
    f.manifests.write(
        SLICE_FILE,
        &web_slice_yaml_with(&[
            ("10.0.11.2", true),
            ("10.0.12.2", true),
            ("10.0.11.300", true),
        ]),
    )?;
    let line = f.kproxy().wait_rejected(APPLY_TIMEOUT)?;
    assert!(
        line.text.contains(SLICE_FILE),
        "rejection does not name the file: {}",
        line.text
    );

    assert!(
        f.kproxy().is_running(),
        "kproxy exited after a bad manifest"
    );
    assert_balanced_over_1_2_3(&f, "after the rejection")?;

    // A valid change afterwards is applied again.
    f.set_slice(&[1, 2])?;
    f.kproxy().wait_event(
        "applied",
        |e| matches!(e, Event::Applied { .. }),
        APPLY_TIMEOUT,
    )?;
    let names = f.tcp_round(VIP, HTTP_PORT, spread_flows(2, 6))?;
    assert_spread(&names, &[1, 2], "after the fix");
    Ok(())
}
