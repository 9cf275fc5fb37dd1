//! The controllers in-process, as kube-rs tests its runtime: no server
//! process and no watches. The caches are filled by hand with the objects
//! a test makes up, one reconcile runs, and what it wrote is read back
//! through the real apiserver router over a temporary SQLite store (the
//! client's requests go straight to `router::handle`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{Config, Ctx, Queues, endpointslice, replicaset};
use crate::apiserver::{self, State};
use crate::events::Recorder;
use crate::informer::{Key, Queue};

const TOKEN: &str = "test-token";

/// An apiserver without a listener, and a client whose requests it
/// answers directly.
struct Api0 {
    client: Client,
    _dir: tempfile::TempDir,
}

async fn apiserver() -> Api0 {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = Arc::new(State {
        store: apiserver::open_store(dir.path(), None)
            .await
            .expect("store"),
        // Dual-stack, so that Services can be; SingleStack IPv4 by default.
        alloc: apiserver::allocate::Allocator::new("10.96.0.0/16,fd00:10:96::/108", "30000-32767")
            .expect("allocator"),
        token: TOKEN.into(),
        server_address: "127.0.0.1:6443".into(),
        bookmark_interval: std::time::Duration::from_secs(60),
    });
    apiserver::verbs::bootstrap(&state)
        .await
        .expect("bootstrap");
    let svc = tower::service_fn(move |mut req: http::Request<kube::client::Body>| {
        let state = state.clone();
        async move {
            let bearer = format!("Bearer {TOKEN}");
            req.headers_mut().insert(
                http::header::AUTHORIZATION,
                http::HeaderValue::from_str(&bearer).expect("header"),
            );
            Ok::<_, Infallible>(apiserver::router::handle(state, req).await)
        }
    });
    Api0 {
        client: Client::new(svc, "default"),
        _dir: dir,
    }
}

/// A cache holding exactly `objs`, as a reflector would after its list.
fn cache<K>(objs: impl IntoIterator<Item = K>) -> Store<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, mut writer) = reflector::store();
    for o in objs {
        writer.apply_watcher_event(&watcher::Event::Apply(o));
    }
    reader
}

/// The controllers' context over `client`, with these caches (the kinds
/// not passed are empty).
fn ctx(client: &Client, pods: Vec<Pod>, rs: Vec<ReplicaSet>, svcs: Vec<Service>) -> Ctx {
    Ctx {
        client: client.clone(),
        cfg: Config::default(),
        pods: cache(pods),
        replicasets: cache(rs),
        deployments: cache([]),
        services: cache(svcs),
        slices: cache([]),
        nodes: cache([]),
        leases: cache([]),
        q: Queues {
            replicaset: Queue::new(),
            deployment: Queue::new(),
            service: Queue::new(),
            node: Queue::new(),
            gc: Queue::new(),
        },
        recorder: Recorder::new(client.clone(), "test"),
        expectations: Mutex::new(HashMap::new()),
        rs_written: Mutex::new(HashMap::new()),
        nodes_seen: Mutex::new(HashMap::new()),
    }
}

async fn create<K>(client: &Client, obj: Value) -> K
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let obj: K = serde_json::from_value(obj).expect("object");
    Api::<K>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &obj)
        .await
        .expect("create")
}

async fn pods_in_api(client: &Client) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await
        .expect("list pods")
        .items
}

fn replicaset_json(replicas: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": { "name": "web", "namespace": "default" },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": { "containers": [{ "name": "c", "image": "busybox" }] },
            },
        },
    })
}

#[tokio::test]
async fn replicaset_creates_the_missing_pods_once() {
    let api = apiserver().await;
    let rs: ReplicaSet = create(&api.client, replicaset_json(3)).await;
    let uid = rs.uid().expect("uid");
    let c = ctx(&api.client, vec![], vec![rs.clone()], vec![]);
    let key = Key::of(&rs);

    replicaset::reconcile(&c, key.clone())
        .await
        .expect("reconcile");
    let pods = pods_in_api(&api.client).await;
    assert_eq!(pods.len(), 3, "{pods:?}");
    for p in &pods {
        assert!(p.name_any().starts_with("web-"), "{}", p.name_any());
        assert_eq!(p.labels().get("app").map(String::as_str), Some("web"));
        let owner = crate::informer::controller_of(p).expect("controller");
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("ReplicaSet", uid.as_str())
        );
    }

    // The cache has not shown the new pods yet: a second pass must not
    // create them again.
    replicaset::reconcile(&c, key).await.expect("reconcile");
    assert_eq!(pods_in_api(&api.client).await.len(), 3);
}

#[tokio::test]
async fn replicaset_deletes_the_surplus_pods() {
    let api = apiserver().await;
    let rs: ReplicaSet = create(&api.client, replicaset_json(3)).await;
    replicaset::reconcile(
        &ctx(&api.client, vec![], vec![rs.clone()], vec![]),
        Key::of(&rs),
    )
    .await
    .expect("reconcile");
    let pods = pods_in_api(&api.client).await;
    assert_eq!(pods.len(), 3);

    // Scaled to 1 while the cache holds the three pods.
    let mut one = rs.clone();
    one.spec.as_mut().expect("spec").replicas = Some(1);
    replicaset::reconcile(
        &ctx(&api.client, pods, vec![one.clone()], vec![]),
        Key::of(&one),
    )
    .await
    .expect("reconcile");
    assert_eq!(pods_in_api(&api.client).await.len(), 1);
}

/// A pod of the cache (never written to the API: the EndpointSlice
/// controller only reads pods).
fn pod(name: &str, app: &str, ip: Option<&str>, ready: bool) -> Pod {
    let mut status = json!({
        "phase": "Running",
        "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }],
    });
    if let Some(ip) = ip {
        status["podIP"] = json!(ip);
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "default", "uid": format!("uid-{name}"),
            "labels": { "app": app },
        },
        "spec": {
            "nodeName": "node-1",
            "containers": [{ "name": "c", "image": "busybox",
                             "ports": [{ "name": "http", "containerPort": 8080 }] }],
        },
        "status": status,
    }))
    .expect("pod")
}

#[tokio::test]
async fn endpointslice_lists_the_selected_pod_ips() {
    let api = apiserver().await;
    let svc: Service = create(
        &api.client,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": "web", "namespace": "default" },
            "spec": {
                "selector": { "app": "web" },
                "ports": [{ "name": "http", "port": 80, "targetPort": "http" }],
            },
        }),
    )
    .await;
    let pods = vec![
        pod("web-a", "web", Some("10.244.0.2"), true),
        pod("web-b", "web", Some("10.244.0.3"), false),
        // No address yet: not an endpoint.
        pod("web-c", "web", None, false),
        pod("other", "db", Some("10.244.0.9"), true),
    ];
    let c = ctx(&api.client, pods, vec![], vec![svc.clone()]);
    endpointslice::reconcile(&c, Key::of(&svc))
        .await
        .expect("reconcile");

    let slices = Api::<EndpointSlice>::namespaced(api.client.clone(), "default")
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .expect("list slices")
        .items;
    assert_eq!(slices.len(), 1, "{slices:?}");
    let s = &slices[0];
    assert!(endpointslice::is_ours(s));
    let eps: Vec<(&str, Option<bool>)> = s
        .endpoints
        .iter()
        .map(|e| {
            (
                e.addresses[0].as_str(),
                e.conditions.as_ref().and_then(|c| c.ready),
            )
        })
        .collect();
    assert_eq!(
        eps,
        [("10.244.0.2", Some(true)), ("10.244.0.3", Some(false))]
    );
    // The named targetPort resolved through the pods' container port.
    let ports = s.ports.as_ref().expect("ports");
    assert_eq!(
        (ports[0].name.as_deref(), ports[0].port),
        (Some("http"), Some(8080))
    );
}

#[tokio::test]
async fn endpointslice_names_zones_and_hints_them_for_prefer_close() {
    let api = apiserver().await;
    let svc: Service = create(
        &api.client,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": "web", "namespace": "default" },
            "spec": {
                "selector": { "app": "web" },
                "trafficDistribution": "PreferClose",
                "ports": [{ "name": "http", "port": 80, "targetPort": "http" }],
            },
        }),
    )
    .await;
    let on = |name: &str, ip: &str, node: &str| {
        let mut p = pod(name, "web", Some(ip), true);
        p.spec.as_mut().expect("spec").node_name = Some(node.into());
        p
    };
    let node = |name: &str, zone: &str| -> Node {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": name, "labels": { "topology.kubernetes.io/zone": zone } },
        }))
        .expect("node")
    };
    let list = |api: &Api0| {
        let client = api.client.clone();
        async move {
            Api::<EndpointSlice>::namespaced(client, "default")
                .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
                .await
                .expect("list slices")
                .items
        }
    };
    let zones = |s: &EndpointSlice| -> Vec<(String, Option<String>, Vec<String>)> {
        s.endpoints
            .iter()
            .map(|e| {
                (
                    e.addresses[0].clone(),
                    e.zone.clone(),
                    e.hints
                        .iter()
                        .flat_map(|h| h.for_zones.iter().flatten())
                        .map(|z| z.name.clone())
                        .collect(),
                )
            })
            .collect()
    };
    let mut c = ctx(
        &api.client,
        vec![
            on("web-a", "10.244.0.2", "n1"),
            on("web-b", "10.244.1.2", "n2"),
        ],
        vec![],
        vec![svc.clone()],
    );
    c.nodes = cache([node("n1", "a"), node("n2", "b")]);
    endpointslice::reconcile(&c, Key::of(&svc))
        .await
        .expect("reconcile");
    let slices = list(&api).await;
    assert_eq!(
        zones(&slices[0]),
        [
            ("10.244.0.2".into(), Some("a".into()), vec!["a".to_owned()]),
            ("10.244.1.2".into(), Some("b".into()), vec!["b".to_owned()]),
        ]
    );

    // A pod on a node without a zone: zones where known, no hints at all.
    let mut c = ctx(
        &api.client,
        vec![
            on("web-a", "10.244.0.2", "n1"),
            on("web-b", "10.244.1.2", "n2"),
            on("web-c", "10.244.2.2", "n3"),
        ],
        vec![],
        vec![svc.clone()],
    );
    c.nodes = cache([node("n1", "a"), node("n2", "b")]);
    c.slices = cache(slices);
    endpointslice::reconcile(&c, Key::of(&svc))
        .await
        .expect("reconcile");
    let slices = list(&api).await;
    assert_eq!(
        zones(&slices[0]),
        [
            ("10.244.0.2".into(), Some("a".into()), vec![]),
            ("10.244.1.2".into(), Some("b".into()), vec![]),
            ("10.244.2.2".into(), None, vec![]),
        ]
    );
}

/// A dual-stack Service still gets its IPv4 slice from the pods' IPv4
/// addresses; no IPv6 slice is written, since no pod has an IPv6 address
/// (the kubelet's pod network is IPv4).
#[tokio::test]
async fn endpointslice_of_a_dual_stack_service_is_ipv4() {
    let api = apiserver().await;
    let svc: Service = create(
        &api.client,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": "web", "namespace": "default" },
            "spec": {
                "ipFamilyPolicy": "RequireDualStack",
                "selector": { "app": "web" },
                "ports": [{ "name": "http", "port": 80, "targetPort": "http" }],
            },
        }),
    )
    .await;
    let families = svc.spec.as_ref().and_then(|s| s.ip_families.clone());
    assert_eq!(families, Some(vec!["IPv4".into(), "IPv6".into()]));
    let pods = vec![pod("web-a", "web", Some("10.244.0.2"), true)];
    let c = ctx(&api.client, pods, vec![], vec![svc.clone()]);
    endpointslice::reconcile(&c, Key::of(&svc))
        .await
        .expect("reconcile");
    let slices = Api::<EndpointSlice>::namespaced(api.client.clone(), "default")
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .expect("list slices")
        .items;
    let shapes: Vec<(&str, Vec<&str>)> = slices
        .iter()
        .map(|s| {
            (
                s.address_type.as_str(),
                s.endpoints
                    .iter()
                    .map(|e| e.addresses[0].as_str())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(shapes, [("IPv4", vec!["10.244.0.2"])]);
}
