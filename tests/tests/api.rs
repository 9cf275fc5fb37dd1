//! kproxy following a Kubernetes API: a real `kcontrol apiserver` in the
//! node namespace, objects written with real `kubectl`, kproxy started with
//! `--kubeconfig`. Runs in both datapath modes, and once more with the
//! apiserver keeping its objects in a real etcd (one member on the node
//! namespace's loopback, as the apiserver).

use std::io::ErrorKind;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kproxy_tests::apiserver::Apiserver;
use kproxy_tests::fixture::{
    DNS_PORT, HTTP_PORT, IO_TIMEOUT, STOP_TIMEOUT, VIP, assert_spread, backend_index, spread_flows,
    web_service_yaml, web_service_yaml_with, web_slice_yaml,
};
use kproxy_tests::kproxy::{Launch, Source, field_u64};
use kproxy_tests::{Fixture, Kproxy, mode, multi_doc};
use testbed::EtcdCluster;

/// Removes the apiserver's data directory however the test ends.
struct DataDir(PathBuf);

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_kproxy(f: &Fixture, api: &Apiserver) -> Result<(Kproxy, u64)> {
    let kubeconfig = api.kubeconfig();
    let mut kp = Kproxy::start_from(
        &f.topo.node,
        Source::Kubeconfig(&kubeconfig),
        &[f.topo.client_iface_on_node()],
        &["--no-pin"],
        mode(),
        Launch::IpNetnsExec,
    )?;
    let ready = kp.wait_ready()?;
    Ok((kp, field_u64(&ready, "backends")?))
}

/// Waits for an `applied` line reporting `backends` backend slots.
fn wait_backends(kp: &mut Kproxy, backends: u64, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            bail!("kproxy did not reach backends={backends} within {timeout:?}");
        }
        let line = kp.wait_applied(left)?;
        if field_u64(&line.text, "backends")? == backends {
            return Ok(start.elapsed());
        }
    }
}

fn apply(api: &Apiserver, backends: &[usize]) -> Result<()> {
    let docs = multi_doc(&[web_service_yaml(), web_slice_yaml(backends)]);
    api.kubectl(&["apply", "-f", "-"], Some(&docs))?;
    Ok(())
}

fn reached(f: &Fixture, n: usize) -> Result<Vec<usize>> {
    f.tcp_round(VIP, HTTP_PORT, n)?
        .iter()
        .map(|s| backend_index(s))
        .collect()
}

#[test]
fn services_follow_the_kubernetes_api() -> Result<()> {
    follow_the_api(Store::Embedded)
}

/// The same with the apiserver on etcd (`--store etcd://…`): etcd runs in
/// the node namespace next to the apiserver and outlives the apiserver's
/// restart in the middle of the test.
#[test]
fn services_follow_the_kubernetes_api_on_etcd() -> Result<()> {
    follow_the_api(Store::Etcd)
}

#[derive(Clone, Copy, PartialEq)]
enum Store {
    Embedded,
    Etcd,
}

fn follow_the_api(store: Store) -> Result<()> {
    let f = Fixture::new(3, &[])?;
    let tag = if store == Store::Etcd { "-etcd" } else { "" };
    let data = DataDir(PathBuf::from(format!(
        "/tmp/kpt-api{tag}-{}",
        std::process::id()
    )));
    // Declared before the apiserver, so dropped after it.
    let etcd = match store {
        Store::Embedded => None,
        Store::Etcd => Some(f.topo.node.try_run(|| EtcdCluster::start(1))?),
    };
    let extra: Vec<String> = match &etcd {
        Some(e) => vec!["--store".into(), e.url()],
        None => Vec::new(),
    };
    let mut api = Apiserver::start_with(&f.topo.node, &data.0, "127.0.0.1:6443", &extra)?;
    let (mut kp, base) = start_kproxy(&f, &api)?;

    // Service + EndpointSlice created through the API: balanced within 1 s
    // (two service ports × three endpoints = six backend slots).
    apply(&api, &[1, 2, 3])?;
    let took = wait_backends(&mut kp, base + 6, Duration::from_secs(1))
        .context("programmed within 1 s of kubectl apply")?;
    eprintln!("API change programmed {took:?} after kubectl returned");
    let names = f.tcp_round(VIP, HTTP_PORT, spread_flows(3, 3))?;
    assert_spread(&names, &[1, 2, 3], "flows after the Service was created");
    let (udp, from) = f.topo.udp_ask(VIP, DNS_PORT, IO_TIMEOUT)?;
    assert!(backend_index(&udp).is_ok() && from.port() == DNS_PORT);

    // All endpoints removed: refused at once.
    apply(&api, &[])?;
    wait_backends(&mut kp, base, Duration::from_secs(5))?;
    let (kind, elapsed) = f.topo.tcp_connect_error(VIP, HTTP_PORT, IO_TIMEOUT)?;
    assert_eq!(kind, ErrorKind::ConnectionRefused, "after {elapsed:?}");

    // Service deleted: traffic to it is no longer translated.
    let accepted = f.servers.total_tcp_accepted();
    api.kubectl(&["delete", "service", "web"], None)?;
    let line = kp.wait_applied(Duration::from_secs(5))?;
    assert_eq!(field_u64(&line.text, "backends")?, base, "{}", line.text);
    match f.topo.tcp_ask(VIP, HTTP_PORT, Duration::from_millis(500)) {
        Ok((name, _)) => bail!("{name} answered a deleted Service"),
        Err(_) => assert_eq!(f.servers.total_tcp_accepted(), accepted),
    }

    // The apiserver goes away and comes back; the agent resumes and applies
    // what changes next, without a restart of its own.
    api.kill()?;
    let down = Instant::now();
    api.restart()?;
    apply(&api, &[1, 2])?;
    let took = wait_backends(&mut kp, base + 4, Duration::from_secs(45))?;
    eprintln!(
        "change after apiserver restart applied {took:?} later ({:?} since the outage)",
        down.elapsed()
    );
    let reached_now = reached(&f, spread_flows(2, 2))?;
    assert_spread(
        &reached_now
            .iter()
            .map(|i| format!("backend-{i}"))
            .collect::<Vec<_>>(),
        &[1, 2],
        "after apiserver restart",
    );

    // The agent goes away; changes made meanwhile are applied when it is back.
    let status = kp.stop(STOP_TIMEOUT)?;
    assert!(status.success());
    apply(&api, &[3])?;
    let (_kp2, backends) = start_kproxy(&f, &api)?;
    assert_eq!(backends, base + 2, "started from the API's current state");
    assert!(
        reached(&f, 3)?.iter().all(|i| *i == 3),
        "only backend 3 is left"
    );
    Ok(())
}

/// In API mode the node's zone comes from its Node object's
/// `topology.kubernetes.io/zone` label: a `PreferClose` Service then keeps
/// its traffic on the endpoints hinted for that zone.
#[test]
fn the_node_objects_zone_label_steers_prefer_close() -> Result<()> {
    let f = Fixture::new(3, &[])?;
    let data = DataDir(PathBuf::from(format!(
        "/tmp/kpt-api-zone-{}",
        std::process::id()
    )));
    let api = Apiserver::start(&f.topo.node, &data.0, "127.0.0.1:6443")?;
    let node = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n  labels:\n    \
                topology.kubernetes.io/zone: a\n";
    let service = web_service_yaml_with(serde_json::json!({"trafficDistribution": "PreferClose"}));
    let zones = [(1, "a"), (2, "b"), (3, "a")];
    let endpoints: Vec<String> = zones
        .iter()
        .map(|(i, z)| {
            format!(
                "- addresses: [{}]\n  conditions: {{ready: true}}\n  zone: {z}\n  \
                 hints: {{forZones: [{{name: {z}}}]}}\n",
                kproxy_tests::backend_ip(*i)
            )
        })
        .collect();
    let slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc12\n  \
         namespace: default\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\n\
         endpoints:\n{}ports:\n- {{name: http, port: 8080, protocol: TCP}}\n\
         - {{name: dns, port: 8080, protocol: UDP}}\n",
        endpoints.concat()
    );
    api.kubectl(
        &["apply", "-f", "-"],
        Some(&multi_doc(&[node.to_owned(), service, slice])),
    )?;
    let mut kp = Kproxy::start_from(
        &f.topo.node,
        Source::Kubeconfig(&api.kubeconfig()),
        &[f.topo.client_iface_on_node()],
        &["--no-pin", "--node-name", "node1"],
        mode(),
        Launch::IpNetnsExec,
    )?;
    kp.wait_ready()?;
    let names = f.tcp_round(VIP, HTTP_PORT, spread_flows(2, 12))?;
    assert_spread(
        &names,
        &[1, 3],
        "zone a's endpoints (from the Node's label)",
    );
    Ok(())
}
