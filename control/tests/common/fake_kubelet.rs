//! `FakeKubelet`: a TEST DOUBLE for the kubelet, for the scheduler and
//! controller tests only (the real kubelet is `kcontrol kubelet`). It does
//! the kubelet's API side and nothing else — no containers run:
//!
//! - registers a Node with the given capacity/allocatable, labels and
//!   taints, and a Ready=True condition;
//! - renews the node's Lease in `kube-node-lease` every 200 ms while its
//!   heartbeat is on (`stop_heartbeat` simulates a dead kubelet: no lease
//!   renewals, no pod status updates);
//! - for pods bound to its node: reports phase Running, a pod IP and,
//!   `ready_delay` after first seeing the pod, Ready=True; a pod being
//!   deleted gracefully (deletionTimestamp set) is finished off with
//!   gracePeriodSeconds=0, as the kubelet does once its containers stopped.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

pub struct NodeSpec {
    pub name: String,
    pub cpu: String,
    pub memory: String,
    pub labels: serde_json::Value,
    pub taints: serde_json::Value,
    /// Pod IPs are 10.<subnet>.0.<n>.
    pub subnet: u8,
    /// Time from first seeing a pod to reporting it Ready.
    pub ready_delay: Duration,
}

impl NodeSpec {
    pub fn new(name: &str, cpu: &str, subnet: u8) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            cpu: cpu.into(),
            memory: "8Gi".into(),
            labels: json!({}),
            taints: json!([]),
            subnet,
            ready_delay: Duration::from_millis(0),
        }
    }
}

pub struct FakeKubelet {
    pub name: String,
    heartbeat: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

impl FakeKubelet {
    pub async fn start(client: Client, spec: NodeSpec) -> FakeKubelet {
        let nodes: Api<Node> = Api::all(client.clone());
        let mut labels = spec.labels.clone();
        labels["kubernetes.io/hostname"] = json!(spec.name);
        let node: Node = serde_json::from_value(json!({
            "metadata": { "name": spec.name, "labels": labels },
            "spec": { "taints": spec.taints },
        }))
        .unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
        let resources = json!({ "cpu": spec.cpu, "memory": spec.memory, "pods": "110" });
        nodes
            .patch_status(
                &spec.name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": {
                    "capacity": resources,
                    "allocatable": resources,
                    "conditions": [ready_condition()],
                }})),
            )
            .await
            .unwrap();
        let heartbeat = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(run(client, spec.name.clone(), spec, heartbeat.clone()));
        FakeKubelet {
            name: node.name_any(),
            heartbeat,
            task,
        }
    }

    pub fn stop_heartbeat(&self) {
        self.heartbeat.store(false, Ordering::SeqCst);
    }
}

fn ready_condition() -> serde_json::Value {
    json!({
        "type": "Ready", "status": "True", "reason": "KubeletReady",
        "message": "kubelet is posting ready status",
        "lastHeartbeatTime": now(), "lastTransitionTime": now(),
    })
}

async fn run(client: Client, name: String, spec: NodeSpec, heartbeat: Arc<AtomicBool>) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let pods: Api<Pod> = Api::all(client.clone());
    let next_ip = AtomicU32::new(1);
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    loop {
        if heartbeat.load(Ordering::SeqCst) {
            renew(&leases, &name).await;
            let bound = pods
                .list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            for p in bound {
                if p.metadata.deletion_timestamp.is_some() {
                    let api: Api<Pod> =
                        Api::namespaced(client.clone(), &p.namespace().unwrap_or_default());
                    let _ = api
                        .delete(&p.name_any(), &DeleteParams::default().grace_period(0))
                        .await;
                    continue;
                }
                let uid = p.metadata.uid.clone().unwrap_or_default();
                let seen = *first_seen.entry(uid).or_insert_with(Instant::now);
                let status = p.status.clone().unwrap_or_default();
                let ip = status.pod_ip.clone().unwrap_or_else(|| {
                    format!(
                        "10.{}.0.{}",
                        spec.subnet,
                        next_ip.fetch_add(1, Ordering::SeqCst)
                    )
                });
                let ready = seen.elapsed() >= spec.ready_delay;
                let is_ready = status
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                if status.pod_ip.is_some() && is_ready == ready {
                    continue;
                }
                let r = if ready { "True" } else { "False" };
                let patch = json!({ "status": {
                    "phase": "Running",
                    "podIP": ip,
                    "podIPs": [{ "ip": ip }],
                    "hostIP": "192.0.2.1",
                    "startTime": now(),
                    "conditions": [
                        { "type": "Initialized", "status": "True", "lastTransitionTime": now() },
                        { "type": "ContainersReady", "status": r, "lastTransitionTime": now() },
                        { "type": "Ready", "status": r, "lastTransitionTime": now() },
                    ],
                }});
                let api: Api<Pod> =
                    Api::namespaced(client.clone(), &p.namespace().unwrap_or_default());
                let _ = api
                    .patch_status(
                        &p.name_any(),
                        &PatchParams::default(),
                        &Patch::Strategic(&patch),
                    )
                    .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn renew(leases: &Api<Lease>, name: &str) {
    let body = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": { "name": name, "namespace": "kube-node-lease" },
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": 40,
            "renewTime": now(),
        },
    });
    let patch = Patch::Merge(&body);
    if leases
        .patch(name, &PatchParams::default(), &patch)
        .await
        .is_err()
    {
        let lease: Lease = serde_json::from_value(body.clone()).unwrap();
        let _ = leases.create(&PostParams::default(), &lease).await;
    }
}
