//! `kproxy`: the node agent. Reads Services and EndpointSlices, programs a
//! datapath (eBPF TC programs, or iptables rules with `--mode iptables`),
//! follows changes, and detaches cleanly on SIGINT/SIGTERM.
//!
//! This file turns the command line into an [`agent::Config`] and a
//! datapath; the loop is [`agent::run`]. Stdout carries one
//! [`proxy_common::lifecycle::Event`] line per lifecycle event, for people
//! and scripts. Diagnostics go to stderr through `log`. `kproxy inspect`
//! only reads what a datapath holds: [`inspect::run`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use proxy_common::lifecycle::Event;
use proxy_common::{MAX_CONNTRACK, MAX_SERVICES, MAX_SLOTS};
use proxy_user::agent::{self, Started};
use proxy_user::datapath::Datapath;
use proxy_user::datapath::ebpf::{AttachMode, Dataplane, Following, LoadOptions};
use proxy_user::datapath::ebpf::{NodeAddrs, XdpAttach};
use proxy_user::datapath::iptables::IptablesDatapath;
use proxy_user::datapath::nftables::NftablesDatapath;
use proxy_user::inspect;
use proxy_user::links;
use proxy_user::model::{Cidr, Family, LbAlgorithm, Node};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

#[derive(Parser, Debug)]
#[command(
    name = "kproxy",
    version,
    about = "Kubernetes service dataplane in eBPF",
    // `kproxy inspect …` needs none of the agent's flags (--manifests …),
    // and takes none of them either.
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Service and EndpointSlice manifests: a YAML/JSON file or a directory of
    /// them. Followed for changes.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present_any = ["kubeconfig", "in_cluster"],
        conflicts_with_all = ["kubeconfig", "in_cluster"]
    )]
    manifests: Option<PathBuf>,
    /// Watch Services and EndpointSlices of the Kubernetes API described by
    /// this kubeconfig (kcontrol apiserver or any cluster).
    #[arg(long, value_name = "FILE", conflicts_with = "in_cluster")]
    kubeconfig: Option<PathBuf>,
    /// Watch the Kubernetes API with the pod's service account (in-cluster
    /// configuration, or $KUBECONFIG).
    #[arg(long)]
    in_cluster: bool,
    /// Name of the node this agent runs on (default: the host name):
    /// EndpointSlice endpoints with this `nodeName` are local, for
    /// `externalTrafficPolicy: Local` and for source NAT of external traffic
    /// to other nodes.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The node's zone: endpoints whose `hints.forZones` name it are
    /// preferred for Services with `trafficDistribution: PreferClose` (or
    /// `service.kubernetes.io/topology-mode: Auto`). Default: the Node's
    /// `topology.kubernetes.io/zone` label when reading the API; with
    /// manifests and no --zone, hints are ignored.
    #[arg(long)]
    zone: Option<String>,
    /// How new flows are placed on a Service's endpoints: `round-robin`
    /// (eBPF: exact, one cursor per frontend; iptables and nftables: random,
    /// as kube-proxy) or `maglev` (eBPF only: consistent hashing of the flow's
    /// 5-tuple, the same choice on every node; 128 KiB per frontend). A
    /// Service overrides it with the annotation `kproxy.io/lb-algorithm`.
    #[arg(long, value_name = "ALGORITHM", default_value = "round-robin")]
    lb_algorithm: LbAlgorithm,
    /// The address families this node proxies (comma-separated `IPv4`,
    /// `IPv6`). A Service's ClusterIPs of other families are left alone; a
    /// Service with none of these families is rejected. IPv6 ClusterIPs are
    /// translated like IPv4 ones (ip6tables in iptables mode, the `ip6`
    /// table in nftables mode); nodePorts,
    /// externalIPs and LoadBalancer addresses are IPv4 only.
    #[arg(
        long,
        value_name = "FAMILY[,FAMILY]",
        value_delimiter = ',',
        default_value = "IPv4,IPv6"
    )]
    ip_families: Vec<Family>,
    /// Interfaces where traffic from outside the node and from other nodes
    /// arrives (the uplinks; comma-separated): NodePort, externalIP and
    /// LoadBalancer traffic is translated there, and their IPv4 addresses
    /// are the node addresses unless --node-ip is given. eBPF mode attaches
    /// to them like to --iface; iptables and nftables rules cover the
    /// namespace.
    #[arg(long, value_name = "IF[,IF…]", value_delimiter = ',')]
    external_iface: Vec<String>,
    /// eBPF mode: the XDP fast path on --external-iface: source ranges and
    /// `Local` drops, and flows to other nodes' endpoints translated and sent
    /// before the stack. `native` runs in the driver (veth and most NICs),
    /// `generic` on any interface (slower), `auto` native where the driver
    /// takes it and generic elsewhere, `off` leaves it all to TC.
    #[arg(long, value_enum, default_value = "auto")]
    xdp: XdpArg,
    /// The node's addresses, on which NodePorts answer (comma-separated;
    /// default: the IPv4 addresses of --external-iface, or without it every
    /// non-loopback IPv4 address, read at start). eBPF mode only: iptables
    /// and nftables match every local address, as kube-proxy.
    #[arg(long, value_name = "IP[,IP…]", value_delimiter = ',')]
    node_ip: Vec<std::net::Ipv4Addr>,
    /// Valid nodePorts (the apiserver's --service-node-port-range): a
    /// Service with a nodePort outside it is rejected.
    #[arg(long, value_name = "LO-HI", default_value = "30000-32767", value_parser = parse_port_range)]
    node_port_range: (u16, u16),
    /// Datapath: eBPF TC programs, or kube-proxy-style iptables rules or
    /// nftables tables (for comparison).
    #[arg(long, value_enum, default_value = "ebpf")]
    mode: Mode,
    /// Interfaces that face clients (comma-separated): ingress translates
    /// ClusterIP traffic, egress restores replies. eBPF mode needs this or
    /// --iface-prefix; iptables and nftables rules apply to the whole
    /// network namespace.
    #[arg(long, value_name = "IF[,IF…]", value_delimiter = ',')]
    iface: Vec<String>,
    /// eBPF mode: also attach to every interface whose name starts with one
    /// of these prefixes, now and as they appear (rtnetlink link events) —
    /// e.g. the kubelet's pod veths (`kcv`). Vanished ones are released.
    #[arg(long, value_name = "PREFIX[,PREFIX…]", value_delimiter = ',')]
    iface_prefix: Vec<String>,
    /// iptables and nftables modes: masquerade service traffic from outside
    /// this IPv4 pod CIDR (kube-proxy's --cluster-cidr). Without it, and for
    /// IPv6 ClusterIPs, only hairpin traffic is masqueraded.
    #[arg(long, value_name = "CIDR")]
    cluster_cidr: Option<Cidr>,
    /// How to attach the TC programs: tcx links (kernel ≥ 6.6), netlink
    /// (clsact qdisc + cls_bpf), or auto (tcx where available).
    #[arg(long, value_enum, default_value = "auto")]
    attach: AttachArg,
    /// Agent log level (stderr).
    #[arg(long, default_value = "info")]
    log_level: log::LevelFilter,
    /// In-kernel aya-log level. `off` keeps logging off the hot path.
    #[arg(long, value_enum, default_value = "off")]
    bpf_log_level: BpfLogLevel,
    /// How often to check the manifests for changes, in milliseconds.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    poll_interval_ms: u64,
    /// Capacity of the frontend table (ClusterIP:port/protocol entries).
    #[arg(long, default_value_t = MAX_SERVICES, value_parser = clap::value_parser!(u32).range(1..))]
    max_services: u32,
    /// Capacity of the backend-slot table (sum of backends over frontends).
    #[arg(long, default_value_t = MAX_SLOTS, value_parser = clap::value_parser!(u32).range(1..))]
    max_backends: u32,
    /// bpffs directory for pinned maps and tcx links (mounted if needed,
    /// root-only). A restarted agent — also after `kill -9` — adopts what it
    /// finds there, so established flows keep working through the restart.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/kproxy")]
    pin_dir: PathBuf,
    /// Pin nothing: the datapath lives and dies with this process.
    #[arg(long)]
    no_pin: bool,
    /// On SIGINT/SIGTERM leave the datapath attached and pinned for the next
    /// agent (graceful restart/upgrade) instead of removing everything.
    #[arg(long)]
    keep_datapath_on_exit: bool,
    /// Address for /metrics (Prometheus), /healthz and /readyz; `off` to
    /// disable.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
    metrics_addr: String,
    /// How long a TCP flow's conntrack entries live after a FIN or RST went
    /// through (netfilter's close/time-wait; idle TCP flows live 5 days, UDP
    /// 120 s).
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    conntrack_tcp_close_seconds: u64,
    /// How often the agent sweeps expired entries out of the conntrack table
    /// (eBPF; the programs also drop an expired entry a packet meets).
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    conntrack_gc_interval_seconds: u64,
    /// Capacity of the LRU conntrack table (two entries per flow).
    #[arg(long, default_value_t = MAX_CONNTRACK, value_parser = clap::value_parser!(u32).range(2..))]
    conntrack_size: u32,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show what the datapath holds right now, read-only: `services`,
    /// `backends`, `conntrack` or `affinity` (eBPF: the pinned maps;
    /// iptables: the rules, netfilter's conntrack, the recent lists;
    /// nftables: the tables, netfilter's conntrack, the affinity sets).
    Inspect(inspect::InspectArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Ebpf,
    Iptables,
    Nftables,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum XdpArg {
    Auto,
    Native,
    Generic,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AttachArg {
    Auto,
    Tcx,
    Netlink,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BpfLogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

fn main() {
    let args = Args::parse();
    if let Some(Command::Inspect(a)) = &args.command {
        match inspect::run(a) {
            Ok(out) => print!("{out}"),
            Err(e) => {
                eprintln!("kproxy inspect: error: {e:#}");
                std::process::exit(1);
            }
        }
        return;
    }
    env_logger::Builder::new()
        .filter_level(args.log_level)
        .format_target(false)
        .init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(agent::run(config(&args), || start(&args))) {
        eprintln!("kproxy: error: {e:#}");
        std::process::exit(1);
    }
}

fn config(args: &Args) -> agent::Config {
    agent::Config {
        objects: match &args.manifests {
            Some(path) => agent::Objects::Manifests(path.clone()),
            None => agent::Objects::Api {
                kubeconfig: args.kubeconfig.clone(),
            },
        },
        node: Node {
            name: node_name(args),
            node_port_range: args.node_port_range,
            zone: args.zone.clone().filter(|z| !z.is_empty()),
            lb_algorithm: args.lb_algorithm,
            families: args.ip_families.iter().copied().collect(),
        },
        poll_interval: Duration::from_millis(args.poll_interval_ms),
        gc_interval: Duration::from_secs(args.conntrack_gc_interval_seconds),
        metrics_addr: (args.metrics_addr != "off").then(|| args.metrics_addr.clone()),
        leave_pinned_under: (args.keep_datapath_on_exit && args.mode == Mode::Ebpf && !args.no_pin)
            .then(|| args.pin_dir.clone()),
    }
}

/// Builds the datapath `--mode` names, once the sources have been read.
fn start(args: &Args) -> Result<Started> {
    if args.mode == Mode::Ebpf
        && args
            .iface
            .iter()
            .chain(&args.iface_prefix)
            .chain(&args.external_iface)
            .all(|i| i.is_empty())
    {
        bail!(
            "eBPF mode needs --iface IF[,IF…], --external-iface IF[,IF…] or --iface-prefix PREFIX"
        );
    }
    // Subscribed before the first listing, so no interface slips between.
    let links = if args.mode == Mode::Ebpf && !args.iface_prefix.is_empty() {
        let w = links::LinkWatcher::new().context("subscribing to rtnetlink link events")?;
        // SAFETY: the watcher owns its fd and lives inside the AsyncFd.
        Some(unsafe { AsyncFd::register_with_interest(w, Interest::READABLE) }?)
    } else {
        None
    };
    let datapath: Box<dyn Datapath> = match args.mode {
        Mode::Ebpf => Box::new(start_ebpf(args)?),
        Mode::Iptables | Mode::Nftables => {
            let mode = match args.mode {
                Mode::Nftables => "nftables",
                _ => "iptables",
            };
            if args.lb_algorithm == LbAlgorithm::Maglev {
                bail!(
                    "--lb-algorithm maglev needs --mode ebpf ({mode} picks endpoints at random, \
                     as kube-proxy)"
                );
            }
            if !args.iface.is_empty() || !args.external_iface.is_empty() {
                log::info!(
                    "{mode} mode: --iface and --external-iface are ignored (rules cover the namespace)"
                );
            }
            let families = args.ip_families.iter().copied().collect();
            if args.mode == Mode::Nftables {
                Box::new(NftablesDatapath::new(args.cluster_cidr, &families)?)
            } else {
                Box::new(IptablesDatapath::new(args.cluster_cidr, &families)?)
            }
        }
    };
    Ok(Started { datapath, links })
}

fn attach_mode(args: &Args) -> AttachMode {
    match args.attach {
        AttachArg::Auto => AttachMode::auto(),
        AttachArg::Tcx => AttachMode::Tcx,
        AttachArg::Netlink => AttachMode::Netlink,
    }
}

/// Loads the eBPF object and attaches it to every `--iface` and every
/// interface `--iface-prefix` matches.
fn start_ebpf(args: &Args) -> Result<Dataplane> {
    let opts = LoadOptions {
        max_services: args.max_services,
        max_slots: args.max_backends,
        conntrack_size: args.conntrack_size,
        bpf_log_level: args.bpf_log_level as u8,
        pin_dir: (!args.no_pin).then(|| args.pin_dir.clone()),
        ct_tcp_close_ns: args.conntrack_tcp_close_seconds * 1_000_000_000,
    };
    let mut dp = Dataplane::load(&opts)?;
    dp.keep_on_exit(args.keep_datapath_on_exit);
    if !matches!(args.bpf_log_level, BpfLogLevel::Off) {
        dp.spawn_logger()?;
    }
    let addrs = node_addrs(args)?;
    if addrs.node_ips.is_empty() {
        log::info!("no node addresses: NodePorts are not served");
    } else {
        log::info!(
            "node addresses: {}",
            addrs
                .node_ips
                .iter()
                .map(|ip| ip.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    dp.set_node_addrs(&addrs)?;
    let mode = attach_mode(args);
    for name in dp.prune_stale_link_pins() {
        log::info!("removed pinned link {name}: its interface is gone");
    }
    for iface in distinct(args.iface.iter().chain(&args.external_iface)) {
        // On error `dp` drops and detaches what was attached so far.
        dp.attach(iface, mode)?;
        println!(
            "{}",
            Event::Attached {
                iface: iface.clone(),
                mode: mode.to_string()
            }
        );
    }
    let xdp = match args.xdp {
        XdpArg::Auto | XdpArg::Native => Some(XdpAttach::Native),
        XdpArg::Generic => Some(XdpAttach::Generic),
        XdpArg::Off => None,
    };
    if let Some(xdp) = xdp {
        for iface in distinct(args.external_iface.iter()) {
            let mode = match dp.attach_xdp(iface, xdp) {
                Ok(()) => xdp,
                Err(e) if args.xdp == XdpArg::Auto => {
                    log::warn!("{iface}: native XDP refused ({e:#}); attaching generic XDP");
                    dp.attach_xdp(iface, XdpAttach::Generic)?;
                    XdpAttach::Generic
                }
                Err(e) => return Err(e),
            };
            println!(
                "{}",
                Event::Attached {
                    iface: iface.clone(),
                    mode: mode.to_string()
                }
            );
        }
    }
    if !args.iface_prefix.is_empty() {
        let following = Following {
            prefixes: args.iface_prefix.clone(),
            mode,
        };
        for ev in dp.follow(following) {
            println!("{ev}");
        }
    }
    Ok(dp)
}

/// The interface names of comma-separated flag values, each once, empty
/// ones (`--iface ''`) left out.
fn distinct<'a>(names: impl Iterator<Item = &'a String>) -> Vec<&'a String> {
    let mut out: Vec<&String> = Vec::new();
    for name in names {
        if !name.is_empty() && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// `--node-port-range`: `LO-HI`, both valid ports, LO ≤ HI.
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not a range LO-HI"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{p:?} is not a port 1-65535"))
    };
    let (lo, hi) = (port(lo)?, port(hi)?);
    if lo > hi {
        return Err(format!("{s:?}: {lo} is above {hi}"));
    }
    if hi >= proxy_common::SNAT_PORT_MIN {
        return Err(format!(
            "{s:?} reaches into the source-NAT port range {}-{}: nodePorts must stay below {}",
            proxy_common::SNAT_PORT_MIN,
            proxy_common::SNAT_PORT_MAX,
            proxy_common::SNAT_PORT_MIN
        ));
    }
    Ok((lo, hi))
}

/// `--node-name`, else the host name (as kube-proxy's default).
fn node_name(args: &Args) -> String {
    if let Some(name) = args.node_name.as_ref().filter(|n| !n.is_empty()) {
        return name.clone();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// The node addresses: `--node-ip`, else every IPv4 address of the
/// external interfaces, else (neither given) every non-loopback IPv4 address
/// of the namespace, as kube-proxy serves nodePorts on all local addresses
/// by default; each external interface's first address for the source NAT
/// of flows leaving through it.
fn node_addrs(args: &Args) -> Result<NodeAddrs> {
    let mut addrs = NodeAddrs::default();
    if args.external_iface.iter().all(|i| i.is_empty()) && args.node_ip.is_empty() {
        addrs.node_ips = links::all_ipv4_addrs()
            .context("listing the node's addresses")?
            .into_iter()
            .map(|(_, ip)| ip)
            .filter(|ip| !ip.is_loopback())
            .collect();
        addrs.node_ips.dedup();
        addrs.default_snat = addrs.node_ips.first().copied();
        return Ok(addrs);
    }
    for iface in distinct(args.external_iface.iter()) {
        let (index, ips) = links::ipv4_addrs(iface)
            .with_context(|| format!("--external-iface {iface}: reading its addresses"))?;
        if let Some(first) = ips.first() {
            addrs.snat.push((index, *first));
        }
        if args.node_ip.is_empty() {
            addrs.node_ips.extend(ips);
        }
    }
    addrs.node_ips.extend(&args.node_ip);
    addrs.node_ips.dedup();
    addrs.default_snat = args
        .node_ip
        .first()
        .or(addrs.snat.first().map(|(_, ip)| ip))
        .copied();
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspect_needs_none_of_the_agents_flags_and_the_agent_is_unchanged() {
        let agent = Args::try_parse_from(["kproxy", "--manifests", "m", "--iface", "c0"]).unwrap();
        assert!(agent.command.is_none());
        assert_eq!(agent.iface, ["c0"]);
        let agent =
            Args::try_parse_from(["kproxy", "--mode", "iptables", "--manifests", "m"]).unwrap();
        assert!(agent.command.is_none() && agent.mode == Mode::Iptables);
        let agent =
            Args::try_parse_from(["kproxy", "--mode", "nftables", "--manifests", "m"]).unwrap();
        assert!(agent.command.is_none() && agent.mode == Mode::Nftables);
        // Maglev is the eBPF datapath's: both netfilter modes refuse it at
        // start, before touching the kernel.
        for mode in ["iptables", "nftables"] {
            let args = Args::try_parse_from([
                "kproxy",
                "--mode",
                mode,
                "--lb-algorithm",
                "maglev",
                "--manifests",
                "m",
            ])
            .unwrap();
            let err = start(&args).err().expect("maglev refused");
            assert!(
                err.to_string()
                    .contains(&format!("maglev needs --mode ebpf ({mode} picks")),
                "{err}"
            );
        }
        // The agent still needs a source.
        assert!(Args::try_parse_from(["kproxy", "--iface", "c0"]).is_err());
        let Some(Command::Inspect(i)) = Args::try_parse_from([
            "kproxy",
            "inspect",
            "conntrack",
            "--mode",
            "iptables",
            "-o",
            "json",
        ])
        .unwrap()
        .command
        else {
            panic!("no inspect command");
        };
        assert_eq!(i.subject, "conntrack");
        assert_eq!(i.mode, inspect::InspectMode::Iptables);
        assert_eq!(i.output, inspect::Format::Json);
        assert_eq!(i.pin_dir, PathBuf::from("/sys/fs/bpf/kproxy"));
        // Agent flags and the subcommand do not mix.
        assert!(
            Args::try_parse_from(["kproxy", "--manifests", "m", "inspect", "services"]).is_err()
        );
    }
}
