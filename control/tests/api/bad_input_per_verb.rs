//! Malformed input for each verb gets a 4xx and leaves the store as it was.

use serde_json::{Value, json};

use crate::CMS;
use crate::common::{Server, TempDir, configmap, get, post_json, send};

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
