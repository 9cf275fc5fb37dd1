//! `kproxy inspect` against a running agent, in every datapath: the `web`
//! frontends with their backends, the backends following a slice change,
//! the open connections in conntrack (eBPF: the `CONNTRACK` map's forward
//! and reply entries; iptables and nftables: netfilter's entry), a ClientIP
//! binding (eBPF: `AFFINITY`; iptables: the endpoint's `recent` list;
//! nftables: the endpoint's affinity set), and what an agent that exited
//! with `--keep-datapath-on-exit` left (eBPF); an IPv6 ClusterIP's
//! frontends and backends next to the IPv4 ones (eBPF: `SERVICES6`,
//! `SLOTS6`; iptables: the ip6tables rules; nftables: the `ip6` table; no
//! IPv6 traffic,
//! which tests/tests/ipv6.rs sends). Without a datapath, with another
//! layout, or asked for an unknown subject it fails with one error line and
//! exit code 1.
//!
//! kproxy runs with `nsenter --net` (not `ip netns exec`, whose private
//! /sys would hide its pins) and, in eBPF mode, a pin directory of its own
//! under the host's /sys/fs/bpf; `kproxy inspect -o json` runs the same way
//! in the node namespace.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};
use kproxy_tests::fixture::{
    APPLY_TIMEOUT, HTTP_PORT, IO_TIMEOUT, SERVICE, SERVICE_FILE, STOP_TIMEOUT, TARGET_PORT, VIP,
    VIP_STR, backend_index, web_service_yaml_with,
};
use kproxy_tests::kproxy::{Launch, kproxy_bin};
use kproxy_tests::{Fixture, Kproxy, Mode, Netns, SuiteLock, TcpSession, backend_ip, mode};
use serde_json::{Value, json};

const WEB_HTTP: &str = "10.96.0.10:80/TCP";
const WEB_DNS: &str = "10.96.0.10:53/UDP";

/// The test's pin directory under the host's bpffs, removed however the
/// test ends.
struct PinDir(PathBuf);

impl PinDir {
    fn new(what: &str) -> PinDir {
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/kpt-inspect-{what}-{}",
            std::process::id()
        )))
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("pin path is UTF-8")
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// kproxy in the node namespace through `nsenter --net`, pinning under
/// `pin` in eBPF mode.
fn start(f: &Fixture, pin: &PinDir, extra: &[&str]) -> Result<Kproxy> {
    let mut args: Vec<&str> = match mode() {
        Mode::Ebpf => vec!["--pin-dir", pin.arg()],
        Mode::Iptables | Mode::Nftables => vec![],
    };
    args.extend(extra);
    let mut kp = Kproxy::start_with(
        &f.topo.node,
        f.manifests.path(),
        &[f.topo.client_iface_on_node()],
        &args,
        mode(),
        Launch::NsenterNet,
    )?;
    kp.wait_ready()?;
    Ok(kp)
}

/// `kproxy inspect ARGS` in `node` (`nsenter --net`), as the process ended.
fn run_inspect(node: &Netns, args: &[&str]) -> Result<Output> {
    Command::new("nsenter")
        .arg(format!("--net={}", node.path().display()))
        .arg(kproxy_bin())
        .arg("inspect")
        .args(args)
        .output()
        .context("running kproxy inspect")
}

/// `kproxy inspect SUBJECT -o json` of the suite's datapath, parsed.
fn inspect(f: &Fixture, pin: &PinDir, subject: &str) -> Result<Value> {
    let mut args = vec![subject, "-o", "json"];
    match mode() {
        Mode::Ebpf => args.extend(["--pin-dir", pin.arg()]),
        Mode::Iptables | Mode::Nftables => args.extend(["--mode", mode().as_str()]),
    }
    let out = run_inspect(&f.topo.node, &args)?;
    ensure!(
        out.status.success(),
        "kproxy inspect {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "kproxy inspect {args:?} printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    assert_eq!(doc["subject"], subject, "{doc:#}");
    assert_eq!(doc["mode"], mode().as_str(), "{doc:#}");
    Ok(doc)
}

/// The rows of `key` whose `field` is `value`.
fn rows<'a>(doc: &'a Value, key: &str, field: &str, value: &str) -> Vec<&'a Value> {
    doc[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} array in {doc:#}"))
        .iter()
        .filter(|r| r[field] == value)
        .collect()
}

/// The one row of `key` whose `field` is `value`.
fn row<'a>(doc: &'a Value, key: &str, field: &str, value: &str) -> &'a Value {
    let found = rows(doc, key, field, value);
    assert_eq!(found.len(), 1, "{field} = {value} in {key}: {doc:#}");
    found[0]
}

/// `backend_ip(i):8080` of backends `indexes`.
fn endpoints(indexes: &[usize]) -> BTreeSet<String> {
    indexes
        .iter()
        .map(|i| format!("{}:{TARGET_PORT}", backend_ip(*i)))
        .collect()
}

/// The endpoints `inspect backends` lists for `frontend`, in slot order.
fn listed_backends(doc: &Value, frontend: &str) -> Vec<String> {
    row(doc, "frontends", "frontend", frontend)["backends"]
        .as_array()
        .expect("backends array")
        .iter()
        .map(|b| b["endpoint"].as_str().expect("endpoint").to_owned())
        .collect()
}

#[test]
fn services_backends_and_conntrack_show_what_the_datapath_holds() -> Result<()> {
    let f = Fixture::new(3, &[1, 2])?;
    let pin = PinDir::new("web");
    let mut kp = start(&f, &pin, &["--keep-datapath-on-exit"])?;

    // Three open connections (each asked once, so established both ways).
    let mut sessions: Vec<(TcpSession, usize)> = Vec::new();
    for _ in 0..3 {
        let mut s = f.topo.tcp_session(VIP, HTTP_PORT, IO_TIMEOUT)?;
        let b = backend_index(&s.ask()?)?;
        sessions.push((s, b));
    }

    let services = inspect(&f, &pin, "services")?;
    let http = row(&services, "services", "frontend", WEB_HTTP);
    assert_eq!(http["address"], VIP_STR);
    assert_eq!(http["port"], HTTP_PORT);
    assert_eq!(http["protocol"], "TCP");
    assert_eq!(http["node_port"], false);
    assert_eq!(http["backends"], 2, "{http:#}");
    assert_eq!(http["flags"], json!([]), "a ClusterIP: {http:#}");
    assert_eq!(http["affinity_seconds"], 0);
    assert_eq!(
        row(&services, "services", "frontend", WEB_DNS)["backends"],
        2
    );
    assert_eq!(services["total"], 2, "web's two frontends: {services:#}");
    match mode() {
        Mode::Ebpf => assert!(http["service_id"].is_u64(), "{http:#}"),
        Mode::Iptables | Mode::Nftables => {
            assert_eq!(http["name"], format!("default/{SERVICE}:http"))
        }
    }

    let backends = inspect(&f, &pin, "backends")?;
    let listed = listed_backends(&backends, WEB_HTTP);
    assert_eq!(
        listed.iter().cloned().collect::<BTreeSet<_>>(),
        endpoints(&[1, 2]),
        "{backends:#}"
    );
    assert_eq!(listed.len(), 2, "each backend once: {listed:?}");
    let http_backends = row(&backends, "frontends", "frontend", WEB_HTTP);
    match mode() {
        // One cursor step per new flow: the three connections.
        Mode::Ebpf => assert_eq!(http_backends["rr_cursor"], 3, "{http_backends:#}"),
        Mode::Iptables => {
            let b = &http_backends["backends"];
            assert_eq!(b[0]["probability"], 0.5, "{b:#}");
            assert_eq!(b[1]["probability"], Value::Null, "the last jump: {b:#}");
            assert!(b[0]["chain"].as_str().unwrap().starts_with("KUBE-SEP-"));
        }
        // `numgen random mod 2`: no probabilities to show.
        Mode::Nftables => {
            let b = &http_backends["backends"];
            assert_eq!(b[0]["probability"], Value::Null, "{b:#}");
            assert!(b[0]["chain"].as_str().unwrap().starts_with("endpoint-"));
        }
    }

    let ct = inspect(&f, &pin, "conntrack")?;
    for (s, b) in &sessions {
        let client = s.local().to_string();
        let backend = format!("{}:{TARGET_PORT}", backend_ip(*b));
        let entries = rows(&ct, "entries", "source", &client);
        assert_eq!(entries.len(), 1, "one entry keyed by {client}: {ct:#}");
        let fwd = entries[0];
        assert_eq!(fwd["destination"], format!("{VIP}:{HTTP_PORT}"), "{fwd:#}");
        assert_eq!(fwd["translated"], backend, "{fwd:#}");
        assert_eq!(fwd["frontend"], WEB_HTTP, "{fwd:#}");
        assert_eq!(fwd["protocol"], "TCP");
        match mode() {
            Mode::Ebpf => {
                assert_eq!(fwd["direction"], "forward");
                assert_eq!(fwd["closing"], false);
                assert!(fwd["age_ms"].as_u64().unwrap() < 60_000, "{fwd:#}");
                // The reply entry: backend → client, restored to the ClusterIP.
                let reply = rows(&ct, "entries", "destination", &client);
                assert_eq!(reply.len(), 1, "one reply entry to {client}: {ct:#}");
                assert_eq!(reply[0]["direction"], "reply");
                assert_eq!(reply[0]["source"], backend);
                assert_eq!(reply[0]["translated"], format!("{VIP}:{HTTP_PORT}"));
                assert_eq!(reply[0]["service_id"], fwd["service_id"]);
            }
            Mode::Iptables | Mode::Nftables => {
                assert_eq!(fwd["direction"], "original");
                assert!(
                    fwd["state"].as_str().unwrap().contains("ESTABLISHED"),
                    "{fwd:#}"
                );
                assert!(fwd["timeout_seconds"].as_u64().unwrap() > 0);
            }
        }
    }

    // The slice changes: backend 1 leaves, 3 comes.
    f.set_slice(&[2, 3])?;
    kp.wait_applied(APPLY_TIMEOUT)?;
    let backends = inspect(&f, &pin, "backends")?;
    let listed = listed_backends(&backends, WEB_HTTP);
    assert_eq!(
        listed.iter().cloned().collect::<BTreeSet<_>>(),
        endpoints(&[2, 3]),
        "{backends:#}"
    );
    assert_eq!(listed_backends(&backends, WEB_DNS).len(), 2);
    if mode() == Mode::Ebpf {
        // The flows of the backend that left were flushed (TCP: reset).
        let ct = inspect(&f, &pin, "conntrack")?;
        let gone = format!("{}:{TARGET_PORT}", backend_ip(1));
        assert!(
            rows(&ct, "entries", "translated", &gone).is_empty()
                && rows(&ct, "entries", "source", &gone).is_empty(),
            "entries of {gone} after it left: {ct:#}"
        );
    }

    if mode() == Mode::Ebpf {
        // The agent exits leaving the datapath pinned: still readable.
        let status = kp.stop(STOP_TIMEOUT)?;
        assert!(status.success(), "kproxy exit: {status}");
        let services = inspect(&f, &pin, "services")?;
        assert_eq!(
            row(&services, "services", "frontend", WEB_HTTP)["backends"],
            2
        );
    }
    Ok(())
}

#[test]
fn affinity_lists_the_clients_binding() -> Result<()> {
    let f = Fixture::new(3, &[1, 2, 3])?;
    // `sessionAffinity: ClientIP` for 3 hours.
    let affinity = web_service_yaml_with(json!({
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10_800}},
    }));
    f.manifests.write(SERVICE_FILE, &affinity)?;
    let pin = PinDir::new("affinity");
    let _kp = start(&f, &pin, &[])?;

    let before = inspect(&f, &pin, "affinity")?;
    assert_eq!(before["total"], 0, "no client yet: {before:#}");
    let services = inspect(&f, &pin, "services")?;
    assert_eq!(
        row(&services, "services", "frontend", WEB_HTTP)["affinity_seconds"],
        10_800
    );

    let client = f.topo.client();
    let (name, _) = client.tcp_ask(VIP, HTTP_PORT, IO_TIMEOUT)?;
    let backend = format!("{}:{TARGET_PORT}", backend_ip(backend_index(&name)?));

    let doc = inspect(&f, &pin, "affinity")?;
    let b = row(&doc, "bindings", "client", &client.ip.to_string());
    assert_eq!(b["frontend"], WEB_HTTP, "{doc:#}");
    assert_eq!(b["backend"], backend, "{doc:#}");
    assert_eq!(b["timeout_seconds"], 10_800, "{b:#}");
    assert_eq!(b["expired"], false, "{b:#}");
    assert!(b["age_ms"].as_u64().expect("an age") < 60_000, "{b:#}");
    match mode() {
        Mode::Ebpf => {
            let http = row(&services, "services", "frontend", WEB_HTTP);
            assert_eq!(b["service_id"], http["service_id"], "{doc:#}");
        }
        Mode::Iptables => {
            // The list is the chosen endpoint's chain.
            let backends = inspect(&f, &pin, "backends")?;
            let sep = row(&backends, "frontends", "frontend", WEB_HTTP)["backends"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["endpoint"] == backend)
                .map(|e| e["chain"].clone())
                .expect("the endpoint's chain");
            assert_eq!(b["chain"], sep, "{doc:#}");
        }
        Mode::Nftables => {
            // The set of the chosen endpoint, named after it.
            let set = b["chain"].as_str().expect("the set's name");
            assert!(
                set.starts_with("affinity-")
                    && set.ends_with(&format!("__{}", backend.replace(':', "/"))),
                "{doc:#}"
            );
        }
    }
    Ok(())
}

/// Service `web6` on `fd00:10:96::10` only (80/TCP, 53/UDP) and its IPv6
/// slice: what an IPv6 ClusterIP looks like to inspect. The endpoints need
/// not exist, nothing is sent to them.
const WEB6: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web6, namespace: default}
spec:
  clusterIP: "fd00:10:96::10"
  clusterIPs: ["fd00:10:96::10"]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 8080, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web6-v6, namespace: default, labels: {kubernetes.io/service-name: web6}}
addressType: IPv6
endpoints:
- addresses: ["fd00:10:244::11"]
  conditions: {ready: true}
- addresses: ["fd00:10:244::12"]
  conditions: {ready: true}
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 8080, protocol: UDP}
"#;

#[test]
fn ipv6_clusterips_are_listed_next_to_ipv4_ones() -> Result<()> {
    let f = Fixture::new(3, &[1, 2])?;
    f.manifests.write("web6.yaml", WEB6)?;
    let pin = PinDir::new("ipv6");
    let _kp = start(&f, &pin, &[])?;
    let (http6, dns6) = ("[fd00:10:96::10]:80/TCP", "[fd00:10:96::10]:53/UDP");

    let services = inspect(&f, &pin, "services")?;
    assert_eq!(
        services["total"], 4,
        "web's and web6's frontends: {services:#}"
    );
    let http = row(&services, "services", "frontend", http6);
    assert_eq!(http["address"], "fd00:10:96::10", "no brackets: {http:#}");
    assert_eq!(http["port"], HTTP_PORT);
    assert_eq!(http["backends"], 2, "{http:#}");
    assert_eq!(row(&services, "services", "frontend", dns6)["backends"], 2);
    assert_eq!(
        row(&services, "services", "frontend", WEB_HTTP)["backends"],
        2
    );
    match mode() {
        // One id space for both families.
        Mode::Ebpf => assert_ne!(
            http["service_id"],
            row(&services, "services", "frontend", WEB_HTTP)["service_id"]
        ),
        Mode::Iptables | Mode::Nftables => assert_eq!(http["name"], "default/web6:http"),
    }

    let backends = inspect(&f, &pin, "backends")?;
    let listed: BTreeSet<String> = listed_backends(&backends, http6).into_iter().collect();
    assert_eq!(
        listed,
        BTreeSet::from([
            "[fd00:10:244::11]:8080".to_owned(),
            "[fd00:10:244::12]:8080".to_owned()
        ]),
        "{backends:#}"
    );
    let first = &row(&backends, "frontends", "frontend", http6)["backends"][0];
    assert!(
        first["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("fd00:10:244::")),
        "{first:#}"
    );
    let endpoint_chain = match mode() {
        Mode::Ebpf => None,
        Mode::Iptables => Some("KUBE-SEP-"),
        Mode::Nftables => Some("endpoint-"),
    };
    if let Some(prefix) = endpoint_chain {
        assert!(
            first["chain"]
                .as_str()
                .is_some_and(|c| c.starts_with(prefix)),
            "{first:#}"
        );
    }
    // The IPv4 frontends are unchanged by the IPv6 ones.
    assert_eq!(
        listed_backends(&backends, WEB_HTTP)
            .into_iter()
            .collect::<BTreeSet<_>>(),
        endpoints(&[1, 2])
    );
    Ok(())
}

/// Runs `kproxy inspect ARGS` in `node`; asserts exit code 1, nothing on
/// stdout and one line on stderr, which it returns.
fn one_error_line(node: &Netns, args: &[&str]) -> Result<String> {
    let out = run_inspect(node, args)?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "kproxy inspect {args:?}: {out:?}"
    );
    assert!(out.stdout.is_empty(), "kproxy inspect {args:?}: {out:?}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    Ok(stderr)
}

#[test]
fn inspect_without_a_datapath_fails_with_one_clear_line() -> Result<()> {
    let _lock = SuiteLock::acquire()?;
    let node = Netns::new("node")?;

    // A pin directory without a datapath, and none at all.
    let empty = PinDir::new("empty");
    std::fs::create_dir(&empty.0)?;
    for dir in [empty.arg().to_owned(), format!("{}-absent", empty.arg())] {
        let err = one_error_line(&node, &["services", "--pin-dir", &dir])?;
        assert!(
            err.contains(&format!(
                "no pinned kproxy datapath under {dir} (is the agent running with pinning?)"
            )),
            "{err}"
        );
    }

    // A layout this binary does not read.
    std::fs::create_dir(empty.0.join("v1-8_16-s1-b1-c1"))?;
    let err = one_error_line(&node, &["services", "--pin-dir", empty.arg()])?;
    assert!(
        err.contains("has layout v1-8_16-s1-b1-c1") && err.contains("this kproxy reads layout v"),
        "{err}"
    );

    let err = one_error_line(&node, &["routes"])?;
    assert!(err.contains("unknown subject \"routes\""), "{err}");

    // iptables mode in a namespace without kproxy's rules.
    let err = one_error_line(&node, &["services", "--mode", "iptables"])?;
    assert!(err.contains("no KUBE-SERVICES chain"), "{err}");
    // nftables mode in a namespace without kproxy's tables.
    let err = one_error_line(&node, &["services", "--mode", "nftables"])?;
    assert!(err.contains("no kube-proxy table"), "{err}");
    Ok(())
}
