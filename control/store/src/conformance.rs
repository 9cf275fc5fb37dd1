//! The behaviour every [`Store`] backend must have: one behaviour, many
//! stores. Each behaviour is a function that panics on a violation and gets
//! a fresh, empty store. A backend's tests run them all with
//!
//! ```text
//! async fn fixture() -> kcontrol_store::conformance::Fixture<MyStore> { ... }
//! kcontrol_store::conformance_tests!(fixture);
//! ```
//!
//! which makes one `#[test]` per behaviour (each on its own runtime), or
//! with [`run_all`].

use std::any::Any;
use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use crate::{Event, EventKind, KeyValue, Revision, Store, StoreError, WatchStream};

/// A store under test, with whatever keeps its backing alive (a temporary
/// directory, a server) until the behaviour is done.
pub struct Fixture<S> {
    pub store: S,
    _guard: Box<dyn Any + Send + Sync>,
}

impl<S: Store> Fixture<S> {
    pub fn new(store: S) -> Self {
        Fixture {
            store,
            _guard: Box::new(()),
        }
    }

    pub fn with_guard(store: S, guard: impl Any + Send + Sync) -> Self {
        Fixture {
            store,
            _guard: Box::new(guard),
        }
    }
}

/// One `#[test]` per behaviour; `$fixture` is an async fn (or closure
/// returning a future) that makes a [`Fixture`].
#[macro_export]
macro_rules! conformance_tests {
    ($fixture:expr) => {
        $crate::conformance_tests!(@each $fixture;
            create_get, create_existing, revisions_increase, update_cas, delete_semantics,
            recreate_after_delete, values_roundtrip, list_prefix, list_pagination,
            list_at_revision, watch_backlog_then_live, watch_event_shapes, watch_prefix,
            watch_from_current, watch_concurrent_writes_in_order, compact_semantics,
            compact_trailing_tombstone, slow_watcher, stalled_watcher_catches_up,
            concurrent_updates_one_wins,
            concurrent_creates_one_wins, concurrent_deletes_one_wins);
    };
    (@each $fixture:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::conformance::block_on(async {
                    let fixture = ($fixture)().await;
                    $crate::conformance::$name(&fixture.store).await;
                });
            }
        )*
    };
}

/// Runs every behaviour, each on a fresh fixture.
pub async fn run_all<S, F, Fut>(fixture: F)
where
    S: Store,
    F: Fn() -> Fut,
    Fut: Future<Output = Fixture<S>>,
{
    create_get(&fixture().await.store).await;
    create_existing(&fixture().await.store).await;
    revisions_increase(&fixture().await.store).await;
    update_cas(&fixture().await.store).await;
    delete_semantics(&fixture().await.store).await;
    recreate_after_delete(&fixture().await.store).await;
    values_roundtrip(&fixture().await.store).await;
    list_prefix(&fixture().await.store).await;
    list_pagination(&fixture().await.store).await;
    list_at_revision(&fixture().await.store).await;
    watch_backlog_then_live(&fixture().await.store).await;
    watch_event_shapes(&fixture().await.store).await;
    watch_prefix(&fixture().await.store).await;
    watch_from_current(&fixture().await.store).await;
    watch_concurrent_writes_in_order(&fixture().await.store).await;
    compact_semantics(&fixture().await.store).await;
    compact_trailing_tombstone(&fixture().await.store).await;
    slow_watcher(&fixture().await.store).await;
    stalled_watcher_catches_up(&fixture().await.store).await;
    concurrent_updates_one_wins(&fixture().await.store).await;
    concurrent_creates_one_wins(&fixture().await.store).await;
    concurrent_deletes_one_wins(&fixture().await.store).await;
}

/// A multi-threaded runtime for one test.
pub fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

// ---- helpers ----

/// How long a behaviour waits for an event that must come.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

fn v(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn kv(key: &str, value: &str, create_revision: Revision, mod_revision: Revision) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: v(value),
        create_revision,
        mod_revision,
    }
}

/// The next item of a watch stream (`None`: the stream ended).
pub async fn next_item(w: &mut WatchStream) -> Option<crate::Result<Event>> {
    tokio::time::timeout(EVENT_TIMEOUT, w.recv())
        .await
        .expect("timed out waiting for a watch event")
}

/// The next event of a watch stream, which must come.
pub async fn next_event(w: &mut WatchStream) -> Event {
    match next_item(w).await {
        Some(Ok(e)) => e,
        Some(Err(e)) => panic!("watch error: {e}"),
        None => panic!("watch stream ended"),
    }
}

/// Polls all futures concurrently; their outputs in order.
pub async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(o) => *out = Some(o),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("polled to completion"))
        .collect()
}

async fn keys<S: Store>(store: &S, prefix: &str, at: Option<Revision>) -> Vec<(String, Vec<u8>)> {
    let page = store.list(prefix, at, None, None).await.unwrap();
    assert!(!page.more);
    page.items
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    items
        .iter()
        .map(|(k, val)| (k.to_string(), v(val)))
        .collect()
}

// ---- single-key operations ----

pub async fn create_get<S: Store>(store: &S) {
    assert_eq!(store.get("/t/a").await.unwrap(), None);
    let r = store.create("/t/a", v("1")).await.unwrap();
    assert!(r > 0);
    assert_eq!(
        store.get("/t/a").await.unwrap(),
        Some(kv("/t/a", "1", r, r))
    );
    assert_eq!(store.current_revision().await.unwrap(), r);
    assert_eq!(store.get("/t/b").await.unwrap(), None);
    assert_eq!(
        store.get("/t/").await.unwrap(),
        None,
        "get is exact, not by prefix"
    );
}

pub async fn create_existing<S: Store>(store: &S) {
    let r = store.create("/t/a", v("1")).await.unwrap();
    match store.create("/t/a", v("2")).await {
        Err(StoreError::AlreadyExists(k)) => assert_eq!(k, "/t/a"),
        other => panic!("create of an existing key: {other:?}"),
    }
    assert_eq!(
        store.get("/t/a").await.unwrap(),
        Some(kv("/t/a", "1", r, r))
    );
    assert_eq!(
        store.current_revision().await.unwrap(),
        r,
        "a failed write takes no revision"
    );
}

pub async fn revisions_increase<S: Store>(store: &S) {
    let mut last = store.current_revision().await.unwrap();
    for i in 0..5 {
        let key = format!("/t/{i}");
        let r = store.create(&key, v("a")).await.unwrap();
        assert!(r > last, "{r} after {last}");
        let u = store.update(&key, v("b"), r).await.unwrap();
        assert!(u > r);
        last = u;
    }
    let (d, _) = store.delete("/t/0", None).await.unwrap();
    assert!(d > last);
    assert_eq!(store.current_revision().await.unwrap(), d);
}

pub async fn update_cas<S: Store>(store: &S) {
    let r1 = store.create("/t/a", v("1")).await.unwrap();
    let r2 = store.update("/t/a", v("2"), r1).await.unwrap();
    assert!(r2 > r1);
    assert_eq!(
        store.get("/t/a").await.unwrap(),
        Some(kv("/t/a", "2", r1, r2))
    );
    match store.update("/t/a", v("3"), r1).await {
        Err(StoreError::Conflict { key, current }) => {
            assert_eq!(key, "/t/a");
            assert_eq!(current, r2);
        }
        other => panic!("update with a stale revision: {other:?}"),
    }
    assert_eq!(
        store.get("/t/a").await.unwrap(),
        Some(kv("/t/a", "2", r1, r2))
    );
    match store.update("/t/missing", v("1"), r1).await {
        Err(StoreError::NotFound(k)) => assert_eq!(k, "/t/missing"),
        other => panic!("update of a missing key: {other:?}"),
    }
    let r3 = store.update("/t/a", v("3"), r2).await.unwrap();
    assert_eq!(
        store.get("/t/a").await.unwrap(),
        Some(kv("/t/a", "3", r1, r3))
    );
}

pub async fn delete_semantics<S: Store>(store: &S) {
    let r1 = store.create("/t/a", v("1")).await.unwrap();
    let r2 = store.update("/t/a", v("2"), r1).await.unwrap();
    match store.delete("/t/a", Some(r1)).await {
        Err(StoreError::Conflict { current, .. }) => assert_eq!(current, r2),
        other => panic!("delete with a stale revision: {other:?}"),
    }
    assert!(store.get("/t/a").await.unwrap().is_some());
    let (rd, last) = store.delete("/t/a", Some(r2)).await.unwrap();
    assert!(rd > r2);
    assert_eq!(
        last,
        kv("/t/a", "2", r1, r2),
        "delete returns the last value"
    );
    assert_eq!(store.current_revision().await.unwrap(), rd);
    assert_eq!(store.get("/t/a").await.unwrap(), None);
    assert!(matches!(
        store.delete("/t/a", None).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.delete("/t/a", Some(rd)).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.update("/t/a", v("3"), rd).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.delete("/t/never", None).await,
        Err(StoreError::NotFound(_))
    ));
    // Unconditional delete.
    let rb = store.create("/t/b", v("b")).await.unwrap();
    let (_, last) = store.delete("/t/b", None).await.unwrap();
    assert_eq!(last, kv("/t/b", "b", rb, rb));
}

pub async fn recreate_after_delete<S: Store>(store: &S) {
    let r1 = store.create("/t/a", v("1")).await.unwrap();
    store.delete("/t/a", None).await.unwrap();
    let r3 = store.create("/t/a", v("again")).await.unwrap();
    assert!(r3 > r1);
    assert_eq!(
        store.get("/t/a").await.unwrap(),
        Some(kv("/t/a", "again", r3, r3))
    );
    assert!(matches!(
        store.create("/t/a", v("x")).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(keys(store, "/t/", None).await, pairs(&[("/t/a", "again")]));
}

pub async fn values_roundtrip<S: Store>(store: &S) {
    let bytes: Vec<u8> = (0..=255).collect();
    let r = store.create("/t/bytes", bytes.clone()).await.unwrap();
    store.create("/t/empty", Vec::new()).await.unwrap();
    let key = "/t/ünïcødé/ключ";
    store.create(key, v("u")).await.unwrap();
    assert_eq!(store.get("/t/bytes").await.unwrap().unwrap().value, bytes);
    assert_eq!(
        store.get("/t/empty").await.unwrap().unwrap().value,
        Vec::<u8>::new()
    );
    assert_eq!(store.get(key).await.unwrap().unwrap().value, v("u"));
    let listed = keys(store, "/t/", None).await;
    assert_eq!(
        listed,
        vec![
            ("/t/bytes".to_string(), bytes.clone()),
            ("/t/empty".into(), vec![]),
            (key.into(), v("u"))
        ]
    );
    let mut w = store.watch("/t/bytes", r - 1).await.unwrap();
    assert_eq!(next_event(&mut w).await.kv.value, bytes);
}

// ---- lists ----

pub async fn list_prefix<S: Store>(store: &S) {
    for key in [
        "/t/a/3", "/t/b/1", "/t/a/1", "/t/ab", "/t/a/4", "/t/a/2", "/u/a/1",
    ] {
        store.create(key, v(key)).await.unwrap();
    }
    store.delete("/t/a/4", None).await.unwrap();
    let page = store.list("/t/a/", None, None, None).await.unwrap();
    assert_eq!(page.revision, store.current_revision().await.unwrap());
    assert!(!page.more);
    let names: Vec<&str> = page.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(names, ["/t/a/1", "/t/a/2", "/t/a/3"]);
    let all = keys(store, "/t/", None).await;
    let names: Vec<&str> = all.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["/t/a/1", "/t/a/2", "/t/a/3", "/t/ab", "/t/b/1"]);
    let names: Vec<String> = keys(store, "/t/a", None)
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(names, ["/t/a/1", "/t/a/2", "/t/a/3", "/t/ab"]);
    assert!(keys(store, "/t/c", None).await.is_empty());
    assert_eq!(
        keys(store, "", None).await.len(),
        6,
        "the empty prefix lists every key"
    );
}

pub async fn list_pagination<S: Store>(store: &S) {
    for i in [4, 1, 6, 0, 3, 5, 2] {
        store
            .create(&format!("/t/p/{i}"), v(&format!("v{i}")))
            .await
            .unwrap();
    }
    let first = store.list("/t/p/", None, None, Some(3)).await.unwrap();
    let rev = first.revision;
    assert!(first.more);
    let mut seen: Vec<KeyValue> = first.items.clone();
    assert_eq!(seen.len(), 3);
    // Writes between pages do not show: the next pages are read at `rev`.
    let r5 = store.get("/t/p/5").await.unwrap().unwrap().mod_revision;
    store.update("/t/p/5", v("changed"), r5).await.unwrap();
    store.delete("/t/p/6", None).await.unwrap();
    store.create("/t/p/9", v("new")).await.unwrap();
    let mut pages = 1;
    let mut more = first.more;
    while more {
        let after = seen.last().unwrap().key.clone();
        let page = store
            .list("/t/p/", Some(rev), Some(&after), Some(3))
            .await
            .unwrap();
        assert_eq!(page.revision, rev);
        assert!(!page.items.is_empty());
        more = page.more;
        seen.extend(page.items);
        pages += 1;
    }
    assert_eq!(pages, 3);
    let got: Vec<(String, Vec<u8>)> = seen.into_iter().map(|kv| (kv.key, kv.value)).collect();
    let want: Vec<(String, Vec<u8>)> = (0..7)
        .map(|i| (format!("/t/p/{i}"), v(&format!("v{i}"))))
        .collect();
    assert_eq!(got, want);
    // A limit that fits exactly has no more; start_after past the end is empty.
    let exact = store.list("/t/p/", Some(rev), None, Some(7)).await.unwrap();
    assert_eq!(exact.items.len(), 7);
    assert!(!exact.more);
    let past = store
        .list("/t/p/", None, Some("/t/p/9"), Some(3))
        .await
        .unwrap();
    assert!(past.items.is_empty() && !past.more);
    // And the latest view has the writes.
    assert_eq!(
        keys(store, "/t/p/", None).await.last().unwrap(),
        &("/t/p/9".to_string(), v("new"))
    );
}

pub async fn list_at_revision<S: Store>(store: &S) {
    let r1 = store.create("/t/a", v("a1")).await.unwrap();
    let r2 = store.create("/t/b", v("b1")).await.unwrap();
    let r3 = store.update("/t/a", v("a2"), r1).await.unwrap();
    let (r4, _) = store.delete("/t/b", None).await.unwrap();
    let r5 = store.create("/t/c", v("c1")).await.unwrap();
    assert_eq!(keys(store, "/t/", Some(r1)).await, pairs(&[("/t/a", "a1")]));
    assert_eq!(
        keys(store, "/t/", Some(r2)).await,
        pairs(&[("/t/a", "a1"), ("/t/b", "b1")])
    );
    assert_eq!(
        keys(store, "/t/", Some(r3)).await,
        pairs(&[("/t/a", "a2"), ("/t/b", "b1")])
    );
    assert_eq!(keys(store, "/t/", Some(r4)).await, pairs(&[("/t/a", "a2")]));
    assert_eq!(
        keys(store, "/t/", Some(r5)).await,
        pairs(&[("/t/a", "a2"), ("/t/c", "c1")])
    );
    let page = store.list("/t/", Some(r2), None, None).await.unwrap();
    assert_eq!(page.revision, r2);
    assert_eq!(page.items[0], kv("/t/a", "a1", r1, r1));
    match store.list("/t/", Some(r5 + 1), None, None).await {
        Err(StoreError::FutureRevision(r)) => assert_eq!(r, r5 + 1),
        other => panic!("list at a future revision: {other:?}"),
    }
}

// ---- watches ----

pub async fn watch_backlog_then_live<S: Store>(store: &S) {
    let r0 = store.current_revision().await.unwrap();
    let a1 = store.create("/t/a", v("1")).await.unwrap();
    let a2 = store.update("/t/a", v("2"), a1).await.unwrap();
    let b1 = store.create("/t/b", v("1")).await.unwrap();
    let mut w = store.watch("/t/", r0).await.unwrap();
    let mut from_middle = store.watch("/t/", a2).await.unwrap();
    let c1 = store.create("/t/c", v("1")).await.unwrap();
    let (ad, _) = store.delete("/t/a", None).await.unwrap();
    let want = [a1, a2, b1, c1, ad];
    let mut got = Vec::new();
    for _ in want {
        got.push(next_event(&mut w).await.kv.mod_revision);
    }
    assert_eq!(got, want, "backlog then live, in revision order, none lost");
    for want in [b1, c1, ad] {
        assert_eq!(next_event(&mut from_middle).await.kv.mod_revision, want);
    }
    // Still live after the backlog.
    let d1 = store.create("/t/d", v("1")).await.unwrap();
    assert_eq!(next_event(&mut w).await.kv.mod_revision, d1);
}

pub async fn watch_event_shapes<S: Store>(store: &S) {
    let r0 = store.current_revision().await.unwrap();
    let mut w = store.watch("/t/", r0).await.unwrap();
    let r1 = store.create("/t/a", v("1")).await.unwrap();
    let r2 = store.update("/t/a", v("2"), r1).await.unwrap();
    let (rd, _) = store.delete("/t/a", None).await.unwrap();
    let r4 = store.create("/t/a", v("3")).await.unwrap();
    let want = [
        Event {
            kind: EventKind::Put,
            kv: kv("/t/a", "1", r1, r1),
            prev: None,
        },
        Event {
            kind: EventKind::Put,
            kv: kv("/t/a", "2", r1, r2),
            prev: Some(kv("/t/a", "1", r1, r1)),
        },
        Event {
            kind: EventKind::Delete,
            kv: kv("/t/a", "2", r1, rd),
            prev: Some(kv("/t/a", "2", r1, r2)),
        },
        Event {
            kind: EventKind::Put,
            kv: kv("/t/a", "3", r4, r4),
            prev: None,
        },
    ];
    for want in want {
        assert_eq!(next_event(&mut w).await, want);
    }
    // The same events replayed from the log.
    let mut replay = store.watch("/t/", r0).await.unwrap();
    assert_eq!(next_event(&mut replay).await.kv, kv("/t/a", "1", r1, r1));
    assert_eq!(
        next_event(&mut replay).await.prev,
        Some(kv("/t/a", "1", r1, r1))
    );
    let delete = next_event(&mut replay).await;
    assert_eq!(
        (delete.kind, delete.kv.mod_revision),
        (EventKind::Delete, rd)
    );
}

pub async fn watch_prefix<S: Store>(store: &S) {
    let r0 = store.current_revision().await.unwrap();
    let mut w = store.watch("/t/a/", r0).await.unwrap();
    let mut exact = store.watch("/t/ab", r0).await.unwrap();
    let mut got = Vec::new();
    for key in ["/t/a/1", "/t/ab", "/t/b", "/t/a", "/t/a/2"] {
        store.create(key, v("x")).await.unwrap();
    }
    for _ in 0..2 {
        got.push(next_event(&mut w).await.kv.key);
    }
    assert_eq!(got, ["/t/a/1", "/t/a/2"]);
    assert_eq!(next_event(&mut exact).await.kv.key, "/t/ab");
    // Nothing else came in between: the next event is the next matching write.
    store.create("/t/a/3", v("x")).await.unwrap();
    assert_eq!(next_event(&mut w).await.kv.key, "/t/a/3");
}

pub async fn watch_from_current<S: Store>(store: &S) {
    store.create("/t/old", v("x")).await.unwrap();
    let now = store.current_revision().await.unwrap();
    let mut w = store.watch("/t/", now).await.unwrap();
    let r = store.create("/t/new", v("x")).await.unwrap();
    let e = next_event(&mut w).await;
    assert_eq!((e.kv.key.as_str(), e.kv.mod_revision), ("/t/new", r));
}

/// Concurrent writers: the watcher sees exactly the acknowledged writes, in
/// strictly increasing revision order.
pub async fn watch_concurrent_writes_in_order<S: Store>(store: &S) {
    let r0 = store.current_revision().await.unwrap();
    let mut w = store.watch("/t/", r0).await.unwrap();
    let writers = (0..4).map(|t| async move {
        let mut acked = Vec::new();
        for i in 0..40 {
            let key = format!("/t/{t}/{i}");
            let r = store.create(&key, v("x")).await.unwrap();
            acked.push(r);
            if i % 4 == 0 {
                acked.push(store.update(&key, v("y"), r).await.unwrap());
            }
        }
        acked
    });
    let acked: BTreeSet<Revision> = join_all(writers.collect())
        .await
        .into_iter()
        .flatten()
        .collect();
    let mut got = Vec::new();
    for _ in 0..acked.len() {
        got.push(next_event(&mut w).await.kv.mod_revision);
    }
    assert!(
        got.windows(2).all(|p| p[0] < p[1]),
        "events out of order: {got:?}"
    );
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), acked);
}

// ---- compaction ----

pub async fn compact_semantics<S: Store>(store: &S) {
    let a1 = store.create("/t/a", v("a1")).await.unwrap();
    let a2 = store.update("/t/a", v("a2"), a1).await.unwrap();
    let a3 = store.update("/t/a", v("a3"), a2).await.unwrap();
    let b1 = store.create("/t/b", v("b1")).await.unwrap();
    let (bd, _) = store.delete("/t/b", None).await.unwrap();
    let d1 = store.create("/t/d", v("d1")).await.unwrap();
    let c1 = store.create("/t/c", v("c1")).await.unwrap();
    let d2 = store.update("/t/d", v("d2"), d1).await.unwrap();
    // Compact at c1: d1 stays (it is the latest at c1), the rest of history goes.
    store.compact(c1).await.unwrap();
    assert_eq!(
        store.get("/t/a").await.unwrap(),
        Some(kv("/t/a", "a3", a1, a3))
    );
    assert_eq!(store.get("/t/b").await.unwrap(), None);
    assert_eq!(
        store.get("/t/d").await.unwrap(),
        Some(kv("/t/d", "d2", d1, d2))
    );
    assert_eq!(
        keys(store, "/t/", Some(c1)).await,
        pairs(&[("/t/a", "a3"), ("/t/c", "c1"), ("/t/d", "d1")])
    );
    assert_eq!(
        keys(store, "/t/", None).await,
        pairs(&[("/t/a", "a3"), ("/t/c", "c1"), ("/t/d", "d2")])
    );
    match store.list("/t/", Some(b1), None, None).await {
        Err(StoreError::Compacted {
            requested,
            compacted,
        }) => assert_eq!((requested, compacted), (b1, c1)),
        other => panic!("list below the compaction point: {other:?}"),
    }
    match store.watch("/t/", bd).await {
        Err(StoreError::Compacted {
            requested,
            compacted,
        }) => assert_eq!((requested, compacted), (bd, c1)),
        Err(other) => panic!("watch below the compaction point: {other:?}"),
        Ok(_) => panic!("watch below the compaction point succeeded"),
    }
    // Watching from the compaction point misses nothing.
    let mut w = store.watch("/t/", c1).await.unwrap();
    let e = next_event(&mut w).await;
    assert_eq!(
        (e.kv.mod_revision, e.prev),
        (d2, Some(kv("/t/d", "d1", d1, d1)))
    );
    // Compacting again below the point does nothing; above the store fails.
    store.compact(a2).await.unwrap();
    assert!(store.list("/t/", Some(c1), None, None).await.is_ok());
    assert!(matches!(
        store.compact(d2 + 1).await,
        Err(StoreError::FutureRevision(_))
    ));
    // The store goes on: CAS on kept revisions, create of a compacted-away key.
    let a4 = store.update("/t/a", v("a4"), a3).await.unwrap();
    assert!(a4 > d2);
    let b2 = store.create("/t/b", v("b2")).await.unwrap();
    assert!(matches!(
        store.create("/t/b", v("b3")).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(
        store.get("/t/b").await.unwrap(),
        Some(kv("/t/b", "b2", b2, b2))
    );
    assert_eq!(next_event(&mut w).await.kv.mod_revision, a4);
    assert_eq!(next_event(&mut w).await.kv.mod_revision, b2);
    // Everything, to the current revision.
    let now = store.current_revision().await.unwrap();
    store.compact(now).await.unwrap();
    assert_eq!(keys(store, "/t/", Some(now)).await.len(), 4);
}

/// Compacting away the newest row (a tombstone) does not rewind revisions.
pub async fn compact_trailing_tombstone<S: Store>(store: &S) {
    store.create("/t/a", v("1")).await.unwrap();
    let (rd, _) = store.delete("/t/a", None).await.unwrap();
    store.compact(rd).await.unwrap();
    assert_eq!(store.current_revision().await.unwrap(), rd);
    assert!(keys(store, "/t/", None).await.is_empty());
    let r = store.create("/t/a", v("2")).await.unwrap();
    assert!(r > rd, "revision {r} after compacting at {rd}");
}

/// How a slow watcher's stream went.
#[derive(Debug, PartialEq, Eq)]
pub enum SlowWatcher {
    /// It got every event.
    Complete,
    /// It got the events up to some revision, then `Compacted`, then its
    /// stream ended.
    Compacted,
}

/// `writers` concurrent writers each creating `per_writer` keys under /t/;
/// the revisions their creates were acknowledged at.
async fn create_concurrently<S: Store>(
    store: &S,
    writers: usize,
    per_writer: usize,
) -> BTreeSet<Revision> {
    let writers = (0..writers).map(|t| async move {
        let mut acked = Vec::new();
        for i in 0..per_writer {
            acked.push(store.create(&format!("/t/{t}/{i}"), v("x")).await.unwrap());
        }
        acked
    });
    join_all(writers.collect())
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// A watcher that reads nothing while `writes` writes happen and the store
/// is compacted to the end: it must not hold up the writers, and must get
/// either every event or an unbroken prefix of them followed by
/// `Compacted`. Never a silent gap.
pub async fn slow_watcher_with<S: Store>(store: &S, writes: usize) -> SlowWatcher {
    let r0 = store.current_revision().await.unwrap();
    let mut w = store.watch("/t/", r0).await.unwrap();
    let acked = create_concurrently(store, 4, writes.div_ceil(4)).await;
    store
        .compact(store.current_revision().await.unwrap())
        .await
        .unwrap();
    let marker = store.create("/t/marker", v("x")).await.unwrap();
    let mut got = Vec::new();
    let outcome = loop {
        match next_item(&mut w).await {
            Some(Ok(e)) => {
                got.push(e.kv.mod_revision);
                if e.kv.mod_revision == marker {
                    break SlowWatcher::Complete;
                }
            }
            Some(Err(StoreError::Compacted { .. })) => {
                assert!(
                    next_item(&mut w).await.is_none(),
                    "the stream goes on after Compacted"
                );
                break SlowWatcher::Compacted;
            }
            Some(Err(e)) => panic!("slow watcher: {e}"),
            None => panic!("slow watcher: the stream ended without an error"),
        }
    };
    assert!(got.windows(2).all(|p| p[0] < p[1]), "events out of order");
    let last = got.last().copied().unwrap_or(r0);
    let want: Vec<Revision> = acked
        .iter()
        .copied()
        .chain([marker])
        .filter(|&r| r <= last)
        .collect();
    assert_eq!(got, want, "a slow watcher lost events");
    outcome
}

pub async fn slow_watcher<S: Store>(store: &S) {
    slow_watcher_with(store, 200).await;
}

/// A watcher that reads nothing while more writes happen than any buffer
/// between the store and it holds (its stream's, the SQLite driver's
/// published rows, etcd's responses), with no compaction: once it reads,
/// it gets every event, in order. This is the path where a watcher has
/// fallen behind the live rows and must catch up from the log (SQLite) or
/// re-watch from its cursor (etcd); `slow_watcher` compacts, so it only
/// shows that such a watcher ends without a gap.
pub async fn stalled_watcher_catches_up<S: Store>(store: &S) {
    let r0 = store.current_revision().await.unwrap();
    let mut w = store.watch("/t/", r0).await.unwrap();
    let acked = create_concurrently(store, 4, 500).await;
    let mut got = Vec::new();
    while got.len() < acked.len() {
        let item = tokio::time::timeout(EVENT_TIMEOUT, w.recv()).await;
        let n = got.len();
        match item {
            Ok(Some(Ok(e))) => got.push(e.kv.mod_revision),
            Ok(Some(Err(e))) => panic!("stalled watcher, after {n} events: {e}"),
            Ok(None) => panic!("stalled watcher: the stream ended after {n} events"),
            Err(_) => panic!(
                "stalled watcher: {n} of {} events, then none for {EVENT_TIMEOUT:?}",
                acked.len()
            ),
        }
    }
    let want: Vec<Revision> = acked.into_iter().collect();
    assert_eq!(
        got, want,
        "a stalled watcher lost, repeated or reordered events"
    );
}

// ---- concurrency ----

/// Updates racing with the same expected revision: exactly one wins.
pub async fn concurrent_updates_one_wins<S: Store>(store: &S) {
    let r1 = store.create("/t/a", v("0")).await.unwrap();
    let updates = (0..8).map(|i| store.update("/t/a", v(&format!("{i}")), r1));
    let results = join_all(updates.collect()).await;
    let winners: Vec<(usize, Revision)> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().ok().map(|&r| (i, r)))
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let (i, rev) = winners[0];
    for r in &results {
        match r {
            Ok(_) => {}
            Err(StoreError::Conflict { current, .. }) => assert_eq!(*current, rev),
            Err(e) => panic!("losing update: {e}"),
        }
    }
    assert_eq!(
        store.get("/t/a").await.unwrap(),
        Some(kv("/t/a", &format!("{i}"), r1, rev))
    );
}

pub async fn concurrent_creates_one_wins<S: Store>(store: &S) {
    let creates = (0..8).map(|i| store.create("/t/a", v(&format!("{i}"))));
    let results = join_all(creates.collect()).await;
    let winners: Vec<(usize, Revision)> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().ok().map(|&r| (i, r)))
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Ok(_) | Err(StoreError::AlreadyExists(_))))
    );
    let (i, rev) = winners[0];
    assert_eq!(
        store.get("/t/a").await.unwrap(),
        Some(kv("/t/a", &format!("{i}"), rev, rev))
    );
}

pub async fn concurrent_deletes_one_wins<S: Store>(store: &S) {
    let r1 = store.create("/t/a", v("0")).await.unwrap();
    let deletes = (0..8).map(|i| store.delete("/t/a", if i % 2 == 0 { None } else { Some(r1) }));
    let results = join_all(deletes.collect()).await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    for r in results {
        match r {
            Ok((_, last)) => assert_eq!(last, kv("/t/a", "0", r1, r1)),
            Err(StoreError::NotFound(_)) => {}
            Err(e) => panic!("losing delete: {e}"),
        }
    }
}
