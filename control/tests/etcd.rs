//! `kcontrol apiserver --store etcd://…` against real etcd members on
//! loopback (`/usr/bin/etcd`): several apiservers on one cluster, member and
//! apiserver failures, Service address allocation across apiservers, and
//! `kcontrol migrate` from the embedded store.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, TempDir, post_json};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use testbed::EtcdCluster;

/// The CA and admin token of `from` in `to`, so that one kubeconfig works
/// against both apiservers (as when several apiservers front one etcd).
fn share_credentials(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("pki")).unwrap();
    for f in ["pki/ca.key", "pki/ca.crt", "admin.token"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// A client of `server` built from `kubeconfig_of`'s kubeconfig.
async fn client_for(kubeconfig_of: &Server, server: &Server) -> kube::Client {
    let mut cfg = kubeconfig_of.config().await;
    cfg.cluster_url = server.url.parse().unwrap();
    kube::Client::try_from(cfg).unwrap()
}

fn cm(name: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "data": { "k": name },
    }))
    .unwrap()
}

/// Polls `cond` until true or the deadline.
async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start_etcd(members: usize) -> EtcdCluster {
    tokio::task::spawn_blocking(move || EtcdCluster::start(members))
        .await
        .unwrap()
        .expect("starting etcd")
}

/// Three etcd members, two apiservers. A writer keeps creating ConfigMaps
/// through both while first the etcd leader and then apiserver 1 are
/// SIGKILLed; a watcher on apiserver 2 sees the writes made through
/// apiserver 1; every write acknowledged with 2xx is there at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_apiservers_on_three_etcd_members() {
    let mut cluster = start_etcd(3).await;
    let url = cluster.url();
    let (d1, d2) = (TempDir::new("etcd-a1"), TempDir::new("etcd-a2"));
    let mut s1 = Server::start(&d1.0, &["--store", &url]);
    share_credentials(&d1.0, &d2.0);
    let s2 = Server::start(&d2.0, &["--store", &url]);
    let c1 = s1.client().await;
    // Apiserver 1's kubeconfig, pointed at apiserver 2.
    let c2 = client_for(&s1, &s2).await;

    // A watcher on apiserver 2.
    let seen: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let cms2: Api<ConfigMap> = Api::namespaced(c2.clone(), "default");
    let mut w = watcher(cms2.clone(), watcher::Config::default()).boxed();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(15), w.try_next())
            .await
            .expect("watcher init")
            .expect("watcher")
            .expect("watcher ended");
        if matches!(ev, watcher::Event::InitDone) {
            break;
        }
    }
    let watch_task = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(ev) = w.next().await {
                if let Ok(watcher::Event::Apply(c)) = ev {
                    seen.lock().unwrap().insert(c.metadata.name.unwrap());
                }
            }
        })
    };

    // A write through apiserver 1 reaches the watcher on apiserver 2.
    let cms1: Api<ConfigMap> = Api::namespaced(c1.clone(), "default");
    cms1.create(&PostParams::default(), &cm("first"))
        .await
        .unwrap();
    eventually(
        "the watcher on apiserver 2 sees a write through 1",
        Duration::from_secs(10),
        || seen.lock().unwrap().contains("first"),
    )
    .await;

    // The writer: alternates apiservers; records what was acknowledged.
    let acked: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(vec!["first".into()]));
    let failed = Arc::new(Mutex::new(0usize));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acked, failed, stop) = (acked.clone(), failed.clone(), stop.clone());
        let apis = [cms1.clone(), cms2.clone()];
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("w-{i:05}");
                let api = &apis[i % 2];
                match tokio::time::timeout(
                    Duration::from_secs(20),
                    api.create(&PostParams::default(), &cm(&name)),
                )
                .await
                {
                    Ok(Ok(_)) => acked.lock().unwrap().push(name),
                    _ => *failed.lock().unwrap() += 1,
                }
                i += 1;
            }
        })
    };
    let count = || acked.lock().unwrap().len();

    let n = count();
    eventually("writes before any failure", Duration::from_secs(30), || {
        count() >= n + 40
    })
    .await;
    assert_eq!(
        *failed.lock().unwrap(),
        0,
        "writes failed with every member up"
    );

    // SIGKILL the etcd leader: writes go on once the others elect one.
    let leader = cluster.leader().expect("an etcd leader");
    cluster.kill(leader);
    let n = count();
    eventually(
        "writes after an etcd member died",
        Duration::from_secs(60),
        || count() >= n + 40,
    )
    .await;
    let failed_member = *failed.lock().unwrap();

    // SIGKILL apiserver 1: the clients of apiserver 2 go on.
    s1.kill9();
    let n = count();
    eventually(
        "writes through apiserver 2 after apiserver 1 died",
        Duration::from_secs(60),
        || count() >= n + 40,
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();

    // Nothing acknowledged is lost: apiserver 2 lists every acknowledged
    // write, and its watcher saw each one.
    let acked: Vec<String> = acked.lock().unwrap().clone();
    let listed: BTreeMap<String, ConfigMap> = cms2
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|c| (c.metadata.name.clone().unwrap(), c))
        .collect();
    for name in &acked {
        let c = listed
            .get(name)
            .unwrap_or_else(|| panic!("acknowledged write {name} is missing"));
        assert_eq!(c.data.as_ref().unwrap()["k"], *name);
    }
    eventually(
        "the watcher saw every acknowledged write",
        Duration::from_secs(20),
        || {
            let seen = seen.lock().unwrap();
            acked.iter().all(|n| seen.contains(n))
        },
    )
    .await;
    watch_task.abort();
    eprintln!(
        "acknowledged {} writes; {} failed while a member was down, {} in all (writes to the dead apiserver 1 included)",
        acked.len(),
        failed_member,
        failed.lock().unwrap()
    );
    assert_eq!(
        failed_member, 0,
        "a write failed while an etcd member was down and both apiservers were up"
    );
}

fn node_port_service(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name },
        "spec": { "type": "NodePort", "selector": { "app": name }, "ports": [{ "port": 80 }] },
    })
}

/// Two apiservers allocate from one small range at once: every Service gets
/// its own ClusterIP and NodePort, a full range is refused, and a deleted
/// Service's addresses are free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn service_addresses_unique_across_apiservers() {
    let cluster = start_etcd(1).await;
    let url = cluster.url();
    // 14 usable IPs, 14 ports.
    let flags = [
        "--store",
        &url,
        "--service-cidr",
        "10.96.0.0/28",
        "--node-port-range",
        "30000-30013",
    ];
    let (d1, d2) = (TempDir::new("etcd-s1"), TempDir::new("etcd-s2"));
    let s1 = Server::start(&d1.0, &flags);
    share_credentials(&d1.0, &d2.0);
    let s2 = Server::start(&d2.0, &flags);
    let clients = [s1.client().await, client_for(&s1, &s2).await];

    let creates = (0..14).map(|i| {
        let c = clients[i % 2].clone();
        async move {
            post_json(
                &c,
                "/api/v1/namespaces/default/services",
                &node_port_service(&format!("s{i}")),
            )
            .await
        }
    });
    let replies = futures::future::join_all(creates).await;
    let mut ips = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for r in &replies {
        assert_eq!(r.code, 201, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        ips.insert(v["spec"]["clusterIP"].as_str().unwrap().to_string());
        ports.insert(v["spec"]["ports"][0]["nodePort"].as_i64().unwrap());
    }
    assert_eq!(ips.len(), 14, "a ClusterIP was handed out twice: {ips:?}");
    assert_eq!(
        ports.len(),
        14,
        "a NodePort was handed out twice: {ports:?}"
    );

    // The range is full, whichever apiserver is asked.
    for c in &clients {
        let r = post_json(
            c,
            "/api/v1/namespaces/default/services",
            &node_port_service("extra"),
        )
        .await;
        assert_eq!(r.code, 422, "{}", String::from_utf8_lossy(&r.body));
    }
    // A deleted Service frees its addresses for the other apiserver.
    let svcs: Api<Service> = Api::namespaced(clients[0].clone(), "default");
    let gone = svcs.get("s3").await.unwrap();
    svcs.delete("s3", &Default::default()).await.unwrap();
    let r = post_json(
        &clients[1],
        "/api/v1/namespaces/default/services",
        &node_port_service("extra"),
    )
    .await;
    assert_eq!(r.code, 201, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let spec = gone.spec.unwrap();
    assert_eq!(v["spec"]["clusterIP"], json!(spec.cluster_ip.unwrap()));
    assert_eq!(
        v["spec"]["ports"][0]["nodePort"],
        json!(spec.ports.unwrap()[0].node_port.unwrap())
    );
    // Asking for an address another Service holds is refused.
    let mut dup = node_port_service("dup");
    dup["spec"]["clusterIP"] = v["spec"]["clusterIP"].clone();
    let r = post_json(&clients[0], "/api/v1/namespaces/default/services", &dup).await;
    assert_eq!(r.code, 422, "{}", String::from_utf8_lossy(&r.body));
}

fn kcontrol(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kcontrol"))
        .args(args)
        .output()
        .unwrap()
}

/// An embedded store with objects in it, migrated into etcd: the apiserver
/// on etcd serves the same objects (same uids and content), a kube-rs
/// watcher lists them and follows new writes, and a second migration into
/// the now different etcd is refused without writing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_embedded_store_to_etcd() {
    let dir = TempDir::new("etcd-migrate");
    let mut before: BTreeMap<String, ConfigMap> = BTreeMap::new();
    let svc_ip;
    {
        let mut server = Server::start(&dir.0, &[]);
        let client = server.client().await;
        let r = post_json(
            &client,
            "/api/v1/namespaces",
            &json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "mig" } }),
        )
        .await;
        assert_eq!(r.code, 201);
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "mig");
        for i in 0..30 {
            let mut c = cm(&format!("c{i:02}"));
            c.metadata.labels = Some([("i".to_string(), i.to_string())].into());
            let c = cms.create(&PostParams::default(), &c).await.unwrap();
            before.insert(c.metadata.name.clone().unwrap(), c);
        }
        // Some history: updates and a delete.
        for i in 0..5 {
            let name = format!("c{i:02}");
            let mut c = cms.get(&name).await.unwrap();
            c.data
                .as_mut()
                .unwrap()
                .insert("k".into(), "updated".into());
            let c = cms
                .replace(&name, &PostParams::default(), &c)
                .await
                .unwrap();
            before.insert(name, c);
        }
        cms.delete("c29", &Default::default()).await.unwrap();
        before.remove("c29");
        let r = post_json(
            &client,
            "/api/v1/namespaces/mig/services",
            &node_port_service("web"),
        )
        .await;
        assert_eq!(r.code, 201);
        svc_ip = r.json()["spec"]["clusterIP"].clone();
        server.kill9();
    }

    let cluster = start_etcd(1).await;
    let url = cluster.url();
    let from = dir.0.to_str().unwrap();

    // Bad input: no store there; not an etcd URL. Clear errors.
    let missing = kcontrol(&[
        "migrate",
        "--from",
        "/nonexistent-kcontrol-dir",
        "--to",
        &url,
    ]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no embedded store"));
    let bad = kcontrol(&["migrate", "--from", from, "--to", "http://127.0.0.1:1"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("etcd://"));

    let out = kcontrol(&["migrate", "--from", from, "--to", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Again: everything is already there (an interrupted run resumes).
    let again = kcontrol(&["migrate", "--from", from, "--to", &url]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(String::from_utf8_lossy(&again.stdout).contains("were already there"));

    let server = Server::start(&dir.0, &["--store", &url]);
    let client = server.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "mig");
    let after: BTreeMap<String, ConfigMap> = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|c| (c.metadata.name.clone().unwrap(), c))
        .collect();
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    for (name, old) in &before {
        let new = &after[name];
        assert_eq!(new.metadata.uid, old.metadata.uid, "{name}");
        assert_eq!(new.metadata.labels, old.metadata.labels, "{name}");
        assert_eq!(
            new.metadata.creation_timestamp,
            old.metadata.creation_timestamp
        );
        assert_eq!(new.data, old.data, "{name}");
    }
    let svc: Api<Service> = Api::namespaced(client.clone(), "mig");
    assert_eq!(
        json!(svc.get("web").await.unwrap().spec.unwrap().cluster_ip),
        svc_ip
    );

    // A kube-rs watcher picks up from the new store: the migrated objects,
    // then new writes.
    let mut w = watcher(cms.clone(), watcher::Config::default()).boxed();
    let mut initial = BTreeSet::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(15), w.try_next())
            .await
            .expect("watcher")
            .unwrap()
            .unwrap();
        match ev {
            watcher::Event::InitApply(c) => {
                initial.insert(c.metadata.name.unwrap());
            }
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(
        initial.iter().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    cms.create(&PostParams::default(), &cm("new"))
        .await
        .unwrap();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(15), w.try_next())
            .await
            .expect("the watcher did not see the new write")
            .unwrap()
            .unwrap();
        if let watcher::Event::Apply(c) = ev {
            assert_eq!(c.metadata.name.as_deref(), Some("new"));
            break;
        }
    }

    // The target now differs from the source: migrating again is refused
    // and changes nothing.
    let refused = kcontrol(&["migrate", "--from", from, "--to", &url]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("other content"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(cms.get("new").await.is_ok());
}
