//! The standard scenario of the integration tests: Service `web`
//! (ClusterIP 10.96.0.10, 80/TCP "http" → 8080, 53/UDP "dns" → 8080), its
//! EndpointSlice over some backends, servers on 8080 in every backend, and
//! kproxy attached to the client-facing veth of the node.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::client::{TcpSession, UdpSession};
use crate::kproxy::Kproxy;
use crate::manifest::{ManifestDir, endpointslice_yaml, service_yaml_with};
use crate::mode::{Mode, mode};
use crate::servers::Servers;
use crate::topology::{Topology, backend_ip, backend_name};
use crate::util::SuiteLock;

/// ClusterIP of Service `web`.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const VIP_STR: &str = "10.96.0.10";
/// Service port "http" (TCP).
pub const HTTP_PORT: u16 = 80;
/// Service port "dns" (UDP).
pub const DNS_PORT: u16 = 53;
/// Port the backends listen on (TCP and UDP).
pub const TARGET_PORT: u16 = 8080;
pub const SERVICE: &str = "web";
pub const SERVICE_FILE: &str = "web-service.yaml";
pub const SLICE_FILE: &str = "web-slice.yaml";
pub const SLICE_NAME: &str = "web-abc12";

/// Timeout of one client request when a reply is expected.
pub const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait for `kproxy: applied`/`rejected` after a manifest change
/// (assertions on the latency itself are made separately).
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for kproxy to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `web` Service manifest.
pub fn web_service_yaml() -> String {
    web_service_yaml_with(serde_json::json!({}))
}

/// The `web` Service with more `spec` fields (session affinity, traffic
/// policies, …).
pub fn web_service_yaml_with(extra: serde_json::Value) -> String {
    service_yaml_with(
        SERVICE,
        VIP_STR,
        &[
            ("http", HTTP_PORT, TARGET_PORT, "TCP"),
            ("dns", DNS_PORT, TARGET_PORT, "UDP"),
        ],
        extra,
    )
}

/// The `web` EndpointSlice with the given endpoints `(ip, ready)`.
pub fn web_slice_yaml_with(endpoints: &[(&str, bool)]) -> String {
    endpointslice_yaml(
        SLICE_NAME,
        SERVICE,
        endpoints,
        &[("http", TARGET_PORT, "TCP"), ("dns", TARGET_PORT, "UDP")],
    )
}

/// The `web` EndpointSlice with `ready` backends and `draining` ones
/// (1-based): terminating pods still serving (ready=false, serving=true,
/// terminating=true), as the EndpointSlice controller lists a pod in its
/// grace period.
pub fn web_slice_yaml_draining(ready: &[usize], draining: &[usize]) -> String {
    let ips =
        |set: &[usize]| -> Vec<String> { set.iter().map(|i| backend_ip(*i).to_string()).collect() };
    let (r, d) = (ips(ready), ips(draining));
    let mut eps: Vec<(&str, serde_json::Value)> = r
        .iter()
        .map(|ip| (ip.as_str(), serde_json::json!({"ready": true})))
        .collect();
    eps.extend(d.iter().map(|ip| {
        (
            ip.as_str(),
            serde_json::json!({"ready": false, "serving": true, "terminating": true}),
        )
    }));
    crate::manifest::endpointslice_yaml_with_conditions(
        SLICE_NAME,
        SERVICE,
        &eps,
        &[("http", TARGET_PORT, "TCP"), ("dns", TARGET_PORT, "UDP")],
    )
}

/// The `web` EndpointSlice with the given backends (1-based), all ready.
pub fn web_slice_yaml(backends: &[usize]) -> String {
    let ips: Vec<String> = backends
        .iter()
        .map(|i| backend_ip(*i).to_string())
        .collect();
    let eps: Vec<(&str, bool)> = ips.iter().map(|ip| (ip.as_str(), true)).collect();
    web_slice_yaml_with(&eps)
}

/// Counts names: `["backend-1", "backend-2", "backend-1"]` → {backend-1: 2, backend-2: 1}.
pub fn tally<I, S>(names: I) -> BTreeMap<String, usize>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.into()).or_insert(0) += 1;
    }
    m
}

/// Expected tally from `(backend index, count)` pairs.
pub fn counts(pairs: &[(usize, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(i, n)| (backend_name(*i), *n)).collect()
}

/// How new flows spread in iptables mode, where each one picks its backend
/// at random (`statistic --mode random`, probability 1/k for each of k
/// backends): a spread check opens `flows` flows and requires at least
/// `min_each` of them on every backend.
///
/// The thresholds keep the chance that a correct datapath fails a check
/// below 1e-9: a backend's count is X ~ Binomial(flows, 1/k), and by the
/// union bound over the k backends P(fail) ≤ k·P(X < min_each).
/// [`RandomSpread::false_failure_bound`] computes it (a harness test checks
/// the table). A few checks per suite run put a false failure of the whole
/// suite around 1e-8. (60 flows with at least 8 each, for comparison, would
/// fail a correct datapath once in about 3,000 checks: 3.3e-4.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RandomSpread {
    pub backends: usize,
    pub flows: usize,
    pub min_each: usize,
}

/// 40 flows per backend; at least a quarter to a third of the fair share each.
pub const RANDOM_SPREADS: [RandomSpread; 3] = [
    // X ~ Bin(80, 1/2): P(X ≤ 13) = 3.2e-10, × 2 backends = 6.4e-10.
    RandomSpread {
        backends: 2,
        flows: 80,
        min_each: 14,
    },
    // X ~ Bin(120, 1/3): P(X ≤ 10) = 1.0e-10, × 3 backends = 3.1e-10.
    RandomSpread {
        backends: 3,
        flows: 120,
        min_each: 11,
    },
    // X ~ Bin(160, 1/4): P(X ≤ 9) = 9.5e-11, × 4 backends = 3.8e-10.
    RandomSpread {
        backends: 4,
        flows: 160,
        min_each: 10,
    },
];

impl RandomSpread {
    /// The check for `k` backends; panics for a count without one.
    pub fn for_backends(k: usize) -> RandomSpread {
        RANDOM_SPREADS
            .iter()
            .copied()
            .find(|s| s.backends == k)
            .unwrap_or_else(|| panic!("no random spread check for {k} backends"))
    }

    /// k·P(X < min_each) for X ~ Binomial(flows, 1/k): an upper bound of the
    /// probability that a correct random choice fails the check.
    pub fn false_failure_bound(&self) -> f64 {
        let (n, p) = (self.flows, 1.0 / self.backends as f64);
        // P(X = i), from P(X = 0) = (1-p)^n by the ratio of successive terms.
        let mut pmf = (1.0 - p).powi(n as i32);
        let mut tail = 0.0;
        for i in 0..self.min_each {
            tail += pmf;
            pmf *= (n - i) as f64 / (i + 1) as f64 * p / (1.0 - p);
        }
        self.backends as f64 * tail
    }
}

/// How many new flows a test opens to check that they spread over
/// `backends` backends: `ebpf_flows` with exact round-robin (a multiple of
/// `backends`), [`RandomSpread::flows`] in iptables mode.
pub fn spread_flows(backends: usize, ebpf_flows: usize) -> usize {
    match mode() {
        Mode::Ebpf => ebpf_flows,
        Mode::Iptables | Mode::Nftables => RandomSpread::for_backends(backends).flows,
    }
}

/// Asserts that the new flows answered by `names` spread over exactly
/// `backends` (1-based indexes). eBPF mode (exact round-robin): every
/// backend got the same number of flows. iptables mode (random choice): no
/// flow reached another backend and every backend got at least
/// [`RandomSpread::min_each`] of the [`RandomSpread::flows`].
pub fn assert_spread(names: &[String], backends: &[usize], what: &str) {
    let k = backends.len();
    match mode() {
        Mode::Ebpf => {
            assert_eq!(
                names.len() % k,
                0,
                "{what}: {} flows cannot spread evenly over {k} backends",
                names.len()
            );
            let each = names.len() / k;
            let expected: Vec<(usize, usize)> = backends.iter().map(|b| (*b, each)).collect();
            assert_eq!(tally(names), counts(&expected), "{what}: {names:?}");
        }
        Mode::Iptables | Mode::Nftables => {
            let spread = RandomSpread::for_backends(k);
            assert_eq!(
                names.len(),
                spread.flows,
                "{what}: a random spread check over {k} backends needs {} flows",
                spread.flows
            );
            let got = tally(names);
            let allowed: Vec<String> = backends.iter().map(|b| backend_name(*b)).collect();
            for (name, n) in &got {
                assert!(
                    allowed.contains(name),
                    "{what}: {n} flows reached {name}, not one of {allowed:?}: {got:?}"
                );
            }
            for name in &allowed {
                let n = got.get(name).copied().unwrap_or(0);
                assert!(
                    n >= spread.min_each,
                    "{what}: {name} got {n} of {} random flows, expected at least {} \
                     (a correct datapath fails this with probability < {:.1e}): {got:?}",
                    spread.flows,
                    spread.min_each,
                    spread.false_failure_bound()
                );
            }
        }
    }
}

/// Parses `backend-<i>` into `i`.
pub fn backend_index(name: &str) -> Result<usize> {
    name.strip_prefix("backend-")
        .and_then(|i| i.parse().ok())
        .with_context(|| format!("{name:?} is not a backend-<i> reply"))
}

/// Topology + backend servers + manifests (+ kproxy once started). Fields
/// drop in order: kproxy (detaches), servers, manifests, namespaces, and
/// finally the suite lock.
pub struct Fixture {
    kproxy: Option<Kproxy>,
    ready_line: Option<String>,
    pub servers: Servers,
    pub manifests: ManifestDir,
    pub topo: Topology,
    _lock: SuiteLock,
}

impl Fixture {
    /// Builds the topology with `n_backends`, starts servers on 8080 in all
    /// of them and writes the `web` Service plus an EndpointSlice listing
    /// `in_slice` (1-based indexes). kproxy is not started.
    pub fn new(n_backends: usize, in_slice: &[usize]) -> Result<Fixture> {
        let lock = SuiteLock::acquire()?;
        let topo = Topology::new(n_backends).context("build topology")?;
        Fixture::on(lock, topo, in_slice)
    }

    /// [`Fixture::new`] on a [`Topology::dual_stack`]: the backends'
    /// servers answer on IPv6 too.
    pub fn dual_stack(n_backends: usize, in_slice: &[usize]) -> Result<Fixture> {
        let lock = SuiteLock::acquire()?;
        let topo = Topology::dual_stack(n_backends).context("build topology")?;
        Fixture::on(lock, topo, in_slice)
    }

    fn on(lock: SuiteLock, topo: Topology, in_slice: &[usize]) -> Result<Fixture> {
        let servers = topo.start_servers(TARGET_PORT)?;
        let manifests = ManifestDir::new()?;
        manifests.write(SERVICE_FILE, &web_service_yaml())?;
        manifests.write(SLICE_FILE, &web_slice_yaml(in_slice))?;
        Ok(Fixture {
            kproxy: None,
            ready_line: None,
            servers,
            manifests,
            topo,
            _lock: lock,
        })
    }

    /// [`Fixture::new`] then [`Fixture::start_kproxy`].
    pub fn start(n_backends: usize, in_slice: &[usize]) -> Result<Fixture> {
        let mut f = Fixture::new(n_backends, in_slice)?;
        f.start_kproxy()?;
        Ok(f)
    }

    /// Starts kproxy on the node attached to the clients' veths and waits
    /// for `kproxy: ready`; returns that line.
    pub fn start_kproxy(&mut self) -> Result<String> {
        self.start_kproxy_with(&[])
    }

    /// [`Fixture::start_kproxy`] with extra command-line arguments.
    pub fn start_kproxy_with(&mut self, extra: &[&str]) -> Result<String> {
        let ifaces = self.topo.client_ifaces_on_node();
        let mut kp = Kproxy::start(&self.topo.node, self.manifests.path(), &ifaces, extra)?;
        let ready = kp.wait_ready()?;
        self.kproxy = Some(kp);
        self.ready_line = Some(ready.clone());
        Ok(ready)
    }

    /// [`Fixture::start_kproxy`], attached to the backends' veths as well, so
    /// that the backends are clients of the service too (hairpin). In
    /// iptables mode the rules cover the whole node either way.
    pub fn start_kproxy_on_backends_too(&mut self) -> Result<String> {
        let mut ifaces = self.topo.client_ifaces_on_node();
        ifaces.extend(self.topo.backends().iter().map(|b| b.node_iface.as_str()));
        let mut kp = Kproxy::start(&self.topo.node, self.manifests.path(), &ifaces, &[])?;
        let ready = kp.wait_ready()?;
        self.kproxy = Some(kp);
        self.ready_line = Some(ready.clone());
        Ok(ready)
    }

    /// The `kproxy: ready …` line of the last start. Panics if not started.
    pub fn ready_line(&self) -> &str {
        self.ready_line.as_deref().expect("kproxy was not started")
    }

    /// The running kproxy guard. Panics if it was not started.
    pub fn kproxy(&mut self) -> &mut Kproxy {
        self.kproxy.as_mut().expect("kproxy was not started")
    }

    /// Rewrites the `web` EndpointSlice to list `backends` (all ready).
    /// Returns the instant just before the atomic rename.
    pub fn set_slice(&self, backends: &[usize]) -> Result<Instant> {
        self.manifests.write(SLICE_FILE, &web_slice_yaml(backends))
    }

    /// Opens `n` TCP connections to `ip:port` (all kept open until the end,
    /// so every one has its own source port), asks each once and returns
    /// the reply names in order.
    pub fn tcp_round(&self, ip: impl Into<IpAddr>, port: u16, n: usize) -> Result<Vec<String>> {
        let ip: IpAddr = ip.into();
        let mut sessions: Vec<TcpSession> = Vec::with_capacity(n);
        let mut names = Vec::with_capacity(n);
        for k in 0..n {
            let mut s = self
                .topo
                .tcp_session(ip, port, IO_TIMEOUT)
                .with_context(|| format!("tcp connection #{k} to {ip}:{port}"))?;
            names.push(
                s.ask()
                    .with_context(|| format!("tcp ask #{k} to {ip}:{port}"))?,
            );
            sessions.push(s);
        }
        Ok(names)
    }

    /// Sends one UDP request each from `n` different sockets (all bound
    /// until the end, so every one has its own source port) and returns
    /// `(reply, reply source)` in order.
    pub fn udp_round(
        &self,
        ip: impl Into<IpAddr>,
        port: u16,
        n: usize,
    ) -> Result<Vec<(String, SocketAddr)>> {
        let ip: IpAddr = ip.into();
        let mut sessions: Vec<UdpSession> = Vec::with_capacity(n);
        let mut replies = Vec::with_capacity(n);
        for k in 0..n {
            let mut s = self.topo.udp_session(ip, port, IO_TIMEOUT)?;
            replies.push(
                s.ask()
                    .with_context(|| format!("udp ask #{k} to {ip}:{port}"))?,
            );
            sessions.push(s);
        }
        Ok(replies)
    }
}
