//! The Deployment controller: one ReplicaSet per pod template (named and
//! labelled by `pod-template-hash`), the newest scaled up and the older
//! ones down within `maxSurge`/`maxUnavailable` (RollingUpdate) or all old
//! ones first (Recreate); revisions in `deployment.kubernetes.io/revision`
//! (a template that matches an older ReplicaSet — `kubectl rollout undo` —
//! reuses it under the next revision); `revisionHistoryLimit` old
//! ReplicaSets kept; status and the Progressing/Available conditions that
//! `kubectl rollout status` reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, ReplicaSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::Ctx;
use crate::events;
use crate::informer::{Key, Next};

pub const HASH_LABEL: &str = "pod-template-hash";
pub const REVISION: &str = "deployment.kubernetes.io/revision";
const DESIRED: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
/// Deployment annotations not copied to its ReplicaSets.
const NOT_COPIED: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    "deployment.kubernetes.io/revision-history",
    DESIRED,
    MAX_REPLICAS,
    "deprecated.deployment.rollback.to",
];

fn revision(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn available(rs: &ReplicaSet) -> i32 {
    // A status older than the spec may count pods about to go.
    rs.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
        .min(replicas(rs))
}

/// The template without the pod-template-hash label: what a Deployment's
/// template is compared with.
fn template_without_hash(t: &PodTemplateSpec) -> PodTemplateSpec {
    let mut t = t.clone();
    if let Some(m) = t.metadata.as_mut()
        && let Some(l) = m.labels.as_mut()
    {
        l.remove(HASH_LABEL);
        if l.is_empty() {
            m.labels = None;
        }
    }
    t
}

/// FNV-1a (32 bit) of the template's JSON (keys sorted) and the collision
/// count, spelled in the consonants-and-digits alphabet of generated names.
pub fn template_hash(t: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let v = serde_json::to_value(t).unwrap_or_default();
    let mut h: u32 = 0x811c9dc5;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x01000193);
        }
    };
    feed(canonical(&v).as_bytes());
    if let Some(c) = collision_count {
        feed(&c.to_le_bytes());
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    h.to_string()
        .bytes()
        .map(|d| ALPHABET[d as usize % ALPHABET.len()] as char)
        .collect()
}

fn canonical(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => {
            let sorted: BTreeMap<&String, String> =
                m.iter().map(|(k, v)| (k, canonical(v))).collect();
            let parts: Vec<String> = sorted.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
            format!("{{{}}}", parts.join(","))
        }
        serde_json::Value::Array(a) => {
            format!(
                "[{}]",
                a.iter().map(canonical).collect::<Vec<_>>().join(",")
            )
        }
        other => other.to_string(),
    }
}

/// maxSurge/maxUnavailable as pod counts: percentages of `replicas`,
/// surge rounded up and unavailable down; both zero means one unavailable.
fn resolve(d: &Deployment, replicas: i32) -> (i32, i32) {
    let ru = d
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.rolling_update.clone())
        .unwrap_or_default();
    let val = |v: Option<IntOrString>, default: &str, up: bool| -> i32 {
        match v.unwrap_or(IntOrString::String(default.into())) {
            IntOrString::Int(i) => i.max(0),
            IntOrString::String(s) => {
                let pct: f64 = s.trim_end_matches('%').parse().unwrap_or(0.0);
                let x = pct * f64::from(replicas) / 100.0;
                (if up { x.ceil() } else { x.floor() }) as i32
            }
        }
    };
    let surge = val(ru.max_surge, "25%", true);
    let mut unavail = val(ru.max_unavailable, "25%", false);
    if surge == 0 && unavail == 0 {
        unavail = 1;
    }
    (surge, unavail)
}

pub(super) async fn reconcile(ctx: &Ctx, key: Key) -> Result<Next> {
    let Some(d) = key.get(&ctx.deployments) else {
        return Ok(Next::Done);
    };
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Next::Done);
    }
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let mut rss: Vec<Arc<ReplicaSet>> = ctx.replicasets.state_filter(|rs| {
        rs.metadata.namespace.as_deref() == Some(key.ns())
            && crate::informer::controller_of(rs).is_some_and(|r| r.uid == uid)
    });
    // Our own last scale of an RS not visible yet: decide once it is.
    {
        let written = ctx.rs_written.lock().expect("lock");
        let stale = rss.iter().any(|rs| {
            let uid = rs.metadata.uid.clone().unwrap_or_default();
            written
                .get(&uid)
                .is_some_and(|g| rs.metadata.generation.unwrap_or(0) < *g)
        });
        if stale {
            return Ok(Next::After(Duration::from_millis(200)));
        }
    }
    rss.sort_by_key(|rs| {
        (
            revision(rs),
            rs.metadata.creation_timestamp.as_ref().map(|t| t.0),
        )
    });
    let spec = d.spec.clone().unwrap_or_default();
    let want = spec.replicas.unwrap_or(1).max(0);
    let template = spec.template.clone();
    let new_rs = rss
        .iter()
        .filter(|rs| {
            rs.spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .is_some_and(|t| template_without_hash(t) == template)
        })
        .min_by_key(|rs| rs.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .cloned();
    let olds: Vec<Arc<ReplicaSet>> = rss
        .iter()
        .filter(|rs| {
            new_rs
                .as_ref()
                .is_none_or(|n| n.metadata.uid != rs.metadata.uid)
        })
        .cloned()
        .collect();
    let max_old_revision = olds.iter().map(|r| revision(r)).max().unwrap_or(0);

    if spec.paused == Some(true) {
        return sync_status(ctx, &d, new_rs.as_deref(), &rss, false).await;
    }

    let (surge, unavail) = resolve(&d, want);
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");

    let Some(new_rs) = new_rs else {
        let total: i32 = rss.iter().map(|r| replicas(r)).sum();
        let initial = if recreate {
            if olds
                .iter()
                .any(|r| replicas(r) > 0 || r.status.as_ref().is_some_and(|s| s.replicas > 0))
            {
                0
            } else {
                want
            }
        } else if olds.iter().all(|r| replicas(r) == 0) {
            want
        } else {
            (want + surge - total).clamp(0, want)
        };
        let created = create_rs(ctx, &d, &key, max_old_revision + 1, initial, surge).await?;
        if let Some(rs) = created {
            let mut all = rss.clone();
            all.push(Arc::new(rs.clone()));
            return sync_status(ctx, &d, Some(&rs), &all, true).await;
        }
        return Ok(Next::After(Duration::from_millis(200)));
    };

    // The newest template: the newest revision, also when an old
    // ReplicaSet comes back (rollback), and the annotations to show it.
    let new_revision = if revision(&new_rs) <= max_old_revision {
        max_old_revision + 1
    } else {
        revision(&new_rs)
    };
    sync_annotations(ctx, &d, &new_rs, new_revision, want, surge).await?;

    let mut scaled = false;
    if recreate {
        let old_active = olds.iter().any(|r| replicas(r) > 0);
        for rs in olds.iter().filter(|r| replicas(r) > 0) {
            scale(ctx, &d, rs, 0).await?;
            scaled = true;
        }
        let old_pods_left = olds
            .iter()
            .any(|r| r.status.as_ref().is_some_and(|s| s.replicas > 0));
        if !old_active && !old_pods_left && replicas(&new_rs) != want {
            scale(ctx, &d, &new_rs, want).await?;
            scaled = true;
        }
    } else if olds.iter().all(|r| replicas(r) == 0) {
        if replicas(&new_rs) != want {
            scale(ctx, &d, &new_rs, want).await?;
            scaled = true;
        }
    } else {
        scaled = rolling(ctx, &d, &new_rs, &olds, want, surge, unavail).await?;
    }

    if !scaled {
        cleanup_history(ctx, &d, &olds).await?;
    }
    sync_status(ctx, &d, Some(&new_rs), &rss, false).await
}

/// One step of a rolling update: scale the new ReplicaSet up within
/// maxSurge, or old ones down within maxUnavailable. Returns whether
/// anything was scaled.
async fn rolling(
    ctx: &Ctx,
    d: &Deployment,
    new_rs: &ReplicaSet,
    olds: &[Arc<ReplicaSet>],
    want: i32,
    surge: i32,
    unavail: i32,
) -> Result<bool> {
    let new_replicas = replicas(new_rs);
    let total: i32 = new_replicas + olds.iter().map(|r| replicas(r)).sum::<i32>();
    // Scale up the new one.
    let target = if new_replicas > want {
        want
    } else if total >= want + surge {
        new_replicas
    } else {
        new_replicas + (want + surge - total).min(want - new_replicas)
    };
    if target != new_replicas {
        scale(ctx, d, new_rs, target).await?;
        return Ok(true);
    }
    // Scale old ones down, never below want - maxUnavailable available.
    let min_available = want - unavail;
    let new_unavailable = (new_replicas - available(new_rs)).max(0);
    let mut old_sizes: Vec<(Arc<ReplicaSet>, i32)> = olds
        .iter()
        .filter(|r| replicas(r) > 0)
        .map(|r| (r.clone(), replicas(r)))
        .collect();
    // Oldest first.
    old_sizes.sort_by_key(|(r, _)| revision(r));
    let max_scaled_down = total - min_available - new_unavailable;
    if max_scaled_down <= 0 {
        return Ok(false);
    }
    // Old pods that are not available anyway go first.
    let mut cleaned = 0;
    for (rs, size) in old_sizes.iter_mut() {
        if cleaned >= max_scaled_down {
            break;
        }
        let unhealthy = *size - available(rs);
        if unhealthy <= 0 {
            continue;
        }
        let n = unhealthy.min(max_scaled_down - cleaned);
        *size -= n;
        cleaned += n;
    }
    // Then available ones, while enough stay available.
    let available_total: i32 = available(new_rs)
        + old_sizes
            .iter()
            .map(|(r, size)| available(r).min(*size))
            .sum::<i32>();
    let mut can_go = (available_total - min_available).max(0);
    for (_, size) in old_sizes.iter_mut() {
        if can_go == 0 {
            break;
        }
        let n = (*size).min(can_go);
        *size -= n;
        can_go -= n;
    }
    let mut scaled = false;
    for (rs, size) in old_sizes {
        if size != replicas(&rs) {
            scale(ctx, d, &rs, size).await?;
            scaled = true;
        }
    }
    Ok(scaled)
}

async fn scale(ctx: &Ctx, d: &Deployment, rs: &ReplicaSet, to: i32) -> Result<()> {
    let from = replicas(rs);
    let api: Api<ReplicaSet> =
        Api::namespaced(ctx.client.clone(), &rs.namespace().unwrap_or_default());
    let patch = json!({
        "metadata": {
            "resourceVersion": rs.metadata.resource_version,
            "annotations": { DESIRED: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).to_string() },
        },
        "spec": { "replicas": to },
    });
    let out = api
        .patch(
            &rs.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .with_context(|| format!("scaling replica set {}", rs.name_any()))?;
    ctx.rs_written.lock().expect("lock").insert(
        out.metadata.uid.clone().unwrap_or_default(),
        out.metadata.generation.unwrap_or(0),
    );
    let verb = if to > from { "up" } else { "down" };
    ctx.recorder
        .emit(
            d,
            events::NORMAL,
            "ScalingReplicaSet",
            &format!(
                "Scaled {verb} replica set {} from {from} to {to}",
                rs.name_any()
            ),
        )
        .await;
    Ok(())
}

fn copied_annotations(d: &Deployment) -> BTreeMap<String, String> {
    d.annotations()
        .iter()
        .filter(|(k, _)| !NOT_COPIED.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

async fn create_rs(
    ctx: &Ctx,
    d: &Deployment,
    key: &Key,
    rev: i64,
    replicas: i32,
    surge: i32,
) -> Result<Option<ReplicaSet>> {
    let spec = d.spec.clone().unwrap_or_default();
    let collision = d.status.as_ref().and_then(|s| s.collision_count);
    let hash = template_hash(&spec.template, collision);
    let mut template = spec.template.clone();
    let tmeta = template.metadata.get_or_insert_with(Default::default);
    tmeta
        .labels
        .get_or_insert_with(Default::default)
        .insert(HASH_LABEL.into(), hash.clone());
    let mut selector = spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(Default::default)
        .insert(HASH_LABEL.into(), hash.clone());
    let mut labels = tmeta.labels.clone().unwrap_or_default();
    labels.insert(HASH_LABEL.into(), hash.clone());
    let mut annotations = copied_annotations(d);
    annotations.insert(REVISION.into(), rev.to_string());
    annotations.insert(DESIRED.into(), spec.replicas.unwrap_or(1).to_string());
    annotations.insert(
        MAX_REPLICAS.into(),
        (spec.replicas.unwrap_or(1) + surge).to_string(),
    );
    let name = format!("{}-{hash}", key.name);
    let rs = ReplicaSet {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(key.ns().to_string()),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: Deployment::api_version(&()).into_owned(),
                kind: Deployment::kind(&()).into_owned(),
                name: key.name.clone(),
                uid: d.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::apps::v1::ReplicaSetSpec {
            replicas: Some(replicas),
            min_ready_seconds: spec.min_ready_seconds,
            selector,
            template: Some(template),
        }),
        status: None,
    };
    let api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), key.ns());
    match api.create(&PostParams::default(), &rs).await {
        Ok(rs) => {
            ctx.rs_written.lock().expect("lock").insert(
                rs.metadata.uid.clone().unwrap_or_default(),
                rs.metadata.generation.unwrap_or(0),
            );
            ctx.recorder
                .emit(
                    d,
                    events::NORMAL,
                    "ScalingReplicaSet",
                    &format!("Scaled up replica set {name} from 0 to {replicas}"),
                )
                .await;
            Ok(Some(rs))
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            // Ours with this template (the cache lags), or a hash collision:
            // then the next hash comes from a bumped collisionCount.
            let existing = api
                .get(&name)
                .await
                .context("reading the existing replica set")?;
            let ours = crate::informer::controller_of(&existing)
                .is_some_and(|r| Some(&r.uid) == d.metadata.uid.as_ref());
            let same = existing
                .spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .is_some_and(|t| template_without_hash(t) == spec.template);
            if !(ours && same) {
                let dapi: Api<Deployment> = Api::namespaced(ctx.client.clone(), key.ns());
                dapi.patch_status(
                    &key.name,
                    &PatchParams::default(),
                    &Patch::Merge(
                        &json!({ "status": { "collisionCount": collision.unwrap_or(0) + 1 } }),
                    ),
                )
                .await
                .context("bumping collisionCount")?;
            }
            Ok(None)
        }
        Err(e) => Err(e).context("creating the replica set"),
    }
}

/// The new ReplicaSet carries the newest revision and the deployment's
/// annotations; the deployment names its revision.
async fn sync_annotations(
    ctx: &Ctx,
    d: &Deployment,
    rs: &ReplicaSet,
    rev: i64,
    want: i32,
    surge: i32,
) -> Result<()> {
    let mut wanted = copied_annotations(d);
    wanted.insert(REVISION.into(), rev.to_string());
    wanted.insert(DESIRED.into(), want.to_string());
    wanted.insert(MAX_REPLICAS.into(), (want + surge).to_string());
    let have = rs.annotations();
    if wanted.iter().any(|(k, v)| have.get(k) != Some(v)) {
        let api: Api<ReplicaSet> =
            Api::namespaced(ctx.client.clone(), &rs.namespace().unwrap_or_default());
        api.patch(
            &rs.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({ "metadata": { "annotations": wanted } })),
        )
        .await
        .context("annotating the new replica set")?;
    }
    if d.annotations().get(REVISION) != Some(&rev.to_string()) {
        let api: Api<Deployment> =
            Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
        api.patch(
            &d.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({ "metadata": { "annotations": { REVISION: rev.to_string() } } })),
        )
        .await
        .context("annotating the deployment")?;
    }
    Ok(())
}

/// Deletes the oldest fully scaled-down ReplicaSets beyond
/// revisionHistoryLimit.
async fn cleanup_history(ctx: &Ctx, d: &Deployment, olds: &[Arc<ReplicaSet>]) -> Result<()> {
    let limit = d
        .spec
        .as_ref()
        .and_then(|s| s.revision_history_limit)
        .unwrap_or(10)
        .max(0) as usize;
    let mut idle: Vec<&Arc<ReplicaSet>> = olds
        .iter()
        .filter(|r| {
            replicas(r) == 0
                && r.status.as_ref().is_none_or(|s| s.replicas == 0)
                && r.metadata.deletion_timestamp.is_none()
        })
        .collect();
    if idle.len() <= limit {
        return Ok(());
    }
    idle.sort_by_key(|r| revision(r));
    let api: Api<ReplicaSet> =
        Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
    for rs in &idle[..idle.len() - limit] {
        match api
            .delete(&rs.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e).context("deleting an old replica set"),
        }
    }
    Ok(())
}

fn condition<'a>(d: &'a Deployment, type_: &str) -> Option<&'a DeploymentCondition> {
    d.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

/// A condition, keeping lastTransitionTime while the status stays and
/// lastUpdateTime while nothing about it changes.
fn set_condition(
    out: &mut Vec<DeploymentCondition>,
    old: Option<&DeploymentCondition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    touched: bool,
) {
    let now = Time(jiff::Timestamp::now());
    let same_status = old.is_some_and(|o| o.status == status);
    let same_all = same_status
        && old.is_some_and(|o| {
            o.reason.as_deref() == Some(reason) && o.message.as_deref() == Some(&message)
        });
    out.push(DeploymentCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_transition_time: if same_status {
            old.and_then(|o| o.last_transition_time.clone())
        } else {
            Some(now.clone())
        },
        last_update_time: if same_all && !touched {
            old.and_then(|o| o.last_update_time.clone())
        } else {
            Some(now)
        },
    });
}

async fn sync_status(
    ctx: &Ctx,
    d: &Deployment,
    new_rs: Option<&ReplicaSet>,
    all: &[Arc<ReplicaSet>],
    created: bool,
) -> Result<Next> {
    let spec = d.spec.clone().unwrap_or_default();
    let want = spec.replicas.unwrap_or(1);
    let st = |rs: &ReplicaSet| rs.status.clone().unwrap_or_default();
    let total: i32 = all.iter().map(|r| st(r).replicas).sum();
    let spec_total: i32 = all.iter().map(|r| replicas(r)).sum();
    let updated = new_rs.map(|r| st(r).replicas).unwrap_or(0);
    let ready: i32 = all.iter().map(|r| st(r).ready_replicas.unwrap_or(0)).sum();
    let avail: i32 = all
        .iter()
        .map(|r| st(r).available_replicas.unwrap_or(0))
        .sum();
    let (_, unavail) = resolve(d, want);
    let old = d.status.clone().unwrap_or_default();
    let new_name = new_rs.map(|r| r.name_any()).unwrap_or_default();

    let mut conds = Vec::new();
    if avail >= want - unavail {
        set_condition(
            &mut conds,
            condition(d, "Available"),
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.".into(),
            false,
        );
    } else {
        set_condition(
            &mut conds,
            condition(d, "Available"),
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.".into(),
            false,
        );
    }
    let complete = new_rs.is_some()
        && updated == want
        && total == want
        && avail >= want
        && new_rs.is_some_and(|r| replicas(r) == want);
    let progressed = created
        || updated > old.updated_replicas.unwrap_or(0)
        || avail > old.available_replicas.unwrap_or(0)
        || ready > old.ready_replicas.unwrap_or(0)
        || old.observed_generation != d.metadata.generation;
    let prev = condition(d, "Progressing");
    let mut next = Next::Done;
    if spec.paused == Some(true) {
        set_condition(
            &mut conds,
            prev,
            "Progressing",
            "Unknown",
            "DeploymentPaused",
            "Deployment is paused".into(),
            false,
        );
    } else if complete {
        set_condition(
            &mut conds,
            prev,
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{new_name}\" has successfully progressed."),
            false,
        );
    } else if created {
        set_condition(
            &mut conds,
            prev,
            "Progressing",
            "True",
            "NewReplicaSetCreated",
            format!("Created new replica set \"{new_name}\""),
            true,
        );
    } else if progressed || prev.is_none() {
        set_condition(
            &mut conds,
            prev,
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            format!("ReplicaSet \"{new_name}\" is progressing."),
            true,
        );
    } else {
        let deadline = i64::from(spec.progress_deadline_seconds.unwrap_or(600));
        let last = prev.and_then(|c| c.last_update_time.as_ref()).map(|t| t.0);
        let elapsed = last
            .map(|t| jiff::Timestamp::now().duration_since(t).as_secs())
            .unwrap_or(0);
        if prev.is_some_and(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
            || elapsed > deadline
        {
            set_condition(
                &mut conds,
                prev,
                "Progressing",
                "False",
                "ProgressDeadlineExceeded",
                format!("ReplicaSet \"{new_name}\" has timed out progressing."),
                false,
            );
        } else {
            let p = prev.cloned().expect("checked above");
            conds.push(p);
            next = Next::After(Duration::from_secs((deadline - elapsed).max(1) as u64));
        }
    }
    // Keep the order upstream uses (Available first) stable.
    let status = json!({
        "observedGeneration": d.metadata.generation,
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": avail,
        "unavailableReplicas": (spec_total.max(want) - avail).max(0),
        "collisionCount": old.collision_count,
        "conditions": conds,
    });
    let current = serde_json::to_value(&old).unwrap_or_default();
    let differs = [
        "observedGeneration",
        "replicas",
        "updatedReplicas",
        "readyReplicas",
        "availableReplicas",
        "unavailableReplicas",
        "conditions",
    ]
    .iter()
    .any(|f| {
        let a = current.get(*f).cloned().unwrap_or(serde_json::Value::Null);
        let b = status.get(*f).cloned().unwrap_or(serde_json::Value::Null);
        let zeroish = |v: &serde_json::Value| v.is_null() || *v == json!(0);
        !(a == b || (zeroish(&a) && zeroish(&b)))
    });
    if differs {
        let api: Api<Deployment> =
            Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
        match api
            .patch_status(
                &d.name_any(),
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
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_depends_on_template_and_collisions() {
        let t: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": { "labels": { "app": "a", "b": "c" } },
            "spec": { "containers": [{ "name": "c", "image": "busybox" }] }
        }))
        .unwrap();
        let h = template_hash(&t, None);
        assert_eq!(h, template_hash(&t.clone(), None));
        assert!(h.chars().all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)));
        assert_ne!(h, template_hash(&t, Some(1)));
        let mut t2 = t.clone();
        t2.spec.as_mut().unwrap().containers[0].image = Some("busybox:2".into());
        assert_ne!(h, template_hash(&t2, None));
    }

    #[test]
    fn surge_rounds_up_unavailable_down() {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": { "name": "d" },
            "spec": {
                "selector": {}, "template": {},
                "strategy": { "rollingUpdate": { "maxSurge": "25%", "maxUnavailable": "25%" } }
            }
        }))
        .unwrap();
        assert_eq!(resolve(&d, 3), (1, 0));
        assert_eq!(resolve(&d, 10), (3, 2));
    }
}
