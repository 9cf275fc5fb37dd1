//! The test network: client namespace(s) → node namespace (where kproxy
//! runs and routes) → backend namespaces.
//!
//! ```text
//!  client  eth0 10.0.1.2/24 ── c0 10.0.1.1/24   node   b1 10.0.11.1/24 ── eth0 10.0.11.2/24  backend1
//!  client2 eth0 10.0.2.2/24 ── c1 10.0.2.1/24  (fwd)   b2 10.0.12.1/24 ── eth0 10.0.12.2/24  backend2
//!                                                      …
//! ```
//!
//! North-south tests add another node (`node2`, [`Topology::add_remote_node`]):
//! a namespace wired to the node by `n2` 10.0.200.1/24 ↔ `eth0`
//! 10.0.200.2/24, *without* a default route, so it can answer only the
//! node's own subnet — a remote endpoint reached through source NAT.
//!
//! Veth pairs are created directly inside their namespaces, so no interface
//! ever exists in the root namespace and names never clash between tests.
//!
//! In iptables mode the node is prepared for kube-proxy's REJECT rules (for
//! services without endpoints), which eBPF mode does not need (its TC
//! program answers before routing, with an ICMP error it builds itself) and
//! does not get:
//! - a route for the service CIDR (10.96.0.0/12) into a device that drops
//!   everything, `svc0`, as a real node has a default route: the REJECT
//!   sits in the filter FORWARD path, which a packet only reaches once
//!   routing found a route for it (in eBPF mode, ClusterIP traffic without
//!   kproxy keeps failing routing);
//! - no kernel rate limit on ICMP destination-unreachable messages
//!   (`net.ipv4.icmp_ratemask` without bit 3, as OpenShift's SDN sets on its
//!   nodes for the same reason): the REJECT target's ICMP errors are sent by
//!   the kernel, which by default allows a client 6 of them in a burst and
//!   then one per second (`icmp_ratelimit`), so the 7th quick refusal would
//!   come only with the SYN retransmission a second later.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::client::{self, TcpSession, UdpSession};
use crate::mode::{Mode, mode};
use crate::netns::Netns;
use crate::servers::{BackendServer, Servers};
use crate::util::poll_until;

/// How long links may take to come up after creation.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// The service CIDR the tests' ClusterIPs live in (kubeadm's default).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// Where the tests' externalIPs and LoadBalancer addresses live
/// (TEST-NET-3). Routed like [`SERVICE_CIDR`] in iptables mode, so traffic
/// that kube-proxy's rules leave untranslated (refused or dropped) reaches
/// the filter FORWARD chain, as on a node with a default route.
pub const EXTERNAL_CIDR: &str = "203.0.113.0/24";
/// The IPv6 service CIDR of dual-stack topologies ([`Topology::dual_stack`]).
pub const SERVICE_CIDR6: &str = "fd00:10:96::/108";
/// Node-side device the service CIDR is routed into in iptables mode.
pub const SERVICE_CIDR_IFACE: &str = "svc0";

/// A client namespace attached to the node.
#[derive(Debug)]
pub struct Client {
    /// 0 for the first client.
    pub index: usize,
    pub ns: Netns,
    /// Address on the client's `eth0`, e.g. 10.0.1.2.
    pub ip: Ipv4Addr,
    /// Address of the node side, e.g. 10.0.1.1 (the client's default gateway).
    pub gateway: Ipv4Addr,
    /// IPv6 address on `eth0` in a dual-stack topology, fd00:0:1+index::2.
    pub ip6: Option<Ipv6Addr>,
    /// Name of the node-side veth, e.g. `c0`.
    pub node_iface: String,
}

/// A backend namespace attached to the node.
#[derive(Debug)]
pub struct Backend {
    /// 1-based, as in `backend-<index>`.
    pub index: usize,
    pub ns: Netns,
    /// Address on the backend's `eth0`, 10.0.(10+index).2.
    pub ip: Ipv4Addr,
    /// Node side address, 10.0.(10+index).1.
    pub gateway: Ipv4Addr,
    /// IPv6 address in a dual-stack topology ([`backend_ip6`]).
    pub ip6: Option<Ipv6Addr>,
    /// Name of the node-side veth, `b<index>`.
    pub node_iface: String,
}

impl Backend {
    /// The name its servers answer with: `backend-<index>`.
    pub fn name(&self) -> String {
        backend_name(self.index)
    }
}

/// `backend-<index>`.
pub fn backend_name(index: usize) -> String {
    format!("backend-{index}")
}

/// Address of backend `index` (1-based): 10.0.(10+index).2.
pub fn backend_ip(index: usize) -> Ipv4Addr {
    assert!(
        (1..=200).contains(&index),
        "backend index {index} out of range"
    );
    Ipv4Addr::new(10, 0, 10 + index as u8, 2)
}

/// IPv6 address of backend `index` in a dual-stack topology:
/// fd00:0:(0x10+index)::2.
pub fn backend_ip6(index: usize) -> Ipv6Addr {
    assert!(
        (1..=200).contains(&index),
        "backend index {index} out of range"
    );
    Ipv6Addr::new(0xfd00, 0, 0x10 + index as u16, 0, 0, 0, 0, 2)
}

/// IPv6 address of client `index` in a dual-stack topology: fd00:0:(1+index)::2.
pub fn client_ip6(index: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 1 + index as u16, 0, 0, 0, 0, 2)
}

/// Address of client `index` (0-based): 10.0.(1+index).2.
pub fn client_ip(index: usize) -> Ipv4Addr {
    assert!(index < 9, "client index {index} out of range");
    Ipv4Addr::new(10, 0, 1 + index as u8, 2)
}

/// Another node, reachable only from the node (no default route): what
/// holds a remote endpoint in the north-south tests.
#[derive(Debug)]
pub struct RemoteNode {
    pub ns: Netns,
    /// Its address, 10.0.200.2.
    pub ip: Ipv4Addr,
    /// The node's address on the link, 10.0.200.1.
    pub node_ip: Ipv4Addr,
    /// The node-side veth, `n2`.
    pub node_iface: String,
}

/// Client, node and backend namespaces wired with veths. Dropping it
/// deletes all namespaces (and thereby all veths).
#[derive(Debug)]
pub struct Topology {
    pub node: Netns,
    clients: Vec<Client>,
    backends: Vec<Backend>,
    remote: Option<RemoteNode>,
    /// Every client and backend has an IPv6 address too.
    ipv6: bool,
}

impl Topology {
    /// Builds one client, the node and `n_backends` backends.
    pub fn new(n_backends: usize) -> Result<Topology> {
        Topology::new_for(n_backends, mode())
    }

    /// [`Topology::new`] for an explicit datapath `mode` instead of the
    /// suite's: only the netfilter modes (iptables, nftables) get the
    /// service CIDR route (and unlimited ICMP destination-unreachable
    /// messages). eBPF mode
    /// works on that topology too (its programs translate before routing),
    /// so a program comparing both modes on one topology builds it for
    /// [`Mode::Iptables`].
    pub fn new_for(n_backends: usize, mode: Mode) -> Result<Topology> {
        Topology::build(n_backends, mode, false)
    }

    /// [`Topology::new`] with IPv6 too: every client and backend also gets
    /// an IPv6 address ([`client_ip6`], [`backend_ip6`]; the node side is
    /// `…::1`, the default gateway), the node forwards IPv6, and in
    /// iptables mode [`SERVICE_CIDR6`] is routed like [`SERVICE_CIDR`].
    /// Addresses skip duplicate address detection, so they are usable at
    /// once.
    pub fn dual_stack(n_backends: usize) -> Result<Topology> {
        Topology::build(n_backends, mode(), true)
    }

    fn build(n_backends: usize, mode: Mode, ipv6: bool) -> Result<Topology> {
        let node = Netns::new("node")?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        if ipv6 {
            node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        let mut topo = Topology {
            node,
            clients: Vec::new(),
            backends: Vec::new(),
            remote: None,
            ipv6,
        };
        topo.add_client()?;
        for i in 1..=n_backends {
            topo.add_backend(i)?;
        }
        if mode.is_netfilter() {
            route_service_cidr(&topo.node, ipv6)?;
            unlimit_icmp_unreachable(&topo.node, ipv6)?;
        }
        topo.wait_links_up()?;
        Ok(topo)
    }

    /// Adds another client namespace (10.0.(1+k).2, node side `c<k>`) and
    /// returns it. Add clients before starting kproxy: its `--iface` list is
    /// fixed at start.
    pub fn add_client(&mut self) -> Result<&Client> {
        let index = self.clients.len();
        let role = if index == 0 {
            "client".to_owned()
        } else {
            format!("client{}", index + 1)
        };
        let ns = Netns::new(&role)?;
        let ip = client_ip(index);
        let gateway = Ipv4Addr::new(10, 0, 1 + index as u8, 1);
        let node_iface = format!("c{index}");
        wire(&ns, ip, &self.node, &node_iface, gateway, true)?;
        let ip6 = self.ipv6.then(|| client_ip6(index));
        if let Some(ip6) = ip6 {
            wire6(&ns, ip6, &self.node, &node_iface)?;
        }
        self.clients.push(Client {
            index,
            ns,
            ip,
            gateway,
            ip6,
            node_iface,
        });
        if index > 0 {
            self.wait_links_up()?;
        }
        Ok(self.clients.last().expect("just pushed"))
    }

    fn add_backend(&mut self, index: usize) -> Result<()> {
        let ns = Netns::new(&format!("backend{index}"))?;
        let ip = backend_ip(index);
        let gateway = Ipv4Addr::new(10, 0, 10 + index as u8, 1);
        let node_iface = format!("b{index}");
        wire(&ns, ip, &self.node, &node_iface, gateway, true)?;
        let ip6 = self.ipv6.then(|| backend_ip6(index));
        if let Some(ip6) = ip6 {
            wire6(&ns, ip6, &self.node, &node_iface)?;
            // Servers bind 0.0.0.0 and [::] side by side.
            ns.sysctl("net.ipv6.bindv6only", "1")?;
        }
        self.backends.push(Backend {
            index,
            ns,
            ip,
            gateway,
            ip6,
            node_iface,
        });
        Ok(())
    }

    /// Adds the remote node (`node2`, see the module docs) and returns it.
    /// Add it before starting kproxy: its `--external-iface` list is fixed
    /// at start.
    pub fn add_remote_node(&mut self) -> Result<&RemoteNode> {
        if self.remote.is_some() {
            bail!("the topology has a remote node already");
        }
        let ns = Netns::new("node2")?;
        let ip = Ipv4Addr::new(10, 0, 200, 2);
        let node_ip = Ipv4Addr::new(10, 0, 200, 1);
        let node_iface = "n2".to_owned();
        wire(&ns, ip, &self.node, &node_iface, node_ip, false)?;
        self.remote = Some(RemoteNode {
            ns,
            ip,
            node_ip,
            node_iface,
        });
        self.wait_links_up()?;
        Ok(self.remote.as_ref().expect("just set"))
    }

    /// Gives the outside namespaces' `eth0` (every client, the remote node)
    /// the offloads of a NIC: transmit checksums computed in full (a veth
    /// fed by a local socket otherwise leaves partial ones, which only the
    /// skb knows about and an XDP program rewriting and forwarding the frame
    /// would pass on wrong), and GRO, which lets a veth receive frames an
    /// XDP program redirects into its peer.
    pub fn nic_like_offloads(&self) -> Result<()> {
        let outside = self
            .clients
            .iter()
            .map(|c| &c.ns)
            .chain(self.remote.as_ref().map(|r| &r.ns));
        for ns in outside {
            ns.exec("ethtool", &["-K", "eth0", "tx", "off", "gro", "on"])
                .with_context(|| format!("ethtool -K eth0 in {}", ns.name()))?;
        }
        Ok(())
    }

    /// The remote node, once added.
    pub fn remote_node(&self) -> &RemoteNode {
        self.remote
            .as_ref()
            .expect("add_remote_node was not called")
    }

    /// Waits until every veth reports carrier on both ends.
    fn wait_links_up(&self) -> Result<()> {
        let mut pairs: Vec<(&Netns, &str, &Netns)> = Vec::new();
        if let Some(r) = &self.remote {
            pairs.push((&r.ns, r.node_iface.as_str(), &self.node));
        }
        for c in &self.clients {
            pairs.push((&c.ns, c.node_iface.as_str(), &self.node));
        }
        for b in &self.backends {
            pairs.push((&b.ns, b.node_iface.as_str(), &self.node));
        }
        for (ns, node_iface, node) in pairs {
            for (n, dev) in [(ns, "eth0"), (node, node_iface)] {
                poll_until(
                    &format!("{dev} in {} to be up", n.name()),
                    LINK_UP_TIMEOUT,
                    || {
                        let out = n.ip(&["-o", "link", "show", "dev", dev])?;
                        Ok((out.contains("LOWER_UP") && out.contains(",UP")).then_some(()))
                    },
                )?;
            }
        }
        Ok(())
    }

    /// The first client.
    pub fn client(&self) -> &Client {
        &self.clients[0]
    }

    pub fn clients(&self) -> &[Client] {
        &self.clients
    }

    /// Backend by 1-based index.
    pub fn backend(&self, index: usize) -> &Backend {
        self.backends
            .iter()
            .find(|b| b.index == index)
            .unwrap_or_else(|| panic!("no backend {index} in topology"))
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Node-side name of the first client's veth: `c0`.
    pub fn client_iface_on_node(&self) -> &str {
        &self.clients[0].node_iface
    }

    /// Node-side veth names of all clients (what kproxy attaches to).
    pub fn client_ifaces_on_node(&self) -> Vec<&str> {
        self.clients.iter().map(|c| c.node_iface.as_str()).collect()
    }

    pub fn client_ip(&self) -> Ipv4Addr {
        self.clients[0].ip
    }

    pub fn node_ns(&self) -> &str {
        self.node.name()
    }

    pub fn client_ns(&self) -> &str {
        self.clients[0].ns.name()
    }

    pub fn backend_ns(&self, index: usize) -> &str {
        self.backend(index).ns.name()
    }

    /// Starts TCP and UDP servers on `port` in every backend namespace.
    pub fn start_servers(&self, port: u16) -> Result<Servers> {
        let mut list = Vec::new();
        for b in &self.backends {
            list.push(BackendServer::start_families(
                &b.ns,
                b.index,
                b.ip,
                port,
                b.ip6.is_some(),
            )?);
        }
        Ok(Servers::new(list))
    }

    // Delegations to the first client, so tests read naturally.

    pub fn tcp_ask(
        &self,
        ip: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<(String, SocketAddr)> {
        self.client().tcp_ask(ip, port, timeout)
    }

    pub fn tcp_session(
        &self,
        ip: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpSession> {
        self.client().tcp_session(ip, port, timeout)
    }

    pub fn udp_ask(
        &self,
        ip: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<(String, SocketAddr)> {
        self.client().udp_ask(ip, port, timeout)
    }

    pub fn udp_session(
        &self,
        ip: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<UdpSession> {
        self.client().udp_session(ip, port, timeout)
    }

    pub fn tcp_connect_error(
        &self,
        ip: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<(io::ErrorKind, Duration)> {
        self.client().tcp_connect_error(ip, port, timeout)
    }

    pub fn udp_connect_error(
        &self,
        ip: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<(io::ErrorKind, Duration)> {
        self.client().udp_connect_error(ip, port, timeout)
    }
}

impl Client {
    /// New TCP connection, sends `who\n`, returns the reply line and the
    /// socket's peer address.
    pub fn tcp_ask(
        &self,
        ip: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<(String, SocketAddr)> {
        client::tcp_ask(&self.ns, ip, port, timeout)
    }

    /// A TCP connection that can [`TcpSession::ask`] repeatedly.
    pub fn tcp_session(
        &self,
        ip: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpSession> {
        TcpSession::connect(&self.ns, ip, port, timeout)
    }

    /// Fresh unconnected UDP socket: send_to, then recv_from (reply, source).
    pub fn udp_ask(
        &self,
        ip: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<(String, SocketAddr)> {
        client::udp_ask(&self.ns, ip, port, timeout)
    }

    /// A UDP socket with a fixed local port (same 5-tuple on every ask).
    pub fn udp_session(
        &self,
        ip: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<UdpSession> {
        UdpSession::open(&self.ns, ip, port, timeout)
    }

    /// Connect that is expected to fail: its error kind and how long it took.
    pub fn tcp_connect_error(
        &self,
        ip: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<(io::ErrorKind, Duration)> {
        client::tcp_connect_error(&self.ns, ip, port, timeout)
    }

    /// Connected UDP send + recv that is expected to fail (ICMP error).
    pub fn udp_connect_error(
        &self,
        ip: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<(io::ErrorKind, Duration)> {
        client::udp_connect_error(&self.ns, ip, port, timeout)
    }
}

/// Routes [`SERVICE_CIDR`] and [`EXTERNAL_CIDR`] in `node` into [`SERVICE_CIDR_IFACE`], a device
/// without ARP that drops what it is given: a `dummy` device, or an `ifb`
/// one (which drops every packet not redirected to it by tc) on kernels
/// built without the dummy driver.
fn route_service_cidr(node: &Netns, ipv6: bool) -> Result<()> {
    let mut errors = Vec::new();
    let mut created = false;
    for kind in ["dummy", "ifb"] {
        match node.ip(&["link", "add", SERVICE_CIDR_IFACE, "type", kind]) {
            Ok(_) => {
                created = true;
                break;
            }
            Err(e) => errors.push(format!("{kind}: {e:#}")),
        }
    }
    if !created {
        bail!(
            "cannot create {SERVICE_CIDR_IFACE} in {} for the service CIDR route: {}",
            node.name(),
            errors.join("; ")
        );
    }
    node.ip(&["link", "set", SERVICE_CIDR_IFACE, "up"])?;
    node.ip(&["route", "add", SERVICE_CIDR, "dev", SERVICE_CIDR_IFACE])?;
    node.ip(&["route", "add", EXTERNAL_CIDR, "dev", SERVICE_CIDR_IFACE])?;
    if ipv6 {
        node.ip(&[
            "-6",
            "route",
            "add",
            SERVICE_CIDR6,
            "dev",
            SERVICE_CIDR_IFACE,
        ])?;
    }
    Ok(())
}

/// Bit of ICMP type 3 (destination unreachable) in `net.ipv4.icmp_ratemask`.
pub const ICMP_RATEMASK_DEST_UNREACH: u32 = 1 << 3;

/// Clears the destination-unreachable bit of `net.ipv4.icmp_ratemask` in
/// `node`, so that REJECT's ICMP errors are not rate-limited per client.
fn unlimit_icmp_unreachable(node: &Netns, ipv6: bool) -> Result<()> {
    let key = "net.ipv4.icmp_ratemask";
    let mask: u32 = node
        .sysctl_get(key)?
        .parse()
        .with_context(|| format!("{key} in {}", node.name()))?;
    node.sysctl(key, &(mask & !ICMP_RATEMASK_DEST_UNREACH).to_string())?;
    if ipv6 {
        // ICMPv6 has no per-type mask worth editing here: no rate limit.
        node.sysctl("net.ipv6.icmp.ratelimit", "0")?;
    }
    Ok(())
}

/// Adds `ip`/64 on `eth0` in `ns` and `…::1`/64 on `node_iface` in `node`,
/// without duplicate address detection, and the default route via the
/// node.
fn wire6(ns: &Netns, ip: Ipv6Addr, node: &Netns, node_iface: &str) -> Result<()> {
    let mut gw = ip.segments();
    gw[7] = 1;
    let gateway = Ipv6Addr::from(gw);
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{ip}/64"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    node.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{gateway}/64"),
        "dev",
        node_iface,
        "nodad",
    ])?;
    ns.ip(&["-6", "route", "add", "default", "via", &gateway.to_string()])?;
    Ok(())
}

/// Creates the veth pair `eth0` (in `ns`) ↔ `node_iface` (in `node`), with
/// `ip`/24 and `gateway`/24, and (with `default_route`) a default route in
/// `ns` via the node.
fn wire(
    ns: &Netns,
    ip: Ipv4Addr,
    node: &Netns,
    node_iface: &str,
    gateway: Ipv4Addr,
    default_route: bool,
) -> Result<()> {
    crate::util::cmd(
        "ip",
        &[
            "link",
            "add",
            "eth0",
            "netns",
            ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            node_iface,
            "netns",
            node.name(),
        ],
    )
    .with_context(|| format!("create veth {} <-> {node_iface}", ns.name()))?;
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    node.sysctl(&format!("net.ipv4.conf.{node_iface}.rp_filter"), "0")?;
    node.ip(&["addr", "add", &format!("{gateway}/24"), "dev", node_iface])?;
    node.ip(&["link", "set", node_iface, "up"])?;
    if !default_route {
        return Ok(());
    }
    ns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
    if ns.ip(&["route", "show", "default"])?.trim().is_empty() {
        bail!("no default route in {}", ns.name());
    }
    Ok(())
}
