//! Pagination and selectors on lists; resourceVersion semantics and
//! compaction on watches.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::CMS;
use crate::common::{Server, TempDir, configmap, delete, get, patch, post_json, put_json, send};

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
