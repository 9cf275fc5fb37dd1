//! Behaviour 8 with `--attach netlink` (clsact qdisc + cls_bpf filters, the
//! path kernels without tcx take): after SIGTERM the qdisc, the filters, the
//! programs and the pins are gone. eBPF mode only.

mod detach;

use anyhow::Result;
use detach::check_detach;
use kproxy_tests::{Mode, mode};

/// `--attach netlink`: clsact qdisc + cls_bpf filters, which must be removed.
/// eBPF only: iptables mode attaches nothing.
#[test]
fn sigterm_detaches_everything_netlink_mode() -> Result<()> {
    assert_eq!(
        mode(),
        Mode::Ebpf,
        "--attach netlink is an eBPF mode option: this file is generated for eBPF mode only \
         (cargo xtask test leaves it out of the iptables run)"
    );
    check_detach(&["--attach", "netlink"], true)
}
