//! The garbage collector: an object whose ownerReferences all name owners
//! that no longer exist (by uid) is deleted; one that still has a live
//! owner loses only the dangling references. Deleting a Deployment thus
//! takes its ReplicaSets, and with them their Pods (background
//! propagation). Absence is confirmed with a GET against the API before
//! anything is deleted: the caches may simply not have seen a new owner.
//!
//! Dependents watched: Pods, ReplicaSets, EndpointSlices, node Leases.
//! Owners resolved: Deployments, ReplicaSets, Pods, Services, Nodes; owners
//! of other kinds are left alone.

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use serde_json::json;

use super::Ctx;
use crate::informer::{Key, Next};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Pod,
    ReplicaSet,
    EndpointSlice,
    Lease,
}

/// An object the collector looks at.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dependent {
    kind: Kind,
    key: Key,
}

impl Dependent {
    pub fn pod(p: &Pod) -> Dependent {
        Dependent {
            kind: Kind::Pod,
            key: Key::of(p),
        }
    }
    pub fn replicaset(r: &ReplicaSet) -> Dependent {
        Dependent {
            kind: Kind::ReplicaSet,
            key: Key::of(r),
        }
    }
}

impl std::fmt::Display for Dependent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}", self.kind, self.key)
    }
}

fn meta_of(ctx: &Ctx, d: &Dependent) -> Option<ObjectMeta> {
    match d.kind {
        Kind::Pod => d.key.get(&ctx.pods).map(|o| o.metadata.clone()),
        Kind::ReplicaSet => d.key.get(&ctx.replicasets).map(|o| o.metadata.clone()),
        Kind::EndpointSlice => d.key.get(&ctx.slices).map(|o| o.metadata.clone()),
        Kind::Lease => d.key.get(&ctx.leases).map(|o| o.metadata.clone()),
    }
}

/// Whether the owner is in the cache: Some(true/false) for the kinds we
/// cache, None for others.
fn owner_cached(ctx: &Ctx, ns: &str, r: &OwnerReference) -> Option<bool> {
    fn has<K>(store: &kube::runtime::reflector::Store<K>, key: Key, uid: &str) -> bool
    where
        K: Resource + Clone + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        key.get(store)
            .is_some_and(|o| o.meta().uid.as_deref() == Some(uid))
    }
    let k = Key::new(ns, &r.name);
    let cluster = Key {
        namespace: None,
        name: r.name.clone(),
    };
    Some(match (r.api_version.as_str(), r.kind.as_str()) {
        ("apps/v1", "Deployment") => has(&ctx.deployments, k, &r.uid),
        ("apps/v1", "ReplicaSet") => has(&ctx.replicasets, k, &r.uid),
        ("v1", "Pod") => has(&ctx.pods, k, &r.uid),
        ("v1", "Service") => has(&ctx.services, k, &r.uid),
        ("v1", "Node") => has(&ctx.nodes, cluster, &r.uid),
        _ => return None,
    })
}

/// The owner as the API has it now (uid compared): Some(true/false), None
/// for kinds we do not resolve.
async fn owner_live(ctx: &Ctx, ns: &str, r: &OwnerReference) -> Result<Option<bool>> {
    async fn exists<K>(api: Api<K>, name: &str, uid: &str) -> Result<bool>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        Ok(api
            .get_opt(name)
            .await
            .context("looking up an owner")?
            .is_some_and(|o| o.meta().uid.as_deref() == Some(uid)))
    }
    let c = ctx.client.clone();
    Ok(Some(match (r.api_version.as_str(), r.kind.as_str()) {
        ("apps/v1", "Deployment") => {
            exists(Api::<Deployment>::namespaced(c, ns), &r.name, &r.uid).await?
        }
        ("apps/v1", "ReplicaSet") => {
            exists(Api::<ReplicaSet>::namespaced(c, ns), &r.name, &r.uid).await?
        }
        ("v1", "Pod") => exists(Api::<Pod>::namespaced(c, ns), &r.name, &r.uid).await?,
        ("v1", "Service") => exists(Api::<Service>::namespaced(c, ns), &r.name, &r.uid).await?,
        ("v1", "Node") => exists(Api::<Node>::all(c), &r.name, &r.uid).await?,
        _ => return Ok(None),
    }))
}

fn has_missing_owner(ctx: &Ctx, m: &ObjectMeta) -> bool {
    let ns = m.namespace.clone().unwrap_or_default();
    m.owner_references
        .iter()
        .flatten()
        .any(|r| owner_cached(ctx, &ns, r) == Some(false))
}

pub(super) fn enqueue_if_orphan(ctx: &Ctx, d: Dependent) {
    if meta_of(ctx, &d).is_some_and(|m| has_missing_owner(ctx, &m)) {
        ctx.q.gc.add(d);
    }
}

/// Everything that names the deleted object `owner` as an owner.
pub(super) fn enqueue_dependents(ctx: &Ctx, owner: &ObjectMeta) {
    let Some(uid) = owner.uid.clone() else {
        return;
    };
    let names = |m: &ObjectMeta| m.owner_references.iter().flatten().any(|r| r.uid == uid);
    for p in ctx.pods.state_filter(|o| names(&o.metadata)) {
        ctx.q.gc.add(Dependent::pod(&p));
    }
    for r in ctx.replicasets.state_filter(|o| names(&o.metadata)) {
        ctx.q.gc.add(Dependent::replicaset(&r));
    }
    for s in ctx.slices.state_filter(|o| names(&o.metadata)) {
        ctx.q.gc.add(Dependent {
            kind: Kind::EndpointSlice,
            key: Key::of(s.as_ref()),
        });
    }
    for l in ctx.leases.state_filter(|o| names(&o.metadata)) {
        ctx.q.gc.add(Dependent {
            kind: Kind::Lease,
            key: Key::of(l.as_ref()),
        });
    }
}

/// A full scan of the caches for dangling owner references.
pub(super) fn enqueue_all_orphans(ctx: &Ctx) {
    let check = |m: &ObjectMeta| has_missing_owner(ctx, m);
    for p in ctx.pods.state_filter(|o| check(&o.metadata)) {
        ctx.q.gc.add(Dependent::pod(&p));
    }
    for r in ctx.replicasets.state_filter(|o| check(&o.metadata)) {
        ctx.q.gc.add(Dependent::replicaset(&r));
    }
    for s in ctx.slices.state_filter(|o| check(&o.metadata)) {
        ctx.q.gc.add(Dependent {
            kind: Kind::EndpointSlice,
            key: Key::of(s.as_ref()),
        });
    }
    for l in ctx.leases.state_filter(|o| check(&o.metadata)) {
        ctx.q.gc.add(Dependent {
            kind: Kind::Lease,
            key: Key::of(l.as_ref()),
        });
    }
}

pub(super) async fn reconcile(ctx: &Ctx, d: Dependent) -> Result<Next> {
    let Some(meta) = meta_of(ctx, &d) else {
        return Ok(Next::Done);
    };
    if meta.deletion_timestamp.is_some() {
        return Ok(Next::Done);
    }
    let refs = meta.owner_references.clone().unwrap_or_default();
    if refs.is_empty() {
        return Ok(Next::Done);
    }
    let ns = d.key.ns().to_string();
    let mut live = Vec::new();
    let mut dangling = Vec::new();
    for r in &refs {
        match owner_cached(ctx, &ns, r) {
            Some(true) | None => live.push(r.clone()),
            Some(false) => match owner_live(ctx, &ns, r).await? {
                Some(false) => dangling.push(r.clone()),
                _ => live.push(r.clone()),
            },
        }
    }
    if dangling.is_empty() {
        return Ok(Next::Done);
    }
    let uid = meta.uid.clone();
    if live.is_empty() {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid,
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        let r = match d.kind {
            Kind::Pod => delete::<Pod>(ctx, &d.key, &dp).await,
            Kind::ReplicaSet => delete::<ReplicaSet>(ctx, &d.key, &dp).await,
            Kind::EndpointSlice => delete::<EndpointSlice>(ctx, &d.key, &dp).await,
            Kind::Lease => delete::<Lease>(ctx, &d.key, &dp).await,
        };
        return r.map(|_| Next::Done);
    }
    let patch = json!({
        "metadata": { "ownerReferences": live },
    });
    let pp = PatchParams::default();
    let r = match d.kind {
        Kind::Pod => patch_meta::<Pod>(ctx, &d.key, &pp, &patch).await,
        Kind::ReplicaSet => patch_meta::<ReplicaSet>(ctx, &d.key, &pp, &patch).await,
        Kind::EndpointSlice => patch_meta::<EndpointSlice>(ctx, &d.key, &pp, &patch).await,
        Kind::Lease => patch_meta::<Lease>(ctx, &d.key, &pp, &patch).await,
    };
    r.map(|_| Next::Done)
}

fn api<K>(ctx: &Ctx, key: &Key) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    Api::namespaced(ctx.client.clone(), key.ns())
}

async fn delete<K>(ctx: &Ctx, key: &Key, dp: &DeleteParams) -> Result<()>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    match api::<K>(ctx, key).delete(&key.name, dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("collecting {key}")),
    }
}

async fn patch_meta<K>(
    ctx: &Ctx,
    key: &Key,
    pp: &PatchParams,
    patch: &serde_json::Value,
) -> Result<()>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    match api::<K>(ctx, key)
        .patch(&key.name, pp, &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("dropping dangling owners of {key}")),
    }
}
