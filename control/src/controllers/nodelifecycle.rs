//! The node lifecycle controller. A node's heartbeat is its Lease in
//! `kube-node-lease` being renewed (or its Ready condition's
//! lastHeartbeatTime moving). When no heartbeat has been seen for
//! `node_monitor_grace_period` (measured on this controller's clock, from
//! when it last saw the heartbeat change, so clock skew does not matter):
//! the node's conditions turn Unknown ("Kubelet stopped posting node
//! status."), it gets the `node.kubernetes.io/unreachable` taints, its pods'
//! Ready condition turns False (so their endpoints turn not ready) and after
//! `pod_eviction_timeout` more its pods are deleted (except pods that
//! tolerate the unreachable NoExecute taint without a time limit). When the
//! kubelet reports Ready again the taints go. Pods bound to a node that no
//! longer exists are deleted.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

use super::{Ctx, NODE_LEASE_NS};
use crate::events;
use crate::informer::{Key, Next};
use crate::podutil;

const UNREACHABLE: &str = "node.kubernetes.io/unreachable";

/// What this controller last saw of a node's heartbeat.
pub(crate) struct Health {
    /// Lease renewTime + Ready lastHeartbeatTime, as seen.
    token: String,
    changed_at: Instant,
    /// When this controller marked it NotReady.
    not_ready_since: Option<Instant>,
}

fn heartbeat_token(ctx: &Ctx, node: &Node) -> String {
    let lease = Key::new(NODE_LEASE_NS, &node.name_any())
        .get(&ctx.leases)
        .and_then(|l| l.spec.clone())
        .and_then(|s| s.renew_time)
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    let ready = ready_condition(node)
        .and_then(|c| c.last_heartbeat_time.clone())
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    format!("{lease}|{ready}")
}

fn ready_condition(node: &Node) -> Option<&k8s_openapi::api::core::v1::NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

fn pods_on(ctx: &Ctx, node: &str) -> Vec<std::sync::Arc<Pod>> {
    ctx.pods
        .state_filter(|p| podutil::node_name(p) == Some(node))
}

pub(super) async fn reconcile(ctx: &Ctx, key: Key) -> Result<Next> {
    let name = key.name.clone();
    let Some(node) = key.get(&ctx.nodes) else {
        ctx.nodes_seen.lock().expect("lock").remove(&name);
        return delete_pods_of_missing_node(ctx, &name).await;
    };
    let token = heartbeat_token(ctx, &node);
    let grace = ctx.cfg.node_monitor_grace_period;
    let (silent_for, not_ready_since) = {
        let mut seen = ctx.nodes_seen.lock().expect("lock");
        let h = seen.entry(name.clone()).or_insert_with(|| Health {
            token: token.clone(),
            changed_at: Instant::now(),
            not_ready_since: None,
        });
        if h.token != token {
            h.token = token;
            h.changed_at = Instant::now();
            h.not_ready_since = None;
        }
        (h.changed_at.elapsed(), h.not_ready_since)
    };
    let ready = ready_condition(&node).map(|c| c.status.as_str());

    if silent_for < grace {
        // Alive. The kubelet reports Ready itself; once it does, the
        // unreachable taints go.
        if ready == Some("True") && has_unreachable_taint(&node) {
            set_unreachable_taints(ctx, &node, false).await?;
        }
        return Ok(Next::After(grace - silent_for + Duration::from_millis(50)));
    }

    // Silent for longer than the grace period.
    if ready != Some("Unknown") {
        mark_unknown(ctx, &node).await?;
        ctx.recorder
            .emit(
                node.as_ref(),
                events::NORMAL,
                "NodeNotReady",
                &format!("Node {name} status is now: NodeNotReady"),
            )
            .await;
    }
    if !has_unreachable_taint(&node) {
        set_unreachable_taints(ctx, &node, true).await?;
    }
    let since = match not_ready_since {
        Some(s) => s,
        None => {
            let now = Instant::now();
            if let Some(h) = ctx.nodes_seen.lock().expect("lock").get_mut(&name) {
                h.not_ready_since = Some(now);
            }
            now
        }
    };
    let pods = pods_on(ctx, &name);
    for p in &pods {
        if podutil::is_ready(p) && !podutil::is_terminal(p) {
            mark_pod_not_ready(ctx, p).await?;
        }
    }
    let left = ctx.cfg.pod_eviction_timeout.saturating_sub(since.elapsed());
    if !left.is_zero() {
        return Ok(Next::After(left + Duration::from_millis(50)));
    }
    let mut kept = false;
    for p in &pods {
        if podutil::is_deleting(p) {
            continue;
        }
        if tolerates_forever(p) {
            kept = true;
            continue;
        }
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
        match api.delete(&p.name_any(), &DeleteParams::default()).await {
            Ok(_) => {
                ctx.recorder
                    .emit(
                        p.as_ref(),
                        events::NORMAL,
                        "TaintManagerEviction",
                        &format!("Deleting pod {} of unreachable node {name}", p.name_any()),
                    )
                    .await
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e).context("evicting a pod"),
        }
    }
    let _ = kept;
    // Keep watching: pods may be bound here later, the node may come back.
    Ok(Next::After(grace))
}

fn has_unreachable_taint(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == UNREACHABLE))
}

async fn set_unreachable_taints(ctx: &Ctx, node: &Node, on: bool) -> Result<()> {
    let mut taints: Vec<Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t.key != UNREACHABLE)
        .collect();
    if on {
        for effect in ["NoSchedule", "NoExecute"] {
            taints.push(Taint {
                key: UNREACHABLE.into(),
                effect: effect.into(),
                time_added: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    jiff::Timestamp::now(),
                )),
                value: None,
            });
        }
    }
    let api: Api<Node> = Api::all(ctx.client.clone());
    let patch = json!({
        "metadata": { "resourceVersion": node.metadata.resource_version },
        "spec": { "taints": taints },
    });
    api.patch(
        &node.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .context("updating node taints")?;
    Ok(())
}

async fn mark_unknown(ctx: &Ctx, node: &Node) -> Result<()> {
    let now = jiff::Timestamp::now().to_string();
    let mut conds: Vec<serde_json::Value> = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|c| serde_json::to_value(c).unwrap_or_default())
        .collect();
    for t in ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"] {
        let fresh = json!({
            "type": t,
            "status": "Unknown",
            "reason": "NodeStatusUnknown",
            "message": "Kubelet stopped posting node status.",
            "lastTransitionTime": now,
        });
        match conds.iter_mut().find(|c| c["type"] == t) {
            Some(c) => {
                if c["status"] != "Unknown" {
                    c["lastTransitionTime"] = json!(now);
                }
                c["status"] = fresh["status"].clone();
                c["reason"] = fresh["reason"].clone();
                c["message"] = fresh["message"].clone();
            }
            None => conds.push(fresh),
        }
    }
    let api: Api<Node> = Api::all(ctx.client.clone());
    api.patch_status(
        &node.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({
            "metadata": { "resourceVersion": node.metadata.resource_version },
            "status": { "conditions": conds },
        })),
    )
    .await
    .context("marking the node NotReady")?;
    Ok(())
}

async fn mark_pod_not_ready(ctx: &Ctx, p: &Pod) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    let patch = json!({
        "status": { "conditions": [{
            "type": "Ready",
            "status": "False",
            "reason": "NodeNotReady",
            "message": "Node is not ready",
            "lastTransitionTime": jiff::Timestamp::now().to_string(),
        }]}
    });
    match api
        .patch_status(
            &p.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(e).context("marking a pod not ready"),
    }
    ctx.recorder
        .emit(p, events::WARNING, "NodeNotReady", "Node is not ready")
        .await;
    Ok(())
}

fn tolerates_forever(p: &Pod) -> bool {
    p.spec
        .as_ref()
        .and_then(|s| s.tolerations.as_ref())
        .is_some_and(|ts| {
            ts.iter().any(|t| {
                let key_ok = match t.key.as_deref() {
                    None | Some("") => t.operator.as_deref() == Some("Exists"),
                    Some(k) => k == UNREACHABLE,
                };
                let effect_ok = t
                    .effect
                    .as_deref()
                    .is_none_or(|e| e.is_empty() || e == "NoExecute");
                key_ok && effect_ok && t.toleration_seconds.is_none()
            })
        })
}

/// Pod GC: pods bound to a node that is gone (checked against the API, not
/// just the cache) are deleted.
async fn delete_pods_of_missing_node(ctx: &Ctx, node: &str) -> Result<Next> {
    let pods = pods_on(ctx, node);
    if pods.is_empty() {
        return Ok(Next::Done);
    }
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    if nodes
        .get_opt(node)
        .await
        .context("checking the node")?
        .is_some()
    {
        return Ok(Next::Done);
    }
    for p in pods {
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
        match api.delete(&p.name_any(), &DeleteParams::default()).await {
            Ok(_) | Err(kube::Error::Api(_)) => {}
            Err(e) => return Err(e).context("deleting a pod of a missing node"),
        }
    }
    Ok(Next::Done)
}
