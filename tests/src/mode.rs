//! Which datapath the suite runs kproxy with: `KPROXY_MODE=ebpf` (the
//! default), `KPROXY_MODE=iptables` or `KPROXY_MODE=nftables`.
//!
//! The same tests run in every mode. Only where the datapaths legitimately
//! differ do tests look at [`mode()`]: exact round-robin (eBPF) against
//! random choice (iptables' `statistic --mode random`, nftables' `numgen
//! random`: [`Mode::is_netfilter`]), and what "nothing left behind" means
//! after SIGTERM (BPF links and tc state, `KUBE-` chains and rules, or the
//! `kube-proxy` tables).

use std::fmt;

/// Environment variable selecting the datapath (`ebpf`, `iptables` or
/// `nftables`).
pub const KPROXY_MODE_ENV: &str = "KPROXY_MODE";

/// kproxy's `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// TC programs attached to the client-facing veths (`--iface`).
    Ebpf,
    /// kube-proxy's iptables rules in the node namespace.
    Iptables,
    /// kube-proxy's nftables tables in the node namespace.
    Nftables,
}

impl Mode {
    /// The value of kproxy's `--mode` (and of `KPROXY_MODE`).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }

    /// kube-proxy's netfilter datapaths (iptables, nftables): rules for the
    /// whole node namespace, netfilter's conntrack, a random endpoint
    /// choice, masquerade for hairpin traffic, and REJECT answered by the
    /// node's stack (so the service CIDR must be routed).
    pub fn is_netfilter(self) -> bool {
        matches!(self, Mode::Iptables | Mode::Nftables)
    }

    /// Parses a `KPROXY_MODE` value (case-insensitive, surrounding blanks
    /// ignored; empty means the default).
    pub fn parse(value: &str) -> Option<Mode> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "ebpf" => Some(Mode::Ebpf),
            "iptables" => Some(Mode::Iptables),
            "nftables" => Some(Mode::Nftables),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The datapath selected by `$KPROXY_MODE` (eBPF when unset); panics with a
/// clear message on any other value.
pub fn mode() -> Mode {
    match std::env::var(KPROXY_MODE_ENV) {
        Ok(v) => Mode::parse(&v).unwrap_or_else(|| {
            panic!(
                "{KPROXY_MODE_ENV}={v:?} is not a kproxy mode: use `ebpf` (default), `iptables` or `nftables`"
            )
        }),
        Err(std::env::VarError::NotPresent) => Mode::Ebpf,
        Err(e) => panic!("{KPROXY_MODE_ENV}: {e}"),
    }
}
