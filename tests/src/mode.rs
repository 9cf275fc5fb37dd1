//! Which datapath the suite runs kproxy with: `KPROXY_MODE=ebpf` (the
//! default) or `KPROXY_MODE=iptables`.
//!
//! The same tests run in both modes. Only where the datapaths legitimately
//! differ do tests look at [`mode()`]: exact round-robin (eBPF) against
//! random choice (iptables' `statistic --mode random`), and what "nothing
//! left behind" means after SIGTERM (BPF links and tc state against
//! `KUBE-` chains and rules).

use std::fmt;

/// Environment variable selecting the datapath (`ebpf` or `iptables`).
pub const KPROXY_MODE_ENV: &str = "KPROXY_MODE";

/// kproxy's `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// TC programs attached to the client-facing veths (`--iface`).
    Ebpf,
    /// kube-proxy's iptables rules in the node namespace.
    Iptables,
}

impl Mode {
    /// The value of kproxy's `--mode` (and of `KPROXY_MODE`).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
        }
    }

    /// Parses a `KPROXY_MODE` value (case-insensitive, surrounding blanks
    /// ignored; empty means the default).
    pub fn parse(value: &str) -> Option<Mode> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "ebpf" => Some(Mode::Ebpf),
            "iptables" => Some(Mode::Iptables),
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
                "{KPROXY_MODE_ENV}={v:?} is not a kproxy mode: use `ebpf` (default) or `iptables`"
            )
        }),
        Err(std::env::VarError::NotPresent) => Mode::Ebpf,
        Err(e) => panic!("{KPROXY_MODE_ENV}: {e}"),
    }
}
