//! Malformed requests get a 4xx and change nothing; invalid objects get a
//! 422 naming each field.

use serde_json::{Value, json};

use crate::CMS;
use crate::common::{Server, TempDir, configmap, delete, get, patch, post_json, send};

fn causes(status: &Value) -> Vec<String> {
    status["details"]["causes"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|c| c["field"].as_str().unwrap_or_default().to_string())
        .collect()
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
    // Updates keep the addresses; the ClusterIP cannot change (to another
    // address than the one allocated at random: .99 was 1 in 254).
    let other = std::net::Ipv4Addr::new(10, 96, 0, if ip.octets()[3] == 99 { 98 } else { 99 });
    let r = patch(
        &c,
        &format!("{svcs}/b"),
        "application/merge-patch+json",
        &json!({"spec": {"clusterIP": other.to_string(), "clusterIPs": [other.to_string()]}}),
    )
    .await;
    assert_eq!(r.code, 422, "{}", r.json());
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

/// A `--service-cidr` the cluster cannot use stops the apiserver at start,
/// saying why, before it listens or touches the store.
#[test]
fn bad_service_cidr_stops_the_apiserver() {
    let dir = TempDir::new("badcidr");
    for (flag, says) in [
        ("10.96.0.0/12,10.100.0.0/16", "two IPv4 CIDRs"),
        ("fd00::/108,fd01::/108", "two IPv6 CIDRs"),
        ("fd00::/64", "prefix length between 108 and 126"),
        ("10.96.0.0/12,fd00::/108,10.1.0.0/16", "at most two CIDRs"),
        ("10.96.0.0/12,nope", "\"nope\" is not a CIDR"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kcontrol"))
            .arg("apiserver")
            .arg("--data-dir")
            .arg(&dir.0)
            .args(["--listen", "127.0.0.1:0", "--service-cidr", flag])
            .output()
            .expect("running kcontrol");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag}: started");
        assert!(
            err.contains("--service-cidr") && err.contains(says),
            "{flag}: {err}"
        );
    }
    assert!(
        !dir.0.join("store.db").exists(),
        "the store was opened before the flags were checked"
    );
}
