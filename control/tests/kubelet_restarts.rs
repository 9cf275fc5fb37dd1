//! The kubelet end to end, container restarts: probes (liveness restarts
//! a container, readiness drives Ready), image pull failures and their
//! back-off, restart policies. Same setup as `kubelet.rs`: a real
//! apiserver, a real `kcontrol kubelet` and crun containers; needs root,
//! crun and the busybox rootfs.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::kubelet_node::{
    DEADLINE, Node1, condition, create, crun_ids, exec, leftovers, phase, pod_json, ready,
    restarts, wait_event, wait_pod,
};
use common::{Server, TempDir};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, WatchEvent, WatchParams};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_failure_restarts_the_container() {
    let dir = TempDir::new("kl-live");
    let server = Server::start(&dir.0.join("api"), &[]);
    let node = Node1::start(&server);
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let c = json!({
        "name": "app",
        "image": "docker.io/library/busybox:latest",
        // Healthy for a second, then not.
        "command": ["sh", "-c", "touch /tmp/healthy; sleep 1; rm /tmp/healthy; exec sleep 3600"],
        "livenessProbe": {
            "exec": { "command": ["cat", "/tmp/healthy"] },
            "periodSeconds": 1, "failureThreshold": 2,
        },
    });
    let mut pod = pod_json("live", &node.node, json!([c]));
    pod.spec.as_mut().unwrap().termination_grace_period_seconds = Some(1);
    create(&node, &api, pod).await;
    let p = wait_pod(&api, "live", "restarted twice", |p| restarts(p) >= 2).await;
    let cs = &p.status.unwrap().container_statuses.unwrap()[0];
    let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
    // sleep ignores nothing: SIGTERM ends it (143), else SIGKILL (137).
    assert!(
        [137, 143].contains(&last.exit_code),
        "exit code {}",
        last.exit_code
    );
    let evs = wait_event(&client, "live", "Killing").await;
    assert!(
        evs.iter()
            .any(|(r, m)| r == "Unhealthy" && m.starts_with("Liveness probe failed")),
        "{evs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_probe_drives_the_ready_condition() {
    let dir = TempDir::new("kl-ready");
    let server = Server::start(&dir.0.join("api"), &[]);
    let node = Node1::start(&server);
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let c = json!({
        "name": "app",
        "image": "busybox",
        "command": ["sleep", "3600"],
        "readinessProbe": {
            "exec": { "command": ["cat", "/tmp/ready"] },
            "periodSeconds": 1, "failureThreshold": 1, "successThreshold": 1,
        },
    });
    create(&node, &api, pod_json("rd", &node.node, json!([c]))).await;
    let p = wait_pod(&api, "rd", "Running", |p| {
        phase(p) == "Running"
            && restarts(p) == 0
            && p.status
                .as_ref()
                .unwrap()
                .container_statuses
                .as_ref()
                .is_some_and(|c| c[0].container_id.is_some())
    })
    .await;
    assert!(!ready(&p));
    assert_eq!(condition(&p, "ContainersReady").as_deref(), Some("False"));
    // Running is reported as soon as crun started the process; exec may
    // need a moment longer: poll for it (deadline 10 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (code, _) = exec(&node, &p, &["touch", "/tmp/ready"]);
        if code == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "exec kept failing ({code})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    wait_pod(&api, "rd", "Ready", ready).await;
    let (code, _) = exec(&node, &p, &["rm", "/tmp/ready"]);
    assert_eq!(code, 0);
    let p = wait_pod(&api, "rd", "not Ready", |p| !ready(p)).await;
    // Readiness never restarts anything.
    assert_eq!(restarts(&p), 0);
    assert_eq!(phase(&p), "Running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_image_is_err_image_pull_then_back_off() {
    let dir = TempDir::new("kl-image");
    let server = Server::start(&dir.0.join("api"), &[]);
    let node = Node1::start(&server);
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut stream = api
        .watch(&WatchParams::default().fields("metadata.name=img"), "0")
        .await
        .unwrap()
        .boxed();
    create(
        &node,
        &api,
        pod_json(
            "img",
            &node.node,
            json!([{ "name": "c", "image": "nginx:1.27" }]),
        ),
    )
    .await;
    let mut seen = BTreeSet::new();
    let mut message = String::new();
    let deadline = Instant::now() + DEADLINE;
    while !(seen.contains("ErrImagePull") && seen.contains("ImagePullBackOff")) {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, stream.try_next())
            .await
            .unwrap_or_else(|_| panic!("saw only {seen:?}"))
            .unwrap()
            .unwrap();
        if let WatchEvent::Modified(p) = ev {
            assert_eq!(phase(&p), "Pending");
            if let Some(w) = p
                .status
                .and_then(|s| s.container_statuses)
                .and_then(|c| c[0].state.clone())
                .and_then(|s| s.waiting)
            {
                let r = w.reason.unwrap_or_default();
                if r == "ErrImagePull" {
                    message = w.message.unwrap_or_default();
                }
                seen.insert(r);
            }
        }
    }
    assert!(
        message.contains("nginx:1.27") && message.contains("busybox"),
        "{message}"
    );
    let evs = wait_event(&client, "img", "Failed").await;
    assert!(
        evs.iter()
            .any(|(r, m)| r == "Failed" && m.contains("ErrImagePull")),
        "{evs:?}"
    );
    // Nothing ran.
    assert!(crun_ids(&node.crun_root()).is_empty());
}

/// restartPolicy: Never and OnFailure pods end Failed/Succeeded with the exit
/// code (and give their network back); Always restarts with back-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policies_and_back_off() {
    let dir = TempDir::new("kl-policy");
    let server = Server::start(&dir.0.join("api"), &[]);
    let node = Node1::start(&server);
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let ctr =
        |cmd: &str| json!([{ "name": "c", "image": "busybox", "command": ["sh", "-c", cmd] }]);
    let mut never = pod_json("never", &node.node, ctr("exit 3"));
    never.spec.as_mut().unwrap().restart_policy = Some("Never".into());
    let mut onfail = pod_json("onfail", &node.node, ctr("test -f /tmp/x || exit 0"));
    onfail.spec.as_mut().unwrap().restart_policy = Some("OnFailure".into());
    let always = pod_json("always", &node.node, ctr("exit 1"));
    let never = create(&node, &api, never).await;
    let onfail = create(&node, &api, onfail).await;
    create(&node, &api, always).await;

    let exit_of = |p: &Pod| {
        p.status.as_ref()?.container_statuses.as_ref()?[0]
            .state
            .as_ref()?
            .terminated
            .as_ref()
            .map(|t| (t.exit_code, t.reason.clone().unwrap_or_default()))
    };
    let p = wait_pod(&api, "never", "Failed", |p| phase(p) == "Failed").await;
    assert_eq!(exit_of(&p), Some((3, "Error".into())));
    assert_eq!(restarts(&p), 0);
    let p = wait_pod(&api, "onfail", "Succeeded", |p| phase(p) == "Succeeded").await;
    assert_eq!(exit_of(&p), Some((0, "Completed".into())));
    // Finished pods keep their status but not their network.
    for p in [&never, &onfail] {
        let uid = p.metadata.uid.clone().unwrap();
        let deadline = Instant::now() + DEADLINE;
        while !leftovers(&node, &uid).is_empty() {
            assert!(Instant::now() < deadline, "{:?}", leftovers(&node, &uid));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Always: restarted, then back-off (1 s, 2 s, … in this test).
    let p = wait_pod(&api, "always", "restarted twice", |p| restarts(p) >= 2).await;
    assert_eq!(phase(&p), "Running");
    let evs = wait_event(&client, "always", "BackOff").await;
    assert!(
        evs.iter()
            .any(|(r, m)| r == "BackOff" && m.contains("restarting failed container")),
        "{evs:?}"
    );
    wait_pod(&api, "always", "in CrashLoopBackOff", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c[0].state.as_ref()?.waiting.as_ref()?.reason.clone())
            .as_deref()
            == Some("CrashLoopBackOff")
    })
    .await;
}
