//! The `Store` trait: what the apiserver needs from a backend. Keys are
//! strings (`/registry/<resource>/<namespace>/<name>`), values opaque bytes
//! (JSON objects without their resourceVersion). Every write gets a new
//! global revision; an object's `mod_revision` is its resourceVersion.
//!
//! The same conformance suite runs against every backend.
//!
//! Layout: [`logstructured`] is the revision log (kine's design: one row per
//! write, compare-and-swap on the previous revision, watch = tail of the
//! log) over a [`driver::Log`]; [`sqlite`] is the embedded driver
//! ([`SqliteStore`]); [`etcd`] maps the trait onto an etcd cluster
//! ([`EtcdStore`]); [`conformance`] is the suite; [`mod@bench`] measures a
//! store.

use async_trait::async_trait;

pub mod bench;
pub mod conformance;
pub mod driver;
pub mod etcd;
pub mod logstructured;
pub mod sqlite;

pub use etcd::{EtcdOptions, EtcdStore};
pub use logstructured::{Compactor, LogStore, spawn_compactor};
pub use sqlite::{SqliteOptions, SqliteStore, Synchronous};

/// A global, strictly increasing write counter (etcd's revision).
pub type Revision = i64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created the key.
    pub create_revision: Revision,
    /// Revision of the last write to the key (its resourceVersion).
    pub mod_revision: Revision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// Put: the new value. Delete: the last value, with `mod_revision` set to
    /// the revision of the delete.
    pub kv: KeyValue,
    /// Put that replaced a value, or Delete: the value before.
    pub prev: Option<KeyValue>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {0} already exists")]
    AlreadyExists(String),
    #[error("key {0} not found")]
    NotFound(String),
    /// Compare-and-swap failed: the key is at `current`, not the expected
    /// revision.
    #[error("key {key} is at revision {current}, not the expected one")]
    Conflict { key: String, current: Revision },
    /// The requested revision is older than the compaction point.
    #[error("revision {requested} has been compacted (oldest kept: {compacted})")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    /// The requested revision is in the future.
    #[error("revision {0} is newer than the store")]
    FutureRevision(Revision),
    #[error("store backend: {0:#}")]
    Backend(#[from] anyhow::Error),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A page of a list.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    /// Keys in ascending order.
    pub items: Vec<KeyValue>,
    /// The revision the list was read at (the list's resourceVersion).
    pub revision: Revision,
    /// More keys follow the last item.
    pub more: bool,
}

/// Events from `watch`, in revision order. The stream ends (sender dropped)
/// if the backend cannot continue; an `Err(Compacted)` item means the
/// watcher fell behind compaction.
pub type WatchStream = tokio::sync::mpsc::Receiver<Result<Event>>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The latest value of `key`.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Keys under `prefix` as of revision `at` (latest if `None`), starting
    /// after `start_after` (exclusive), at most `limit` items.
    async fn list(
        &self,
        prefix: &str,
        at: Option<Revision>,
        start_after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<ListPage>;

    /// Creates `key`; `AlreadyExists` if it exists. Returns the revision.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision>;

    /// Replaces `key` if its mod_revision is `expected`; else `Conflict`
    /// (or `NotFound`). Returns the new revision.
    async fn update(&self, key: &str, value: Vec<u8>, expected: Revision) -> Result<Revision>;

    /// Deletes `key` (if `expected` is given, only at that mod_revision).
    /// Returns the delete's revision and the last value.
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)>;

    /// Events for keys under `prefix` with revision > `after`, first the
    /// backlog from the log, then live ones. `Compacted` if `after` is older
    /// than the compaction point.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream>;

    /// The latest revision.
    async fn current_revision(&self) -> Result<Revision>;

    /// Forgets history at or below `revision` (latest values stay).
    async fn compact(&self, revision: Revision) -> Result<()>;
}
