//! The router, the verbs and watches in-process: a fresh SQLite store in a
//! temporary directory and the real [`router::handle`], no TLS, no socket.

use std::sync::Arc;
use std::time::Duration;

use ::http::{Method, Request, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use kcontrol_store::Store;
use serde_json::{Value, json};
use testbed::etcd::EtcdCluster;

use super::allocate::Allocator;
use super::http::Body;
use super::{State, router, start};

mod dual_stack;

const TOKEN: &str = "unit-test-token";

/// An apiserver on its own store; the directory (and etcd) go with it.
struct Server {
    state: Arc<State>,
    backend: Backend,
    service_cidr: String,
    dir: tempfile::TempDir,
    etcd: Option<EtcdCluster>,
}

/// The store a test apiserver runs on: the embedded one, or a one-member
/// etcd (as shared by several apiservers: addresses are claimed in it).
#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Etcd,
}

async fn server() -> Server {
    server_on(Backend::Sqlite, "10.96.0.0/24").await
}

async fn server_on(backend: Backend, service_cidr: &str) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = match backend {
        Backend::Sqlite => None,
        Backend::Etcd => Some(
            tokio::task::spawn_blocking(|| EtcdCluster::start(1))
                .await
                .unwrap()
                .expect("etcd"),
        ),
    };
    let state = open(backend, service_cidr, dir.path(), etcd.as_ref()).await;
    Server {
        state,
        backend,
        service_cidr: service_cidr.into(),
        dir,
        etcd,
    }
}

/// A started apiserver on the store in `dir` (or in `etcd`).
async fn open(
    backend: Backend,
    service_cidr: &str,
    dir: &std::path::Path,
    etcd: Option<&EtcdCluster>,
) -> Arc<State> {
    let store: Arc<dyn Store> = match etcd {
        None => Arc::new(kcontrol_store::SqliteStore::open(dir.join("store.db")).unwrap()),
        Some(c) => Arc::new(
            kcontrol_store::EtcdStore::connect_url(&c.url(), Default::default())
                .await
                .expect("connecting to etcd"),
        ),
    };
    start(State {
        store,
        alloc: Allocator::new(service_cidr, "30000-30099")
            .unwrap()
            .shared_store(matches!(backend, Backend::Etcd)),
        token: TOKEN.into(),
        server_address: "127.0.0.1:6443".into(),
        bookmark_interval: Duration::from_secs(60),
    })
    .await
    .unwrap()
}

impl Server {
    /// The apiserver stopped and started again on the same store: what it
    /// knows of addresses comes from the store alone.
    async fn restart(self) -> Server {
        let Server {
            state,
            backend,
            service_cidr,
            dir,
            etcd,
        } = self;
        drop(Arc::into_inner(state).expect("no request holds the state"));
        let state = open(backend, &service_cidr, dir.path(), etcd.as_ref()).await;
        Server {
            state,
            backend,
            service_cidr,
            dir,
            etcd,
        }
    }

    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Response {
        self.send_as(method, path, "application/json", body).await
    }

    async fn send_as(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<Value>,
    ) -> Response {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .unwrap();
        Response(router::handle(self.state.clone(), req).await)
    }

    /// The code and the JSON document of a request that is not a watch.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(method, path, "application/json", body).await
    }

    async fn call_as(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let resp = self.send_as(method, path, content_type, body).await.0;
        let code = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let doc = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {bytes:?}"));
        (code, doc)
    }
}

struct Response(::http::Response<Body>);

impl Response {
    /// The next event line of a watch.
    async fn next_event(&mut self) -> Value {
        let mut line = Vec::new();
        while !line.ends_with(b"\n") {
            let frame = tokio::time::timeout(Duration::from_secs(5), self.0.body_mut().frame())
                .await
                .expect("an event within 5 s")
                .expect("the watch is still open")
                .unwrap();
            line.extend_from_slice(&frame.into_data().unwrap());
        }
        serde_json::from_slice(&line).unwrap()
    }
}

fn configmap(name: &str, data: Value) -> Value {
    json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": name }, "data": data })
}

fn service(name: &str, cluster_ip: Option<&str>) -> Value {
    let mut s = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": { "name": name },
        "spec": { "selector": { "app": name }, "ports": [{ "port": 80 }] },
    });
    if let Some(ip) = cluster_ip {
        s["spec"]["clusterIP"] = json!(ip);
    }
    s
}

const CONFIGMAPS: &str = "/api/v1/namespaces/default/configmaps";
const SERVICES: &str = "/api/v1/namespaces/default/services";

#[tokio::test]
async fn create_then_get_round_trip() {
    let s = server().await;
    let (code, created) = s
        .call(
            Method::POST,
            CONFIGMAPS,
            Some(configmap("a", json!({"k": "v"}))),
        )
        .await;
    assert_eq!(code, 201, "{created}");
    assert!(created["metadata"]["uid"].is_string(), "{created}");
    let (code, got) = s.call(Method::GET, &format!("{CONFIGMAPS}/a"), None).await;
    assert_eq!(code, 200);
    assert_eq!(got, created);
    assert_eq!(got["data"], json!({"k": "v"}));
    let (code, _) = s.call(Method::GET, &format!("{CONFIGMAPS}/b"), None).await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn service_gets_a_cluster_ip_of_its_own() {
    let s = server().await;
    let (code, a) = s
        .call(Method::POST, SERVICES, Some(service("a", None)))
        .await;
    assert_eq!(code, 201, "{a}");
    let ip = a["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(ip.starts_with("10.96.0."), "{ip}");
    assert_eq!(a["spec"]["clusterIPs"], json!([ip]));
    let (code, b) = s
        .call(Method::POST, SERVICES, Some(service("b", Some(&ip))))
        .await;
    assert_eq!(code, 422, "{b}");
    assert_eq!(b["details"]["causes"][0]["field"], "spec.clusterIPs");
    // Deleting the Service frees its address.
    let (code, _) = s.call(Method::DELETE, &format!("{SERVICES}/a"), None).await;
    assert_eq!(code, 200);
    let (code, b) = s
        .call(Method::POST, SERVICES, Some(service("b", Some(&ip))))
        .await;
    assert_eq!(code, 201, "{b}");
}

#[tokio::test]
async fn validation_error_is_a_422_status_naming_the_field() {
    let s = server().await;
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p" },
        "spec": { "containers": [{ "name": "c", "image": "busybox", "ports": [{ "containerPort": 70000 }] }] },
    });
    let (code, status) = s
        .call(Method::POST, "/api/v1/namespaces/default/pods", Some(pod))
        .await;
    assert_eq!(code, 422, "{status}");
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "Invalid");
    assert_eq!(status["details"]["kind"], "Pod");
    assert_eq!(
        status["details"]["causes"][0]["field"],
        "spec.containers[0].ports[0].containerPort"
    );
}

#[tokio::test]
async fn watch_from_a_resource_version_delivers_the_next_event() {
    let s = server().await;
    let (_, a) = s
        .call(Method::POST, CONFIGMAPS, Some(configmap("a", json!({}))))
        .await;
    let rv = a["metadata"]["resourceVersion"].as_str().unwrap();
    let mut watch = s
        .send(
            Method::GET,
            &format!("{CONFIGMAPS}?watch=1&resourceVersion={rv}"),
            None,
        )
        .await;
    assert_eq!(watch.0.status(), StatusCode::OK);
    let (_, b) = s
        .call(Method::POST, CONFIGMAPS, Some(configmap("b", json!({}))))
        .await;
    let ev = watch.next_event().await;
    assert_eq!(ev["type"], "ADDED", "{ev}");
    assert_eq!(ev["object"], b);
    s.call(Method::DELETE, &format!("{CONFIGMAPS}/a"), None)
        .await;
    let ev = watch.next_event().await;
    assert_eq!(ev["type"], "DELETED", "{ev}");
    assert_eq!(ev["object"]["metadata"]["name"], "a");
}

#[tokio::test]
async fn deleting_a_namespace_deletes_its_contents_and_addresses() {
    let s = server().await;
    let ns = json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "t" } });
    let (code, _) = s.call(Method::POST, "/api/v1/namespaces", Some(ns)).await;
    assert_eq!(code, 201);
    let (code, svc) = s
        .call(
            Method::POST,
            "/api/v1/namespaces/t/services",
            Some(service("a", None)),
        )
        .await;
    assert_eq!(code, 201, "{svc}");
    let ip = svc["spec"]["clusterIP"].as_str().unwrap();
    let (code, _) = s
        .call(
            Method::POST,
            "/api/v1/namespaces/t/configmaps",
            Some(configmap("c", json!({}))),
        )
        .await;
    assert_eq!(code, 201);

    let (code, status) = s.call(Method::DELETE, "/api/v1/namespaces/t", None).await;
    assert_eq!(code, 200, "{status}");
    for path in [
        "/api/v1/namespaces/t",
        "/api/v1/namespaces/t/services/a",
        "/api/v1/namespaces/t/configmaps/c",
    ] {
        let (code, _) = s.call(Method::GET, path, None).await;
        assert_eq!(code, 404, "{path}");
    }
    let (code, b) = s
        .call(Method::POST, SERVICES, Some(service("b", Some(ip))))
        .await;
    assert_eq!(code, 201, "the address of the deleted Service is free: {b}");

    let (code, status) = s
        .call(Method::DELETE, "/api/v1/namespaces/default", None)
        .await;
    assert_eq!(code, 403, "{status}");
}

#[tokio::test]
async fn a_service_keeps_its_cluster_ip_on_update() {
    let s = server().await;
    let (code, a) = s
        .call(Method::POST, SERVICES, Some(service("a", None)))
        .await;
    assert_eq!(code, 201, "{a}");
    // Another address of the range than the one allocated (at random).
    let ip: std::net::Ipv4Addr = a["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    let other = std::net::Ipv4Addr::from([10, 96, 0, if ip.octets()[3] == 99 { 98 } else { 99 }])
        .to_string();
    let mut changed = a.clone();
    changed["spec"]["clusterIP"] = json!(other);
    changed["spec"]["clusterIPs"] = json!([other]);
    let (code, r) = s
        .call(Method::PUT, &format!("{SERVICES}/a"), Some(changed))
        .await;
    assert_eq!(code, 422, "{r}");
    let (code, r) = s
        .call_as(
            Method::PATCH,
            &format!("{SERVICES}/a"),
            "application/merge-patch+json",
            Some(json!({"spec": {"clusterIP": other, "clusterIPs": [other]}})),
        )
        .await;
    assert_eq!(code, 422, "{r}");
    let (_, got) = s.call(Method::GET, &format!("{SERVICES}/a"), None).await;
    assert_eq!(got["spec"]["clusterIP"], a["spec"]["clusterIP"]);
}
