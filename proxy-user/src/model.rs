//! The desired state: which frontends exist and which ready backends each
//! has. Built from Kubernetes `Service` and `discovery.k8s.io/v1`
//! `EndpointSlice` objects, whatever their source (manifest files or the
//! API, through the index); the reconciler diffs two of these and the
//! datapath applies the difference.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Annotation that turns topology-aware hints on (`Auto`), the older
/// spelling of `trafficDistribution: PreferClose`.
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => proxy_common::IPPROTO_TCP,
            Proto::Udp => proxy_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// A service frontend: ClusterIP (IPv4 or IPv6), externalIP or
/// LoadBalancer address, port, protocol. A NodePort is the frontend with
/// address `0.0.0.0` ([`Frontend::nodeport`]): every node address on that
/// port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl Frontend {
    /// The NodePort frontend of `port`.
    pub fn nodeport(port: u16, proto: Proto) -> Frontend {
        Frontend {
            ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port,
            proto,
        }
    }

    pub fn is_nodeport(&self) -> bool {
        self.ip == IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }

    pub fn family(&self) -> Family {
        Family::of(self.ip)
    }
}

/// An address family (`spec.ipFamilies`, an EndpointSlice's `addressType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv6() { Family::V6 } else { Family::V4 }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

impl std::str::FromStr for Family {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "IPv4" => Ok(Family::V4),
            "IPv6" => Ok(Family::V6),
            other => Err(format!("{other:?} is not one of IPv4, IPv6")),
        }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_nodeport() {
            write!(f, "nodePort {}/{}", self.port, self.proto)
        } else {
            write!(
                f,
                "{}/{}",
                std::net::SocketAddr::new(self.ip, self.port),
                self.proto
            )
        }
    }
}

/// A backend endpoint: pod IP (of the frontend's family) and target port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
    /// Flows to it are source-NATed to the node: external traffic under
    /// `externalTrafficPolicy: Cluster` to an endpoint on another node, so
    /// its replies come back through this node. Always false for a
    /// ClusterIP.
    pub snat: bool,
}

impl BackendAddr {
    pub fn new(ip: impl Into<IpAddr>, port: u16) -> BackendAddr {
        BackendAddr {
            ip: ip.into(),
            port,
            snat: false,
        }
    }
}

/// An IPv4 CIDR (`--cluster-cidr`, `loadBalancerSourceRanges`), with the
/// host bits of `addr` cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (a.b.c.d/n)"))?;
        let addr = a
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let prefix = p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{p:?} is not a prefix length 0-32"))?;
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        };
        Ok(Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `externalTrafficPolicy` of an external frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TrafficPolicy {
    /// Any ready endpoint; those on other nodes through source NAT.
    Cluster,
    /// Only this node's endpoints, the client's address preserved; none →
    /// dropped.
    Local,
}

/// What this node is, as far as the model cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The node's name (`--node-name`): EndpointSlice endpoints with this
    /// `nodeName` are local.
    pub name: String,
    /// Valid nodePorts (`--node-port-range`, the apiserver's
    /// `--service-node-port-range`).
    pub node_port_range: (u16, u16),
    /// The node's `topology.kubernetes.io/zone` (`--zone`): endpoints
    /// hinted for this zone are preferred (`trafficDistribution:
    /// PreferClose`, topology-aware hints). `None`: hints are ignored.
    pub zone: Option<String>,
    /// How new flows are placed unless a Service's
    /// [`LB_ALGORITHM_ANNOTATION`] says otherwise (`--lb-algorithm`).
    pub lb_algorithm: LbAlgorithm,
    /// The address families this node proxies (`--ip-families`): a
    /// Service's ClusterIPs of other families are left alone, and one with
    /// none of these is an error.
    pub families: BTreeSet<Family>,
}

/// How a frontend places new flows on its backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LbAlgorithm {
    /// Exact round-robin (eBPF) / random (iptables, as kube-proxy).
    #[default]
    RoundRobin,
    /// Maglev consistent hashing of the flow's 5-tuple (eBPF only).
    Maglev,
}

impl std::str::FromStr for LbAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" => Ok(LbAlgorithm::RoundRobin),
            "maglev" => Ok(LbAlgorithm::Maglev),
            other => Err(format!("{other:?} is not one of round-robin, maglev")),
        }
    }
}

/// Per-Service override of `--lb-algorithm` (`round-robin` or `maglev`).
pub const LB_ALGORITHM_ANNOTATION: &str = "kproxy.io/lb-algorithm";

/// The apiserver's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: (u16, u16) = (30000, 32767);

impl Node {
    /// A nodePort or healthCheckNodePort field: a port in the node port
    /// range, or the message naming `what`.
    fn node_port(&self, v: i32, what: &str) -> Result<u16, String> {
        let p = port_u16(v, what)?;
        let (lo, hi) = self.node_port_range;
        if !(lo..=hi).contains(&p) {
            return Err(format!(
                "{what} {p} is outside the node port range {lo}-{hi}"
            ));
        }
        Ok(p)
    }
}

impl Default for Node {
    fn default() -> Node {
        Node {
            name: String::new(),
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            zone: None,
            lb_algorithm: LbAlgorithm::RoundRobin,
            families: [Family::V4, Family::V6].into(),
        }
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::net::SocketAddr::new(self.ip, self.port))
    }
}

/// How a frontend treats its traffic beyond the choice of backends. A
/// change of any of it replaces the frontend (its flows were admitted under
/// the old rule).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// `None` for a ClusterIP; the traffic policy of a NodePort, externalIP
    /// or LoadBalancer frontend.
    pub external: Option<TrafficPolicy>,
    /// `loadBalancerSourceRanges` of a LoadBalancer address: only clients
    /// in these reach it. Empty: everyone.
    pub source_ranges: Vec<Cidr>,
    /// `sessionAffinity: ClientIP`: its timeout in seconds
    /// (`sessionAffinityConfig.clientIP.timeoutSeconds`, default 10800).
    pub affinity: Option<u32>,
    /// How new flows are placed.
    pub lb: LbAlgorithm,
}

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;
/// Largest valid `timeoutSeconds` (one day, as the apiserver validates).
pub const MAX_AFFINITY_SECONDS: u32 = 86_400;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    /// `namespace/name:port-name`, for messages and counters.
    pub name: String,
    /// Ready backends. Empty means "reject".
    pub backends: BTreeSet<BackendAddr>,
    /// Terminating endpoints that are still serving (not ready, `serving`
    /// and `terminating` true): they get no new flows, but the flows they
    /// already have keep going to them until they leave the slice — a pod
    /// finishing its requests during its grace period (kubernetes#85643).
    pub draining: BTreeSet<BackendAddr>,
    pub policy: Policy,
}

impl DesiredService {
    /// A ClusterIP service with `backends` and nothing draining.
    pub fn new(name: impl Into<String>, backends: BTreeSet<BackendAddr>) -> DesiredService {
        DesiredService {
            name: name.into(),
            backends,
            draining: BTreeSet::new(),
            policy: Policy::default(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<Frontend, DesiredService>,
    /// `healthCheckNodePort` → what it answers. Served by the agent (not a
    /// datapath), so no [`Change`](crate::reconcile::Change) carries it.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// What a `healthCheckNodePort` answers for its Service (`Local` policy
/// LoadBalancer): 200 with the count of this node's ready endpoints, 503
/// when there are none — the contract cloud load balancers probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

impl DesiredState {
    pub fn backend_count(&self) -> usize {
        self.services.values().map(|s| s.backends.len()).sum()
    }
}

/// An object that could not be turned into desired state, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectError {
    /// `Service default/web`, `EndpointSlice default/web-abc`.
    pub object: String,
    pub message: String,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

impl std::error::Error for ObjectError {}

fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn parse_proto(p: Option<&str>) -> Result<Option<Proto>, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Some(Proto::Tcp)),
        "UDP" => Ok(Some(Proto::Udp)),
        // SCTP is a valid Kubernetes protocol the datapath does not handle.
        "SCTP" => Ok(None),
        other => Err(format!("protocol {other:?} is not one of TCP, UDP, SCTP")),
    }
}

fn port_u16(v: i32, what: &str) -> Result<u16, String> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what} {v} is out of range 1-65535"))
}

/// One Service port after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvcPort {
    pub name: String,
    pub port: u16,
    pub proto: Proto,
    /// NodePort and LoadBalancer services.
    pub node_port: Option<u16>,
}

/// Validated view of a Service: namespace, name, ClusterIPs (none for
/// headless or ExternalName services, which we do not program), ports and
/// the addresses it is reached by from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvcView {
    pub ns: String,
    pub name: String,
    /// `spec.clusterIPs` (or `spec.clusterIP`) of the families this node
    /// proxies, primary first: one per family.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<SvcPort>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip` of a LoadBalancer service.
    pub lb_ips: Vec<Ipv4Addr>,
    /// `spec.externalTrafficPolicy`.
    pub policy: TrafficPolicy,
    /// `spec.healthCheckNodePort` of a LoadBalancer with `Local` policy.
    pub health_check_node_port: Option<u16>,
    /// `spec.loadBalancerSourceRanges` of a LoadBalancer (IPv4 ones).
    pub source_ranges: Vec<Cidr>,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity: Option<u32>,
    /// `spec.internalTrafficPolicy: Local`: in-cluster traffic only to
    /// this node's endpoints.
    pub internal_local: bool,
    /// `trafficDistribution: PreferClose` (or the
    /// `service.kubernetes.io/topology-mode: Auto` annotation): endpoints
    /// hinted for this node's zone are preferred.
    pub prefer_close: bool,
    /// [`LB_ALGORITHM_ANNOTATION`], if set.
    pub lb: Option<LbAlgorithm>,
}

/// Parses a list of IPv4 addresses, naming the field of the bad one. IPv6
/// entries are skipped (this datapath is IPv4-only).
fn ipv4_list<'a>(
    items: impl Iterator<Item = &'a str>,
    field: &str,
) -> Result<Vec<Ipv4Addr>, String> {
    let mut out = Vec::new();
    for (i, a) in items.enumerate() {
        match a.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => out.push(ip),
            Ok(std::net::IpAddr::V6(_)) => {}
            Err(_) => return Err(format!("{field}[{i}] {a:?} is not an IP address")),
        }
    }
    Ok(out)
}

/// A Service's ClusterIPs, validated as the apiserver would
/// (`spec.clusterIPs` starts with `spec.clusterIP`, one address per
/// family, `spec.ipFamilies` naming their families in order,
/// `ipFamilyPolicy: SingleStack` with one), then narrowed to the families
/// `node` proxies. Headless (`None`) and unset: none. A Service none of
/// whose families this node proxies is an error (a dual-stack one keeps
/// the family it can serve, as kube-proxy's per-family proxiers do).
fn cluster_ips(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    node: &Node,
) -> Result<Vec<IpAddr>, String> {
    let listed: Vec<&str> = match (&spec.cluster_ips, spec.cluster_ip.as_deref()) {
        (Some(ips), first) if !ips.is_empty() => {
            if let Some(first) = first.filter(|f| !f.is_empty())
                && first != ips[0]
            {
                return Err(format!(
                    "spec.clusterIPs[0] {:?} must equal spec.clusterIP {first:?}",
                    ips[0]
                ));
            }
            ips.iter().map(String::as_str).collect()
        }
        (_, None | Some("")) => return Ok(Vec::new()),
        (_, Some(ip)) => vec![ip],
    };
    if listed[0] == "None" {
        return Ok(Vec::new());
    }
    if listed.len() > 2 {
        return Err(format!(
            "spec.clusterIPs has {} addresses; at most 2 (one per family)",
            listed.len()
        ));
    }
    let mut ips = Vec::new();
    for (i, a) in listed.iter().enumerate() {
        let ip = a
            .parse::<IpAddr>()
            .map_err(|_| format!("spec.clusterIPs[{i}] {a:?} is not an IP address"))?;
        if ips
            .iter()
            .any(|o: &IpAddr| Family::of(*o) == Family::of(ip))
        {
            return Err(format!(
                "spec.clusterIPs[{i}] {a:?}: a second {} address (one per family)",
                Family::of(ip)
            ));
        }
        ips.push(ip);
    }
    for (i, f) in spec.ip_families.iter().flatten().enumerate() {
        let f = f
            .parse::<Family>()
            .map_err(|m| format!("spec.ipFamilies[{i}]: {m}"))?;
        if let Some(ip) = ips.get(i)
            && Family::of(*ip) != f
        {
            return Err(format!(
                "spec.ipFamilies[{i}] {f} does not match spec.clusterIPs[{i}] {ip}"
            ));
        }
    }
    match spec.ip_family_policy.as_deref() {
        None | Some("PreferDualStack" | "RequireDualStack") => {}
        Some("SingleStack") if ips.len() > 1 => {
            return Err("spec.ipFamilyPolicy SingleStack with two spec.clusterIPs".into());
        }
        Some("SingleStack") => {}
        Some(other) => {
            return Err(format!(
                "spec.ipFamilyPolicy {other:?} is not one of SingleStack, PreferDualStack, RequireDualStack"
            ));
        }
    }
    let served: Vec<IpAddr> = ips
        .iter()
        .copied()
        .filter(|ip| node.families.contains(&Family::of(*ip)))
        .collect();
    if served.is_empty() {
        let f = Family::of(ips[0]);
        return Err(format!(
            "spec.clusterIPs: {f} is not proxied on this node (--ip-families)"
        ));
    }
    Ok(served)
}

pub fn view_service(svc: &Service, node: &Node) -> Result<SvcView, ObjectError> {
    let (ns, name) = ns_name(&svc.metadata);
    let err = |message: String| ObjectError {
        object: format!("Service {ns}/{name}"),
        message,
    };
    if name.is_empty() {
        return Err(err("metadata.name is missing".into()));
    }
    let spec = svc
        .spec
        .as_ref()
        .ok_or_else(|| err("spec is missing".into()))?;
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if type_ == "ExternalName" {
        return Ok(SvcView {
            ns,
            name,
            cluster_ips: vec![],
            ports: vec![],
            external_ips: vec![],
            lb_ips: vec![],
            policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
            source_ranges: vec![],
            affinity: None,
            internal_local: false,
            prefer_close: false,
            lb: None,
        });
    }
    let has_node_ports = match type_ {
        "ClusterIP" => false,
        "NodePort" | "LoadBalancer" => true,
        other => {
            return Err(err(format!(
                "spec.type {other:?} is not one of ClusterIP, NodePort, LoadBalancer, ExternalName"
            )));
        }
    };
    let policy = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => TrafficPolicy::Cluster,
        Some("Local") => TrafficPolicy::Local,
        Some(other) => {
            return Err(err(format!(
                "spec.externalTrafficPolicy {other:?} is not one of Cluster, Local"
            )));
        }
    };
    let external_ips = ipv4_list(
        spec.external_ips.iter().flatten().map(String::as_str),
        "spec.externalIPs",
    )
    .map_err(err)?;
    let lb_ips = if type_ == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        ipv4_list(
            ingress
                .into_iter()
                .flatten()
                .filter_map(|i| i.ip.as_deref()),
            "status.loadBalancer.ingress[].ip",
        )
        .map_err(err)?
    } else {
        Vec::new()
    };
    let cluster_ips = cluster_ips(spec, node).map_err(err)?;
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let port = port_u16(p.port, &format!("spec.ports[{i}].port")).map_err(err)?;
        let proto =
            parse_proto(p.protocol.as_deref()).map_err(|m| err(format!("spec.ports[{i}]: {m}")))?;
        let node_port = match p.node_port {
            Some(np) if has_node_ports => Some(
                node.node_port(np, &format!("spec.ports[{i}].nodePort"))
                    .map_err(err)?,
            ),
            _ => None,
        };
        if let Some(proto) = proto {
            ports.push(SvcPort {
                name: p.name.clone().unwrap_or_default(),
                port,
                proto,
                node_port,
            });
        }
    }
    let health_check_node_port = match spec.health_check_node_port {
        Some(p) if type_ == "LoadBalancer" && policy == TrafficPolicy::Local => {
            Some(node.node_port(p, "spec.healthCheckNodePort").map_err(err)?)
        }
        _ => None,
    };
    let mut source_ranges = Vec::new();
    if type_ == "LoadBalancer" {
        for (i, r) in spec
            .load_balancer_source_ranges
            .iter()
            .flatten()
            .enumerate()
        {
            let r = r.trim();
            // IPv6 ranges are valid; this datapath is IPv4-only.
            if r.contains(':') {
                continue;
            }
            source_ranges.push(
                r.parse::<Cidr>()
                    .map_err(|m| err(format!("spec.loadBalancerSourceRanges[{i}]: {m}")))?,
            );
        }
    }
    // One order, whatever the spec's, so a restarted agent reading them
    // back from the datapath sees no change.
    source_ranges.sort();
    source_ranges.dedup();
    let affinity = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            Some(match t {
                None => DEFAULT_AFFINITY_SECONDS,
                Some(t) if (1..=i64::from(MAX_AFFINITY_SECONDS)).contains(&i64::from(t)) => {
                    t as u32
                }
                Some(t) => {
                    return Err(err(format!(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds {t} is outside \
                         1-{MAX_AFFINITY_SECONDS}"
                    )));
                }
            })
        }
        Some(other) => {
            return Err(err(format!(
                "spec.sessionAffinity {other:?} is not one of None, ClientIP"
            )));
        }
    };
    let internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(err(format!(
                "spec.internalTrafficPolicy {other:?} is not one of Cluster, Local"
            )));
        }
    };
    let distribution = match spec.traffic_distribution.as_deref() {
        None => false,
        // PreferSameZone is PreferClose's newer name.
        Some("PreferClose" | "PreferSameZone") => true,
        Some(other) => {
            return Err(err(format!(
                "spec.trafficDistribution {other:?} is not one of PreferClose, PreferSameZone"
            )));
        }
    };
    let annotation = |name: &str| svc.metadata.annotations.as_ref().and_then(|a| a.get(name));
    let topology_mode =
        annotation(TOPOLOGY_MODE_ANNOTATION).is_some_and(|m| m.eq_ignore_ascii_case("auto"));
    let lb = annotation(LB_ALGORITHM_ANNOTATION)
        .map(|v| {
            v.parse::<LbAlgorithm>()
                .map_err(|m| err(format!("annotation {LB_ALGORITHM_ANNOTATION}: {m}")))
        })
        .transpose()?;
    Ok(SvcView {
        ns,
        name,
        cluster_ips,
        ports,
        external_ips,
        lb_ips,
        policy,
        health_check_node_port,
        source_ranges,
        affinity,
        internal_local,
        prefer_close: distribution || topology_mode,
        lb,
    })
}

/// Ready endpoints of one slice, per (port name, protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceView {
    pub ns: String,
    /// The slice's own name.
    pub name: String,
    /// The service it belongs to (`kubernetes.io/service-name`).
    pub service: String,
    /// (port name, proto) → backends
    pub ports: BTreeMap<(String, Proto), BTreeSet<BackendAddr>>,
    /// (port name, proto) → terminating endpoints still serving.
    pub draining: BTreeMap<(String, Proto), BTreeSet<BackendAddr>>,
    /// Endpoint address → `nodeName`, for those that name one.
    pub nodes: BTreeMap<IpAddr, String>,
    /// Ready endpoint address → its `hints.forZones` (empty: no hints).
    pub zones: BTreeMap<IpAddr, BTreeSet<String>>,
}

pub fn view_slice(slice: &EndpointSlice) -> Result<Option<SliceView>, ObjectError> {
    let (ns, name) = ns_name(&slice.metadata);
    let err = |message: String| ObjectError {
        object: format!("EndpointSlice {ns}/{name}"),
        message,
    };
    if name.is_empty() {
        return Err(err("metadata.name is missing".into()));
    }
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
        .ok_or_else(|| err(format!("label {SERVICE_NAME_LABEL} is missing")))?;
    let family = match slice.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        // Valid, but no Service is translated to a name: skip, do not fail.
        "FQDN" => return Ok(None),
        other => {
            return Err(err(format!(
                "addressType {other:?} is not one of IPv4, IPv6, FQDN"
            )));
        }
    };
    let mut ready = BTreeSet::new();
    let mut draining = BTreeSet::new();
    let mut nodes = BTreeMap::new();
    let mut zones: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        if ep.addresses.is_empty() {
            return Err(err(format!("endpoints[{i}].addresses is empty")));
        }
        let mut ips = Vec::new();
        for (j, a) in ep.addresses.iter().enumerate() {
            ips.push(
                a.parse::<IpAddr>()
                    .ok()
                    .filter(|ip| Family::of(*ip) == family)
                    .ok_or_else(|| {
                        err(format!(
                            "endpoints[{i}].addresses[{j}] {a:?} is not an {family} address"
                        ))
                    })?,
            );
        }
        // Kubernetes: a nil `ready` condition means ready; a nil `serving`
        // means the same as `ready`; a nil `terminating` means false.
        let cond = ep.conditions.as_ref();
        let is_ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(is_ready);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        if let Some(node) = &ep.node_name {
            nodes.insert(ips[0], node.clone());
        }
        if is_ready {
            let hinted = ep
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone());
            zones.entry(ips[0]).or_default().extend(hinted);
        }
        // Kubernetes uses only the first address of an endpoint.
        if is_ready {
            ready.insert(ips[0]);
        } else if serving && terminating {
            draining.insert(ips[0]);
        }
    }
    // An address listed both ways (two endpoints) counts as ready.
    draining.retain(|ip| !ready.contains(ip));
    let mut ports = BTreeMap::new();
    let mut draining_ports = BTreeMap::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let Some(port) = p.port else {
            // A port without a number means "all ports"; not applicable to
            // ClusterIP translation.
            continue;
        };
        let port = port_u16(port, &format!("ports[{i}].port")).map_err(err)?;
        let Some(proto) =
            parse_proto(p.protocol.as_deref()).map_err(|m| err(format!("ports[{i}]: {m}")))?
        else {
            continue;
        };
        let key = (p.name.clone().unwrap_or_default(), proto);
        let set: &mut BTreeSet<BackendAddr> = ports.entry(key.clone()).or_default();
        set.extend(ready.iter().map(|&ip| BackendAddr::new(ip, port)));
        let set: &mut BTreeSet<BackendAddr> = draining_ports.entry(key).or_default();
        set.extend(draining.iter().map(|&ip| BackendAddr::new(ip, port)));
    }
    Ok(Some(SliceView {
        ns,
        name,
        service,
        ports,
        draining: draining_ports,
        nodes,
        zones,
    }))
}

/// Whether a service port's ready `backends` can be narrowed to `zone`
/// (kube-proxy's rule for topology hints): every one carries hints, and at
/// least one is hinted for the zone. Otherwise all are used, so a half-
/// hinted slice or a zone without endpoints never loses traffic.
fn zone_usable(
    backends: &BTreeSet<BackendAddr>,
    hints: &dyn Fn(IpAddr) -> BTreeSet<String>,
    zone: &str,
) -> bool {
    let mut any = false;
    for b in backends {
        let h = hints(b.ip);
        if h.is_empty() {
            return false;
        }
        any |= h.contains(zone);
    }
    any
}

/// The frontends of one service and their ready backends, from the
/// slices that belong to it: per port its ClusterIP, its nodePort, each
/// externalIP and each LoadBalancer address. The ClusterIP follows
/// `internalTrafficPolicy` (`Local`: only the endpoints on `node`; none
/// → refused) and external frontends `externalTrafficPolicy` (`Local`
/// keeps only the endpoints on `node`, `Cluster` marks those elsewhere for
/// source NAT); where a policy is `Cluster`, `PreferClose` narrows the
/// endpoints to those hinted for the node's zone when
/// [`zone_usable`].
pub fn frontends<'a>(
    svc: &SvcView,
    node: &Node,
    slices: impl Iterator<Item = &'a SliceView> + Clone,
) -> Vec<(Frontend, DesiredService)> {
    if svc.cluster_ips.is_empty() {
        return Vec::new();
    }
    let is_local = |b: &BackendAddr| {
        slices
            .clone()
            .any(|v| v.nodes.get(&b.ip).is_some_and(|n| *n == node.name))
    };
    let hints = |ip: IpAddr| -> BTreeSet<String> {
        slices
            .clone()
            .filter_map(|v| v.zones.get(&ip))
            .flatten()
            .cloned()
            .collect()
    };
    let local_only = |set: &BTreeSet<BackendAddr>| -> BTreeSet<BackendAddr> {
        set.iter().filter(|b| is_local(b)).copied().collect()
    };
    let mut out = Vec::new();
    for p in &svc.ports {
        let key = (p.name.clone(), p.proto);
        let name = if p.name.is_empty() {
            format!("{}/{}", svc.ns, svc.name)
        } else {
            format!("{}/{}:{}", svc.ns, svc.name, p.name)
        };
        // One family at a time: a frontend's endpoints are of its family.
        for &ip in &svc.cluster_ips {
            let family = Family::of(ip);
            let backends: BTreeSet<BackendAddr> = slices
                .clone()
                .filter_map(|v| v.ports.get(&key))
                .flatten()
                .filter(|b| Family::of(b.ip) == family)
                .copied()
                .collect();
            let draining: BTreeSet<BackendAddr> = slices
                .clone()
                .filter_map(|v| v.draining.get(&key))
                .flatten()
                .filter(|b| Family::of(b.ip) == family && !backends.contains(b))
                .copied()
                .collect();
            // Endpoints for a `Cluster` policy: those of the node's zone
            // when the hints allow it, else all.
            let cluster: BTreeSet<BackendAddr> = match &node.zone {
                Some(zone) if svc.prefer_close && zone_usable(&backends, &hints, zone) => backends
                    .iter()
                    .filter(|b| hints(b.ip).contains(zone))
                    .copied()
                    .collect(),
                _ => backends.clone(),
            };
            // NodePorts, externalIPs and LoadBalancer addresses are IPv4
            // here; they go with the IPv4 ClusterIP.
            if family == Family::V4 {
                external_frontends(
                    svc, node, p, &name, &backends, &cluster, &draining, &is_local, &mut out,
                );
            }
            out.push((
                Frontend {
                    ip,
                    port: p.port,
                    proto: p.proto,
                },
                DesiredService {
                    name: name.clone(),
                    backends: if svc.internal_local {
                        local_only(&backends)
                    } else {
                        cluster
                    },
                    draining: if svc.internal_local {
                        local_only(&draining)
                    } else {
                        draining
                    },
                    policy: Policy {
                        affinity: svc.affinity,
                        lb: svc.lb.unwrap_or(node.lb_algorithm),
                        ..Policy::default()
                    },
                },
            ));
        }
    }
    out
}

/// The IPv4 external frontends of one service port — its nodePort, each
/// LoadBalancer address and externalIP — under `externalTrafficPolicy`:
/// `Local` keeps only the endpoints on `node`, `Cluster` (the zone's,
/// `cluster`) marks those elsewhere for source NAT.
#[allow(clippy::too_many_arguments)]
fn external_frontends(
    svc: &SvcView,
    node: &Node,
    p: &SvcPort,
    name: &str,
    backends: &BTreeSet<BackendAddr>,
    cluster: &BTreeSet<BackendAddr>,
    draining: &BTreeSet<BackendAddr>,
    is_local: &dyn Fn(&BackendAddr) -> bool,
    out: &mut Vec<(Frontend, DesiredService)>,
) {
    let external = |set: &BTreeSet<BackendAddr>| -> BTreeSet<BackendAddr> {
        match svc.policy {
            TrafficPolicy::Local => set.iter().filter(|b| is_local(b)).copied().collect(),
            TrafficPolicy::Cluster => set
                .iter()
                .map(|b| BackendAddr {
                    snat: !is_local(b),
                    ..*b
                })
                .collect(),
        }
    };
    let outside = DesiredService {
        name: name.to_string(),
        backends: match svc.policy {
            TrafficPolicy::Local => external(backends),
            TrafficPolicy::Cluster => external(cluster),
        },
        draining: external(draining),
        policy: Policy {
            external: Some(svc.policy),
            source_ranges: Vec::new(),
            affinity: svc.affinity,
            lb: svc.lb.unwrap_or(node.lb_algorithm),
        },
    };
    // loadBalancerSourceRanges guard the LoadBalancer addresses only
    // (as kube-proxy); nodePorts and externalIPs stay open.
    let guarded = DesiredService {
        policy: Policy {
            source_ranges: svc.source_ranges.clone(),
            ..outside.policy.clone()
        },
        ..outside.clone()
    };
    let on = |ip: Ipv4Addr| Frontend {
        ip: IpAddr::V4(ip),
        port: p.port,
        proto: p.proto,
    };
    let addrs = p
        .node_port
        .map(|np| (Frontend::nodeport(np, p.proto), &outside))
        .into_iter()
        .chain(svc.lb_ips.iter().map(|&ip| (on(ip), &guarded)))
        .chain(svc.external_ips.iter().map(|&ip| (on(ip), &outside)));
    for (fe, desired) in addrs {
        // The same address as externalIP and LoadBalancer ingress is one
        // frontend (the LoadBalancer's).
        if !out.iter().any(|(f, _)| *f == fe) {
            out.push((fe, desired.clone()));
        }
    }
}

/// The `healthCheckNodePort` of a service and what it answers: the number
/// of distinct ready endpoint addresses on `node`, over all its slices.
pub fn health_check<'a>(
    svc: &SvcView,
    node: &Node,
    slices: impl Iterator<Item = &'a SliceView> + Clone,
) -> Option<(u16, HealthCheck)> {
    let port = svc.health_check_node_port?;
    let local: BTreeSet<IpAddr> = slices
        .clone()
        .flat_map(|v| {
            v.ports
                .values()
                .flatten()
                .map(|b| b.ip)
                .filter(|ip| v.nodes.get(ip).is_some_and(|n| *n == node.name))
        })
        .collect();
    Some((
        port,
        HealthCheck {
            namespace: svc.ns.clone(),
            name: svc.name.clone(),
            local_endpoints: local.len(),
        },
    ))
}

/// Builds the desired state. Every object is validated; the first invalid
/// one is returned as the error (so a bad object never half-applies).
pub fn build(
    node: &Node,
    services: &[Service],
    slices: &[EndpointSlice],
) -> Result<DesiredState, ObjectError> {
    let svcs = services
        .iter()
        .map(|s| view_service(s, node))
        .collect::<Result<Vec<_>, _>>()?;
    let mut by_service: BTreeMap<(String, String), Vec<SliceView>> = BTreeMap::new();
    for s in slices {
        if let Some(v) = view_slice(s)? {
            by_service
                .entry((v.ns.clone(), v.service.clone()))
                .or_default()
                .push(v);
        }
    }
    let mut state = DesiredState::default();
    for svc in svcs {
        let slices = by_service
            .get(&(svc.ns.clone(), svc.name.clone()))
            .map(|v| v.as_slice())
            .unwrap_or_default();
        if let Some((port, check)) = health_check(&svc, node, slices.iter()) {
            if let Some(prev) = state.health_checks.get(&port) {
                return Err(ObjectError {
                    object: format!("Service {}/{}", svc.ns, svc.name),
                    message: format!(
                        "healthCheckNodePort {port} is already used by {}/{}",
                        prev.namespace, prev.name
                    ),
                });
            }
            state.health_checks.insert(port, check);
        }
        for (fe, desired) in frontends(&svc, node, slices.iter()) {
            if let Some(prev) = state.services.get(&fe) {
                return Err(ObjectError {
                    object: format!("Service {}/{}", svc.ns, svc.name),
                    message: format!("frontend {fe} is already used by {}", prev.name),
                });
            }
            state.services.insert(fe, desired);
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_saphyr::from_str(yaml).unwrap()
    }
    fn slice(yaml: &str) -> EndpointSlice {
        serde_saphyr::from_str(yaml).unwrap()
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
"#;

    const WEB_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
- addresses: [10.0.0.2]
- addresses: [10.0.0.3]
  conditions: {ready: false}
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
"#;

    #[test]
    fn ready_endpoints_matched_by_port_name() {
        let st = build(&Node::default(), &[svc(WEB)], &[slice(WEB_SLICE)]).unwrap();
        assert_eq!(st.services.len(), 2);
        let http = &st.services[&Frontend {
            ip: "10.96.0.10".parse().unwrap(),
            port: 80,
            proto: Proto::Tcp,
        }];
        let ips: Vec<String> = http.backends.iter().map(|b| b.to_string()).collect();
        assert_eq!(ips, ["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(http.name, "default/web:http");
        let dns = &st.services[&Frontend {
            ip: "10.96.0.10".parse().unwrap(),
            port: 53,
            proto: Proto::Udp,
        }];
        assert!(dns.backends.iter().all(|b| b.port == 5353));
    }

    #[test]
    fn service_without_slices_has_no_backends() {
        let st = build(&Node::default(), &[svc(WEB)], &[]).unwrap();
        assert!(st.services.values().all(|s| s.backends.is_empty()));
    }

    #[test]
    fn headless_service_is_not_programmed() {
        let st = build(
            &Node::default(),
            &[svc(&WEB.replace("10.96.0.10", "None"))],
            &[],
        )
        .unwrap();
        assert!(st.services.is_empty());
    }

    #[test]
    fn bad_ip_names_object_and_field() {
        let e = build(
            &Node::default(),
            &[svc(WEB)],
            &[slice(&WEB_SLICE.replace("10.0.0.2", "10.0.0.300"))],
        )
        .unwrap_err();
        assert_eq!(e.object, "EndpointSlice default/web-1");
        assert!(e.message.contains("endpoints[1].addresses[0]"), "{e}");
        let e = build(
            &Node::default(),
            &[svc(&WEB.replace("10.96.0.10", "banana"))],
            &[],
        )
        .unwrap_err();
        assert_eq!(e.object, "Service default/web");
        assert!(e.message.contains("spec.clusterIP"), "{e}");
    }

    #[test]
    fn bad_port_and_protocol_are_rejected() {
        let e = build(
            &Node::default(),
            &[svc(&WEB.replace("port: 80,", "port: 70000,"))],
            &[],
        )
        .unwrap_err();
        assert!(e.message.contains("spec.ports[0].port 70000"), "{e}");
        let e = build(
            &Node::default(),
            &[svc(&WEB.replace("protocol: TCP", "protocol: QUIC"))],
            &[],
        )
        .unwrap_err();
        assert!(e.message.contains("QUIC"), "{e}");
    }

    #[test]
    fn duplicate_frontend_is_an_error() {
        let other = WEB.replace("name: web,", "name: web2,");
        let e = build(&Node::default(), &[svc(WEB), svc(&other)], &[]).unwrap_err();
        assert!(e.message.contains("already used"), "{e}");
    }

    const NODEPORT: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalIPs: [192.0.2.10, "2001:db8::1"]
  externalTrafficPolicy: Cluster
  ports:
  - {name: http, port: 80, nodePort: 30080, protocol: TCP}
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.20}, {hostname: lb.example}]
"#;

    const NODEPORT_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-1, namespace: default, labels: {kubernetes.io/service-name: np}}
addressType: IPv4
endpoints:
- {addresses: [10.0.0.1], nodeName: node1}
- {addresses: [10.0.0.2], nodeName: node2}
- {addresses: [10.0.0.3]}
ports:
- {name: http, port: 8080, protocol: TCP}
"#;

    fn node1() -> Node {
        Node {
            name: "node1".into(),
            ..Node::default()
        }
    }

    fn fe(ip: &str, port: u16) -> Frontend {
        Frontend {
            ip: ip.parse().unwrap(),
            port,
            proto: Proto::Tcp,
        }
    }

    #[test]
    fn nodeport_external_and_lb_addresses_are_frontends() {
        let st = build(&node1(), &[svc(NODEPORT)], &[slice(NODEPORT_SLICE)]).unwrap();
        let fes: Vec<String> = st.services.keys().map(|f| f.to_string()).collect();
        assert_eq!(
            fes,
            [
                "nodePort 30080/TCP",
                "10.96.0.20:80/TCP",
                "192.0.2.10:80/TCP",
                "192.0.2.20:80/TCP"
            ]
        );
        let cluster = &st.services[&fe("10.96.0.20", 80)];
        assert_eq!(cluster.policy.external, None);
        assert!(cluster.backends.iter().all(|b| !b.snat));
        // Cluster policy: every endpoint, those not on node1 source-NATed.
        for f in [Frontend::nodeport(30080, Proto::Tcp), fe("192.0.2.20", 80)] {
            let s = &st.services[&f];
            assert_eq!(s.policy.external, Some(TrafficPolicy::Cluster));
            let snat: Vec<(String, bool)> =
                s.backends.iter().map(|b| (b.to_string(), b.snat)).collect();
            assert_eq!(
                snat,
                [
                    ("10.0.0.1:8080".into(), false),
                    ("10.0.0.2:8080".into(), true),
                    ("10.0.0.3:8080".into(), true)
                ]
            );
        }
    }

    #[test]
    fn local_policy_keeps_only_this_nodes_endpoints() {
        let local = NODEPORT.replace(
            "externalTrafficPolicy: Cluster",
            "externalTrafficPolicy: Local",
        );
        let st = build(&node1(), &[svc(&local)], &[slice(NODEPORT_SLICE)]).unwrap();
        let np = &st.services[&Frontend::nodeport(30080, Proto::Tcp)];
        assert_eq!(np.policy.external, Some(TrafficPolicy::Local));
        let ips: Vec<String> = np.backends.iter().map(|b| b.to_string()).collect();
        assert_eq!(ips, ["10.0.0.1:8080"]);
        assert!(np.backends.iter().all(|b| !b.snat));
        // The ClusterIP keeps all three.
        assert_eq!(st.services[&fe("10.96.0.20", 80)].backends.len(), 3);
        // Another node: none local.
        let other = Node {
            name: "node3".into(),
            ..Node::default()
        };
        let st = build(&other, &[svc(&local)], &[slice(NODEPORT_SLICE)]).unwrap();
        assert!(
            st.services[&Frontend::nodeport(30080, Proto::Tcp)]
                .backends
                .is_empty()
        );
    }

    #[test]
    fn clusterip_service_ignores_node_port_field() {
        let plain = NODEPORT.replace("type: LoadBalancer", "type: ClusterIP");
        let st = build(&node1(), &[svc(&plain)], &[]).unwrap();
        let fes: Vec<String> = st.services.keys().map(|f| f.to_string()).collect();
        // externalIPs apply to every type; nodePort and LB status do not.
        assert_eq!(fes, ["10.96.0.20:80/TCP", "192.0.2.10:80/TCP"]);
    }

    #[test]
    fn bad_north_south_fields_are_rejected_naming_the_field() {
        let cases = [
            (
                "nodePort: 30080",
                "nodePort: 80",
                "spec.ports[0].nodePort 80 is outside the node port range 30000-32767",
            ),
            ("192.0.2.10,", "banana,", "spec.externalIPs[0] \"banana\""),
            (
                "externalTrafficPolicy: Cluster",
                "externalTrafficPolicy: Nearby",
                "externalTrafficPolicy \"Nearby\"",
            ),
            ("type: LoadBalancer", "type: Magic", "spec.type \"Magic\""),
            (
                "{ip: 192.0.2.20}",
                "{ip: 192.0.2.300}",
                "status.loadBalancer.ingress[].ip[0]",
            ),
        ];
        for (from, to, want) in cases {
            let bad = NODEPORT.replace(from, to);
            assert_ne!(bad, NODEPORT, "{from}");
            let e = build(&node1(), &[svc(&bad)], &[]).unwrap_err();
            assert_eq!(e.object, "Service default/np");
            assert!(e.message.contains(want), "{e}");
        }
    }

    #[test]
    fn duplicate_node_port_is_an_error() {
        let other = NODEPORT
            .replace("name: np,", "name: np2,")
            .replace("10.96.0.20", "10.96.0.21")
            .replace("192.0.2.", "198.51.100.");
        let e = build(&node1(), &[svc(NODEPORT), svc(&other)], &[]).unwrap_err();
        assert!(
            e.message.contains("nodePort 30080/TCP is already used"),
            "{e}"
        );
    }

    #[test]
    fn session_affinity_is_parsed_defaulted_and_validated() {
        let with = |extra: &str| WEB.replace("  clusterIP:", &format!("{extra}\n  clusterIP:"));
        let st = build(
            &Node::default(),
            &[svc(&with("  sessionAffinity: ClientIP"))],
            &[],
        )
        .unwrap();
        assert!(
            st.services
                .values()
                .all(|s| s.policy.affinity == Some(10_800))
        );
        let st = build(
            &Node::default(),
            &[svc(&with(
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}",
            ))],
            &[],
        )
        .unwrap();
        assert!(st.services.values().all(|s| s.policy.affinity == Some(5)));
        let st = build(
            &Node::default(),
            &[svc(&with("  sessionAffinity: None"))],
            &[],
        )
        .unwrap();
        assert!(st.services.values().all(|s| s.policy.affinity.is_none()));
        let e = build(
            &Node::default(),
            &[svc(&with("  sessionAffinity: Cookie"))],
            &[],
        )
        .unwrap_err();
        assert!(e.message.contains("spec.sessionAffinity \"Cookie\""), "{e}");
        for bad in [0, 86_401] {
            let e = build(
                &Node::default(),
                &[svc(&with(&format!(
                    "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {bad}}}}}"
                )))],
                &[],
            )
            .unwrap_err();
            assert!(
                e.message
                    .contains(&format!("timeoutSeconds {bad} is outside 1-86400")),
                "{e}"
            );
        }
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_endpoints_only() {
        let local = NODEPORT.replace(
            "externalTrafficPolicy: Cluster",
            "externalTrafficPolicy: Cluster\n  internalTrafficPolicy: Local",
        );
        let st = build(&node1(), &[svc(&local)], &[slice(NODEPORT_SLICE)]).unwrap();
        let ips: Vec<String> = st.services[&fe("10.96.0.20", 80)]
            .backends
            .iter()
            .map(|b| b.to_string())
            .collect();
        assert_eq!(ips, ["10.0.0.1:8080"]);
        // External traffic still follows externalTrafficPolicy.
        assert_eq!(
            st.services[&Frontend::nodeport(30080, Proto::Tcp)]
                .backends
                .len(),
            3
        );
        // No local endpoint: the ClusterIP has none (refused).
        let other = Node {
            name: "node9".into(),
            ..Node::default()
        };
        let st = build(&other, &[svc(&local)], &[slice(NODEPORT_SLICE)]).unwrap();
        assert!(st.services[&fe("10.96.0.20", 80)].backends.is_empty());
        let e = build(
            &node1(),
            &[svc(&local.replace(
                "internalTrafficPolicy: Local",
                "internalTrafficPolicy: Nearby",
            ))],
            &[],
        )
        .unwrap_err();
        assert!(
            e.message.contains("spec.internalTrafficPolicy \"Nearby\""),
            "{e}"
        );
    }

    const ZONED_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.0.0.1], zone: a, hints: {forZones: [{name: a}]}}
- {addresses: [10.0.0.2], zone: b, hints: {forZones: [{name: b}]}}
- {addresses: [10.0.0.3], zone: a, hints: {forZones: [{name: a}]}}
ports:
- {name: http, port: 8080, protocol: TCP}
"#;

    #[test]
    fn prefer_close_narrows_to_the_zone_when_every_endpoint_is_hinted() {
        let close = WEB.replace(
            "  clusterIP:",
            "  trafficDistribution: PreferClose\n  clusterIP:",
        );
        let in_zone = |zone: Option<&str>, service: &str, slice_yaml: &str| -> Vec<String> {
            let node = Node {
                zone: zone.map(str::to_owned),
                ..node1()
            };
            let st = build(&node, &[svc(service)], &[slice(slice_yaml)]).unwrap();
            st.services[&fe("10.96.0.10", 80)]
                .backends
                .iter()
                .map(|b| b.ip.to_string())
                .collect()
        };
        assert_eq!(
            in_zone(Some("a"), &close, ZONED_SLICE),
            ["10.0.0.1", "10.0.0.3"]
        );
        assert_eq!(in_zone(Some("b"), &close, ZONED_SLICE), ["10.0.0.2"]);
        // No endpoint for the zone, no zone, no PreferClose, or one endpoint
        // without hints: all of them.
        let all = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];
        assert_eq!(in_zone(Some("c"), &close, ZONED_SLICE), all);
        assert_eq!(in_zone(None, &close, ZONED_SLICE), all);
        assert_eq!(in_zone(Some("a"), WEB, ZONED_SLICE), all);
        let half = ZONED_SLICE.replace(", hints: {forZones: [{name: b}]}", "");
        assert_eq!(in_zone(Some("a"), &close, &half), all);
        // The older annotation means the same.
        let auto = WEB.replace(
            "namespace: default}",
            "namespace: default, annotations: {service.kubernetes.io/topology-mode: Auto}}",
        );
        assert_eq!(in_zone(Some("b"), &auto, ZONED_SLICE), ["10.0.0.2"]);
    }

    #[test]
    fn lb_algorithm_comes_from_the_annotation_else_the_node() {
        let annotated = |v: &str| {
            WEB.replace(
                "namespace: default}",
                &format!("namespace: default, annotations: {{kproxy.io/lb-algorithm: {v}}}}}"),
            )
        };
        let lb = |node: &Node, yaml: &str| -> Vec<LbAlgorithm> {
            let st = build(node, &[svc(yaml)], &[]).unwrap();
            st.services.values().map(|s| s.policy.lb).collect()
        };
        let maglev_node = Node {
            lb_algorithm: LbAlgorithm::Maglev,
            ..Node::default()
        };
        assert_eq!(lb(&Node::default(), WEB), [LbAlgorithm::RoundRobin; 2]);
        assert_eq!(lb(&maglev_node, WEB), [LbAlgorithm::Maglev; 2]);
        assert_eq!(
            lb(&Node::default(), &annotated("maglev")),
            [LbAlgorithm::Maglev; 2]
        );
        assert_eq!(
            lb(&maglev_node, &annotated("round-robin")),
            [LbAlgorithm::RoundRobin; 2]
        );
        let e = build(&Node::default(), &[svc(&annotated("random"))], &[]).unwrap_err();
        assert!(
            e.message
                .contains("kproxy.io/lb-algorithm: \"random\" is not one of"),
            "{e}"
        );
    }

    const WEB_DUAL: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:10:96::a"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: PreferDualStack
  type: NodePort
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30080}
"#;

    const WEB_SLICE6: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-6, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
endpoints:
- addresses: ["fd00::1"]
ports:
- {name: http, port: 8080, protocol: TCP}
"#;

    #[test]
    fn a_dual_stack_service_has_a_frontend_per_family_with_its_familys_endpoints() {
        let st = build(
            &Node::default(),
            &[svc(WEB_DUAL)],
            &[slice(WEB_SLICE), slice(WEB_SLICE6)],
        )
        .unwrap();
        let v4 = Frontend {
            ip: "10.96.0.10".parse().unwrap(),
            port: 80,
            proto: Proto::Tcp,
        };
        let v6 = Frontend {
            ip: "fd00:10:96::a".parse().unwrap(),
            ..v4
        };
        let ips = |fe: &Frontend| -> Vec<String> {
            st.services[fe]
                .backends
                .iter()
                .map(|b| b.ip.to_string())
                .collect()
        };
        assert_eq!(ips(&v4), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(ips(&v6), ["fd00::1"]);
        // The nodePort is IPv4 and has the IPv4 endpoints only.
        let np = Frontend::nodeport(30080, Proto::Tcp);
        assert_eq!(ips(&np), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(st.services.len(), 3, "{:?}", st.services.keys());
        // A node proxying IPv4 only keeps the IPv4 half.
        let v4_only = Node {
            families: [Family::V4].into(),
            ..Node::default()
        };
        let st = build(&v4_only, &[svc(WEB_DUAL)], &[slice(WEB_SLICE6)]).unwrap();
        assert!(!st.services.contains_key(&v6));
        assert!(st.services.contains_key(&v4));
    }

    #[test]
    fn bad_families_are_rejected_naming_the_field() {
        let cases = [
            (
                WEB_DUAL.replace("ipFamilies: [IPv4, IPv6]", "ipFamilies: [IPv6, IPv4]"),
                "spec.ipFamilies[0] IPv6 does not match",
            ),
            (
                WEB_DUAL.replace("clusterIPs: [10.96.0.10,", "clusterIPs: [10.96.0.11,"),
                "must equal spec.clusterIP",
            ),
            (
                WEB_DUAL.replace("\"fd00:10:96::a\"", "10.96.0.12"),
                "a second IPv4 address",
            ),
            (
                WEB_DUAL.replace("PreferDualStack", "SingleStack"),
                "SingleStack with two",
            ),
            (
                WEB_DUAL.replace("PreferDualStack", "Maybe"),
                "spec.ipFamilyPolicy \"Maybe\"",
            ),
            (
                WEB_DUAL.replace("ipFamilies: [IPv4, IPv6]", "ipFamilies: [IPv4, IPv7]"),
                "spec.ipFamilies[1]",
            ),
        ];
        for (yaml, want) in cases {
            let e = build(&Node::default(), &[svc(&yaml)], &[]).unwrap_err();
            assert!(e.message.contains(want), "{want:?} not in {e}");
        }
        // IPv6 only, on a node that proxies IPv4 only.
        let v6_only = WEB.replace("clusterIP: 10.96.0.10", "clusterIP: \"fd00:10:96::a\"");
        let v4_node = Node {
            families: [Family::V4].into(),
            ..Node::default()
        };
        let e = build(&v4_node, &[svc(&v6_only)], &[]).unwrap_err();
        assert!(
            e.message.contains("IPv6 is not proxied on this node"),
            "{e}"
        );
        // An address of the other family in a slice.
        let e = build(
            &Node::default(),
            &[svc(WEB)],
            &[slice(&WEB_SLICE6.replace("fd00::1", "10.0.0.9"))],
        )
        .unwrap_err();
        assert!(e.message.contains("is not an IPv6 address"), "{e}");
    }
}
