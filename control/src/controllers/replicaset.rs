//! The ReplicaSet controller: as many active pods as `spec.replicas`,
//! created from the template with the ReplicaSet as controlling owner, and
//! the counts in `status` (replicas, ready, available after
//! minReadySeconds).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::Ctx;
use crate::events;
use crate::informer::{Key, Next};
use crate::podutil;

/// Pods created or deleted in one pass at most (as upstream's burst).
const BURST: usize = 500;

pub(super) fn owned_pods(ctx: &Ctx, ns: &str, uid: &str) -> Vec<Arc<Pod>> {
    ctx.pods.state_filter(|p| {
        p.metadata.namespace.as_deref() == Some(ns)
            && crate::informer::controller_of(p).is_some_and(|r| r.uid == uid)
    })
}

pub(super) async fn reconcile(ctx: &Ctx, key: Key) -> Result<Next> {
    let Some(rs) = key.get(&ctx.replicasets) else {
        ctx.expectations.lock().expect("lock").remove(&key);
        return Ok(Next::Done);
    };
    if rs.metadata.deletion_timestamp.is_some() {
        return Ok(Next::Done);
    }
    let uid = rs.metadata.uid.clone().unwrap_or_default();
    let spec = rs.spec.clone().unwrap_or_default();
    let desired = spec.replicas.unwrap_or(1).max(0) as usize;
    let all = owned_pods(ctx, key.ns(), &uid);
    let mut active: Vec<Arc<Pod>> = all
        .iter()
        .filter(|p| !podutil::is_terminal(p) && !podutil::is_deleting(p))
        .cloned()
        .collect();

    if ctx.expectations_met(&key) {
        if active.len() < desired {
            create_pods(ctx, &rs, &key, (desired - active.len()).min(BURST)).await?;
        } else if active.len() > desired {
            active.sort_by_key(|p| deletion_rank(p));
            let doomed: Vec<Arc<Pod>> = active
                .iter()
                .take(active.len() - desired)
                .cloned()
                .collect();
            delete_pods(ctx, &rs, &key, &doomed).await?;
        }
    }
    update_status(ctx, &rs, &all).await
}

/// Pods deleted first sort first: unassigned, then pending, not ready,
/// ready for a shorter time, more restarts, newer.
fn deletion_rank(
    p: &Pod,
) -> (
    u8,
    u8,
    u8,
    std::cmp::Reverse<i64>,
    std::cmp::Reverse<i32>,
    std::cmp::Reverse<i64>,
) {
    let assigned = u8::from(podutil::node_name(p).is_some());
    let phase = match podutil::phase(p) {
        "Pending" => 0,
        "Unknown" => 1,
        _ => 2,
    };
    let ready = u8::from(podutil::is_ready(p));
    let ready_since = podutil::condition(p, "Ready")
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0.as_second())
        .unwrap_or(0);
    let restarts = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().map(|c| c.restart_count).sum())
        .unwrap_or(0);
    let created = p
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or(0);
    (
        assigned,
        phase,
        ready,
        std::cmp::Reverse(ready_since),
        std::cmp::Reverse(restarts),
        std::cmp::Reverse(created),
    )
}

fn owner_ref(rs: &ReplicaSet) -> OwnerReference {
    OwnerReference {
        api_version: ReplicaSet::api_version(&()).into_owned(),
        kind: ReplicaSet::kind(&()).into_owned(),
        name: rs.name_any(),
        uid: rs.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

async fn create_pods(ctx: &Ctx, rs: &ReplicaSet, key: &Key, n: usize) -> Result<()> {
    let template = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .context("spec.template is missing")?;
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), key.ns());
    let tmeta = template.metadata.unwrap_or_default();
    let pod = Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", key.name)),
            namespace: Some(key.ns().to_string()),
            labels: tmeta.labels,
            annotations: tmeta.annotations,
            finalizers: tmeta.finalizers,
            owner_references: Some(vec![owner_ref(rs)]),
            ..Default::default()
        },
        spec: template.spec,
        status: None,
    };
    let pp = PostParams::default();
    let results = futures::future::join_all((0..n).map(|_| api.create(&pp, &pod))).await;
    let mut created = Vec::new();
    let mut first_err = None;
    for r in results {
        match r {
            Ok(p) => created.push(p),
            Err(e) => {
                ctx.recorder
                    .emit(
                        rs,
                        events::WARNING,
                        "FailedCreate",
                        &format!("Error creating: {e}"),
                    )
                    .await;
                first_err.get_or_insert(e);
            }
        }
    }
    {
        let mut all = ctx.expectations.lock().expect("lock");
        let e = all.entry(key.clone()).or_default();
        e.creates.extend(created.iter().map(|p| p.name_any()));
        e.since = Some(Instant::now());
    }
    for p in &created {
        ctx.recorder
            .emit(
                rs,
                events::NORMAL,
                "SuccessfulCreate",
                &format!("Created pod: {}", p.name_any()),
            )
            .await;
    }
    match first_err {
        Some(e) => Err(e).context("creating pods"),
        None => Ok(()),
    }
}

async fn delete_pods(ctx: &Ctx, rs: &ReplicaSet, key: &Key, pods: &[Arc<Pod>]) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), key.ns());
    {
        let mut all = ctx.expectations.lock().expect("lock");
        let e = all.entry(key.clone()).or_default();
        e.deletes.extend(pods.iter().map(|p| p.name_any()));
        e.since = Some(Instant::now());
    }
    let results = futures::future::join_all(pods.iter().map(|p| {
        let api = api.clone();
        let name = p.name_any();
        async move { (api.delete(&name, &DeleteParams::default()).await, name) }
    }))
    .await;
    let mut first_err = None;
    for (r, name) in results {
        match r {
            Ok(_) => {
                ctx.recorder
                    .emit(
                        rs,
                        events::NORMAL,
                        "SuccessfulDelete",
                        &format!("Deleted pod: {name}"),
                    )
                    .await
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                ctx.recorder
                    .emit(
                        rs,
                        events::WARNING,
                        "FailedDelete",
                        &format!("Error deleting: {e}"),
                    )
                    .await;
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e).context("deleting pods"),
        None => Ok(()),
    }
}

async fn update_status(ctx: &Ctx, rs: &ReplicaSet, pods: &[Arc<Pod>]) -> Result<Next> {
    let spec = rs.spec.clone().unwrap_or_default();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let labels = spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let now = jiff::Timestamp::now();
    let active: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| !podutil::is_terminal(p) && !podutil::is_deleting(p))
        .collect();
    let mut ready = 0;
    let mut available = 0;
    let mut recheck: Option<Duration> = None;
    for p in &active {
        if podutil::is_ready(p) {
            ready += 1;
        }
        let (avail, after) = podutil::availability(p, min_ready, now);
        if avail {
            available += 1;
        }
        if let Some(a) = after {
            recheck = Some(recheck.map_or(a, |r| r.min(a)));
        }
    }
    let fully_labeled = active
        .iter()
        .filter(|p| labels.iter().all(|(k, v)| p.labels().get(k) == Some(v)))
        .count();
    let status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": fully_labeled,
        "readyReplicas": ready,
        "availableReplicas": available,
        "observedGeneration": rs.metadata.generation,
    });
    let cur = rs.status.clone().unwrap_or_default();
    let same = cur.replicas == active.len() as i32
        && cur.fully_labeled_replicas.unwrap_or(0) == fully_labeled as i32
        && cur.ready_replicas.unwrap_or(0) == ready
        && cur.available_replicas.unwrap_or(0) == available
        && cur.observed_generation == rs.metadata.generation;
    if !same {
        let api: Api<ReplicaSet> =
            Api::namespaced(ctx.client.clone(), &rs.namespace().unwrap_or_default());
        match api
            .patch_status(
                &rs.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": status })),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e).context("updating status"),
        }
    }
    Ok(match recheck {
        Some(d) => Next::After(d),
        None => Next::Done,
    })
}
