//! What is particular to the SQLite backend: files, reopening, the row-level
//! effect of compaction, group commit, the compactor, lagging watchers.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kcontrol_store::conformance::{self, SlowWatcher, block_on, join_all, next_event, next_item};
use kcontrol_store::logstructured::{COMPACT_BATCH, WATCH_BUFFER};
use kcontrol_store::{
    Revision, SqliteOptions, SqliteStore, Store, StoreError, Synchronous, spawn_compactor,
};

fn fast() -> SqliteOptions {
    SqliteOptions {
        synchronous: Synchronous::Off,
        ..SqliteOptions::default()
    }
}

fn rows_in_log(path: &Path) -> i64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("SELECT COUNT(*) FROM log", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn open_creates_directories_and_wal() {
    block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/store.db");
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.current_revision().await.unwrap(), 0);
        assert_eq!(
            store.list("", None, None, None).await.unwrap().items.len(),
            0
        );
        store.create("/k", b"v".to_vec()).await.unwrap();
        assert!(path.exists());
        let conn = rusqlite::Connection::open(&path).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    });
}

#[test]
fn reopen_sees_everything() {
    block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        let a1 = store.create("/t/a", b"a1".to_vec()).await.unwrap();
        let b1 = store.create("/t/b", b"b1".to_vec()).await.unwrap();
        let a2 = store.update("/t/a", b"a2".to_vec(), a1).await.unwrap();
        store.compact(a2).await.unwrap();
        let (bd, _) = store.delete("/t/b", Some(b1)).await.unwrap();
        let c1 = store.create("/t/c", b"c1".to_vec()).await.unwrap();
        drop(store);

        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.current_revision().await.unwrap(), c1);
        assert_eq!(store.compacted_revision().await.unwrap(), a2);
        assert_eq!(store.get("/t/a").await.unwrap().unwrap().mod_revision, a2);
        assert_eq!(store.get("/t/b").await.unwrap(), None);
        let at_a2: Vec<String> = store
            .list("/t/", Some(a2), None, None)
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        assert_eq!(at_a2, ["/t/a", "/t/b"]);
        assert!(matches!(
            store.list("/t/", Some(b1), None, None).await,
            Err(StoreError::Compacted { .. })
        ));
        // The log replays from the compaction point.
        let mut w = store.watch("/t/", a2).await.unwrap();
        assert_eq!(next_event(&mut w).await.kv.mod_revision, bd);
        assert_eq!(next_event(&mut w).await.kv.mod_revision, c1);
        // And goes on.
        let a3 = store.update("/t/a", b"a3".to_vec(), a2).await.unwrap();
        assert_eq!(a3, c1 + 1);
        assert_eq!(next_event(&mut w).await.kv.mod_revision, a3);
    });
}

#[test]
fn group_commit_keeps_revisions_contiguous() {
    block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("store.db")).unwrap();
        let r0 = store.create("/t/x", vec![]).await.unwrap();
        let creates = (0..100).map(|i| {
            let store = &store;
            async move {
                let key = format!("/t/{i}");
                // Every other write fails inside the group: it takes no revision.
                let failed = store.create("/t/x", vec![]).await;
                assert!(matches!(failed, Err(StoreError::AlreadyExists(_))));
                store.create(&key, vec![]).await.unwrap()
            }
        });
        let mut revisions = join_all(creates.collect()).await;
        revisions.sort();
        assert_eq!(revisions, (r0 + 1..=r0 + 100).collect::<Vec<_>>());
    });
}

/// Compaction deletes superseded rows and tombstones, in several steps, and
/// every list at or above the compaction point stays exact.
#[test]
fn compaction_deletes_history_in_steps() {
    block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open_with(&path, fast()).unwrap();
        // A model of the store: revision -> (key -> value) after each write.
        let mut live: BTreeMap<String, (Revision, Vec<u8>)> = BTreeMap::new();
        let mut history: Vec<(Revision, BTreeMap<String, Vec<u8>>)> = Vec::new();
        let total = 2 * COMPACT_BATCH as usize + 500;
        for i in 0..total {
            let key = format!("/t/{:02}", (i * 7) % 40);
            let value = format!("{i}").into_bytes();
            let r = match live.get(&key) {
                Some(&(rev, _)) if i % 11 == 0 => {
                    store.delete(&key, Some(rev)).await.unwrap();
                    live.remove(&key);
                    history.push((store.current_revision().await.unwrap(), snapshot(&live)));
                    continue;
                }
                Some(&(rev, _)) => store.update(&key, value.clone(), rev).await.unwrap(),
                None => store.create(&key, value.clone()).await.unwrap(),
            };
            live.insert(key, (r, value));
            history.push((r, snapshot(&live)));
        }
        let rows_before = rows_in_log(&path);
        assert_eq!(rows_before, total as i64);
        let point = history[2 * COMPACT_BATCH as usize + 100].0;
        store.compact(point).await.unwrap();
        assert_eq!(store.compacted_revision().await.unwrap(), point);
        for (rev, want) in history.iter().filter(|(r, _)| *r >= point) {
            let page = store.list("/t/", Some(*rev), None, None).await.unwrap();
            let got: BTreeMap<String, Vec<u8>> = page
                .items
                .into_iter()
                .map(|kv| (kv.key, kv.value))
                .collect();
            assert_eq!(&got, want, "list at {rev}");
        }
        // Left: each key's row at the point (not tombstones) and everything after.
        let at_point = history.iter().find(|(r, _)| *r == point).unwrap().1.len() as i64;
        let after = history.iter().filter(|(r, _)| *r > point).count() as i64;
        assert_eq!(rows_in_log(&path), at_point + after);
        store
            .compact(store.current_revision().await.unwrap())
            .await
            .unwrap();
        assert_eq!(rows_in_log(&path), live.len() as i64);
    });
}

fn snapshot(live: &BTreeMap<String, (Revision, Vec<u8>)>) -> BTreeMap<String, Vec<u8>> {
    live.iter()
        .map(|(k, (_, v))| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn compactor_keeps_the_last_revisions() {
    block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open_with(dir.path().join("store.db"), fast()).unwrap());
        for i in 0..40 {
            store.create(&format!("/t/{i}"), vec![]).await.unwrap();
        }
        let current = store.current_revision().await.unwrap();
        let mut compactor = spawn_compactor(store.clone(), Duration::from_millis(5), 10);
        let compacted = tokio::time::timeout(
            Duration::from_secs(10),
            compactor.compacted.wait_for(|&r| r == current - 10),
        )
        .await
        .expect("the compactor compacted");
        assert!(compacted.is_ok());
        compactor.handle.abort();
        assert!(
            store
                .list("/t/", Some(current - 10), None, None)
                .await
                .is_ok()
        );
        assert!(matches!(
            store.list("/t/", Some(current - 11), None, None).await,
            Err(StoreError::Compacted { .. })
        ));
    });
}

/// A watcher whose consumer reads nothing falls out of the in-memory buffer,
/// and finds the log compacted past it: `Compacted`, then the end.
#[test]
fn lagging_watcher_gets_compacted() {
    block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions {
            event_buffer: 8,
            ..fast()
        };
        let store = SqliteStore::open_with(dir.path().join("store.db"), options).unwrap();
        let writes = WATCH_BUFFER * 3;
        assert_eq!(
            conformance::slow_watcher_with(&store, writes).await,
            SlowWatcher::Compacted
        );
    });
}

/// The same watcher, when the buffer holds every event, gets them all
/// without reading the log.
#[test]
fn slow_watcher_within_the_buffer_gets_everything() {
    block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_with(dir.path().join("store.db"), fast()).unwrap();
        assert_eq!(
            conformance::slow_watcher_with(&store, 400).await,
            SlowWatcher::Complete
        );
    });
}

#[test]
fn dropping_the_store_ends_its_watches() {
    block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("store.db")).unwrap();
        let mut w = store.watch("/", 0).await.unwrap();
        let r = store.create("/a", vec![]).await.unwrap();
        assert_eq!(next_event(&mut w).await.kv.mod_revision, r);
        drop(store);
        assert!(next_item(&mut w).await.is_none());
    });
}

#[test]
fn watch_from_the_future_waits() {
    block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("store.db")).unwrap();
        let mut w = store.watch("/", 2).await.unwrap();
        for _ in 0..3 {
            store
                .create(
                    &format!("/{}", store.current_revision().await.unwrap()),
                    vec![],
                )
                .await
                .unwrap();
        }
        assert_eq!(next_event(&mut w).await.kv.mod_revision, 3);
    });
}

#[test]
fn one_store_per_file() {
    block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        let err = SqliteStore::open(&path).err().expect("a second open fails");
        assert!(
            format!("{err:#}").contains("open in another store"),
            "{err:#}"
        );
        store.create("/a", vec![]).await.unwrap();
        drop(store);
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.current_revision().await.unwrap(), 1);
    });
}
