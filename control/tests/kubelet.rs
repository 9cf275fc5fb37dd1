//! The kubelet end to end: a real apiserver, a real `kcontrol kubelet`
//! process and real crun containers on the busybox rootfs `cargo xtask
//! setup` builds. There is no scheduler here, so pods are created with
//! spec.nodeName set. Each test has its own node, bridge (`kct<N>`) and pod
//! CIDR (10.252.<N>.0/24); traffic only goes between the host and those pod
//! addresses. Needs root, crun and the rootfs.
//!
//! This file: the node, pod networking and environment, and how pods and
//! the kubelet stop (graceful deletion, kubelet restart and shutdown).
//! Container restarts (probes, image pulls, restart policies) are in
//! `kubelet_restarts.rs`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::kubelet_node::{
    DEADLINE, Node1, cgroup_left, condition, create, crun_ids, crun_pids, events_for, exec,
    http_get, leftovers, link_exists, links_on, netns_list, phase, pod_json, ready, wait_pod,
    web_container,
};
use common::{Server, TempDir};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kcontrol_names::pod_hash;
use kube::api::{Api, DeleteParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_registers_and_heartbeats() {
    let dir = TempDir::new("kl-node");
    let server = Server::start(&dir.0.join("api"), &[]);
    let node = Node1::start(&server);
    let client = server.client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + DEADLINE;
    let n = loop {
        if let Some(n) = nodes.get_opt(&node.node).await.unwrap() {
            break n;
        }
        assert!(Instant::now() < deadline, "node never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let spec = n.spec.unwrap();
    assert_eq!(spec.pod_cidr.as_deref(), Some(node.cidr.as_str()));
    let st = n.status.unwrap();
    let cap = st.capacity.unwrap();
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(cap["cpu"].0, cpus.to_string());
    assert!(cap["memory"].0.ends_with("Ki"), "{:?}", cap["memory"]);
    assert_eq!(cap["pods"].0, "110");
    let ready = st
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "True");
    assert!(
        st.addresses
            .unwrap()
            .iter()
            .any(|a| a.type_ == "InternalIP")
    );
    // The lease is renewed (every second here).
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let renew = |l: Lease| l.spec.unwrap().renew_time.unwrap().0;
    let deadline = Instant::now() + DEADLINE;
    let first = loop {
        if let Some(l) = leases.get_opt(&node.node).await.unwrap() {
            break renew(l);
        }
        assert!(Instant::now() < deadline, "no lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loop {
        let now = renew(leases.get(&node.node).await.unwrap());
        if now > first {
            break;
        }
        assert!(Instant::now() < deadline, "lease never renewed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The bridge carries the gateway address.
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "dev", &node.bridge])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("10.252.{}.1/24", node.n)),
        "bridge address: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_serve_http_reach_each_other_and_see_service_env() {
    let dir = TempDir::new("kl-http");
    let server = Server::start(&dir.0.join("api"), &[]);
    let node = Node1::start(&server);
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    // A Service made before the pods shows up in their environment.
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "back-end" },
        "spec": { "selector": { "app": "a" }, "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] },
    }))
    .unwrap();
    let svc = svcs.create(&PostParams::default(), &svc).await.unwrap();
    let cluster_ip = svc.spec.unwrap().cluster_ip.unwrap();

    let mut a = web_container();
    a["env"] = json!([
        { "name": "GREETING", "value": "hello" },
        { "name": "MESSAGE", "value": "$(GREETING) world" },
        { "name": "MY_POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } },
        { "name": "MY_NODE", "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } } },
    ]);
    a["workingDir"] = json!("/tmp");
    a["command"] = json!([
        "sh",
        "-c",
        "pwd > /tmp/cwd && mkdir -p /tmp/www && hostname > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"
    ]);
    a["startupProbe"] =
        json!({ "tcpSocket": { "port": "http" }, "periodSeconds": 1, "failureThreshold": 30 });
    a["readinessProbe"] = json!({ "httpGet": { "path": "/", "port": 8080 }, "periodSeconds": 1 });
    create(&node, &api, pod_json("a", &node.node, json!([a]))).await;
    create(
        &node,
        &api,
        pod_json("b", &node.node, json!([web_container()])),
    )
    .await;

    let pa = wait_pod(&api, "a", "Running and Ready", |p| {
        phase(p) == "Running" && ready(p)
    })
    .await;
    let pb = wait_pod(&api, "b", "Running and Ready", |p| {
        phase(p) == "Running" && ready(p)
    })
    .await;
    let st = pa.status.clone().unwrap();
    let ip_a = st.pod_ip.clone().unwrap();
    let ip_b = pb.status.clone().unwrap().pod_ip.unwrap();
    assert!(
        node.contains(&ip_a) && node.contains(&ip_b),
        "{ip_a} {ip_b}"
    );
    assert_ne!(ip_a, ip_b);
    assert!(st.host_ip.is_some());
    assert!(st.start_time.is_some());
    for c in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
        assert_eq!(condition(&pa, c).as_deref(), Some("True"), "{c}");
    }
    let cs = &st.container_statuses.unwrap()[0];
    assert!(cs.ready);
    assert!(cs.state.as_ref().unwrap().running.is_some());
    assert_eq!(cs.restart_count, 0);

    // From the host to each pod.
    assert_eq!(http_get(&ip_a, 8080, "/").unwrap(), (200, "a\n".into()));
    assert_eq!(http_get(&ip_b, 8080, "/").unwrap(), (200, "b\n".into()));
    // Pod to pod, directly over the bridge. (Debian's busybox 1.35 wget
    // crashes with -T, so no timeout flag.)
    let (code, out) = exec(
        &node,
        &pa,
        &["wget", "-qO-", &format!("http://{ip_b}:8080/")],
    );
    assert_eq!((code, out.as_str()), (0, "b\n"));
    let (code, out) = exec(
        &node,
        &pb,
        &["wget", "-qO-", &format!("http://{ip_a}:8080/")],
    );
    assert_eq!((code, out.as_str()), (0, "a\n"));
    // Inside: eth0 with the address, default route via the bridge.
    let (_, route) = exec(&node, &pa, &["ip", "route"]);
    assert!(
        route.contains(&format!("default via 10.252.{}.1", node.n)),
        "{route}"
    );

    // Environment.
    let (code, env) = exec(&node, &pa, &["env"]);
    assert_eq!(code, 0);
    let has = |kv: &str| env.lines().any(|l| l == kv);
    for kv in [
        format!("BACK_END_SERVICE_HOST={cluster_ip}"),
        "BACK_END_SERVICE_PORT=80".to_string(),
        "BACK_END_SERVICE_PORT_HTTP=80".to_string(),
        format!("BACK_END_PORT=tcp://{cluster_ip}:80"),
        "GREETING=hello".to_string(),
        "MESSAGE=hello world".to_string(),
        format!("MY_POD_IP={ip_a}"),
        format!("MY_NODE={}", node.node),
        "HOSTNAME=a".to_string(),
    ] {
        assert!(has(&kv), "{kv} missing from:\n{env}");
    }
    let (_, cwd) = exec(&node, &pa, &["cat", "/tmp/cwd"]);
    assert_eq!(cwd.trim(), "/tmp");
    // The root filesystem is read-only, /tmp is not.
    let (code, _) = exec(&node, &pa, &["touch", "/bin/x"]);
    assert_ne!(code, 0);

    let evs = events_for(&client, "a").await;
    for r in ["Pulled", "Created", "Started"] {
        assert!(evs.iter().any(|(e, _)| e == r), "no {r} event: {evs:?}");
    }
    // The host side of each pod's veth is a port of the node bridge.
    let ports = links_on(&node.bridge);
    for p in [&pa, &pb] {
        let veth = kcontrol_names::veth(&pod_hash(p.metadata.uid.as_deref().unwrap()));
        assert!(
            ports.contains(&veth),
            "{veth} not on {}: {ports:?}",
            node.bridge
        );
    }
    // The bridge has a fixed MAC derived from its address, not the lowest
    // of its ports' MACs (which changes as pods come and go and leaves the
    // pods' neighbour entry for their gateway pointing nowhere).
    let want = format!("0a:58:0a:fc:{:02x}:01", node.n);
    let out = std::process::Command::new("ip")
        .args(["-br", "link", "show", &node.bridge])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&out.stdout);
    assert!(link.contains(&want), "bridge MAC should be {want}: {link}");
    let (_, neigh) = exec(&node, &pa, &["ip", "neigh"]);
    assert!(
        neigh
            .lines()
            .filter(|l| l.starts_with(&format!("10.252.{}.1 ", node.n)))
            .all(|l| l.contains(&want)),
        "the pod's gateway entry should be {want}: {neigh}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_delete_sends_sigterm_waits_then_cleans_up() {
    let dir = TempDir::new("kl-delete");
    let server = Server::start(&dir.0.join("api"), &[]);
    let node = Node1::start(&server);
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    // Handles SIGTERM by exiting 42.
    let polite = json!({
        "name": "c", "image": "busybox",
        "command": ["sh", "-c", "trap 'exit 42' TERM; while true; do sleep 0.2; done"],
    });
    // Ignores SIGTERM: needs the SIGKILL after the grace period.
    let stubborn = json!({
        "name": "c", "image": "busybox",
        "command": ["sh", "-c", "trap '' TERM; while true; do sleep 0.2; done"],
    });
    let p1 = create(&node, &api, pod_json("polite", &node.node, json!([polite]))).await;
    let p2 = create(
        &node,
        &api,
        pod_json("stubborn", &node.node, json!([stubborn])),
    )
    .await;
    for n in ["polite", "stubborn"] {
        wait_pod(&api, n, "Running", |p| phase(p) == "Running").await;
    }
    // Let the shells install their traps.
    let p = api.get("polite").await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    while exec(&node, &p, &["true"]).0 != 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for (pod, name, want_exit) in [(&p1, "polite", 42), (&p2, "stubborn", 137)] {
        let uid = pod.metadata.uid.clone().unwrap();
        let mut stream = api
            .watch(
                &WatchParams::default().fields(&format!("metadata.name={name}")),
                "0",
            )
            .await
            .unwrap()
            .boxed();
        let res = api.delete(name, &DeleteParams::default()).await.unwrap();
        // Bound: marked, not removed.
        let marked = res.left().expect("a bound pod is not deleted at once");
        assert!(marked.metadata.deletion_timestamp.is_some());
        assert_eq!(marked.metadata.deletion_grace_period_seconds, Some(2));
        let mut exit = None;
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = tokio::time::timeout(left, stream.try_next())
                .await
                .expect("pod not deleted in time")
                .unwrap()
                .unwrap();
            match ev {
                WatchEvent::Modified(p) => {
                    if let Some(t) = p
                        .status
                        .and_then(|s| s.container_statuses)
                        .and_then(|c| c[0].state.clone())
                        .and_then(|s| s.terminated)
                    {
                        exit = Some(t.exit_code);
                    }
                }
                WatchEvent::Deleted(_) => break,
                _ => {}
            }
        }
        assert_eq!(exit, Some(want_exit), "{name}");
        assert!(api.get_opt(name).await.unwrap().is_none());
        let left = leftovers(&node, &uid);
        assert!(left.is_empty(), "{name} left {left:?}");
    }
    assert!(links_on(&node.bridge).is_empty());

    // Unbound pods and gracePeriodSeconds=0 go at once.
    let unbound: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "unbound" },
        "spec": { "containers": [{ "name": "c", "image": "busybox" }] },
    }))
    .unwrap();
    api.create(&PostParams::default(), &unbound).await.unwrap();
    api.delete("unbound", &DeleteParams::default())
        .await
        .unwrap();
    assert!(api.get_opt("unbound").await.unwrap().is_none());
    let now = create(
        &node,
        &api,
        pod_json(
            "now",
            &node.node,
            json!([{ "name": "c", "image": "busybox", "command": ["sleep", "3600"] }]),
        ),
    )
    .await;
    wait_pod(&api, "now", "Running", |p| phase(p) == "Running").await;
    api.delete(
        "now",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(api.get_opt("now").await.unwrap().is_none());
    // The kubelet sees it gone and cleans up anyway.
    let uid = now.metadata.uid.clone().unwrap();
    let deadline = Instant::now() + DEADLINE;
    while !leftovers(&node, &uid).is_empty() {
        assert!(Instant::now() < deadline, "{:?}", leftovers(&node, &uid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_does_not_double_run_and_shutdown_leaves_nothing() {
    let dir = TempDir::new("kl-restart");
    let server = Server::start(&dir.0.join("api"), &[]);
    let mut node = Node1::start(&server);
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let p1 = create(
        &node,
        &api,
        pod_json("r1", &node.node, json!([web_container()])),
    )
    .await;
    let p2 = create(
        &node,
        &api,
        pod_json("r2", &node.node, json!([web_container()])),
    )
    .await;
    let first = wait_pod(&api, "r1", "Running", |p| phase(p) == "Running").await;
    wait_pod(&api, "r2", "Running", |p| phase(p) == "Running").await;
    let ip1 = first.status.unwrap().pod_ip.unwrap();
    let deadline = Instant::now() + DEADLINE;
    while crun_ids(&node.crun_root()).len() != 2 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            crun_ids(&node.crun_root())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Crash: everything stays; a new kubelet takes over without a second copy.
    node.kill9();
    let before = crun_pids(&node.crun_root());
    assert_eq!(before.len(), 2);
    node.spawn();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let now = crun_pids(&node.crun_root());
        assert!(now.len() <= 2, "double run: {now:?}");
        let replaced = now.len() == 2 && now.iter().all(|c| !before.contains(c));
        if replaced && http_get(&ip1, 8080, "/").is_ok_and(|r| r == (200, "r1\n".into())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "r1 not back: {now:?} (before {before:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = wait_pod(&api, "r1", "Running", |p| phase(p) == "Running").await;
    assert_eq!(again.status.unwrap().pod_ip.unwrap(), ip1, "address kept");
    assert_eq!(links_on(&node.bridge).len(), 2);

    // Shutdown: nothing of ours stays on the host.
    let st = node.stop();
    assert!(st.success(), "kubelet exit: {st}");
    for p in [&p1, &p2] {
        let left = leftovers(&node, p.metadata.uid.as_deref().unwrap());
        assert!(left.is_empty(), "left {left:?}");
    }
    assert!(!link_exists(&node.bridge), "bridge {} left", node.bridge);
    assert!(cgroup_left(&node.node, "").is_empty(), "cgroups left");
    assert!(crun_ids(&node.crun_root()).is_empty());
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    for p in [&p1, &p2] {
        let h = pod_hash(p.metadata.uid.as_deref().unwrap());
        assert!(!String::from_utf8_lossy(&out.stdout).contains(&h));
        assert!(!netns_list().contains(&h));
    }
}

/// The apiserver side alone (no kubelet): a bound pod's DELETE only marks
/// it; status updates keep it; a shorter grace period replaces a longer one;
/// gracePeriodSeconds=0 removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_marks_bound_pods_for_graceful_deletion() {
    let dir = TempDir::new("kl-grace");
    let server = Server::start(&dir.0.join("api"), &[]);
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut pod = pod_json("g", "nowhere", json!([{ "name": "c", "image": "busybox" }]));
    pod.spec.as_mut().unwrap().termination_grace_period_seconds = Some(45);
    api.create(&PostParams::default(), &pod).await.unwrap();
    let mut stream = api
        .watch(&WatchParams::default().fields("metadata.name=g"), "0")
        .await
        .unwrap()
        .boxed();
    let marked = api
        .delete("g", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("marked, not deleted");
    assert_eq!(marked.metadata.deletion_grace_period_seconds, Some(45));
    let ts = marked.metadata.deletion_timestamp.clone().unwrap().0;
    // deletionTimestamp is when the grace period ends.
    let ahead = ts.as_second() - jiff::Timestamp::now().as_second();
    assert!(
        (40..=46).contains(&ahead),
        "deletionTimestamp {ahead}s ahead"
    );
    let modified = loop {
        match tokio::time::timeout(DEADLINE, stream.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            WatchEvent::Modified(p) => break p,
            WatchEvent::Added(_) | WatchEvent::Bookmark(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(modified.metadata.deletion_timestamp.is_some());
    // A status update (what the kubelet sends while stopping) keeps it.
    api.patch_status(
        "g",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({ "status": { "phase": "Running" } })),
    )
    .await
    .unwrap();
    assert!(api.get_opt("g").await.unwrap().is_some());
    // A shorter period replaces it; a longer one does not.
    let dp = |g| DeleteParams {
        grace_period_seconds: Some(g),
        ..Default::default()
    };
    let p = api.delete("g", &dp(10)).await.unwrap().left().unwrap();
    assert_eq!(p.metadata.deletion_grace_period_seconds, Some(10));
    let p = api.delete("g", &dp(20)).await.unwrap().left().unwrap();
    assert_eq!(p.metadata.deletion_grace_period_seconds, Some(10));
    // Bad input is refused and loses nothing.
    let r = common::send(
        &client,
        "DELETE",
        "/api/v1/namespaces/default/pods/g?gracePeriodSeconds=soon",
        None,
        Vec::new(),
        None,
    )
    .await;
    assert_eq!(r.code, 400);
    assert!(api.get_opt("g").await.unwrap().is_some());
    api.delete("g", &dp(0)).await.unwrap();
    assert!(api.get_opt("g").await.unwrap().is_none());
}
