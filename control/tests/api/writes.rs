//! Conflicts and preconditions on writes, and concurrent Service creates
//! racing for addresses.

use serde_json::json;

use crate::CMS;
use crate::common::{Server, TempDir, configmap, delete, get, patch, post_json, put_json, send};

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
