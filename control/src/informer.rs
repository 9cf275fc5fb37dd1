//! The informer machinery the scheduler and the controllers share, in the
//! shape of client-go's: one watch per kind feeding a reflector (a local
//! cache), event handlers that turn changes into keys, and work queues whose
//! workers reconcile one key at a time against the caches (level-triggered:
//! a reconcile looks at the whole current state, never at the event).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

/// What an event handler is told.
pub enum Change<K> {
    /// Added or modified (the cache already holds this version).
    Applied(K),
    /// Deleted (the cache no longer holds it); the last known state.
    Deleted(K),
    /// The watch (re)listed: the cache was replaced wholesale and deletions
    /// in between may have gone unseen. Handlers enqueue everything.
    Relisted,
}

/// Starts a reflector for `api` whose changes go to `handler` after the
/// cache has taken them. Returns the cache; the task runs until the
/// returned handle is aborted.
pub fn spawn<K, F>(
    api: Api<K>,
    cfg: watcher::Config,
    handler: F,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
    F: Fn(Change<K>) + Send + 'static,
{
    let (reader, writer) = reflector::store();
    let task = tokio::spawn(async move {
        let stream = watcher(api, cfg).default_backoff().reflect(writer);
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Apply(o)) => handler(Change::Applied(o)),
                Ok(watcher::Event::Delete(o)) => handler(Change::Deleted(o)),
                Ok(watcher::Event::InitDone) => handler(Change::Relisted),
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                // The backoff retries; the cache keeps its last state meanwhile.
                Err(e) => eprintln!("kcontrol: watch {}: {e}", K::plural(&Default::default())),
            }
        }
    });
    (reader, task)
}

/// Aborts the tasks when dropped, so that cancelling `run` stops them.
#[derive(Default)]
pub struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Tasks {
    pub fn push(&mut self, t: tokio::task::JoinHandle<()>) {
        self.0.push(t);
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// `namespace/name` (or `name` for cluster-scoped objects).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub namespace: Option<String>,
    pub name: String,
}

impl Key {
    pub fn of<K: Resource>(o: &K) -> Key {
        Key {
            namespace: o.meta().namespace.clone(),
            name: o.meta().name.clone().unwrap_or_default(),
        }
    }

    pub fn new(namespace: &str, name: &str) -> Key {
        Key {
            namespace: Some(namespace.to_string()),
            name: name.to_string(),
        }
    }

    pub fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or_default()
    }

    /// Looks the key up in a cache.
    pub fn get<K>(&self, store: &Store<K>) -> Option<Arc<K>>
    where
        K: Resource + Clone + 'static,
        K::DynamicType: Default + Eq + Hash + Clone,
    {
        let mut r = reflector::ObjectRef::new(&self.name);
        if let Some(ns) = &self.namespace {
            r = r.within(ns);
        }
        store.get(&r)
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// A de-duplicating FIFO of keys: a key queued twice is reconciled once.
pub struct Queue<T> {
    inner: Mutex<QueueInner<T>>,
    notify: Notify,
}

struct QueueInner<T> {
    order: VecDeque<T>,
    queued: HashSet<T>,
}

impl<T: Clone + Eq + Hash + Send + Sync + 'static> Queue<T> {
    pub fn new() -> Arc<Queue<T>> {
        Arc::new(Queue {
            inner: Mutex::new(QueueInner {
                order: VecDeque::new(),
                queued: HashSet::new(),
            }),
            notify: Notify::new(),
        })
    }

    pub fn add(&self, t: T) {
        let mut q = self.inner.lock().expect("queue lock");
        if q.queued.insert(t.clone()) {
            q.order.push_back(t);
            self.notify.notify_one();
        }
    }

    /// Queues `t` once `after` has passed.
    pub fn add_after(self: &Arc<Self>, t: T, after: Duration) {
        let q = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(q) = q.upgrade() {
                q.add(t);
            }
        });
    }

    pub async fn next(&self) -> T {
        loop {
            let notified = self.notify.notified();
            {
                let mut q = self.inner.lock().expect("queue lock");
                if let Some(t) = q.order.pop_front() {
                    q.queued.remove(&t);
                    return t;
                }
            }
            notified.await;
        }
    }
}

/// What a reconcile asks for next.
pub enum Next {
    /// Nothing until something changes (or the periodic resync).
    Done,
    /// Look again after this long (a time-based condition is pending).
    After(Duration),
}

/// Runs `reconcile` on the keys of `queue`, one at a time, forever. A
/// failed reconcile is retried with a per-key exponential backoff
/// (0.2 s doubling up to 30 s), as client-go's rate-limited queue does.
pub async fn worker<T, F, Fut>(name: &'static str, queue: Arc<Queue<T>>, reconcile: F)
where
    T: Clone + Eq + Hash + Send + Sync + std::fmt::Display + 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Next>>,
{
    let mut failures: HashMap<T, u32> = HashMap::new();
    loop {
        let key = queue.next().await;
        match reconcile(key.clone()).await {
            Ok(next) => {
                failures.remove(&key);
                if let Next::After(d) = next {
                    queue.add_after(key, d);
                }
            }
            Err(e) => {
                let n = failures.entry(key.clone()).or_insert(0);
                *n += 1;
                let delay =
                    Duration::from_millis(200u64 << (*n).min(8)).min(Duration::from_secs(30));
                if *n <= 3 || (*n).is_power_of_two() {
                    eprintln!("kcontrol: {name} {key}: {e:#} (retry in {delay:?})");
                }
                queue.add_after(key, delay);
            }
        }
    }
}

/// Queues every key of `store` into `queue` every `period`.
pub async fn resync<K, T>(
    store: Store<K>,
    queue: Arc<Queue<T>>,
    period: Duration,
    to_key: fn(&K) -> T,
) where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
    T: Clone + Eq + Hash + Send + Sync + 'static,
{
    let mut ticker = tokio::time::interval(period);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        for o in store.state() {
            queue.add(to_key(&o));
        }
    }
}

/// The controlling owner reference of an object, if any.
pub fn controller_of<K: Resource>(
    o: &K,
) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
    o.meta()
        .owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true))
}
