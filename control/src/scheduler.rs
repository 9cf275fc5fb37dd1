//! `kcontrol scheduler`: assigns pods without `spec.nodeName` to nodes.
//!
//! Pods wait in a queue; one at a time a pod goes through the filters (in
//! kube-scheduler's plugin order: NodeUnschedulable, TaintToleration with
//! the not-ready/unreachable taints standing in for the node's Ready
//! condition, NodeAffinity/nodeSelector, NodeResourcesFit) and the nodes
//! that pass are scored least-allocated; the pod is bound through
//! `pods/binding`. A pod that fits nowhere gets `PodScheduled=False`
//! (reason Unschedulable, message "0/N nodes are available: …") and a
//! FailedScheduling event, and waits in the unschedulable set until a node
//! or a pod changes (or the retry interval passes).
//!
//! Pods bound here but not yet seen bound in the cache are "assumed": their
//! requests count on their node, so two pods scheduled back to back do not
//! both take the last free CPU.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::events::{self, Recorder};
use crate::informer::{self, Change, Key, Next, Queue, Tasks};
use crate::podutil;
use crate::quantity::{self, Resources};

pub struct Config {
    /// Pods whose `spec.schedulerName` is this are ours.
    pub scheduler_name: String,
    /// Unschedulable pods are tried again at least this often.
    pub retry_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            scheduler_name: "default-scheduler".into(),
            retry_interval: Duration::from_secs(30),
        }
    }
}

struct Scheduler {
    client: Client,
    cfg: Config,
    pods: Store<Pod>,
    nodes: Store<Node>,
    unschedulable: Arc<Mutex<HashSet<Key>>>,
    /// Bound by us, not yet seen bound in the cache: pod → (node, requests).
    assumed: Mutex<HashMap<Key, (String, Resources)>>,
    recorder: Recorder,
}

fn wants_scheduling(p: &Pod, name: &str) -> bool {
    podutil::node_name(p).is_none()
        && !podutil::is_deleting(p)
        && !podutil::is_terminal(p)
        && p.spec
            .as_ref()
            .and_then(|s| s.scheduler_name.as_deref())
            .unwrap_or("default-scheduler")
            == name
}

/// Runs until the future is dropped.
pub async fn run(client: Client, cfg: Config) -> Result<()> {
    let queue = Queue::<Key>::new();
    let unschedulable = Arc::new(Mutex::new(HashSet::<Key>::new()));
    let flush = {
        let queue = queue.clone();
        let unschedulable = unschedulable.clone();
        move || {
            for k in unschedulable.lock().expect("lock").drain() {
                queue.add(k);
            }
        }
    };
    let mut tasks = Tasks::default();

    let name = cfg.scheduler_name.clone();
    let (pods, t) = informer::spawn(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default(),
        {
            let queue = queue.clone();
            let flush = flush.clone();
            move |c| match c {
                Change::Applied(p) => {
                    if wants_scheduling(&p, &name) {
                        queue.add(Key::of(&p));
                    } else if podutil::is_terminal(&p) || podutil::is_deleting(&p) {
                        // Resources may have been freed.
                        flush();
                    }
                }
                Change::Deleted(_) => flush(),
                Change::Relisted => flush(),
            }
        },
    );
    tasks.push(t);
    let (nodes, t) = informer::spawn(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        {
            let flush = flush.clone();
            move |_| flush()
        },
    );
    tasks.push(t);
    pods.wait_until_ready().await.context("pod cache")?;
    nodes.wait_until_ready().await.context("node cache")?;
    for p in pods.state() {
        if wants_scheduling(&p, &cfg.scheduler_name) {
            queue.add(Key::of(p.as_ref()));
        }
    }
    {
        let flush = flush.clone();
        let every = cfg.retry_interval;
        tasks.push(tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                flush();
            }
        }));
    }
    println!("kcontrol: scheduler {} running", cfg.scheduler_name);
    let s = Arc::new(Scheduler {
        recorder: Recorder::new(client.clone(), "default-scheduler"),
        client,
        cfg,
        pods,
        nodes,
        unschedulable,
        assumed: Mutex::new(HashMap::new()),
    });
    informer::worker("scheduler", queue, |k| {
        let s = s.clone();
        async move { s.schedule(k).await }
    })
    .await;
    drop(tasks);
    Ok(())
}

/// Why one node was filtered out.
type Reason = String;

impl Scheduler {
    async fn schedule(&self, key: Key) -> Result<Next> {
        let Some(pod) = key.get(&self.pods) else {
            self.assumed.lock().expect("lock").remove(&key);
            return Ok(Next::Done);
        };
        if !wants_scheduling(&pod, &self.cfg.scheduler_name) {
            return Ok(Next::Done);
        }
        if let Some((node, _)) = self.assumed.lock().expect("lock").get(&key) {
            // Bound already; the cache has not caught up yet.
            let _ = node;
            return Ok(Next::Done);
        }
        let nodes = self.nodes.state();
        let used = self.usage();
        let want = podutil::requests(&pod);
        let mut reasons: BTreeMap<Reason, usize> = BTreeMap::new();
        let mut feasible = Vec::new();
        for node in &nodes {
            let node_used = used.get(&node.name_any());
            match filter(&pod, node, &want, node_used) {
                Ok(()) => feasible.push(node.clone()),
                Err(rs) => {
                    for r in rs {
                        *reasons.entry(r).or_insert(0) += 1;
                    }
                }
            }
        }
        if feasible.is_empty() {
            let mut parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
            parts.sort();
            let msg = if parts.is_empty() {
                format!("0/{} nodes are available.", nodes.len())
            } else {
                format!(
                    "0/{} nodes are available: {}.",
                    nodes.len(),
                    parts.join(", ")
                )
            };
            self.mark_unschedulable(&pod, &msg).await?;
            self.unschedulable.lock().expect("lock").insert(key);
            return Ok(Next::Done);
        }
        let best = pick(&feasible, &used, &want);
        let node = best.name_any();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), key.ns());
        let binding = json!({
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": { "name": key.name, "uid": pod.metadata.uid },
            "target": { "apiVersion": "v1", "kind": "Node", "name": node },
        });
        match api
            .create_subresource::<_, serde_json::Value>(
                "binding",
                &key.name,
                &PostParams::default(),
                &binding,
            )
            .await
        {
            Ok(_) => {}
            // Bound meanwhile (another scheduler) or gone: nothing to do.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => return Ok(Next::Done),
            Err(e) => return Err(e).context("binding"),
        }
        self.assumed
            .lock()
            .expect("lock")
            .insert(key.clone(), (node.clone(), want));
        self.recorder
            .emit(
                pod.as_ref(),
                events::NORMAL,
                "Scheduled",
                &format!("Successfully assigned {key} to {node}"),
            )
            .await;
        Ok(Next::Done)
    }

    /// Requests of the pods holding resources on each node: bound and not
    /// terminated, plus the assumed ones.
    fn usage(&self) -> HashMap<String, (Resources, usize)> {
        let mut used: HashMap<String, (Resources, usize)> = HashMap::new();
        let mut seen = HashSet::new();
        for p in self.pods.state() {
            let Some(node) = podutil::node_name(&p) else {
                continue;
            };
            seen.insert(Key::of(p.as_ref()));
            if podutil::is_terminal(&p) {
                continue;
            }
            let e = used.entry(node.to_string()).or_default();
            quantity::add(&mut e.0, &podutil::requests(&p));
            e.1 += 1;
        }
        let mut assumed = self.assumed.lock().expect("lock");
        // Seen bound (or gone): the cache speaks for them now.
        assumed.retain(|k, _| !seen.contains(k) && k.get(&self.pods).is_some());
        for (node, req) in assumed.values() {
            let e = used.entry(node.clone()).or_default();
            quantity::add(&mut e.0, req);
            e.1 += 1;
        }
        used
    }

    async fn mark_unschedulable(&self, pod: &Pod, msg: &str) -> Result<()> {
        let current = podutil::condition(pod, "PodScheduled");
        let unchanged = current.is_some_and(|c| {
            c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
                && c.message.as_deref() == Some(msg)
        });
        if !unchanged {
            let api: Api<Pod> =
                Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
            let patch = json!({
                "status": { "conditions": [{
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": msg,
                    "lastProbeTime": null,
                    "lastTransitionTime": jiff::Timestamp::now().to_string(),
                }]}
            });
            match api
                .patch_status(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Strategic(&patch),
                )
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
                Err(e) => return Err(e).context("setting PodScheduled=False"),
            }
        }
        self.recorder
            .emit(pod, events::WARNING, "FailedScheduling", msg)
            .await;
        Ok(())
    }
}

fn node_condition<'a>(n: &'a Node, type_: &str) -> Option<&'a str> {
    n.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

fn tolerates(tols: &[Toleration], t: &Taint) -> bool {
    tols.iter().any(|tol| {
        let effect_ok = tol
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == t.effect);
        let key_ok = match tol.key.as_deref() {
            None | Some("") => tol.operator.as_deref() == Some("Exists"),
            Some(k) => k == t.key,
        };
        let value_ok = match tol.operator.as_deref() {
            Some("Exists") => true,
            _ => tol.value.as_deref().unwrap_or_default() == t.value.as_deref().unwrap_or_default(),
        };
        effect_ok && key_ok && value_ok
    })
}

/// The filters of one node, in kube-scheduler's plugin order; the first
/// failing plugin gives the reasons.
fn filter(
    pod: &Pod,
    node: &Node,
    want: &Resources,
    used: Option<&(Resources, usize)>,
) -> Result<(), Vec<Reason>> {
    let spec = pod.spec.clone().unwrap_or_default();
    let tols = spec.tolerations.clone().unwrap_or_default();
    let nspec = node.spec.clone().unwrap_or_default();
    let unsched_taint = Taint {
        key: "node.kubernetes.io/unschedulable".into(),
        effect: "NoSchedule".into(),
        ..Default::default()
    };
    if nspec.unschedulable == Some(true) && !tolerates(&tols, &unsched_taint) {
        return Err(vec!["node(s) were unschedulable".into()]);
    }
    // The node's Ready condition, as the taints the node lifecycle
    // controller derives from it upstream.
    let mut taints = nspec.taints.clone().unwrap_or_default();
    match node_condition(node, "Ready") {
        Some("True") => {}
        Some("Unknown") => taints.push(Taint {
            key: "node.kubernetes.io/unreachable".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        }),
        _ => taints.push(Taint {
            key: "node.kubernetes.io/not-ready".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        }),
    }
    for t in &taints {
        if (t.effect == "NoSchedule" || t.effect == "NoExecute") && !tolerates(&tols, t) {
            return Err(vec![format!(
                "node(s) had untolerated taint {{{}: {}}}",
                t.key,
                t.value.as_deref().unwrap_or_default()
            )]);
        }
    }
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let selector_ok = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    if !selector_ok || !affinity_ok(&spec, node) {
        return Err(vec![
            "node(s) didn't match Pod's node affinity/selector".into(),
        ]);
    }
    let status = node.status.clone().unwrap_or_default();
    let alloc = quantity::from_map(status.allocatable.as_ref().or(status.capacity.as_ref()));
    let (used_res, used_pods) = used.cloned().unwrap_or_default();
    let mut out = Vec::new();
    if let Some(max_pods) = alloc.get("pods")
        && used_pods as f64 + 1.0 > *max_pods
    {
        out.push("Too many pods".to_string());
    }
    for (r, v) in want {
        if *v <= 0.0 {
            continue;
        }
        let have = alloc.get(r).copied().unwrap_or(0.0);
        let taken = used_res.get(r).copied().unwrap_or(0.0);
        if taken + v > have {
            out.push(format!("Insufficient {r}"));
        }
    }
    if out.is_empty() { Ok(()) } else { Err(out) }
}

/// `requiredDuringSchedulingIgnoredDuringExecution` node affinity: any term
/// matching is enough; within a term every expression must match.
fn affinity_ok(spec: &k8s_openapi::api::core::v1::PodSpec, node: &Node) -> bool {
    let Some(req) = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
    else {
        return true;
    };
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let name = node.name_any();
    req.node_selector_terms.iter().any(|term| {
        let exprs = term.match_expressions.iter().flatten().map(|e| {
            let v = labels.get(&e.key).map(String::as_str);
            (e, v)
        });
        let fields = term.match_fields.iter().flatten().map(|e| {
            let v = (e.key == "metadata.name").then_some(name.as_str());
            (e, v)
        });
        let mut any = false;
        let all = exprs.chain(fields).all(|(e, v)| {
            any = true;
            let vals = e.values.clone().unwrap_or_default();
            let num = |s: &str| s.parse::<i64>().ok();
            match e.operator.as_str() {
                "In" => v.is_some_and(|v| vals.iter().any(|x| x == v)),
                "NotIn" => !v.is_some_and(|v| vals.iter().any(|x| x == v)),
                "Exists" => v.is_some(),
                "DoesNotExist" => v.is_none(),
                "Gt" => matches!((v.and_then(num), vals.first().and_then(|x| num(x))), (Some(a), Some(b)) if a > b),
                "Lt" => matches!((v.and_then(num), vals.first().and_then(|x| num(x))), (Some(a), Some(b)) if a < b),
                _ => false,
            }
        });
        // An empty term matches nothing, as upstream.
        any && all
    })
}

/// Least-allocated score (0–100) over CPU and memory after placing the pod;
/// pods without requests count 100m / 200Mi here, as upstream, so that they
/// spread too. The best node wins; ties go to a random one of them.
fn pick<'a>(
    nodes: &'a [Arc<Node>],
    used: &HashMap<String, (Resources, usize)>,
    want: &Resources,
) -> &'a Arc<Node> {
    let nonzero = |r: &str, v: f64| {
        if v > 0.0 {
            v
        } else if r == "cpu" {
            100.0
        } else {
            200.0 * 1024.0 * 1024.0
        }
    };
    let score = |n: &Node| -> i64 {
        let status = n.status.clone().unwrap_or_default();
        let alloc = quantity::from_map(status.allocatable.as_ref().or(status.capacity.as_ref()));
        let u = used
            .get(&n.name_any())
            .map(|u| u.0.clone())
            .unwrap_or_default();
        let mut total = 0.0;
        for r in ["cpu", "memory"] {
            let have = alloc.get(r).copied().unwrap_or(0.0);
            if have <= 0.0 {
                continue;
            }
            let after =
                u.get(r).copied().unwrap_or(0.0) + nonzero(r, want.get(r).copied().unwrap_or(0.0));
            total += ((have - after).max(0.0) * 100.0 / have).floor();
        }
        (total / 2.0) as i64
    };
    let scored: Vec<(i64, &Arc<Node>)> = nodes.iter().map(|n| (score(n), n)).collect();
    let best = scored.iter().map(|(s, _)| *s).max().unwrap_or(0);
    let ties: Vec<&Arc<Node>> = scored
        .iter()
        .filter(|(s, _)| *s == best)
        .map(|(_, n)| *n)
        .collect();
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    ties[u32::from_le_bytes(b) as usize % ties.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: serde_json::Value) -> Node {
        serde_json::from_value(json).unwrap()
    }

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn ready_node(name: &str, cpu: &str) -> Node {
        node(json!({
            "metadata": { "name": name, "labels": { "disk": "ssd" } },
            "status": {
                "allocatable": { "cpu": cpu, "memory": "1Gi", "pods": "10" },
                "conditions": [{ "type": "Ready", "status": "True" }],
            }
        }))
    }

    #[test]
    fn filters_give_upstream_reasons() {
        let p = pod(json!({
            "metadata": { "name": "p" },
            "spec": { "containers": [{ "name": "c", "resources": { "requests": { "cpu": "2" } } }] }
        }));
        let want = podutil::requests(&p);
        assert_eq!(
            filter(&p, &ready_node("n", "1"), &want, None),
            Err(vec!["Insufficient cpu".to_string()])
        );
        assert_eq!(filter(&p, &ready_node("n", "4"), &want, None), Ok(()));
        let mut tainted = ready_node("n", "4");
        tainted.spec = Some(
            serde_json::from_value(json!({
                "taints": [{ "key": "dedicated", "value": "db", "effect": "NoSchedule" }]
            }))
            .unwrap(),
        );
        assert_eq!(
            filter(&p, &tainted, &want, None),
            Err(vec![
                "node(s) had untolerated taint {dedicated: db}".to_string()
            ])
        );
        let tolerant = pod(json!({
            "metadata": { "name": "p" },
            "spec": {
                "containers": [{ "name": "c" }],
                "tolerations": [{ "key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule" }],
                "nodeSelector": { "disk": "ssd" },
            }
        }));
        assert_eq!(filter(&tolerant, &tainted, &Resources::new(), None), Ok(()));
        let picky = pod(json!({
            "metadata": { "name": "p" },
            "spec": { "containers": [{ "name": "c" }], "nodeSelector": { "disk": "hdd" } }
        }));
        assert_eq!(
            filter(&picky, &ready_node("n", "4"), &Resources::new(), None),
            Err(vec![
                "node(s) didn't match Pod's node affinity/selector".to_string()
            ])
        );
    }

    #[test]
    fn least_allocated_prefers_the_emptier_node() {
        let a = Arc::new(ready_node("a", "4"));
        let b = Arc::new(ready_node("b", "4"));
        let mut used = HashMap::new();
        used.insert(
            "a".to_string(),
            (Resources::from([("cpu".to_string(), 3000.0)]), 1),
        );
        let nodes = vec![a, b];
        for _ in 0..10 {
            assert_eq!(pick(&nodes, &used, &Resources::new()).name_any(), "b");
        }
    }
}
