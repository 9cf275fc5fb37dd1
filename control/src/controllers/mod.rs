//! `kcontrol controller-manager`: the controllers of kube-controller-manager
//! that a one-node cluster needs, sharing one set of informers.
//!
//! One watch per kind (pods, replicasets, deployments, services,
//! endpointslices, nodes, node leases) fills a cache; the event handlers
//! below map each change to the keys of the objects whose controllers must
//! look again, and each controller has its own work queue and worker:
//!
//! - `replicaset`: keeps `spec.replicas` pods per ReplicaSet, status counts;
//! - `deployment`: ReplicaSets per template (pod-template-hash), rolling
//!   updates within maxSurge/maxUnavailable, revisions, history, status;
//! - `endpointslice`: EndpointSlices and legacy Endpoints per Service;
//! - `nodelifecycle`: Lease heartbeats → NotReady, pods not ready, eviction;
//! - `gc`: deletes objects whose ownerReferences all point at deleted owners.
//!
//! Every queue is also refilled from its cache every `resync_period`.

mod deployment;
mod endpointslice;
mod gc;
mod nodelifecycle;
mod replicaset;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};

use crate::events::Recorder;
use crate::informer::{self, Change, Key, Queue, Tasks};

pub use gc::Dependent;

pub struct Config {
    /// A node whose heartbeat (Lease renewal or Ready condition) is older
    /// than this is marked NotReady (Ready=Unknown).
    pub node_monitor_grace_period: Duration,
    /// Pods of a node that has been NotReady this long are deleted.
    pub pod_eviction_timeout: Duration,
    /// Every queue is refilled from its cache this often.
    pub resync_period: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_monitor_grace_period: Duration::from_secs(40),
            pod_eviction_timeout: Duration::from_secs(300),
            resync_period: Duration::from_secs(60),
        }
    }
}

/// Namespace of the node heartbeat Leases.
pub const NODE_LEASE_NS: &str = "kube-node-lease";

/// Pods created or deleted by a ReplicaSet that the cache has not shown
/// yet. Until it has (or `EXPECTATION_TIMEOUT` passed) the ReplicaSet is
/// not scaled again, so a stale cache never causes double creates.
#[derive(Default)]
pub(crate) struct Expectation {
    creates: Vec<String>,
    deletes: Vec<String>,
    since: Option<Instant>,
}

const EXPECTATION_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Queues {
    replicaset: Arc<Queue<Key>>,
    deployment: Arc<Queue<Key>>,
    service: Arc<Queue<Key>>,
    node: Arc<Queue<Key>>,
    gc: Arc<Queue<Dependent>>,
}

pub(crate) struct Ctx {
    client: Client,
    cfg: Config,
    pods: Store<Pod>,
    replicasets: Store<ReplicaSet>,
    deployments: Store<Deployment>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    leases: Store<Lease>,
    q: Queues,
    recorder: Recorder,
    expectations: Mutex<HashMap<Key, Expectation>>,
    /// ReplicaSet uid → the generation our last scale wrote. The
    /// deployment controller waits until the cache shows it.
    rs_written: Mutex<HashMap<String, i64>>,
    nodes_seen: Mutex<HashMap<String, nodelifecycle::Health>>,
}

impl Ctx {
    /// Whether the cache reflects every pod create/delete `key` asked for.
    fn expectations_met(&self, key: &Key) -> bool {
        let mut all = self.expectations.lock().expect("lock");
        let Some(e) = all.get(key) else {
            return true;
        };
        let ns = key.ns();
        let met = e
            .creates
            .iter()
            .all(|n| Key::new(ns, n).get(&self.pods).is_some())
            && e.deletes
                .iter()
                .all(|n| Key::new(ns, n).get(&self.pods).is_none());
        let expired = e.since.is_some_and(|s| s.elapsed() > EXPECTATION_TIMEOUT);
        if met || expired {
            all.remove(key);
            true
        } else {
            false
        }
    }
}

/// The owner keys of `o` whose kind is `kind` (same namespace).
fn owner_key<K: Resource>(o: &K, kind: &str) -> Option<Key> {
    let r = informer::controller_of(o)?;
    (r.kind == kind).then(|| Key::new(&o.namespace().unwrap_or_default(), &r.name))
}

/// Runs until the future is dropped.
pub async fn run(client: Client, cfg: Config) -> Result<()> {
    let q = Queues {
        replicaset: Queue::new(),
        deployment: Queue::new(),
        service: Queue::new(),
        node: Queue::new(),
        gc: Queue::new(),
    };
    // Handlers run from the start, the context exists once all caches do;
    // whatever a handler sees before that is covered by the initial fill.
    let cell: Arc<OnceLock<Arc<Ctx>>> = Arc::new(OnceLock::new());
    let mut tasks = Tasks::default();
    let wc = watcher::Config::default;

    let (pods, t) = informer::spawn(Api::<Pod>::all(client.clone()), wc(), {
        let cell = cell.clone();
        move |c| {
            if let Some(ctx) = cell.get() {
                on_pod(ctx, c)
            }
        }
    });
    tasks.push(t);
    let (replicasets, t) = informer::spawn(Api::<ReplicaSet>::all(client.clone()), wc(), {
        let cell = cell.clone();
        move |c| {
            if let Some(ctx) = cell.get() {
                on_replicaset(ctx, c)
            }
        }
    });
    tasks.push(t);
    let (deployments, t) = informer::spawn(Api::<Deployment>::all(client.clone()), wc(), {
        let cell = cell.clone();
        move |c| {
            if let Some(ctx) = cell.get() {
                on_deployment(ctx, c)
            }
        }
    });
    tasks.push(t);
    let (services, t) = informer::spawn(Api::<Service>::all(client.clone()), wc(), {
        let cell = cell.clone();
        move |c| {
            if let Some(ctx) = cell.get() {
                match c {
                    Change::Applied(s) | Change::Deleted(s) => ctx.q.service.add(Key::of(&s)),
                    Change::Relisted => enqueue_all(&ctx.services, &ctx.q.service),
                }
            }
        }
    });
    tasks.push(t);
    let (slices, t) = informer::spawn(Api::<EndpointSlice>::all(client.clone()), wc(), {
        let cell = cell.clone();
        move |c| {
            if let Some(ctx) = cell.get() {
                on_slice(ctx, c)
            }
        }
    });
    tasks.push(t);
    let (nodes, t) = informer::spawn(Api::<Node>::all(client.clone()), wc(), {
        let cell = cell.clone();
        move |c| {
            if let Some(ctx) = cell.get() {
                match c {
                    Change::Applied(n) | Change::Deleted(n) => ctx.q.node.add(Key::of(&n)),
                    Change::Relisted => enqueue_all(&ctx.nodes, &ctx.q.node),
                }
                // Leases and pods may name a node that just went away.
                gc::enqueue_all_orphans(ctx);
            }
        }
    });
    tasks.push(t);
    let (leases, t) = informer::spawn(
        Api::<Lease>::namespaced(client.clone(), NODE_LEASE_NS),
        wc(),
        {
            let cell = cell.clone();
            move |c| {
                if let Some(ctx) = cell.get() {
                    match c {
                        Change::Applied(l) | Change::Deleted(l) => ctx.q.node.add(Key {
                            namespace: None,
                            name: l.name_any(),
                        }),
                        Change::Relisted => enqueue_all(&ctx.nodes, &ctx.q.node),
                    }
                }
            }
        },
    );
    tasks.push(t);

    let ctx = Arc::new(Ctx {
        recorder: Recorder::new(client.clone(), "kcontrol-controller-manager"),
        client,
        cfg,
        pods,
        replicasets,
        deployments,
        services,
        slices,
        nodes,
        leases,
        q,
        expectations: Mutex::new(HashMap::new()),
        rs_written: Mutex::new(HashMap::new()),
        nodes_seen: Mutex::new(HashMap::new()),
    });
    let _ = cell.set(ctx.clone());
    ctx.pods.wait_until_ready().await.context("pod cache")?;
    ctx.replicasets
        .wait_until_ready()
        .await
        .context("replicaset cache")?;
    ctx.deployments
        .wait_until_ready()
        .await
        .context("deployment cache")?;
    ctx.services
        .wait_until_ready()
        .await
        .context("service cache")?;
    ctx.slices
        .wait_until_ready()
        .await
        .context("endpointslice cache")?;
    ctx.nodes.wait_until_ready().await.context("node cache")?;
    ctx.leases.wait_until_ready().await.context("lease cache")?;

    enqueue_all(&ctx.replicasets, &ctx.q.replicaset);
    enqueue_all(&ctx.deployments, &ctx.q.deployment);
    enqueue_all(&ctx.services, &ctx.q.service);
    enqueue_all(&ctx.nodes, &ctx.q.node);
    gc::enqueue_all_orphans(&ctx);

    let every = ctx.cfg.resync_period;
    tasks.push(tokio::spawn(informer::resync(
        ctx.replicasets.clone(),
        ctx.q.replicaset.clone(),
        every,
        Key::of,
    )));
    tasks.push(tokio::spawn(informer::resync(
        ctx.deployments.clone(),
        ctx.q.deployment.clone(),
        every,
        Key::of,
    )));
    tasks.push(tokio::spawn(informer::resync(
        ctx.services.clone(),
        ctx.q.service.clone(),
        every,
        Key::of,
    )));
    tasks.push(tokio::spawn(informer::resync(
        ctx.nodes.clone(),
        ctx.q.node.clone(),
        every,
        Key::of,
    )));
    {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                gc::enqueue_all_orphans(&ctx);
            }
        }));
    }

    println!("kcontrol: controller-manager running");
    macro_rules! worker {
        ($name:literal, $queue:expr, $f:path) => {{
            let ctx = ctx.clone();
            informer::worker($name, $queue.clone(), move |k| {
                let ctx = ctx.clone();
                async move { $f(&ctx, k).await }
            })
        }};
    }
    tokio::join!(
        worker!("replicaset", ctx.q.replicaset, replicaset::reconcile),
        worker!("deployment", ctx.q.deployment, deployment::reconcile),
        worker!("endpointslice", ctx.q.service, endpointslice::reconcile),
        worker!("nodelifecycle", ctx.q.node, nodelifecycle::reconcile),
        worker!("garbagecollector", ctx.q.gc, gc::reconcile),
    );
    drop(tasks);
    Ok(())
}

fn enqueue_all<K>(store: &Store<K>, q: &Arc<Queue<Key>>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    for o in store.state() {
        q.add(Key::of(o.as_ref()));
    }
}

fn on_pod(ctx: &Ctx, c: Change<Pod>) {
    let (p, deleted) = match c {
        Change::Applied(p) => (p, false),
        Change::Deleted(p) => (p, true),
        Change::Relisted => {
            enqueue_all(&ctx.replicasets, &ctx.q.replicaset);
            enqueue_all(&ctx.services, &ctx.q.service);
            return;
        }
    };
    if let Some(k) = owner_key(&p, "ReplicaSet") {
        ctx.q.replicaset.add(k);
    }
    endpointslice::enqueue_services_of_pod(ctx, &p);
    if deleted {
        gc::enqueue_dependents(ctx, &p.metadata);
    } else {
        gc::enqueue_if_orphan(ctx, Dependent::pod(&p));
    }
}

fn on_replicaset(ctx: &Ctx, c: Change<ReplicaSet>) {
    match c {
        Change::Applied(rs) => {
            ctx.q.replicaset.add(Key::of(&rs));
            if let Some(k) = owner_key(&rs, "Deployment") {
                ctx.q.deployment.add(k);
            }
            gc::enqueue_if_orphan(ctx, Dependent::replicaset(&rs));
        }
        Change::Deleted(rs) => {
            ctx.q.replicaset.add(Key::of(&rs));
            if let Some(k) = owner_key(&rs, "Deployment") {
                ctx.q.deployment.add(k);
            }
            gc::enqueue_dependents(ctx, &rs.metadata);
        }
        Change::Relisted => enqueue_all(&ctx.deployments, &ctx.q.deployment),
    }
}

fn on_deployment(ctx: &Ctx, c: Change<Deployment>) {
    match c {
        Change::Applied(d) => ctx.q.deployment.add(Key::of(&d)),
        Change::Deleted(d) => gc::enqueue_dependents(ctx, &d.metadata),
        Change::Relisted => enqueue_all(&ctx.deployments, &ctx.q.deployment),
    }
}

fn on_slice(ctx: &Ctx, c: Change<EndpointSlice>) {
    match c {
        Change::Applied(s) | Change::Deleted(s) => {
            if let Some(svc) = s
                .labels()
                .get(endpointslice::SERVICE_NAME_LABEL)
                .filter(|_| endpointslice::is_ours(&s))
            {
                ctx.q
                    .service
                    .add(Key::new(&s.namespace().unwrap_or_default(), svc));
            }
        }
        Change::Relisted => enqueue_all(&ctx.services, &ctx.q.service),
    }
}
