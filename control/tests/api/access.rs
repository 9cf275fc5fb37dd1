//! Authentication (only the probes answer without credentials) and the
//! discovery documents.

use serde_json::json;

use crate::CMS;
use crate::common::{Server, TempDir, configmap, get, post_json, send};

#[tokio::test]
async fn credentials_are_required_except_for_probes() {
    let dir = TempDir::new("auth");
    let server = Server::start(&dir.0, &[]);
    let anon = server.anonymous_client().await;
    for path in ["/healthz", "/readyz", "/livez"] {
        assert_eq!(get(&anon, path).await.code, 200, "{path}");
    }
    let v = get(&anon, "/version").await;
    assert_eq!(v.code, 200);
    assert_eq!(v.json()["minor"], "33");
    for path in [
        "/api",
        "/apis",
        "/api/v1/namespaces",
        "/api/v1/namespaces/default/pods",
    ] {
        let r = get(&anon, path).await;
        assert_eq!(r.code, 401, "{path}");
        assert_eq!(r.json()["reason"], "Unauthorized");
    }
    let r = post_json(&anon, CMS, &configmap("x", json!({}))).await;
    assert_eq!(r.code, 401);

    // A wrong token is no better than none.
    let mut cfg = server.config().await;
    cfg.auth_info.token = Some("not-the-token".to_string().into());
    let wrong = kube::Client::try_from(cfg).unwrap();
    assert_eq!(get(&wrong, "/api/v1/namespaces").await.code, 401);

    // The token file is private.
    use std::os::unix::fs::PermissionsExt;
    for f in ["admin.token", "kubeconfig.yaml", "pki/ca.key"] {
        let mode = std::fs::metadata(dir.0.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} is readable by others");
    }
    let client = server.client().await;
    assert!(
        get(&client, "/api/v1/configmaps").await.json()["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn discovery_documents() {
    let dir = TempDir::new("disc");
    let server = Server::start(&dir.0, &[]);
    let c = server.client().await;
    assert_eq!(get(&c, "/api").await.json()["versions"], json!(["v1"]));
    let groups: Vec<String> = get(&c, "/apis").await.json()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        groups,
        [
            "apps",
            "discovery.k8s.io",
            "coordination.k8s.io",
            "authentication.k8s.io",
            "authorization.k8s.io"
        ]
    );
    let core = get(&c, "/api/v1").await.json();
    let pods = core["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "pods")
        .unwrap();
    assert_eq!(pods["namespaced"], true);
    assert_eq!(pods["shortNames"], json!(["po"]));
    let nodes = core["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "nodes")
        .unwrap();
    assert_eq!(nodes["namespaced"], false);
    assert_eq!(
        get(&c, "/apis/apps/v1").await.json()["groupVersion"],
        "apps/v1"
    );
    assert_eq!(
        get(&c, "/apis/apps").await.json()["preferredVersion"]["version"],
        "v1"
    );
    assert_eq!(get(&c, "/apis/nope/v1").await.code, 404);
    let v2 = send(
        &c,
        "GET",
        "/openapi/v2",
        None,
        Vec::new(),
        Some("application/com.github.proto-openapi.spec.v2@v1.0+protobuf"),
    )
    .await;
    assert_eq!(v2.code, 200);
    assert_eq!(&v2.body[..5], b"\x0a\x032.0");
}
