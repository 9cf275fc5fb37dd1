//! `kcontrol scheduler` and `kcontrol controller-manager` against a real
//! `kcontrol apiserver`, driven with the real kubectl. No kubelet runs
//! here: `FakeKubelet` (tests/common/fake_kubelet.rs) is the test double
//! that registers nodes, renews their leases and reports pods Running and
//! Ready.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::fake_kubelet::{FakeKubelet, NodeSpec};
use common::{Server, TempDir};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Endpoints, Event, Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fields drop in order: the components stop before the apiserver.
struct Cluster {
    _procs: Vec<Proc>,
    server: Server,
    client: Client,
    cache: TempDir,
    _dir: TempDir,
}

impl Cluster {
    async fn start(tag: &str, cm_flags: &[&str]) -> Cluster {
        let dir = TempDir::new(tag);
        let server = Server::start(&dir.0, &[]);
        let client = server.client().await;
        let spawn = |args: &[&str]| {
            Proc(
                Command::new(env!("CARGO_BIN_EXE_kcontrol"))
                    .args(args)
                    .arg("--kubeconfig")
                    .arg(&server.kubeconfig)
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .expect("spawning kcontrol"),
            )
        };
        let mut cm = vec!["controller-manager"];
        cm.extend_from_slice(cm_flags);
        let procs = vec![
            spawn(&["scheduler", "--retry-interval-seconds", "2"]),
            spawn(&cm),
        ];
        Cluster {
            server,
            client,
            cache: TempDir::new(&format!("{tag}-kubectl")),
            _procs: procs,
            _dir: dir,
        }
    }

    fn kubectl_in(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        let out = testbed::Kubectl::new(&self.server.kubeconfig)
            .cache_dir(&self.cache.0)
            .output(args, stdin)
            .expect("running kubectl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// kubectl, off the async runtime; panics with stderr on failure.
    async fn kubectl(self: &Arc<Self>, args: &[&str], stdin: Option<&str>) -> String {
        let me = self.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let stdin = stdin.map(str::to_string);
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, out, err) = me.kubectl_in(&a, stdin.as_deref());
            assert!(ok, "kubectl {a:?} failed:\n{err}\n{out}");
            out
        })
        .await
        .unwrap()
    }

    async fn node(&self, spec: NodeSpec) -> FakeKubelet {
        FakeKubelet::start(self.client.clone(), spec).await
    }
}

/// Polls `f` until it returns Some, failing with `what` and the last
/// observation at the deadline.
async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        match f().await {
            Ok(t) => return t,
            Err(last) => {
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {what}; last seen: {last}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn pods_with(client: &Client, ns: &str, sel: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(sel))
        .await
        .unwrap()
        .items
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn node_of(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

fn scheduled_condition(p: &Pod) -> Option<(String, String, String)> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled")
        .map(|c| {
            (
                c.status.clone(),
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

async fn slices_of(client: &Client, ns: &str, svc: &str) -> Vec<EndpointSlice> {
    Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={svc}")))
        .await
        .unwrap()
        .items
}

fn pod_yaml(name: &str, extra_spec: &str, cpu: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{t: sched}}}}
spec:
  containers:
  - name: c
    image: busybox
    resources: {{requests: {{cpu: "{cpu}"}}}}
{extra_spec}
---
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_filters_scores_binds_and_reports_unschedulable() {
    let c = Arc::new(Cluster::start("sched", &[]).await);
    let mut small = NodeSpec::new("small", "1", 1);
    small.labels = json!({ "disk": "hdd" });
    let mut big = NodeSpec::new("big", "4", 2);
    big.labels = json!({ "disk": "ssd" });
    let mut tainted = NodeSpec::new("tainted", "8", 3);
    tainted.taints = json!([{ "key": "dedicated", "value": "db", "effect": "NoSchedule" }]);
    let _k1 = c.node(small).await;
    let _k2 = c.node(big).await;
    let _k3 = c.node(tainted).await;

    let mut manifests = String::new();
    // Needs 2 CPUs: only big has them among the nodes it tolerates.
    manifests += &pod_yaml("needs-2cpu", "", "2");
    manifests += &pod_yaml("wants-ssd", "  nodeSelector: {disk: ssd}", "10m");
    manifests += &pod_yaml(
        "tolerates-db",
        "  nodeSelector: {kubernetes.io/hostname: tainted}\n  tolerations: [{key: dedicated, operator: Equal, value: db, effect: NoSchedule}]",
        "10m",
    );
    manifests += &pod_yaml(
        "intolerant",
        "  nodeSelector: {kubernetes.io/hostname: tainted}",
        "10m",
    );
    manifests += &pod_yaml("hdd-first", "  nodeSelector: {disk: hdd}", "600m");
    manifests += &pod_yaml("too-big", "", "100");
    c.kubectl(&["apply", "-f", "-"], Some(&manifests)).await;

    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let placed = |name: &'static str, node: &'static str| {
        let pods = pods.clone();
        async move {
            wait_for(&format!("{name} on {node}"), || {
                let pods = pods.clone();
                async move {
                    let p = pods.get(name).await.map_err(|e| e.to_string())?;
                    if node_of(&p) == node {
                        Ok(())
                    } else {
                        Err(format!("{:?}", node_of(&p)))
                    }
                }
            })
            .await
        }
    };
    placed("needs-2cpu", "big").await;
    placed("wants-ssd", "big").await;
    placed("tolerates-db", "tainted").await;
    placed("hdd-first", "small").await;

    let unschedulable = |name: &'static str| {
        let pods = pods.clone();
        async move {
            wait_for(&format!("{name} unschedulable"), || {
                let pods = pods.clone();
                async move {
                    let p = pods.get(name).await.map_err(|e| e.to_string())?;
                    match scheduled_condition(&p) {
                        Some((s, r, m)) if s == "False" && r == "Unschedulable" => Ok((p, m)),
                        other => Err(format!("{other:?} node={:?}", node_of(&p))),
                    }
                }
            })
            .await
        }
    };
    let (_, msg) = unschedulable("intolerant").await;
    assert_eq!(
        msg,
        "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: db}, 2 node(s) didn't match Pod's node affinity/selector."
    );
    let (p, msg) = unschedulable("too-big").await;
    assert!(node_of(&p).is_empty());
    assert_eq!(
        msg,
        "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: db}, 2 Insufficient cpu."
    );
    // A second 600m pod does not fit next to the first on the 1-CPU node.
    c.kubectl(
        &["apply", "-f", "-"],
        Some(&pod_yaml(
            "hdd-second",
            "  nodeSelector: {disk: hdd}",
            "600m",
        )),
    )
    .await;
    let (_, msg) = unschedulable("hdd-second").await;
    assert!(msg.contains("1 Insufficient cpu"), "{msg}");

    // kubectl shows it Pending, with the reason in describe and events.
    let out = c
        .kubectl(&["get", "pod", "too-big", "--no-headers"], None)
        .await;
    assert!(out.contains("Pending"), "{out}");
    let events: Api<Event> = Api::namespaced(c.client.clone(), "default");
    wait_for("FailedScheduling and Scheduled events", || {
        let events = events.clone();
        async move {
            let evs = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items;
            let has = |reason: &str, obj: &str| {
                evs.iter().any(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.involved_object.name.as_deref() == Some(obj)
                })
            };
            if has("FailedScheduling", "too-big") && has("Scheduled", "needs-2cpu") {
                Ok(())
            } else {
                Err(format!("{} events", evs.len()))
            }
        }
    })
    .await;

    // Room appears: the waiting pod is retried and bound.
    let _k4 = c.node(NodeSpec::new("huge", "128", 4)).await;
    placed("too-big", "huge").await;
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  strategy:
    type: RollingUpdate
    rollingUpdate: {maxSurge: 1, maxUnavailable: 0}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: busybox
        ports: [{name: http, containerPort: 8080}]
        resources: {requests: {cpu: 100m}}
"#;

async fn ready_count(client: &Client) -> usize {
    pods_with(client, "default", "app=web")
        .await
        .iter()
        .filter(|p| is_ready(p) && p.metadata.deletion_timestamp.is_none())
        .count()
}

async fn wait_ready_pods(client: &Client, n: usize) {
    wait_for(&format!("{n} ready web pods"), || async move {
        let pods = pods_with(client, "default", "app=web").await;
        let ready = pods.iter().filter(|p| is_ready(p)).count();
        if pods.len() == n && ready == n {
            Ok(())
        } else {
            Err(format!("{} pods, {ready} ready", pods.len()))
        }
    })
    .await
}

async fn ready_slice_endpoints(client: &Client, svc: &str) -> BTreeSet<String> {
    slices_of(client, "default", svc)
        .await
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .filter_map(|e| e.target_ref.as_ref().and_then(|r| r.name.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_scale_rolling_update_undo_and_cascade_delete() {
    let c = Arc::new(Cluster::start("deploy", &[]).await);
    let mut spec = NodeSpec::new("n1", "16", 1);
    spec.ready_delay = Duration::from_millis(300);
    let _kubelet = c.node(spec).await;
    c.kubectl(&["apply", "-f", "-"], Some(WEB)).await;
    let client = &c.client;

    wait_ready_pods(client, 3).await;
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let list = rss.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(list.len(), 1, "one ReplicaSet");
    let first_rs = list[0].clone();
    let hash = first_rs.labels()["pod-template-hash"].clone();
    assert_eq!(first_rs.name_any(), format!("web-{hash}"));
    assert_eq!(
        first_rs.annotations()["deployment.kubernetes.io/revision"],
        "1"
    );
    for p in pods_with(client, "default", "app=web").await {
        assert_eq!(p.labels()["pod-template-hash"], hash);
        let owner = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("ReplicaSet", first_rs.name_any().as_str())
        );
        assert_eq!(node_of(&p), "n1");
    }
    c.kubectl(
        &["rollout", "status", "deployment/web", "--timeout=30s"],
        None,
    )
    .await;

    // The EndpointSlice: ready endpoints for the pods, the named port
    // resolved to the container port, the labels kproxy keys on.
    let names: BTreeSet<String> = pods_with(client, "default", "app=web")
        .await
        .iter()
        .map(|p| p.name_any())
        .collect();
    wait_for("slice with the 3 pods", || async {
        let got = ready_slice_endpoints(client, "web").await;
        if got == names {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await;
    let slices = slices_of(client, "default", "web").await;
    assert_eq!(slices.len(), 1);
    let s = &slices[0];
    assert_eq!(s.address_type, "IPv4");
    assert_eq!(
        s.labels()["endpointslice.kubernetes.io/managed-by"],
        "endpointslice-controller.k8s.io"
    );
    let port = &s.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.name.as_deref(), port.port, port.protocol.as_deref()),
        (Some("http"), Some(8080), Some("TCP"))
    );
    for e in &s.endpoints {
        assert_eq!(e.node_name.as_deref(), Some("n1"));
        assert!(e.addresses[0].starts_with("10.1.0."), "{:?}", e.addresses);
        let cond = e.conditions.clone().unwrap();
        assert_eq!((cond.serving, cond.terminating), (Some(true), Some(false)));
    }
    let eps: Api<Endpoints> = Api::namespaced(client.clone(), "default");
    let ep = eps.get("web").await.unwrap();
    let subset = &ep.subsets.as_ref().unwrap()[0];
    assert_eq!(subset.addresses.as_ref().unwrap().len(), 3);
    assert_eq!(subset.ports.as_ref().unwrap()[0].port, 8080);

    // kubectl scale up and down.
    c.kubectl(&["scale", "deployment/web", "--replicas=5"], None)
        .await;
    wait_ready_pods(client, 5).await;
    wait_for("5 ready endpoints", || async {
        let n = ready_slice_endpoints(client, "web").await.len();
        if n == 5 { Ok(()) } else { Err(n.to_string()) }
    })
    .await;
    c.kubectl(&["scale", "deployment/web", "--replicas=1"], None)
        .await;
    wait_ready_pods(client, 1).await;
    wait_for("1 ready endpoint", || async {
        let n = ready_slice_endpoints(client, "web").await.len();
        if n == 1 { Ok(()) } else { Err(n.to_string()) }
    })
    .await;
    c.kubectl(&["scale", "deployment/web", "--replicas=3"], None)
        .await;
    wait_ready_pods(client, 3).await;
    c.kubectl(
        &["rollout", "status", "deployment/web", "--timeout=30s"],
        None,
    )
    .await;

    // Rolling update with maxUnavailable=0: never fewer than 3 ready pods.
    let done = Arc::new(AtomicBool::new(false));
    let min_ready = Arc::new(AtomicUsize::new(usize::MAX));
    let watcher = {
        let (done, min_ready, client) = (done.clone(), min_ready.clone(), client.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let n = ready_count(&client).await;
                min_ready.fetch_min(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    c.kubectl(&["set", "env", "deployment/web", "VERSION=2"], None)
        .await;
    c.kubectl(
        &["rollout", "status", "deployment/web", "--timeout=60s"],
        None,
    )
    .await;
    wait_ready_pods(client, 3).await;
    done.store(true, Ordering::SeqCst);
    watcher.await.unwrap();
    assert!(
        min_ready.load(Ordering::SeqCst) >= 3,
        "ready pods dipped to {} during the rollout",
        min_ready.load(Ordering::SeqCst)
    );
    let list = rss.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(list.len(), 2);
    let new_rs = list
        .iter()
        .find(|r| r.name_any() != first_rs.name_any())
        .unwrap();
    assert_eq!(
        new_rs.annotations()["deployment.kubernetes.io/revision"],
        "2"
    );
    assert_eq!(new_rs.spec.as_ref().unwrap().replicas, Some(3));
    let old = rss.get(&first_rs.name_any()).await.unwrap();
    assert_eq!(old.spec.as_ref().unwrap().replicas, Some(0));
    let new_hash = new_rs.labels()["pod-template-hash"].clone();
    for p in pods_with(client, "default", "app=web").await {
        assert_eq!(p.labels()["pod-template-hash"], new_hash);
        let env = p.spec.as_ref().unwrap().containers[0]
            .env
            .clone()
            .unwrap_or_default();
        assert!(
            env.iter()
                .any(|e| e.name == "VERSION" && e.value.as_deref() == Some("2"))
        );
    }
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let d = deps.get("web").await.unwrap();
    assert_eq!(d.annotations()["deployment.kubernetes.io/revision"], "2");
    let st = d.status.clone().unwrap();
    assert_eq!(st.observed_generation, d.metadata.generation);
    assert_eq!(
        (
            st.updated_replicas,
            st.ready_replicas,
            st.available_replicas
        ),
        (Some(3), Some(3), Some(3))
    );
    let conds = st.conditions.unwrap();
    let reason = |t: &str| {
        conds
            .iter()
            .find(|c| c.type_ == t)
            .and_then(|c| c.reason.clone())
    };
    assert_eq!(
        reason("Available").as_deref(),
        Some("MinimumReplicasAvailable")
    );
    assert_eq!(
        reason("Progressing").as_deref(),
        Some("NewReplicaSetAvailable")
    );
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let evs = events.list(&ListParams::default()).await.unwrap().items;
    assert!(
        evs.iter()
            .any(|e| e.reason.as_deref() == Some("ScalingReplicaSet"))
    );
    assert!(
        evs.iter()
            .any(|e| e.reason.as_deref() == Some("SuccessfulCreate"))
    );

    // kubectl rollout undo: the first template (and ReplicaSet) is back,
    // under revision 3.
    c.kubectl(&["rollout", "undo", "deployment/web"], None)
        .await;
    c.kubectl(
        &["rollout", "status", "deployment/web", "--timeout=60s"],
        None,
    )
    .await;
    wait_for("pods of the first template again", || async {
        let pods = pods_with(client, "default", "app=web").await;
        let back = pods
            .iter()
            .filter(|p| p.labels()["pod-template-hash"] == hash && is_ready(p))
            .count();
        if pods.len() == 3 && back == 3 {
            Ok(())
        } else {
            Err(format!("{back}/{}", pods.len()))
        }
    })
    .await;
    let old = rss.get(&first_rs.name_any()).await.unwrap();
    assert_eq!(old.annotations()["deployment.kubernetes.io/revision"], "3");
    let d = deps.get("web").await.unwrap();
    assert_eq!(d.annotations()["deployment.kubernetes.io/revision"], "3");
    let env = d.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap_or_default();
    assert!(env.is_empty(), "{env:?}");
    let history = c
        .kubectl(&["rollout", "history", "deployment/web"], None)
        .await;
    assert!(history.contains('2') && history.contains('3'), "{history}");

    // Deleting the Deployment takes its ReplicaSets and their pods.
    c.kubectl(&["delete", "deployment", "web"], None).await;
    wait_for("ReplicaSets and pods gone", || async {
        let rs = rss
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        let pods = pods_with(client, "default", "app=web").await.len();
        if rs == 0 && pods == 0 {
            Ok(())
        } else {
            Err(format!("{rs} rs, {pods} pods"))
        }
    })
    .await;
}

const SVC_AND_PODS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: api}
spec:
  selector: {app: api}
  ports:
  - {name: web, port: 80, targetPort: web}
---
apiVersion: v1
kind: Pod
metadata: {name: api-a, labels: {app: api}}
spec:
  containers:
  - {name: c, image: busybox, ports: [{name: web, containerPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-b, labels: {app: api}}
spec:
  containers:
  - {name: c, image: busybox, ports: [{name: web, containerPort: 9090}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-held, labels: {app: api}, finalizers: [kcontrol.test/hold]}
spec:
  containers:
  - {name: c, image: busybox, ports: [{name: web, containerPort: 8080}]}
"#;

/// (pod name, port, ready, serving, terminating) of every slice endpoint.
async fn endpoint_rows(client: &Client, svc: &str) -> BTreeSet<(String, i32, bool, bool, bool)> {
    let mut out = BTreeSet::new();
    for s in slices_of(client, "default", svc).await {
        let port = s
            .ports
            .as_ref()
            .and_then(|p| p.first())
            .and_then(|p| p.port)
            .unwrap_or(0);
        for e in &s.endpoints {
            let c = e.conditions.clone().unwrap_or_default();
            out.insert((
                e.target_ref
                    .as_ref()
                    .and_then(|r| r.name.clone())
                    .unwrap_or_default(),
                port,
                c.ready.unwrap_or(false),
                c.serving.unwrap_or(false),
                c.terminating.unwrap_or(false),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_follow_ports_termination_node_failure_and_orphans() {
    let c = Arc::new(
        Cluster::start(
            "eps",
            &[
                "--node-monitor-grace-period",
                "2s",
                "--pod-eviction-timeout",
                "3s",
            ],
        )
        .await,
    );
    let kubelet = c.node(NodeSpec::new("n1", "8", 7)).await;
    c.kubectl(&["apply", "-f", "-"], Some(SVC_AND_PODS)).await;
    let client = &c.client;

    // A named targetPort resolves per pod: two port sets, two slices.
    let all_ready: BTreeSet<_> = [
        ("api-a".to_string(), 8080, true, true, false),
        ("api-b".to_string(), 9090, true, true, false),
        ("api-held".to_string(), 8080, true, true, false),
    ]
    .into();
    wait_for("three ready endpoints", || async {
        let rows = endpoint_rows(client, "api").await;
        if rows == all_ready {
            Ok(())
        } else {
            Err(format!("{rows:?}"))
        }
    })
    .await;
    assert_eq!(slices_of(client, "default", "api").await.len(), 2);

    // A pod being deleted (held by a finalizer) is terminating, serving,
    // not ready; legacy Endpoints drop it.
    c.kubectl(&["delete", "pod", "api-held", "--wait=false"], None)
        .await;
    wait_for("api-held terminating", || async {
        let rows = endpoint_rows(client, "api").await;
        if rows.contains(&("api-held".to_string(), 8080, false, true, true)) {
            Ok(())
        } else {
            Err(format!("{rows:?}"))
        }
    })
    .await;
    let eps: Api<Endpoints> = Api::namespaced(client.clone(), "default");
    wait_for("legacy Endpoints without api-held", || {
        let eps = eps.clone();
        async move {
            let ep = eps.get("api").await.map_err(|e| e.to_string())?;
            let names: BTreeSet<String> = ep
                .subsets
                .iter()
                .flatten()
                .flat_map(|s| s.addresses.iter().flatten())
                .filter_map(|a| a.target_ref.as_ref().and_then(|r| r.name.clone()))
                .collect();
            let want: BTreeSet<String> = ["api-a".to_string(), "api-b".to_string()].into();
            if names == want {
                Ok(())
            } else {
                Err(format!("{names:?}"))
            }
        }
    })
    .await;
    c.kubectl(
        &[
            "patch",
            "pod",
            "api-held",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
        None,
    )
    .await;
    wait_for("api-held gone from the slices", || async {
        let rows = endpoint_rows(client, "api").await;
        if rows.iter().all(|r| r.0 != "api-held") && rows.len() == 2 {
            Ok(())
        } else {
            Err(format!("{rows:?}"))
        }
    })
    .await;

    // An object whose owner does not exist is collected.
    c.kubectl(
        &["apply", "-f", "-"],
        Some(
            r#"
apiVersion: v1
kind: Pod
metadata:
  name: orphan
  ownerReferences:
  - {apiVersion: apps/v1, kind: ReplicaSet, name: ghost, uid: 6b1f9c1e-0000-4000-8000-000000000000, controller: true}
spec:
  containers: [{name: c, image: busybox}]
"#,
        ),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    wait_for("the orphan collected", || {
        let pods = pods.clone();
        async move {
            match pods.get_opt("orphan").await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(_) => Err("still there".into()),
            }
        }
    })
    .await;

    // The kubelet stops heartbeating: NotReady, endpoints not ready, then
    // the pods are evicted.
    kubelet.stop_heartbeat();
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for("n1 Ready=Unknown", || {
        let nodes = nodes.clone();
        async move {
            let n = nodes.get("n1").await.map_err(|e| e.to_string())?;
            let ready = n
                .status
                .unwrap()
                .conditions
                .unwrap()
                .into_iter()
                .find(|c| c.type_ == "Ready")
                .unwrap();
            if ready.status == "Unknown" {
                Ok(())
            } else {
                Err(ready.status)
            }
        }
    })
    .await;
    let out = c
        .kubectl(&["get", "node", "n1", "--no-headers"], None)
        .await;
    assert!(out.contains("NotReady"), "{out}");
    wait_for("endpoints not ready", || async {
        let rows = endpoint_rows(client, "api").await;
        if rows.len() == 2 && rows.iter().all(|r| !r.2) {
            Ok(())
        } else {
            Err(format!("{rows:?}"))
        }
    })
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let evs = events.list(&ListParams::default()).await.unwrap().items;
    assert!(
        evs.iter()
            .any(|e| e.reason.as_deref() == Some("NodeNotReady")),
        "no NodeNotReady event"
    );
    // Evicted = deleted gracefully: with its kubelet gone nobody finishes
    // the deletion, so the pods stay Terminating, as upstream.
    wait_for("pods of n1 evicted", || {
        let pods = pods.clone();
        async move {
            let n = pods
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .count();
            if n == 0 {
                Ok(())
            } else {
                Err(format!("{n} pods"))
            }
        }
    })
    .await;
}
