//! Every acknowledged write survives `kill -9` of the apiserver: objects
//! are created and updated through the API by concurrent writers, the
//! process is SIGKILLed while writes are in flight, and a new apiserver on
//! the same data dir must serve every acknowledged object at its
//! acknowledged resourceVersion.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Server, TempDir, configmap, get, post_json, try_send};
use serde_json::json;

const CMS: &str = "/api/v1/namespaces/default/configmaps";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = TempDir::new("durable");
    let mut server = Server::start(&dir.0, &[]);
    let client = server.client().await;
    let ca_before = std::fs::read(dir.0.join("pki/ca.crt")).unwrap();
    let token_before = std::fs::read(dir.0.join("admin.token")).unwrap();

    // name → (resourceVersion, data) of the last acknowledged write.
    let acked: Arc<Mutex<BTreeMap<String, (String, String)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = client.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let name = format!("w{w}-{i}");
                let body = serde_json::to_vec(&configmap(&name, json!({"writer": w.to_string()})))
                    .unwrap();
                let Some(r) =
                    try_send(&client, "POST", CMS, Some("application/json"), body, None).await
                else {
                    return;
                };
                if r.code != 201 {
                    return;
                }
                let mut obj = r.json();
                acked.lock().unwrap().insert(
                    name.clone(),
                    (
                        obj["metadata"]["resourceVersion"].as_str().unwrap().into(),
                        "v".into(),
                    ),
                );
                // Every other object is updated once too.
                if i % 2 == 0 {
                    obj["data"]["k"] = json!("updated");
                    let path = format!("{CMS}/{name}");
                    let body = serde_json::to_vec(&obj).unwrap();
                    let Some(r) =
                        try_send(&client, "PUT", &path, Some("application/json"), body, None).await
                    else {
                        return;
                    };
                    if r.code != 200 {
                        return;
                    }
                    let rv = r.json()["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    acked.lock().unwrap().insert(name, (rv, "updated".into()));
                }
            }
        }));
    }
    // Let the writers get going, then kill the server mid-write.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 150 {
        assert!(std::time::Instant::now() < deadline, "writers too slow");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill9();
    // Writers stop at their first failed request.
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 150);

    let server = Server::start(&dir.0, &[]);
    let client = server.client().await;
    let list = get(&client, CMS).await.json();
    let stored: BTreeMap<String, (String, String)> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["metadata"]["name"].as_str().unwrap().to_string(),
                (
                    o["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                    o["data"]["k"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect();
    for (name, (rv, data)) in &acked {
        let Some((srv, sdata)) = stored.get(name) else {
            panic!("acknowledged object {name} lost after kill -9");
        };
        // A write acknowledged later may have been in flight: never older.
        let (rv, srv): (i64, i64) = (rv.parse().unwrap(), srv.parse().unwrap());
        assert!(
            srv >= rv,
            "{name}: stored revision {srv} older than acknowledged {rv}"
        );
        if data == "updated" {
            assert_eq!(sdata, "updated", "{name}: acknowledged update lost");
        }
    }
    // Revisions keep increasing after the restart.
    let r = post_json(&client, CMS, &configmap("after", json!({}))).await;
    assert_eq!(r.code, 201);
    let after: i64 = r.json()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let max = stored
        .values()
        .map(|(rv, _)| rv.parse::<i64>().unwrap())
        .max()
        .unwrap();
    assert!(after > max);
    // Same CA and token: old kubeconfigs keep working.
    assert_eq!(std::fs::read(dir.0.join("pki/ca.crt")).unwrap(), ca_before);
    assert_eq!(
        std::fs::read(dir.0.join("admin.token")).unwrap(),
        token_before
    );
    let ns = get(&client, "/api/v1/namespaces").await.json();
    assert_eq!(
        ns["items"].as_array().unwrap().len(),
        4,
        "system namespaces created once"
    );
}
