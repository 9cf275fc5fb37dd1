//! North-south: NodePort, externalIPs and LoadBalancer addresses, with
//! `externalTrafficPolicy` Cluster and Local, from a client outside the
//! node.
//!
//! Topology: the client (10.0.1.2) reaches the node on `c0` (10.0.1.1);
//! backends 1 and 2 are this node's endpoints (`nodeName: node1`); the
//! remote node `node2` (10.0.200.2, behind `n2` 10.0.200.1, no default
//! route) serves the third endpoint (`nodeName: node2`), which only
//! answers the node's own subnet — so it is reached only with source NAT.
//! kproxy runs with `--node-name node1` (eBPF: `--external-iface c0,c1,n2`).
//!
//! Not a test target: the cases, run by `north_south.rs` (both datapaths;
//! eBPF with its default XDP fast path) and `north_south_tc.rs` (eBPF with
//! `--xdp off`: TC alone must be as correct), through
//! [`north_south_tests!`].

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use kproxy_tests::fixture::{IO_TIMEOUT, TARGET_PORT, assert_spread, backend_index, spread_flows};
use kproxy_tests::{BackendServer, Fixture, Mode, Netns, mode};
use serde_json::{Value, json};

/// Index the remote node's server answers with (`backend-3`).
pub const REMOTE: usize = 3;
/// The node's address the client reaches it by.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// externalIP and LoadBalancer ingress address of Service `np`
/// (TEST-NET-3; the client's default route leads to the node).
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// How long a probe waits for a refusal or for nothing.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A Service of type LoadBalancer with ClusterIP `10.96.1.<n>`, port 80/TCP
/// (`http`, nodePort `np`) and 53/UDP (`dns`, nodePort `np`), the given
/// policy, externalIPs and LoadBalancer ingress addresses.
pub fn service(
    name: &str,
    n: u8,
    np: u16,
    policy: &str,
    external: &[Ipv4Addr],
    lb: &[Ipv4Addr],
) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": format!("10.96.1.{n}"),
            "externalTrafficPolicy": policy,
            "externalIPs": external.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
            "ports": [
                {"name": "http", "port": 80, "targetPort": TARGET_PORT, "protocol": "TCP", "nodePort": np},
                {"name": "dns", "port": 53, "targetPort": TARGET_PORT, "protocol": "UDP", "nodePort": np},
            ],
        },
        "status": {"loadBalancer": {"ingress": lb.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>()}},
    })
}

/// The EndpointSlice of `service`: `(address, node)` endpoints, all ready.
pub fn slice(service: &str, endpoints: &[(Ipv4Addr, &str)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-abc"),
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": endpoints.iter().map(|(ip, node)| json!({
            "addresses": [ip.to_string()],
            "conditions": {"ready": true},
            "nodeName": node,
        })).collect::<Vec<_>>(),
        "ports": [
            {"name": "http", "port": TARGET_PORT, "protocol": "TCP"},
            {"name": "dns", "port": TARGET_PORT, "protocol": "UDP"},
        ],
    })
}

/// How the eBPF datapath runs the external interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Xdp {
    /// kproxy's default (`--xdp auto`: native on veth, in eBPF mode; iptables has none).
    Default,
    /// `--xdp off`: TC alone.
    Off,
}

/// The fixture's two local backends, the remote node with its server, and
/// the manifests of `objects` (written before kproxy starts).
pub struct NorthSouth {
    pub f: Fixture,
    remote: BackendServer,
}

impl NorthSouth {
    pub fn start(objects: &[(&str, Value)], xdp: Xdp) -> Result<NorthSouth> {
        if xdp == Xdp::Off {
            anyhow::ensure!(
                mode() == Mode::Ebpf,
                "--xdp off is an eBPF mode option: this file is generated for eBPF mode only \
                 (cargo xtask test leaves it out of the iptables run)"
            );
        }
        let mut f = Fixture::new(2, &[1, 2])?;
        // A second outside client (10.0.2.2, behind `c1` 10.0.2.1).
        f.topo.add_client()?;
        f.topo.add_remote_node()?;
        let node2 = f.topo.remote_node();
        let remote = BackendServer::start(&node2.ns, REMOTE, node2.ip, TARGET_PORT)?;
        f.topo.nic_like_offloads()?;
        for (file, obj) in objects {
            f.manifests
                .write(file, &serde_json::to_string_pretty(obj)?)?;
        }
        let extra = args(&f.topo, xdp);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        f.start_kproxy_with(&extra)?;
        Ok(NorthSouth { f, remote })
    }

    /// This node's two endpoints and the remote one.
    pub fn all_endpoints(&self) -> Vec<(Ipv4Addr, &'static str)> {
        let t = &self.f.topo;
        vec![
            (t.backend(1).ip, "node1"),
            (t.backend(2).ip, "node1"),
            (t.remote_node().ip, "node2"),
        ]
    }

    /// `n` new TCP connections to `ip:port`, each asked once: the names
    /// that answered, after checking every reply came from `ip:port`.
    pub fn tcp_round(&self, ip: Ipv4Addr, port: u16, n: usize) -> Result<Vec<String>> {
        let mut sessions = Vec::with_capacity(n);
        let mut names = Vec::with_capacity(n);
        for k in 0..n {
            let mut s = self
                .f
                .topo
                .tcp_session(ip, port, IO_TIMEOUT)
                .with_context(|| format!("tcp connection #{k} to {ip}:{port}"))?;
            names.push(
                s.ask()
                    .with_context(|| format!("tcp ask #{k} to {ip}:{port}"))?,
            );
            assert_eq!(s.peer(), SocketAddr::from((ip, port)), "reply source");
            sessions.push(s);
        }
        Ok(names)
    }

    /// `n` UDP requests from different sockets to `ip:port`: the names that
    /// answered, after checking every reply came from `ip:port`.
    fn udp_round(&self, ip: Ipv4Addr, port: u16, n: usize) -> Result<Vec<String>> {
        let replies = self.f.udp_round(ip, port, n)?;
        for (_, from) in &replies {
            assert_eq!(*from, SocketAddr::from((ip, port)), "UDP reply source");
        }
        Ok(replies.into_iter().map(|(name, _)| name).collect())
    }

    /// Addresses the server `index` saw connections and datagrams from.
    pub fn peers_of(&self, index: usize) -> Vec<Ipv4Addr> {
        let server = if index == REMOTE {
            &self.remote
        } else {
            self.f.servers.backend(index)
        };
        let mut ips: Vec<Ipv4Addr> = server
            .tcp_peers()
            .into_iter()
            .chain(server.udp_peers())
            .filter_map(|p| match p.ip() {
                std::net::IpAddr::V4(ip) => Some(ip),
                _ => None,
            })
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }
}

pub fn np_objects(policy: &str) -> Vec<(&'static str, Value)> {
    vec![(
        "np-service.yaml",
        service("np", 50, 30080, policy, &[EXTERNAL_IP], &[LB_IP]),
    )]
}

pub fn nodeport_balances_over_local_and_remote_endpoints_with_snat_to_the_remote(
    xdp: Xdp,
) -> Result<()> {
    let mut ns = NorthSouth::start(&np_objects("Cluster"), xdp)?;
    let eps = ns.all_endpoints();
    ns.f.manifests
        .write("np-slice.yaml", &serde_json::to_string(&slice("np", &eps))?)?;
    ns.f.kproxy().wait_applied(Duration::from_secs(10))?;
    let n = spread_flows(3, 9);
    let names = ns.tcp_round(NODE_IP, 30080, n)?;
    assert_spread(&names, &[1, 2, REMOTE], "TCP to the nodePort");
    let names = ns.udp_round(NODE_IP, 30080, n)?;
    assert_spread(&names, &[1, 2, REMOTE], "UDP to the nodePort");
    // The remote endpoint can only answer the node: it saw the node's
    // address on its link, never the client's.
    let remote = ns.f.topo.remote_node().node_ip;
    assert_eq!(
        ns.peers_of(REMOTE),
        [remote],
        "source NAT to the remote node"
    );
    if mode() == Mode::Ebpf {
        // eBPF source-NATs only flows that leave the node.
        let client = ns.f.topo.client_ip();
        for i in [1, 2] {
            assert_eq!(
                ns.peers_of(i),
                [client],
                "local endpoint {i} sees the client"
            );
        }
    }
    Ok(())
}

pub fn external_ip_and_load_balancer_address_balance_like_the_nodeport(xdp: Xdp) -> Result<()> {
    let mut ns = NorthSouth::start(&np_objects("Cluster"), xdp)?;
    let eps = ns.all_endpoints();
    ns.f.manifests
        .write("np-slice.yaml", &serde_json::to_string(&slice("np", &eps))?)?;
    ns.f.kproxy().wait_applied(Duration::from_secs(10))?;
    for ip in [EXTERNAL_IP, LB_IP] {
        let n = spread_flows(3, 9);
        let names = ns.tcp_round(ip, 80, n)?;
        assert_spread(&names, &[1, 2, REMOTE], &format!("TCP to {ip}:80"));
        let names = ns.udp_round(ip, 53, n)?;
        assert_spread(&names, &[1, 2, REMOTE], &format!("UDP to {ip}:53"));
    }
    Ok(())
}

pub fn local_policy_keeps_the_client_address_and_only_local_endpoints(xdp: Xdp) -> Result<()> {
    let mut ns = NorthSouth::start(&np_objects("Local"), xdp)?;
    let eps = ns.all_endpoints();
    ns.f.manifests
        .write("np-slice.yaml", &serde_json::to_string(&slice("np", &eps))?)?;
    ns.f.kproxy().wait_applied(Duration::from_secs(10))?;
    let n = spread_flows(2, 8);
    let names = ns.tcp_round(NODE_IP, 30080, n)?;
    assert_spread(&names, &[1, 2], "TCP to a Local nodePort");
    let names = ns.udp_round(LB_IP, 53, n)?;
    assert_spread(&names, &[1, 2], "UDP to a Local LoadBalancer address");
    let client = ns.f.topo.client_ip();
    for i in [1, 2] {
        assert_eq!(
            ns.peers_of(i),
            [client],
            "endpoint {i} sees the client itself"
        );
    }
    assert!(
        ns.peers_of(REMOTE).is_empty(),
        "the remote endpoint got traffic"
    );
    Ok(())
}

pub fn without_endpoints_cluster_refuses_and_local_drops(xdp: Xdp) -> Result<()> {
    let remote_only = [(Ipv4Addr::new(10, 0, 200, 2), "node2")];
    let ns = NorthSouth::start(
        &[
            (
                "empty-service.yaml",
                service("empty", 51, 30081, "Cluster", &[], &[]),
            ),
            (
                "away-service.yaml",
                service("away", 52, 30082, "Local", &[], &[]),
            ),
            ("away-slice.yaml", slice("away", &remote_only)),
        ],
        xdp,
    )?;
    // Cluster policy, no endpoints at all: refused at once, TCP and UDP.
    let (kind, took) = ns.f.topo.tcp_connect_error(NODE_IP, 30081, PROBE_TIMEOUT)?;
    assert_eq!(kind, ErrorKind::ConnectionRefused, "TCP after {took:?}");
    let (kind, took) = ns.f.topo.udp_connect_error(NODE_IP, 30081, PROBE_TIMEOUT)?;
    assert_eq!(kind, ErrorKind::ConnectionRefused, "UDP after {took:?}");
    // Local policy, endpoints only on node2: dropped (no answer at all),
    // and the remote endpoint never sees the traffic.
    let (kind, took) = ns.f.topo.tcp_connect_error(NODE_IP, 30082, PROBE_TIMEOUT)?;
    assert!(
        matches!(kind, ErrorKind::TimedOut | ErrorKind::WouldBlock),
        "TCP to a Local nodePort without local endpoints: {kind:?} after {took:?}, expected no answer"
    );
    assert!(
        ns.peers_of(REMOTE).is_empty(),
        "the remote endpoint got traffic"
    );
    Ok(())
}

pub fn invalid_north_south_fields_are_rejected_and_the_rest_keeps_working(xdp: Xdp) -> Result<()> {
    let mut ns = NorthSouth::start(&np_objects("Cluster"), xdp)?;
    let eps = ns.all_endpoints();
    ns.f.manifests
        .write("np-slice.yaml", &serde_json::to_string(&slice("np", &eps))?)?;
    ns.f.kproxy().wait_applied(Duration::from_secs(10))?;
    let bad = [
        ("out of range", service("bad", 60, 80, "Cluster", &[], &[])),
        ("duplicate", service("dup", 61, 30080, "Cluster", &[], &[])),
        ("bad policy", service("pol", 62, 30090, "Nearby", &[], &[])),
    ];
    for (what, obj) in bad {
        ns.f.manifests
            .write("bad-service.yaml", &serde_json::to_string(&obj)?)?;
        let line = ns.f.kproxy().wait_rejected(Duration::from_secs(10))?.text;
        assert!(line.contains("bad-service.yaml"), "{what}: {line}");
        let (name, _) = ns.f.topo.tcp_ask(NODE_IP, 30080, IO_TIMEOUT)?;
        backend_index(&name).with_context(|| format!("after the {what} nodePort"))?;
    }
    let mut bad_range = service("rng", 64, 30092, "Cluster", &[], &[LB_IP]);
    bad_range["spec"]["loadBalancerSourceRanges"] = json!(["10.0.0.0/33"]);
    ns.f.manifests
        .write("bad-service.yaml", &serde_json::to_string(&bad_range)?)?;
    let line = ns.f.kproxy().wait_rejected(Duration::from_secs(10))?.text;
    assert!(line.contains("spec.loadBalancerSourceRanges[0]"), "{line}");
    let mut bad_ip = service("ext", 63, 30091, "Cluster", &[], &[]);
    bad_ip["spec"]["externalIPs"] = json!(["203.0.113.300"]);
    ns.f.manifests
        .write("bad-service.yaml", &serde_json::to_string(&bad_ip)?)?;
    let line = ns.f.kproxy().wait_rejected(Duration::from_secs(10))?.text;
    assert!(line.contains("spec.externalIPs[0]"), "{line}");
    Ok(())
}

/// `GET /healthz` from `ns` to `addr`: the status code and the JSON body.
fn http_get(ns: &Netns, addr: SocketAddr) -> Result<(u16, Value)> {
    let (status, body) = kproxy_tests::http_get(ns, addr, "/healthz", IO_TIMEOUT)?;
    Ok((
        status,
        serde_json::from_str(&body).with_context(|| format!("body {body:?}"))?,
    ))
}

pub fn health_check_node_port_answers_the_local_endpoint_count(xdp: Xdp) -> Result<()> {
    let mut lb = service("hc", 53, 30084, "Local", &[], &[LB_IP]);
    lb["spec"]["healthCheckNodePort"] = json!(32000);
    let mut ns = NorthSouth::start(&[("hc-service.yaml", lb)], xdp)?;
    let health = SocketAddr::from((NODE_IP, 32000));
    // No slice yet: served, but unhealthy.
    let (status, body) = http_get(&ns.f.topo.client().ns, health)?;
    assert_eq!(
        (status, &body["localEndpoints"]),
        (503, &json!(0)),
        "{body}"
    );
    assert_eq!(
        body["service"],
        json!({"namespace": "default", "name": "hc"})
    );
    let eps = ns.all_endpoints();
    ns.f.manifests
        .write("hc-slice.yaml", &serde_json::to_string(&slice("hc", &eps))?)?;
    ns.f.kproxy().wait_applied(Duration::from_secs(10))?;
    // Two of the three endpoints are on this node.
    let (status, body) = http_get(&ns.f.topo.client().ns, health)?;
    assert_eq!(
        (status, &body["localEndpoints"]),
        (200, &json!(2)),
        "{body}"
    );
    let remote_only = [(ns.f.topo.remote_node().ip, "node2")];
    ns.f.manifests.write(
        "hc-slice.yaml",
        &serde_json::to_string(&slice("hc", &remote_only))?,
    )?;
    ns.f.kproxy().wait_applied(Duration::from_secs(10))?;
    let (status, body) = http_get(&ns.f.topo.client().ns, health)?;
    assert_eq!(
        (status, &body["localEndpoints"]),
        (503, &json!(0)),
        "{body}"
    );
    // The Service gone: nothing listens any more.
    ns.f.manifests.remove("hc-service.yaml")?;
    ns.f.kproxy().wait_applied(Duration::from_secs(10))?;
    let gone = http_get(&ns.f.topo.client().ns, health);
    assert!(gone.is_err(), "health check still served: {gone:?}");
    Ok(())
}

pub fn load_balancer_source_ranges_admit_one_client_and_drop_another(xdp: Xdp) -> Result<()> {
    const FW_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
    let mut lb = service("fw", 54, 30085, "Cluster", &[], &[FW_IP]);
    lb["spec"]["loadBalancerSourceRanges"] = json!(["192.0.2.0/24", "10.0.1.2/32"]);
    let local = [
        (Ipv4Addr::new(10, 0, 11, 2), "node1"),
        (Ipv4Addr::new(10, 0, 12, 2), "node1"),
    ];
    let mut ns = NorthSouth::start(
        &[
            ("fw-service.yaml", lb.clone()),
            ("fw-slice.yaml", slice("fw", &local)),
        ],
        xdp,
    )?;
    let (allowed, refused) = (&ns.f.topo.clients()[0], &ns.f.topo.clients()[1]);
    // The listed client reaches the LoadBalancer address, TCP and UDP.
    let (name, _) = allowed.tcp_ask(FW_IP, 80, IO_TIMEOUT)?;
    backend_index(&name)?;
    let (name, from) = allowed.udp_ask(FW_IP, 53, IO_TIMEOUT)?;
    backend_index(&name)?;
    assert_eq!(from, SocketAddr::from((FW_IP, 53)));
    // The other one is dropped there: no answer, nothing reaches a backend.
    let before = ns.f.servers.total_tcp_accepted();
    let (kind, took) = refused.tcp_connect_error(FW_IP, 80, PROBE_TIMEOUT)?;
    assert!(
        matches!(kind, ErrorKind::TimedOut | ErrorKind::WouldBlock),
        "client outside the ranges: {kind:?} after {took:?}, expected no answer"
    );
    assert_eq!(
        ns.f.servers.total_tcp_accepted(),
        before,
        "a refused client got through"
    );
    // The ranges guard the LoadBalancer address only: the nodePort is open.
    let (name, _) = refused.tcp_ask(refused.gateway, 30085, IO_TIMEOUT)?;
    backend_index(&name)?;
    // Ranges removed: the address is open to everyone.
    lb["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("loadBalancerSourceRanges");
    ns.f.manifests
        .write("fw-service.yaml", &serde_json::to_string(&lb)?)?;
    ns.f.kproxy().wait_applied(Duration::from_secs(10))?;
    let refused = &ns.f.topo.clients()[1];
    let (name, _) = refused.tcp_ask(FW_IP, 80, IO_TIMEOUT)?;
    backend_index(&name)?;
    Ok(())
}

/// kproxy's command line for these tests: `extra` plus the node name and,
/// in eBPF mode, the external interfaces and the XDP setting.
fn args(topo: &kproxy_tests::Topology, xdp: Xdp) -> Vec<String> {
    let mut args: Vec<String> = vec!["--node-name".into(), "node1".into()];
    if mode() == Mode::Ebpf {
        let mut externals = topo.client_ifaces_on_node().join(",");
        externals.push_str(&format!(",{}", topo.remote_node().node_iface));
        args.extend(["--external-iface".into(), externals]);
        if xdp == Xdp::Off {
            args.extend(["--xdp".into(), "off".into()]);
        }
    }
    args
}

/// Removes a pin directory however the test ends.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn a_restarted_agent_adopts_north_south_state_and_keeps_its_flows(xdp: Xdp) -> Result<()> {
    use kproxy_tests::Kproxy;
    use kproxy_tests::kproxy::Launch;
    const FW_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 31);
    let mut fw = service("fw", 55, 30086, "Cluster", &[], &[FW_IP]);
    fw["spec"]["loadBalancerSourceRanges"] = json!(["10.0.1.2/32"]);
    // Started like the other cases, then stopped: the topology and objects
    // are what this case reuses; its agents pin under the host's bpffs.
    let mut ns = NorthSouth::start(&[("fw-service.yaml", fw)], xdp)?;
    let eps = ns.all_endpoints();
    ns.f.manifests.write(
        "np-service.yaml",
        &serde_json::to_string(&np_objects("Cluster")[0].1)?,
    )?;
    ns.f.manifests
        .write("np-slice.yaml", &serde_json::to_string(&slice("np", &eps))?)?;
    ns.f.manifests.write(
        "fw-slice.yaml",
        &serde_json::to_string(&slice("fw", &eps[..2]))?,
    )?;
    ns.f.kproxy().wait_applied(Duration::from_secs(10))?;
    ns.f.kproxy().stop(Duration::from_secs(10))?;
    let pin = PinDir(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/kpt-ns-restart-{}",
        std::process::id()
    )));
    let mut args = args(&ns.f.topo, xdp);
    if mode() == Mode::Ebpf {
        args.extend(["--pin-dir".into(), pin.0.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let start = |ns: &NorthSouth| -> Result<Kproxy> {
        let mut kp = Kproxy::start_with(
            &ns.f.topo.node,
            ns.f.manifests.path(),
            &ns.f.topo.client_ifaces_on_node(),
            &args,
            mode(),
            Launch::NsenterNet,
        )?;
        kp.wait_ready()?;
        Ok(kp)
    };
    let mut first = start(&ns)?;
    // One connection per endpoint, the remote one source-NATed.
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let mut s = ns.f.topo.tcp_session(NODE_IP, 30080, IO_TIMEOUT)?;
        let name = s.ask()?;
        sessions.push((s, name));
    }
    first.kill9()?;
    // Established flows carry on without an agent.
    for (s, name) in &mut sessions {
        assert_eq!(&s.ask()?, name, "a flow moved while no agent ran");
    }
    let mut second = start(&ns)?;
    for (s, name) in &mut sessions {
        assert_eq!(
            &s.ask()?,
            name,
            "a flow moved when the next agent adopted the datapath"
        );
    }
    // The adopted nodePort still balances exactly (eBPF) over all three…
    let names = ns.tcp_round(NODE_IP, 30080, spread_flows(3, 9))?;
    assert_spread(&names, &[1, 2, REMOTE], "new flows after the restart");
    // …and the adopted source ranges still admit one client and drop the
    // other.
    let (name, _) = ns.f.topo.clients()[0].tcp_ask(FW_IP, 80, IO_TIMEOUT)?;
    backend_index(&name)?;
    let (kind, took) = ns.f.topo.clients()[1].tcp_connect_error(FW_IP, 80, PROBE_TIMEOUT)?;
    assert!(
        matches!(kind, ErrorKind::TimedOut | ErrorKind::WouldBlock),
        "refused client after the restart: {kind:?} after {took:?}"
    );
    let status = second.stop(Duration::from_secs(10))?;
    assert!(status.success(), "second agent exit status {status:?}");
    Ok(())
}

/// One `#[test]` per case, run with `$xdp`.
#[macro_export]
macro_rules! north_south_tests {
    ($xdp:expr) => {
        north_south_tests!($xdp; a_restarted_agent_adopts_north_south_state_and_keeps_its_flows, nodeport_balances_over_local_and_remote_endpoints_with_snat_to_the_remote, external_ip_and_load_balancer_address_balance_like_the_nodeport, local_policy_keeps_the_client_address_and_only_local_endpoints, without_endpoints_cluster_refuses_and_local_drops, invalid_north_south_fields_are_rejected_and_the_rest_keeps_working, health_check_node_port_answers_the_local_endpoint_count, load_balancer_source_ranges_admit_one_client_and_drop_another);
    };
    ($xdp:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() -> anyhow::Result<()> {
                cases::$case($xdp)
            }
        )*
    };
}
