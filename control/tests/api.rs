//! Raw HTTP against `kcontrol apiserver`: authentication, error statuses
//! (400, 401, 404, 409, 410, 413, 415, 422), pagination, selectors, tables,
//! resourceVersion semantics, subresources.

mod common;

use std::time::{Duration, Instant};

use common::{Server, TempDir, configmap, delete, get, patch, post_json, put_json, send};
use serde_json::{Value, json};

const CMS: &str = "/api/v1/namespaces/default/configmaps";

fn causes(status: &Value) -> Vec<String> {
    status["details"]["causes"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|c| c["field"].as_str().unwrap_or_default().to_string())
        .collect()
}

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

#[tokio::test]
async fn malformed_requests_get_4xx_and_change_nothing() {
    let dir = TempDir::new("bad");
    let server = Server::start(&dir.0, &[]);
    let c = server.client().await;
    let rv_before = get(&c, CMS).await.json()["metadata"]["resourceVersion"].clone();

    let r = send(
        &c,
        "POST",
        CMS,
        Some("application/json"),
        b"{\"metadata\": ".to_vec(),
        None,
    )
    .await;
    assert_eq!(r.code, 400);
    assert_eq!(r.json()["kind"], "Status");
    assert_eq!(r.json()["reason"], "BadRequest");
    // Wrong types name the field.
    let r = post_json(&c, "/api/v1/namespaces/default/pods", &json!({"metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "x", "ports": [{"containerPort": "eighty"}]}]}})).await;
    assert_eq!(r.code, 400);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("spec.containers[0].ports[0].containerPort"),
        "{}",
        r.json()
    );
    assert_eq!(post_json(&c, CMS, &json!([1, 2])).await.code, 400);
    assert_eq!(
        post_json(&c, CMS, &json!({"kind": "Pod", "metadata": {"name": "x"}}))
            .await
            .code,
        400
    );
    assert_eq!(
        post_json(
            &c,
            CMS,
            &json!({"apiVersion": "v2", "metadata": {"name": "x"}})
        )
        .await
        .code,
        400
    );
    assert_eq!(
        post_json(&c, CMS, &json!({"metadata": "x"})).await.code,
        400
    );
    // Unknown resources, groups, versions, paths.
    for path in [
        "/api/v1/namespaces/default/foos",
        "/api/v1/foos",
        "/apis/apps/v2/deployments",
        "/apis/nope.io/v1/things",
        "/api/v1/namespaces/default/pods/a/b/c",
        "/api/v1/pods/x",
        "/nope",
    ] {
        let r = get(&c, path).await;
        assert_eq!(r.code, 404, "{path}");
        assert_eq!(r.json()["reason"], "NotFound", "{path}");
    }
    // A huge body is refused before it is read whole.
    let mut huge = configmap("huge", json!({}));
    huge["data"]["k"] = json!("x".repeat(4 * 1024 * 1024));
    let r = post_json(&c, CMS, &huge).await;
    assert_eq!(r.code, 413);
    assert_eq!(r.json()["reason"], "RequestEntityTooLarge");
    // Unsupported media types, verbs, accept headers.
    let r = send(
        &c,
        "POST",
        CMS,
        Some("application/vnd.kubernetes.protobuf"),
        b"\x6b\x38".to_vec(),
        None,
    )
    .await;
    assert_eq!(r.code, 400);
    let r = send(
        &c,
        "POST",
        CMS,
        Some("application/cbor"),
        b"\xa0".to_vec(),
        None,
    )
    .await;
    assert_eq!(r.code, 415);
    let r = send(
        &c,
        "PATCH",
        &format!("{CMS}/x"),
        Some("text/plain"),
        b"{}".to_vec(),
        None,
    )
    .await;
    assert!(r.code == 415 || r.code == 404, "{}", r.code);
    let r = send(
        &c,
        "PUT",
        CMS,
        Some("application/json"),
        b"{}".to_vec(),
        None,
    )
    .await;
    assert_eq!(r.code, 405);
    let r = send(
        &c,
        "GET",
        CMS,
        None,
        Vec::new(),
        Some("application/vnd.kubernetes.protobuf"),
    )
    .await;
    assert_eq!(r.code, 406);
    // Bad query parameters.
    assert_eq!(get(&c, &format!("{CMS}?limit=abc")).await.code, 400);
    assert_eq!(
        get(&c, &format!("{CMS}?labelSelector=a%20in%20b"))
            .await
            .code,
        400
    );
    assert_eq!(
        get(&c, &format!("{CMS}?fieldSelector=spec.nope%3Dx"))
            .await
            .code,
        400
    );
    assert_eq!(get(&c, &format!("{CMS}?continue=garbage")).await.code, 400);
    // Create in a namespace that does not exist.
    let r = post_json(
        &c,
        "/api/v1/namespaces/nope/configmaps",
        &configmap("x", json!({})),
    )
    .await;
    assert_eq!(r.code, 404);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("namespaces \"nope\" not found")
    );

    // None of it wrote anything.
    let after = get(&c, CMS).await.json();
    assert_eq!(after["metadata"]["resourceVersion"], rv_before);
    assert!(after["items"].as_array().unwrap().is_empty());
}

/// What a malformed request must leave alone: the newest revision of the
/// store (a list's resourceVersion) and the objects themselves.
async fn snapshot(c: &kube::Client) -> Vec<Value> {
    let mut out = Vec::new();
    for path in [
        "/api/v1/configmaps",
        "/api/v1/services",
        "/apis/apps/v1/deployments",
        "/api/v1/namespaces",
    ] {
        let r = get(c, path).await;
        assert_eq!(r.code, 200, "{path}");
        out.push(r.json());
    }
    out
}

#[tokio::test]
async fn malformed_input_for_each_verb_gets_4xx_and_changes_nothing() {
    let dir = TempDir::new("verbs");
    let server = Server::start(&dir.0, &[]);
    let c = server.client().await;
    assert_eq!(
        post_json(&c, CMS, &configmap("keep", json!({"a": "b"})))
            .await
            .code,
        201
    );
    const SVCS: &str = "/api/v1/namespaces/default/services";
    let svc = json!({"metadata": {"name": "keepsvc"},
        "spec": {"selector": {"app": "x"}, "ports": [{"port": 80}]}});
    assert_eq!(post_json(&c, SVCS, &svc).await.code, 201);
    let before = snapshot(&c).await;

    let keep = format!("{CMS}/keep");
    let foo = "/api/v1/namespaces/default/foos/keep";
    let huge = {
        let mut h = configmap("keep", json!({}));
        h["data"]["k"] = json!("x".repeat(4 * 1024 * 1024));
        serde_json::to_vec(&h).unwrap()
    };
    let huge_patch =
        serde_json::to_vec(&json!({"data": {"k": "x".repeat(4 * 1024 * 1024)}})).unwrap();
    let huge_json_patch = serde_json::to_vec(
        &json!([{"op": "replace", "path": "/data/k", "value": "x".repeat(4 * 1024 * 1024)}]),
    )
    .unwrap();
    const JSON: &str = "application/json";
    const MERGE: &str = "application/merge-patch+json";
    const SMP: &str = "application/strategic-merge-patch+json";
    const JP: &str = "application/json-patch+json";
    let b = |s: &str| s.as_bytes().to_vec();
    // (verb, method, path, content type, body, expected code)
    type Case<'a> = (&'a str, &'a str, String, Option<&'a str>, Vec<u8>, u16);
    let cases: Vec<Case> = vec![
        // get
        (
            "get",
            "GET",
            format!("{keep}?resourceVersion=abc"),
            None,
            vec![],
            400,
        ),
        (
            "get",
            "GET",
            format!("{keep}?resourceVersion=-1"),
            None,
            vec![],
            400,
        ),
        ("get", "GET", foo.into(), None, vec![], 404),
        ("get", "GET", format!("{CMS}/missing"), None, vec![], 404),
        // list
        (
            "list",
            "GET",
            format!("{CMS}?labelSelector=a%20in%20b"),
            None,
            vec![],
            400,
        ),
        (
            "list",
            "GET",
            format!("{CMS}?labelSelector=a%3D%3D%3Db"),
            None,
            vec![],
            400,
        ),
        (
            "list",
            "GET",
            format!("{CMS}?fieldSelector=spec.nope%3Dx"),
            None,
            vec![],
            400,
        ),
        (
            "list",
            "GET",
            format!("{CMS}?resourceVersion=abc"),
            None,
            vec![],
            400,
        ),
        (
            "list",
            "GET",
            format!("{CMS}?resourceVersion=1&resourceVersionMatch=Bogus"),
            None,
            vec![],
            400,
        ),
        ("list", "GET", format!("{CMS}?limit=abc"), None, vec![], 400),
        (
            "list",
            "GET",
            format!("{CMS}?continue=garbage"),
            None,
            vec![],
            400,
        ),
        (
            "list",
            "GET",
            "/api/v1/namespaces/default/foos".into(),
            None,
            vec![],
            404,
        ),
        // watch
        (
            "watch",
            "GET",
            format!("{CMS}?watch=1&resourceVersion=abc"),
            None,
            vec![],
            400,
        ),
        (
            "watch",
            "GET",
            format!("{CMS}?watch=1&labelSelector=a%20in%20b"),
            None,
            vec![],
            400,
        ),
        (
            "watch",
            "GET",
            format!("{CMS}?watch=1&fieldSelector=spec.nope%3Dx"),
            None,
            vec![],
            400,
        ),
        (
            "watch",
            "GET",
            format!("{CMS}?watch=1&timeoutSeconds=abc"),
            None,
            vec![],
            400,
        ),
        (
            "watch",
            "GET",
            "/api/v1/namespaces/default/foos?watch=1".into(),
            None,
            vec![],
            404,
        ),
        // create
        (
            "create",
            "POST",
            CMS.into(),
            Some(JSON),
            b("{\"metadata\": "),
            400,
        ),
        (
            "create",
            "POST",
            CMS.into(),
            Some(JSON),
            b(r#"{"metadata": {"name": "n"}, "data": {"k": 5}}"#),
            400,
        ),
        (
            "create",
            "POST",
            CMS.into(),
            Some(JSON),
            b(r#"{"metadata": {"name": "keep"}}"#),
            409,
        ),
        ("create", "POST", CMS.into(), Some(JSON), huge.clone(), 413),
        (
            "create",
            "POST",
            "/api/v1/namespaces/default/foos".into(),
            Some(JSON),
            b(r#"{"metadata": {"name": "n"}}"#),
            404,
        ),
        (
            "create",
            "POST",
            SVCS.into(),
            Some(JSON),
            b(r#"{"metadata": {"name": "s2"}, "spec": {"ports": [{"port": "http"}]}}"#),
            400,
        ),
        // update
        (
            "update",
            "PUT",
            keep.clone(),
            Some(JSON),
            b("{\"metadata\": "),
            400,
        ),
        (
            "update",
            "PUT",
            keep.clone(),
            Some(JSON),
            b(r#"{"metadata": {"name": "keep"}, "data": {"a": 5}}"#),
            400,
        ),
        (
            "update",
            "PUT",
            keep.clone(),
            Some(JSON),
            b(r#"{"metadata": {"name": "keep", "resourceVersion": "abc"}, "data": {"a": "c"}}"#),
            400,
        ),
        (
            "update",
            "PUT",
            keep.clone(),
            Some(JSON),
            b(r#"{"metadata": {"name": "keep", "resourceVersion": "1"}, "data": {"a": "c"}}"#),
            409,
        ),
        (
            "update",
            "PUT",
            keep.clone(),
            Some(JSON),
            b(r#"{"metadata": {"name": "other"}, "data": {"a": "c"}}"#),
            400,
        ),
        ("update", "PUT", keep.clone(), Some(JSON), huge.clone(), 413),
        (
            "update",
            "PUT",
            foo.into(),
            Some(JSON),
            b(r#"{"metadata": {"name": "keep"}}"#),
            404,
        ),
        // patch: merge
        (
            "merge patch",
            "PATCH",
            keep.clone(),
            Some(MERGE),
            b(r#"{"data": "#),
            400,
        ),
        (
            "merge patch",
            "PATCH",
            keep.clone(),
            Some(MERGE),
            b(r#"{"data": {"a": [1]}}"#),
            400,
        ),
        (
            "merge patch",
            "PATCH",
            keep.clone(),
            Some(MERGE),
            b("[1]"),
            400,
        ),
        (
            "merge patch",
            "PATCH",
            keep.clone(),
            Some(MERGE),
            b(r#"{"metadata": {"resourceVersion": "abc"}}"#),
            400,
        ),
        (
            "merge patch",
            "PATCH",
            keep.clone(),
            Some(MERGE),
            b(r#"{"metadata": {"resourceVersion": "1"}, "data": {"a": "z"}}"#),
            409,
        ),
        (
            "merge patch",
            "PATCH",
            keep.clone(),
            Some(MERGE),
            huge_patch.clone(),
            413,
        ),
        (
            "merge patch",
            "PATCH",
            foo.into(),
            Some(MERGE),
            b("{}"),
            404,
        ),
        // patch: strategic merge
        (
            "strategic patch",
            "PATCH",
            keep.clone(),
            Some(SMP),
            b(r#"{"data": "#),
            400,
        ),
        (
            "strategic patch",
            "PATCH",
            keep.clone(),
            Some(SMP),
            b(r#"{"data": {"a": {"x": 1}}}"#),
            400,
        ),
        (
            "strategic patch",
            "PATCH",
            keep.clone(),
            Some(SMP),
            b(r#"{"metadata": {"labels": "x"}}"#),
            400,
        ),
        (
            "strategic patch",
            "PATCH",
            format!("{SVCS}/keepsvc"),
            Some(SMP),
            b(r#"{"spec": {"ports": [{"port": "eighty"}]}}"#),
            400,
        ),
        (
            "strategic patch",
            "PATCH",
            keep.clone(),
            Some(SMP),
            huge_patch.clone(),
            413,
        ),
        // patch: JSON patch
        (
            "json patch",
            "PATCH",
            keep.clone(),
            Some(JP),
            b(r#"[{"op": "#),
            400,
        ),
        (
            "json patch",
            "PATCH",
            keep.clone(),
            Some(JP),
            b(r#"{"op": "add"}"#),
            400,
        ),
        (
            "json patch",
            "PATCH",
            keep.clone(),
            Some(JP),
            b(r#"[{"op": "frob", "path": "/data/k"}]"#),
            422,
        ),
        (
            "json patch",
            "PATCH",
            keep.clone(),
            Some(JP),
            b(r#"[{"op": "replace", "path": "/data/k", "value": 7}]"#),
            400,
        ),
        (
            "json patch",
            "PATCH",
            keep.clone(),
            Some(JP),
            b(r#"[{"op": "remove", "path": "/nope/x"}]"#),
            422,
        ),
        (
            "json patch",
            "PATCH",
            keep.clone(),
            Some(JP),
            b(
                r#"[{"op": "test", "path": "/data/k", "value": "zzz"}, {"op": "replace", "path": "/data/k", "value": "q"}]"#,
            ),
            422,
        ),
        (
            "json patch",
            "PATCH",
            keep.clone(),
            Some(JP),
            huge_json_patch.clone(),
            413,
        ),
        // delete
        (
            "delete",
            "DELETE",
            keep.clone(),
            Some(JSON),
            b(r#"{"kind": "#),
            400,
        ),
        (
            "delete",
            "DELETE",
            keep.clone(),
            Some(JSON),
            b(r#"{"gracePeriodSeconds": "x"}"#),
            400,
        ),
        (
            "delete",
            "DELETE",
            keep.clone(),
            Some(JSON),
            b(r#"{"propagationPolicy": "Sideways"}"#),
            422,
        ),
        (
            "delete",
            "DELETE",
            keep.clone(),
            Some(JSON),
            b(r#"{"dryRun": ["Some"]}"#),
            422,
        ),
        (
            "delete",
            "DELETE",
            keep.clone(),
            Some(JSON),
            b(r#"{"preconditions": {"resourceVersion": "abc"}}"#),
            400,
        ),
        (
            "delete",
            "DELETE",
            keep.clone(),
            Some(JSON),
            b(r#"{"preconditions": {"resourceVersion": "1"}}"#),
            409,
        ),
        (
            "delete",
            "DELETE",
            keep.clone(),
            Some(JSON),
            b(r#"{"preconditions": {"uid": "not-the-uid"}}"#),
            409,
        ),
        ("delete", "DELETE", keep.clone(), Some(JSON), b("[]"), 400),
        (
            "delete",
            "DELETE",
            format!("{keep}?gracePeriodSeconds=x"),
            None,
            vec![],
            400,
        ),
        (
            "delete",
            "DELETE",
            format!("{keep}?propagationPolicy=Sideways"),
            None,
            vec![],
            422,
        ),
        ("delete", "DELETE", foo.into(), None, vec![], 404),
        (
            "delete",
            "DELETE",
            "/api/v1/namespaces/nope/configmaps/keep".into(),
            None,
            vec![],
            404,
        ),
        (
            "deletecollection",
            "DELETE",
            format!("{CMS}?labelSelector=a%20in%20b"),
            None,
            vec![],
            400,
        ),
        (
            "deletecollection",
            "DELETE",
            CMS.into(),
            Some(JSON),
            b(r#"{"gracePeriodSeconds": "x"}"#),
            400,
        ),
    ];
    for (verb, method, path, ctype, body, want) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
        let r = send(&c, method, &path, ctype, body, None).await;
        let status = r.json();
        assert_eq!(
            r.code, want,
            "{verb}: {method} {path} {shown}: got {} {status}",
            r.code
        );
        assert_eq!(
            status["kind"], "Status",
            "{verb}: {method} {path}: {status}"
        );
        assert_eq!(status["code"], want, "{verb}: {method} {path}: {status}");
        assert!(
            !status["message"].as_str().unwrap_or_default().is_empty(),
            "{verb}: {method} {path}: no message in {status}"
        );
        // The store's newest revision and every object are as before.
        let after = snapshot(&c).await;
        assert_eq!(
            after, before,
            "{verb}: {method} {path} {shown} changed the store"
        );
    }
}

#[tokio::test]
async fn invalid_objects_get_422_naming_each_field() {
    let dir = TempDir::new("invalid");
    let server = Server::start(
        &dir.0,
        &[
            "--service-cidr",
            "10.96.0.0/24",
            "--node-port-range",
            "30000-30010",
        ],
    );
    let c = server.client().await;
    let svcs = "/api/v1/namespaces/default/services";
    let r = post_json(&c, svcs, &json!({"metadata": {"name": "Bad_Name"}, "spec": {
        "clusterIP": "1.2.3", "selector": {"app": "-x"},
        "ports": [{"name": "a", "port": 0, "protocol": "ICMP"}, {"port": 80, "targetPort": 70000}]}})).await;
    assert_eq!(r.code, 422);
    let s = r.json();
    assert_eq!(s["reason"], "Invalid");
    let fields = causes(&s);
    for f in [
        "metadata.name",
        "spec.clusterIPs[0]",
        "spec.ports[0].port",
        "spec.ports[0].protocol",
        "spec.ports[1].name",
        "spec.ports[1].targetPort",
        "spec.selector",
    ] {
        assert!(fields.contains(&f.to_string()), "{f} not in {fields:?}");
    }
    // Required fields and nested validation.
    let r = post_json(&c, "/apis/apps/v1/namespaces/default/deployments", &json!({"metadata": {"name": "d"},
        "spec": {"selector": {"matchLabels": {"app": "a"}}, "template": {"metadata": {"labels": {"app": "b"}},
        "spec": {"containers": [{"name": "c"}]}}}})).await;
    assert_eq!(r.code, 422);
    let fields = causes(&r.json());
    assert!(
        fields.contains(&"spec.template.metadata.labels".to_string()),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"spec.template.spec.containers[0].image".to_string()),
        "{fields:?}"
    );
    let r = post_json(
        &c,
        "/api/v1/namespaces/default/pods",
        &json!({"metadata": {"name": "p"}, "spec": {}}),
    )
    .await;
    assert_eq!(r.code, 422);
    assert_eq!(causes(&r.json()), ["spec.containers"]);
    let r = post_json(&c, "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", &json!({"metadata": {"name": "e"},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.300"]}], "ports": [{"port": 80, "protocol": "XTP"}]})).await;
    assert_eq!(r.code, 422);
    assert_eq!(
        causes(&r.json()),
        ["endpoints[0].addresses[0]", "ports[0].protocol"]
    );

    // Addresses: from the CIDR, unique; a taken or foreign one is a 422.
    let svc = |name: &str, ip: Option<&str>, node_port: Option<i32>| {
        let mut port = json!({"port": 80});
        if let Some(n) = node_port {
            port["nodePort"] = json!(n);
        }
        let mut s =
            json!({"metadata": {"name": name}, "spec": {"type": "NodePort", "ports": [port]}});
        if let Some(ip) = ip {
            s["spec"]["clusterIP"] = json!(ip);
        }
        s
    };
    let a = post_json(&c, svcs, &svc("a", Some("10.96.0.10"), Some(30005))).await;
    assert_eq!(a.code, 201, "{}", a.json());
    assert_eq!(a.json()["spec"]["clusterIPs"], json!(["10.96.0.10"]));
    let b = post_json(&c, svcs, &svc("b", Some("10.96.0.10"), None)).await;
    assert_eq!(b.code, 422);
    assert!(
        b.json()["message"]
            .as_str()
            .unwrap()
            .contains("provided IP is already allocated")
    );
    let b = post_json(&c, svcs, &svc("b", Some("10.97.0.1"), None)).await;
    assert_eq!(b.code, 422);
    assert!(
        b.json()["message"]
            .as_str()
            .unwrap()
            .contains("not in the valid range")
    );
    let b = post_json(&c, svcs, &svc("b", None, Some(30005))).await;
    assert_eq!(b.code, 422);
    assert_eq!(causes(&b.json()), ["spec.ports[0].nodePort"]);
    let b = post_json(&c, svcs, &svc("b", None, Some(80))).await;
    assert_eq!(b.code, 422);
    let b = post_json(&c, svcs, &svc("b", None, None)).await;
    assert_eq!(b.code, 201);
    let ip: std::net::Ipv4Addr = b.json()["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ip.octets()[..3], [10, 96, 0]);
    let np = b.json()["spec"]["ports"][0]["nodePort"].as_i64().unwrap();
    assert!((30000..=30010).contains(&np) && np != 30005);
    // Updates keep the addresses; the ClusterIP cannot change.
    let r = patch(
        &c,
        &format!("{svcs}/b"),
        "application/merge-patch+json",
        &json!({"spec": {"clusterIP": "10.96.0.99", "clusterIPs": ["10.96.0.99"]}}),
    )
    .await;
    assert_eq!(r.code, 422);
    let r = patch(
        &c,
        &format!("{svcs}/b"),
        "application/merge-patch+json",
        &json!({"metadata": {"labels": {"x": "y"}}}),
    )
    .await;
    assert_eq!(r.code, 200);
    assert_eq!(r.json()["spec"]["clusterIP"], ip.to_string());
    // After delete, the address is free again.
    assert_eq!(delete(&c, &format!("{svcs}/a")).await.code, 200);
    assert_eq!(
        post_json(&c, svcs, &svc("c", Some("10.96.0.10"), Some(30005)))
            .await
            .code,
        201
    );
}

#[tokio::test]
async fn conflicts_and_preconditions() {
    let dir = TempDir::new("conflict");
    let server = Server::start(&dir.0, &[]);
    let c = server.client().await;
    let created = post_json(&c, CMS, &configmap("a", json!({}))).await;
    assert_eq!(created.code, 201);
    let v1 = created.json();
    assert_eq!(
        post_json(&c, CMS, &configmap("a", json!({}))).await.json()["reason"],
        "AlreadyExists"
    );
    let mut v2 = v1.clone();
    v2["data"]["k"] = json!("2");
    let r = put_json(&c, &format!("{CMS}/a"), &v2).await;
    assert_eq!(r.code, 200);
    assert_ne!(
        r.json()["metadata"]["resourceVersion"],
        v1["metadata"]["resourceVersion"]
    );
    // v1's resourceVersion is stale now.
    let mut stale = v1.clone();
    stale["data"]["k"] = json!("3");
    let r = put_json(&c, &format!("{CMS}/a"), &stale).await;
    assert_eq!(r.code, 409);
    assert_eq!(r.json()["reason"], "Conflict");
    let r = patch(&c, &format!("{CMS}/a"), "application/merge-patch+json",
        &json!({"metadata": {"resourceVersion": v1["metadata"]["resourceVersion"]}, "data": {"k": "4"}})).await;
    assert_eq!(r.code, 409);
    assert_eq!(get(&c, &format!("{CMS}/a")).await.json()["data"]["k"], "2");
    // A name that differs from the URL's is refused.
    let r = put_json(&c, &format!("{CMS}/b"), &v2).await;
    assert!(r.code == 400 || r.code == 404);
    // Delete preconditions.
    let r = send(
        &c,
        "DELETE",
        &format!("{CMS}/a"),
        Some("application/json"),
        serde_json::to_vec(&json!({"preconditions": {"uid": "wrong"}})).unwrap(),
        None,
    )
    .await;
    assert_eq!(r.code, 409);
    // An unchanged update is not a write.
    let cur = get(&c, &format!("{CMS}/a")).await.json();
    let again = put_json(&c, &format!("{CMS}/a"), &cur).await.json();
    assert_eq!(
        again["metadata"]["resourceVersion"],
        cur["metadata"]["resourceVersion"]
    );

    // Finalizers hold an object until removed.
    let mut f = configmap("f", json!({}));
    f["metadata"]["finalizers"] = json!(["example.com/hold"]);
    assert_eq!(post_json(&c, CMS, &f).await.code, 201);
    assert_eq!(delete(&c, &format!("{CMS}/f")).await.code, 200);
    let held = get(&c, &format!("{CMS}/f")).await;
    assert_eq!(held.code, 200);
    assert!(held.json()["metadata"]["deletionTimestamp"].is_string());
    let r = patch(
        &c,
        &format!("{CMS}/f"),
        "application/json-patch+json",
        &json!([{"op": "remove", "path": "/metadata/finalizers"}]),
    )
    .await;
    assert_eq!(r.code, 200);
    assert_eq!(get(&c, &format!("{CMS}/f")).await.code, 404);

    // Strict field validation, and the default warning.
    let mut unknown = configmap("u", json!({}));
    unknown["bogus"] = json!(1);
    let r = post_json(&c, &format!("{CMS}?fieldValidation=Strict"), &unknown).await;
    assert_eq!(r.code, 400);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("unknown field \"bogus\"")
    );
    let r = post_json(&c, CMS, &unknown).await;
    assert_eq!(r.code, 201);
    assert!(
        r.headers
            .get("warning")
            .unwrap()
            .to_str()
            .unwrap()
            .contains("unknown field")
    );
    assert!(r.json().get("bogus").is_none());

    // Server-side apply needs a field manager and a matching kind.
    let cm = configmap("ssa", json!({}));
    let r = patch(
        &c,
        &format!("{CMS}/ssa"),
        "application/apply-patch+yaml",
        &cm,
    )
    .await;
    assert_eq!(r.code, 400);
    let r = patch(
        &c,
        &format!("{CMS}/ssa?fieldManager=t"),
        "application/apply-patch+yaml",
        &json!({"kind": "Pod", "apiVersion": "v1"}),
    )
    .await;
    assert_eq!(r.code, 400);
    let r = patch(
        &c,
        &format!("{CMS}/ssa?fieldManager=t"),
        "application/apply-patch+yaml",
        &cm,
    )
    .await;
    assert_eq!(r.code, 201);
    let r = patch(
        &c,
        &format!("{CMS}/ssa?fieldManager=t"),
        "application/apply-patch+yaml",
        &cm,
    )
    .await;
    assert_eq!(r.code, 200);

    // Dry run writes nothing.
    let r = post_json(
        &c,
        &format!("{CMS}?dryRun=All"),
        &configmap("dry", json!({})),
    )
    .await;
    assert_eq!(r.code, 201);
    assert_eq!(get(&c, &format!("{CMS}/dry")).await.code, 404);
}

#[tokio::test]
async fn pagination_and_selectors() {
    let dir = TempDir::new("list");
    let server = Server::start(&dir.0, &[]);
    let c = server.client().await;
    for i in 0..7 {
        let tier = if i % 2 == 0 { "even" } else { "odd" };
        let r = post_json(
            &c,
            CMS,
            &configmap(&format!("cm{i}"), json!({"tier": tier, "n": i.to_string()})),
        )
        .await;
        assert_eq!(r.code, 201);
    }
    // limit/continue walks every item once, all pages at one revision.
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    let mut revs = Vec::new();
    let mut pages = 0;
    loop {
        let mut path = format!("{CMS}?limit=3");
        if let Some(t) = &token {
            path.push_str(&format!("&continue={t}"));
        }
        let page = get(&c, &path).await.json();
        pages += 1;
        revs.push(page["metadata"]["resourceVersion"].clone());
        names.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["metadata"]["name"].as_str().unwrap().to_string()),
        );
        // A write between pages does not show up in later pages.
        if pages == 1 {
            assert_eq!(
                post_json(&c, CMS, &configmap("cm99", json!({}))).await.code,
                201
            );
        }
        match page["metadata"]["continue"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, (0..7).map(|i| format!("cm{i}")).collect::<Vec<_>>());
    assert!(revs.iter().all(|r| *r == revs[0]));

    let count = |q: &str| {
        let c = c.clone();
        let path = format!("{CMS}?{q}");
        async move {
            get(&c, &path).await.json()["items"]
                .as_array()
                .unwrap()
                .len()
        }
    };
    assert_eq!(count("labelSelector=tier%3Deven").await, 4);
    assert_eq!(count("labelSelector=tier!%3Deven").await, 4); // odd ones and cm99
    assert_eq!(
        count("labelSelector=tier%20in%20(even,odd),n%20notin%20(0,1)").await,
        5
    );
    assert_eq!(count("labelSelector=!tier").await, 1);
    assert_eq!(count("labelSelector=tier").await, 7);
    assert_eq!(count("fieldSelector=metadata.name%3Dcm3").await, 1);
    assert_eq!(
        count("fieldSelector=metadata.name!%3Dcm3,metadata.namespace%3Ddefault").await,
        7
    );
    assert_eq!(count("labelSelector=tier%3Dodd&limit=2").await, 2);
    assert_eq!(
        get(&c, "/api/v1/configmaps?labelSelector=tier%3Dodd")
            .await
            .json()["items"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // Pods: spec.nodeName / status.phase field selectors, binding.
    let pods = "/api/v1/namespaces/default/pods";
    for name in ["p1", "p2"] {
        let pod = json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "x"}]}});
        assert_eq!(post_json(&c, pods, &pod).await.code, 201);
    }
    let bind = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p1"}, "target": {"kind": "Node", "name": "n1"}});
    assert_eq!(
        post_json(&c, &format!("{pods}/p1/binding"), &bind)
            .await
            .code,
        201
    );
    assert_eq!(
        post_json(&c, &format!("{pods}/p1/binding"), &bind)
            .await
            .code,
        409
    );
    let on = get(&c, "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1")
        .await
        .json();
    assert_eq!(on["items"].as_array().unwrap().len(), 1);
    let unscheduled = get(&c, &format!("{pods}?fieldSelector=spec.nodeName%3D"))
        .await
        .json();
    assert_eq!(unscheduled["items"][0]["metadata"]["name"], "p2");
    let status = json!({"status": {"phase": "Running"}});
    assert_eq!(
        patch(
            &c,
            &format!("{pods}/p2/status"),
            "application/merge-patch+json",
            &status
        )
        .await
        .code,
        200
    );
    let running = get(&c, &format!("{pods}?fieldSelector=status.phase%3DRunning"))
        .await
        .json();
    assert_eq!(running["items"][0]["metadata"]["name"], "p2");
    // The main resource ignores status; the status subresource ignores spec.
    let r = patch(
        &c,
        &format!("{pods}/p2"),
        "application/merge-patch+json",
        &json!({"status": {"phase": "Failed"}}),
    )
    .await;
    assert_eq!(r.json()["status"]["phase"], "Running");

    // Tables, as kubectl asks for them.
    let table = send(
        &c,
        "GET",
        &format!("{pods}?limit=1"),
        None,
        Vec::new(),
        Some("application/json;as=Table;v=v1;g=meta.k8s.io,application/json"),
    )
    .await
    .json();
    assert_eq!(table["kind"], "Table");
    assert_eq!(table["columnDefinitions"][0]["name"], "Name");
    assert_eq!(table["rows"].as_array().unwrap().len(), 1);
    assert!(table["metadata"]["continue"].is_string());
    assert_eq!(table["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    assert_eq!(table["rows"][0]["cells"][6], "n1");

    // deletecollection with a selector.
    let r = send(
        &c,
        "DELETE",
        &format!("{CMS}?labelSelector=tier%3Dodd"),
        None,
        Vec::new(),
        None,
    )
    .await;
    assert_eq!(r.code, 200);
    assert_eq!(r.json()["items"].as_array().unwrap().len(), 3);
    assert_eq!(count("").await, 5);
}

/// Reads a watch response until `done` says so or the deadline passes.
async fn watch_lines(c: &kube::Client, path: &str) -> Vec<Value> {
    let r = send(c, "GET", path, None, Vec::new(), None).await;
    assert_eq!(r.code, 200, "{}", String::from_utf8_lossy(&r.body));
    String::from_utf8_lossy(&r.body)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect()
}

#[tokio::test]
async fn watch_resource_versions_and_compaction() {
    let dir = TempDir::new("watch");
    let server = Server::start(
        &dir.0,
        &[
            "--compaction-interval-seconds",
            "1",
            "--bookmark-interval-seconds",
            "1",
        ],
    );
    let c = server.client().await;
    let a = post_json(&c, CMS, &configmap("a", json!({"w": "1"})))
        .await
        .json();
    let rv1: i64 = a["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut b = a.clone();
    b["data"]["k"] = json!("2");
    assert_eq!(put_json(&c, &format!("{CMS}/a"), &b).await.code, 200);
    assert_eq!(delete(&c, &format!("{CMS}/a")).await.code, 200);

    // From rv1: the update and the delete, each once, framed one per line;
    // the stream ends at timeoutSeconds with bookmarks in between.
    let started = Instant::now();
    let events = watch_lines(
        &c,
        &format!("{CMS}?watch=1&resourceVersion={rv1}&timeoutSeconds=2&allowWatchBookmarks=true"),
    )
    .await;
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .filter(|t| *t != "BOOKMARK")
        .collect();
    // Compaction may already have run; then the only event is the 410.
    if types != ["ERROR"] {
        assert_eq!(types, ["MODIFIED", "DELETED"], "{events:?}");
        assert!(events.iter().any(|e| e["type"] == "BOOKMARK"), "{events:?}");
        assert!(started.elapsed() >= Duration::from_secs(2));
    }

    // Without a resourceVersion: the current state as ADDED first.
    assert_eq!(
        post_json(&c, CMS, &configmap("c", json!({}))).await.code,
        201
    );
    let events = watch_lines(&c, &format!("{CMS}?watch=true&timeoutSeconds=1")).await;
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["metadata"]["name"], "c");

    // Once history is compacted, rv1 is gone: an ERROR event with a 410
    // Status, and 410 for an exact list at that revision.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tick = 0;
    loop {
        let events = watch_lines(
            &c,
            &format!("{CMS}?watch=1&resourceVersion={rv1}&timeoutSeconds=1"),
        )
        .await;
        if events.first().is_some_and(|e| e["type"] == "ERROR") {
            let status = &events[0]["object"];
            assert_eq!(status["kind"], "Status");
            assert_eq!(status["code"], 410);
            assert_eq!(status["reason"], "Expired");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no 410 after compaction: {events:?}"
        );
        // Keep writing so the compaction point moves past rv1.
        tick += 1;
        assert_eq!(
            post_json(&c, CMS, &configmap(&format!("tick{tick}"), json!({})))
                .await
                .code,
            201
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = get(
        &c,
        &format!("{CMS}?resourceVersion={rv1}&resourceVersionMatch=Exact"),
    )
    .await;
    assert_eq!(r.code, 410);
    assert_eq!(r.json()["reason"], "Expired");

    // Watch of one object (kubectl get NAME -w).
    let events = watch_lines(
        &c,
        "/api/v1/watch/namespaces/default/configmaps/c?timeoutSeconds=1",
    )
    .await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["object"]["metadata"]["name"], "c");
}

/// Service creates race for addresses without a lock across the commit:
/// concurrent ones get distinct ClusterIPs, and of several asking for the
/// same address exactly one gets it; a deleted Service's address is free
/// at once, and the allocations survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_service_creates_get_distinct_addresses() {
    const SVCS: &str = "/api/v1/namespaces/default/services";
    let dir = TempDir::new("svcrace");
    let mut server = Server::start(&dir.0, &["--service-cidr", "10.96.0.0/26"]);
    let c = server.client().await;
    let svc = |name: String, ip: Option<&str>| {
        let mut s = json!({"metadata": {"name": name},
            "spec": {"type": "NodePort", "selector": {"app": "x"}, "ports": [{"port": 80}]}});
        if let Some(ip) = ip {
            s["spec"]["clusterIP"] = json!(ip);
        }
        s
    };
    let creates = (0..40).map(|i| {
        let c = c.clone();
        let s = svc(format!("s{i}"), None);
        tokio::spawn(async move { post_json(&c, SVCS, &s).await })
    });
    let mut ips = std::collections::BTreeSet::new();
    let mut ports = std::collections::BTreeSet::new();
    for t in creates.collect::<Vec<_>>() {
        let r = t.await.unwrap();
        assert_eq!(r.code, 201, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        assert!(
            ips.insert(v["spec"]["clusterIP"].as_str().unwrap().to_string()),
            "{v}"
        );
        assert!(
            ports.insert(v["spec"]["ports"][0]["nodePort"].as_i64().unwrap()),
            "{v}"
        );
    }
    // 62 usable addresses in a /26, 40 taken: one free one, asked for by
    // eight at once.
    let free = (1..63)
        .map(|i| format!("10.96.0.{i}"))
        .find(|ip| !ips.contains(ip))
        .unwrap();
    let racers = (0..8).map(|i| {
        let c = c.clone();
        let s = svc(format!("want{i}"), Some(&free));
        tokio::spawn(async move { post_json(&c, SVCS, &s).await })
    });
    let mut codes = Vec::new();
    for t in racers.collect::<Vec<_>>() {
        codes.push(t.await.unwrap().code);
    }
    codes.sort();
    assert_eq!(codes, [201, 422, 422, 422, 422, 422, 422, 422]);
    let taken = svc("again".into(), Some(&free));
    assert_eq!(post_json(&c, SVCS, &taken).await.code, 422);

    // After a restart the stored allocations still count.
    server.kill9();
    let server = Server::start(&dir.0, &["--service-cidr", "10.96.0.0/26"]);
    let c = server.client().await;
    let r = post_json(&c, SVCS, &svc("after".into(), Some(ips.first().unwrap()))).await;
    assert_eq!(r.code, 422, "{}", String::from_utf8_lossy(&r.body));
    // Deleting frees the address for the next create at once.
    let owner = get(&c, SVCS).await.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["spec"]["clusterIP"] == json!(free))
        .unwrap()["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(delete(&c, &format!("{SVCS}/{owner}")).await.code, 200);
    assert_eq!(post_json(&c, SVCS, &taken).await.code, 201);
}
