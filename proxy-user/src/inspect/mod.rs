//! `kproxy inspect SUBJECT`: what the datapath holds right now, read
//! without changing anything (the counterpart of `cilium-dbg service list`
//! and `cilium-dbg bpf ct list global`).
//!
//! - eBPF ([`ebpf`]): the maps the agent pinned under `<pin-dir>/<layout
//!   tag>/`, opened from their pins (no program is loaded), refused when the
//!   tag's layout is not this binary's.
//! - iptables ([`iptables`]): the live rulesets (`iptables-save`,
//!   `ip6tables-save`) turned back into frontends and endpoints, netfilter's
//!   conntrack table (`conntrack -L`, both families) and the `recent` lists
//!   of session affinity (`/proc/net/xt_recent/KUBE-SEP-*`).
//! - nftables ([`nftables`]): the live `kube-proxy` tables (`nft -j list
//!   table`, `ip` and `ip6`) turned back into the same frontends and
//!   endpoints, the same conntrack reading, and the affinity sets.
//!
//! IPv6 frontends, backends, flows and bindings are rows like IPv4 ones:
//! address columns as std prints addresses, `ip:port` columns as it prints
//! socket addresses (`[fd00::1]:8080`).
//!
//! All produce the same [`Report`]s, printed as an aligned table
//! ([`table`]) or as JSON with stable field names.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Result, bail};
use serde::Serialize;

use crate::model::{BackendAddr, Frontend};

pub mod ebpf;
pub mod iptables;
pub mod nftables;
mod table;

/// `kproxy inspect`'s command line.
#[derive(clap::Args, Debug, Clone)]
pub struct InspectArgs {
    /// What to show: `services` (one row per frontend), `backends` (each
    /// frontend's backends in slot order), `conntrack` (the flows) or
    /// `affinity` (session-affinity bindings of clients to backends).
    #[arg(value_name = "SUBJECT")]
    pub subject: String,
    /// The datapath to read: `ebpf` reads the maps pinned under --pin-dir;
    /// `iptables` reads this network namespace's rules (`iptables-save`,
    /// `ip6tables-save`), netfilter's conntrack table (`conntrack -L`) and
    /// the `recent` lists (/proc/net/xt_recent); `nftables` reads its
    /// `kube-proxy` tables (`nft -j`), the conntrack table and the affinity
    /// sets.
    #[arg(long, value_enum, default_value = "ebpf")]
    pub mode: InspectMode,
    /// eBPF mode: the agent's --pin-dir; the maps are read from
    /// `<DIR>/<layout tag>/`.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/kproxy")]
    pub pin_dir: PathBuf,
    /// Output format: an aligned table, or a JSON document.
    #[arg(
        short = 'o',
        long,
        value_name = "FORMAT",
        value_enum,
        default_value = "table"
    )]
    pub output: Format,
    /// conntrack and affinity: show at most N entries (the total is still
    /// reported).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InspectMode {
    Ebpf,
    Iptables,
    Nftables,
}

impl InspectMode {
    fn as_str(self) -> &'static str {
        match self {
            InspectMode::Ebpf => "ebpf",
            InspectMode::Iptables => "iptables",
            InspectMode::Nftables => "nftables",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// What `kproxy inspect` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    Services,
    Backends,
    Conntrack,
    Affinity,
}

impl std::str::FromStr for Subject {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Subject> {
        Ok(match s {
            "services" => Subject::Services,
            "backends" => Subject::Backends,
            "conntrack" => Subject::Conntrack,
            "affinity" => Subject::Affinity,
            other => {
                bail!("unknown subject {other:?}: use services, backends, conntrack or affinity")
            }
        })
    }
}

/// Runs `kproxy inspect` and returns what it prints (one error line is the
/// caller's to print; exit code 1).
pub fn run(args: &InspectArgs) -> Result<String> {
    let subject: Subject = args.subject.parse()?;
    let mut report = match args.mode {
        InspectMode::Ebpf => ebpf::read(subject, &args.pin_dir)?,
        InspectMode::Iptables => iptables::read(subject)?,
        InspectMode::Nftables => nftables::read(subject)?,
    };
    report.limit(args.limit);
    Ok(match args.output {
        Format::Json => serde_json::to_string_pretty(&report)? + "\n",
        Format::Table => report.table(),
    })
}

/// One subject as read from one datapath.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `services`, `backends`, `conntrack` or `affinity`.
    pub subject: &'static str,
    /// `ebpf` or `iptables`.
    pub mode: &'static str,
    /// What was read: the pinned layout directory, or the commands and files.
    pub source: String,
    /// How many entries the datapath holds (before `--limit`).
    pub total: usize,
    #[serde(flatten)]
    pub rows: Rows,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rows {
    Services(Vec<ServiceRow>),
    Frontends(Vec<BackendsRow>),
    Entries(Vec<ConntrackRow>),
    Bindings(Vec<AffinityRow>),
}

impl Report {
    fn new(subject: Subject, mode: InspectMode, source: String, rows: Rows) -> Report {
        let total = match &rows {
            Rows::Services(r) => r.len(),
            Rows::Frontends(r) => r.len(),
            Rows::Entries(r) => r.len(),
            Rows::Bindings(r) => r.len(),
        };
        Report {
            subject: match subject {
                Subject::Services => "services",
                Subject::Backends => "backends",
                Subject::Conntrack => "conntrack",
                Subject::Affinity => "affinity",
            },
            mode: mode.as_str(),
            source,
            total,
            rows,
        }
    }

    /// Keeps the first `n` conntrack entries or bindings.
    fn limit(&mut self, n: Option<usize>) {
        let Some(n) = n else { return };
        match &mut self.rows {
            Rows::Entries(r) => r.truncate(n),
            Rows::Bindings(r) => r.truncate(n),
            Rows::Services(_) | Rows::Frontends(_) => {}
        }
    }

    fn shown(&self) -> usize {
        match &self.rows {
            Rows::Services(r) => r.len(),
            Rows::Frontends(r) => r.len(),
            Rows::Entries(r) => r.len(),
            Rows::Bindings(r) => r.len(),
        }
    }

    /// The aligned table.
    pub fn table(&self) -> String {
        let mut out = format!("# {} ({} mode): {}\n", self.subject, self.mode, self.source);
        match &self.rows {
            Rows::Services(rows) => table::services(&mut out, rows),
            Rows::Frontends(rows) => table::backends(&mut out, rows),
            Rows::Entries(rows) => table::conntrack(&mut out, rows),
            Rows::Bindings(rows) => table::affinity(&mut out, rows),
        }
        if self.shown() < self.total {
            let _ = writeln!(out, "({} of {} shown: --limit)", self.shown(), self.total);
        }
        out
    }
}

/// A frontend as every row names it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FrontendId {
    /// `10.96.0.10:80/TCP`, or `nodePort 30080/TCP` (address 0.0.0.0: every
    /// node address), as kproxy's log lines name frontends.
    pub frontend: String,
    pub address: String,
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: String,
    pub node_port: bool,
}

impl From<&Frontend> for FrontendId {
    fn from(fe: &Frontend) -> FrontendId {
        FrontendId {
            frontend: fe.to_string(),
            address: fe.ip.to_string(),
            port: fe.port,
            protocol: fe.proto.to_string(),
            node_port: fe.is_nodeport(),
        }
    }
}

/// `services`: one frontend.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceRow {
    #[serde(flatten)]
    pub id: FrontendId,
    /// eBPF: the node addresses a nodePort is also keyed under (the same
    /// entry: one id, one cursor, one set of slots).
    pub node_addresses: Vec<String>,
    /// eBPF: the service id (index of its cursor, counters and slots).
    pub service_id: Option<u32>,
    /// iptables: the service port name from the rule's comment.
    pub name: Option<String>,
    /// Backends in rotation (eBPF: `SvcValue::count`).
    pub backends: usize,
    /// `external` (nodePort, externalIP, LoadBalancer), `drop-empty`
    /// (`externalTrafficPolicy: Local`: without backends, drop instead of
    /// refusing), `source-ranges` (`loadBalancerSourceRanges`), `maglev`
    /// (new flows placed by the Maglev table).
    pub flags: Vec<&'static str>,
    /// `Cluster` or `Local` for an external frontend.
    pub traffic_policy: Option<&'static str>,
    /// The admitted client networks when `source-ranges` is set.
    pub source_ranges: Vec<String>,
    /// `sessionAffinity: ClientIP` timeout; 0: no affinity.
    pub affinity_seconds: u32,
}

/// `backends`: one frontend and its backends in slot order.
#[derive(Debug, Clone, Serialize)]
pub struct BackendsRow {
    #[serde(flatten)]
    pub id: FrontendId,
    pub service_id: Option<u32>,
    pub name: Option<String>,
    /// eBPF: the frontend's round-robin cursor (`RR_CURSOR`): new flows so
    /// far since the id was assigned; the next takes slot `cursor % count`.
    pub rr_cursor: Option<u64>,
    pub backends: Vec<SlotRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SlotRow {
    /// Position in the rotation (eBPF: the `SLOTS` index; iptables: the
    /// order of the jumps).
    pub slot: u32,
    /// `ip:port`.
    pub endpoint: String,
    pub address: String,
    pub port: u16,
    /// eBPF: flows to it are source-NATed to the node (`BACKEND_F_SNAT`).
    pub snat: Option<bool>,
    /// iptables: its `KUBE-SEP-` chain.
    pub chain: Option<String>,
    /// iptables: the `statistic` probability of its jump (none: the last,
    /// unconditional one).
    pub probability: Option<f64>,
}

impl SlotRow {
    fn new(slot: u32, b: &BackendAddr) -> SlotRow {
        SlotRow {
            slot,
            endpoint: b.to_string(),
            address: b.ip.to_string(),
            port: b.port,
            snat: None,
            chain: None,
            probability: None,
        }
    }
}

/// `conntrack`: one entry.
#[derive(Debug, Clone, Serialize)]
pub struct ConntrackRow {
    /// eBPF: `forward` (keyed client → frontend) or `reply` (keyed backend
    /// → client); iptables: `original` (netfilter's entry, shown by its
    /// original direction).
    pub direction: &'static str,
    pub protocol: String,
    /// The tuple the entry is keyed by, `ip:port`.
    pub source: String,
    pub destination: String,
    /// forward/original: the backend the flow goes to; reply: the frontend
    /// restored as the reply's source.
    pub translated: String,
    /// The frontend the flow belongs to (eBPF: by service id).
    pub frontend: Option<String>,
    pub service_id: Option<u32>,
    /// Source NAT. forward/original: the address and port the flow leaves
    /// with; reply: the client restored as the reply's destination.
    pub nat: Option<String>,
    /// eBPF: time since the last packet (CLOCK_MONOTONIC_COARSE, which
    /// `bpf_ktime_get_coarse_ns` reads).
    pub age_ms: Option<u64>,
    /// eBPF: a FIN or RST went through (the short timeout applies).
    pub closing: Option<bool>,
    /// iptables: netfilter's TCP state and flags (`ESTABLISHED`, `ASSURED`, …);
    /// eBPF: `unreplied` until the flow's first reply.
    pub state: Option<String>,
    /// iptables: seconds left before netfilter expires the entry.
    pub timeout_seconds: Option<u64>,
}

/// `affinity`: one client bound to a backend of a frontend.
#[derive(Debug, Clone, Serialize)]
pub struct AffinityRow {
    pub client: String,
    pub service_id: Option<u32>,
    /// The frontend, when the id (eBPF) or the endpoint chain (iptables)
    /// still names one.
    pub frontend: Option<String>,
    pub name: Option<String>,
    /// `ip:port`.
    pub backend: String,
    /// Time since the client's last new flow to the frontend (iptables:
    /// from the `recent` list's jiffies; none when the clock cannot be read).
    pub age_ms: Option<u64>,
    /// The frontend's affinity timeout.
    pub timeout_seconds: Option<u32>,
    /// Older than the timeout: the next flow is balanced anew.
    pub expired: Option<bool>,
    /// iptables: the `recent` list (the endpoint's `KUBE-SEP-` chain).
    pub chain: Option<String>,
}

/// `SvcValue::flags`-style names and the traffic policy of a frontend.
fn flags(
    external: bool,
    drop_empty: bool,
    source_ranges: bool,
) -> (Vec<&'static str>, Option<&'static str>) {
    let mut f = Vec::new();
    if external {
        f.push("external");
    }
    if drop_empty {
        f.push("drop-empty");
    }
    if source_ranges {
        f.push("source-ranges");
    }
    let policy = external.then_some(if drop_empty { "Local" } else { "Cluster" });
    (f, policy)
}

/// The expiry of a binding `age_ms` old under a `timeout` in seconds.
fn expired(age_ms: Option<u64>, timeout: Option<u32>) -> Option<bool> {
    Some(age_ms? > u64::from(timeout?) * 1000)
}
