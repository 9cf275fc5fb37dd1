//! kube-rs (client + runtime) against `kcontrol apiserver` with the
//! generated kubeconfig: list, create, errors as `kube::Error::Api`, raw
//! watches with ADDED/MODIFIED/DELETED/BOOKMARK, and the runtime watcher in
//! both list-then-watch and streaming-list modes, and a runtime watcher on
//! Services that keeps going across a `kill -9` and restart of the apiserver.

mod common;

use std::time::Duration;

use common::{Server, TempDir};
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::{WatchStreamExt, watcher};

fn cm(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": name, "labels": { "t": "kube" } },
        "data": { "k": value },
    }))
    .unwrap()
}

fn name(c: &ConfigMap) -> &str {
    c.metadata.name.as_deref().unwrap()
}

/// The next item of a stream, within 15 s.
async fn next<T, E: std::fmt::Debug>(s: &mut (impl Stream<Item = Result<T, E>> + Unpin)) -> T {
    tokio::time::timeout(Duration::from_secs(15), s.try_next())
        .await
        .expect("no event within 15s")
        .expect("stream error")
        .expect("stream ended")
}

fn api_code(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_client_and_runtime() {
    let dir = TempDir::new("kube");
    let server = Server::start(&dir.0, &["--bookmark-interval-seconds", "1"]);
    let client = server.client().await;

    let nss: Api<Namespace> = Api::all(client.clone());
    let names: Vec<String> = nss
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert!(
        names.iter().any(|n| n == "default") && names.iter().any(|n| n == "kube-system"),
        "{names:?}"
    );

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let pre = cms
        .create(&PostParams::default(), &cm("pre", "1"))
        .await
        .unwrap();
    assert!(pre.metadata.uid.is_some() && pre.metadata.resource_version.is_some());
    assert_eq!(
        api_code(
            cms.create(&PostParams::default(), &cm("pre", "1"))
                .await
                .unwrap_err()
        )
        .0,
        409
    );
    assert_eq!(
        api_code(cms.get("missing").await.unwrap_err()),
        (404, "NotFound".into())
    );
    let mut stale = pre.clone();
    cms.patch(
        "pre",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {"k": "2"}})),
    )
    .await
    .unwrap();
    stale.data = Some([("k".to_string(), "3".to_string())].into());
    assert_eq!(
        api_code(
            cms.replace("pre", &PostParams::default(), &stale)
                .await
                .unwrap_err()
        ),
        (409, "Conflict".into())
    );

    // Server-side apply: creates, then prunes what the manager stopped applying.
    let pp = PatchParams::apply("kcontrol-test").force();
    let applied = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "ssa", "labels": { "t": "ssa", "drop": "me" } },
        "data": { "a": "1", "b": "2" },
    });
    let c1 = cms
        .patch("ssa", &pp, &Patch::Apply(&applied))
        .await
        .unwrap();
    assert_eq!(c1.data.as_ref().unwrap().len(), 2);
    let applied = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "ssa", "labels": { "t": "ssa" } },
        "data": { "a": "3" },
    });
    let c2 = cms
        .patch("ssa", &pp, &Patch::Apply(&applied))
        .await
        .unwrap();
    assert_eq!(
        c2.data.unwrap(),
        [("a".to_string(), "3".to_string())].into()
    );
    assert_eq!(
        c2.metadata.labels.unwrap(),
        [("t".to_string(), "ssa".to_string())].into()
    );
    assert_eq!(
        c2.metadata.managed_fields.unwrap()[0].manager.as_deref(),
        Some("kcontrol-test")
    );

    // The runtime watcher: initial list, then live changes.
    let mut w = watcher(cms.clone(), watcher::Config::default().labels("t=kube")).boxed();
    assert!(matches!(next(&mut w).await, watcher::Event::Init));
    assert!(matches!(next(&mut w).await, watcher::Event::InitApply(c) if name(&c) == "pre"));
    assert!(matches!(next(&mut w).await, watcher::Event::InitDone));
    cms.create(&PostParams::default(), &cm("live", "a"))
        .await
        .unwrap();
    assert!(matches!(next(&mut w).await, watcher::Event::Apply(c) if name(&c) == "live"));
    cms.patch(
        "live",
        &PatchParams::default(),
        &Patch::Strategic(serde_json::json!({"data": {"k": "b"}})),
    )
    .await
    .unwrap();
    match next(&mut w).await {
        watcher::Event::Apply(c) => assert_eq!(c.data.unwrap()["k"], "b"),
        other => panic!("expected Apply, got {other:?}"),
    }
    cms.delete("live", &DeleteParams::default()).await.unwrap();
    assert!(matches!(next(&mut w).await, watcher::Event::Delete(c) if name(&c) == "live"));

    // Streaming lists (sendInitialEvents + the initial-events-end bookmark).
    let mut s = watcher(
        cms.clone(),
        watcher::Config::default()
            .labels("t=kube")
            .streaming_lists(),
    )
    .boxed();
    assert!(matches!(next(&mut s).await, watcher::Event::Init));
    assert!(matches!(next(&mut s).await, watcher::Event::InitApply(c) if name(&c) == "pre"));
    assert!(matches!(next(&mut s).await, watcher::Event::InitDone));

    // A raw watch from a list's resourceVersion sees each event type.
    let rv = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let wp = WatchParams::default().labels("t=kube").timeout(30);
    let mut raw = cms.watch(&wp, &rv).await.unwrap().boxed();
    cms.create(&PostParams::default(), &cm("w1", "x"))
        .await
        .unwrap();
    assert!(matches!(next(&mut raw).await, WatchEvent::Added(c) if name(&c) == "w1"));
    cms.patch(
        "w1",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {"k": "y"}})),
    )
    .await
    .unwrap();
    assert!(matches!(next(&mut raw).await, WatchEvent::Modified(c) if name(&c) == "w1"));
    cms.delete("w1", &DeleteParams::default()).await.unwrap();
    let deleted_rv = match next(&mut raw).await {
        WatchEvent::Deleted(c) => c.metadata.resource_version.unwrap(),
        other => panic!("expected Deleted, got {other:?}"),
    };
    // Bookmarks (every second here) carry the newest revision delivered.
    loop {
        match next(&mut raw).await {
            WatchEvent::Bookmark(b) => {
                assert_eq!(b.metadata.resource_version, deleted_rv);
                break;
            }
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
            _ => {}
        }
    }
    // A label change that makes an object stop matching is a DELETED for
    // this watcher.
    cms.create(&PostParams::default(), &cm("w2", "x"))
        .await
        .unwrap();
    assert!(matches!(next(&mut raw).await, WatchEvent::Added(c) if name(&c) == "w2"));
    cms.patch(
        "w2",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": {"t": "other"}}})),
    )
    .await
    .unwrap();
    loop {
        match next(&mut raw).await {
            WatchEvent::Deleted(c) => {
                assert_eq!(name(&c), "w2");
                break;
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("expected Deleted, got {other:?}"),
        }
    }
}

fn svc(name: &str) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": name, "labels": { "t": "restart" } },
        "spec": { "selector": { "app": name }, "ports": [{ "port": 80, "targetPort": 8080 }] },
    }))
    .unwrap()
}

/// A watcher event on Services reduced to what the test checks:
/// (kind, name, first port's targetPort).
type Seen = (&'static str, String, i64);

fn seen(e: watcher::Event<Service>) -> Option<Seen> {
    let target = |s: &Service| {
        s.spec
            .as_ref()
            .and_then(|sp| sp.ports.as_ref())
            .and_then(|p| p.first())
            .and_then(|p| match &p.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                    Some(*n as i64)
                }
                _ => None,
            })
            .unwrap_or(-1)
    };
    let name = |s: &Service| s.metadata.name.clone().unwrap_or_default();
    match e {
        watcher::Event::Apply(s) => Some(("apply", name(&s), target(&s))),
        // After a reconnect the watcher may re-list instead of resuming;
        // a re-listed object is reported the same way.
        watcher::Event::InitApply(s) => Some(("apply", name(&s), target(&s))),
        watcher::Event::Delete(s) => Some(("delete", name(&s), target(&s))),
        watcher::Event::Init | watcher::Event::InitDone => None,
    }
}

/// The next create/update/delete the watcher reports, skipping the
/// connection errors it retries (with backoff) while the apiserver is down.
async fn next_change(
    s: &mut (impl Stream<Item = Result<watcher::Event<Service>, watcher::Error>> + Unpin),
    errors: &mut usize,
) -> Seen {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let item = tokio::time::timeout_at(deadline, s.next())
            .await
            .expect("no watcher event within 60s")
            .expect("watcher stream ended");
        match item {
            Ok(e) => {
                if let Some(x) = seen(e) {
                    return x;
                }
            }
            Err(_) => *errors += 1,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_watcher_on_services_survives_a_restart() {
    let dir = TempDir::new("kube-restart");
    let mut server = Server::start(&dir.0, &[]);
    let addr = server.addr().to_string();
    let client = server.client().await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let wclient = server.client().await;
    let watched: Api<Service> = Api::namespaced(wclient, "default");
    let mut w = watcher(watched, watcher::Config::default().labels("t=restart"))
        .default_backoff()
        .boxed();
    let mut errors = 0;
    // The initial (empty) list completes before anything is written.
    loop {
        match tokio::time::timeout(Duration::from_secs(15), w.next()).await {
            Ok(Some(Ok(watcher::Event::InitDone))) => break,
            Ok(Some(Ok(_))) => {}
            other => panic!("watcher did not start: {other:?}"),
        }
    }

    // Create, update, delete: seen in that order.
    svcs.create(&PostParams::default(), &svc("a"))
        .await
        .unwrap();
    assert_eq!(
        next_change(&mut w, &mut errors).await,
        ("apply", "a".into(), 8080)
    );
    svcs.patch(
        "a",
        &PatchParams::default(),
        &Patch::Strategic(
            serde_json::json!({"spec": {"ports": [{"port": 80, "targetPort": 9090}]}}),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        next_change(&mut w, &mut errors).await,
        ("apply", "a".into(), 9090)
    );
    svcs.delete("a", &DeleteParams::default()).await.unwrap();
    assert_eq!(next_change(&mut w, &mut errors).await.0, "delete");
    svcs.create(&PostParams::default(), &svc("keep"))
        .await
        .unwrap();
    assert_eq!(
        next_change(&mut w, &mut errors).await,
        ("apply", "keep".into(), 8080)
    );

    // kill -9, then the same data dir on the same port.
    server.kill9();
    let server = Server::start_on(&dir.0, &addr, &[]);
    assert_eq!(server.addr(), addr);
    let client = server.client().await;
    let svcs: Api<Service> = Api::namespaced(client, "default");
    assert!(svcs.get("keep").await.is_ok(), "acknowledged write lost");

    // Changes after the restart reach the same watcher, in order. A
    // watcher that re-listed reports "keep" again first: skip it.
    svcs.create(&PostParams::default(), &svc("b"))
        .await
        .unwrap();
    let mut after = next_change(&mut w, &mut errors).await;
    while after.1 == "keep" {
        after = next_change(&mut w, &mut errors).await;
    }
    assert_eq!(after, ("apply", "b".into(), 8080));
    svcs.patch(
        "b",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": {"x": "y"}}})),
    )
    .await
    .unwrap();
    assert_eq!(
        next_change(&mut w, &mut errors).await,
        ("apply", "b".into(), 8080)
    );
    svcs.delete("b", &DeleteParams::default()).await.unwrap();
    assert_eq!(
        next_change(&mut w, &mut errors).await,
        ("delete", "b".into(), 8080)
    );
    svcs.delete("keep", &DeleteParams::default()).await.unwrap();
    assert_eq!(
        next_change(&mut w, &mut errors).await,
        ("delete", "keep".into(), 8080)
    );
    eprintln!("watcher retried through {errors} connection errors");
}
