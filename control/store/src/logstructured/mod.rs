//! The revision-log layer, in the style of kine's `logstructured`: what
//! create, update, delete, watch and compact mean on an append-only log of
//! rows keyed by a global revision. One file per operation; the storage is a
//! [`Log`] driver.

mod compact;
mod create;
mod delete;
mod read;
mod update;
mod watch;

use std::sync::Arc;

use async_trait::async_trait;

pub use compact::{COMPACT_BATCH, Compactor, spawn_compactor};
pub use watch::{CATCH_UP_BATCH, WATCH_BUFFER};

use crate::driver::{Log, Row};
use crate::{Event, EventKind, KeyValue, ListPage, Result, Revision, Store, WatchStream};

/// A [`Store`] on a revision log.
pub struct LogStore<L: Log> {
    log: Arc<L>,
}

impl<L: Log> Clone for LogStore<L> {
    fn clone(&self) -> Self {
        LogStore {
            log: self.log.clone(),
        }
    }
}

impl<L: Log> LogStore<L> {
    pub fn new(log: L) -> Self {
        LogStore { log: Arc::new(log) }
    }

    /// The storage driver.
    pub fn log(&self) -> &L {
        &self.log
    }

    /// The compaction point: history at or below it is gone.
    pub async fn compacted_revision(&self) -> Result<Revision> {
        Ok(self.log.revisions().await?.compacted)
    }
}

#[async_trait]
impl<L: Log> Store for LogStore<L> {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        read::get(&*self.log, key).await
    }

    async fn list(
        &self,
        prefix: &str,
        at: Option<Revision>,
        start_after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<ListPage> {
        read::list(&*self.log, prefix, at, start_after, limit).await
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        create::create(&*self.log, key, value).await
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: Revision) -> Result<Revision> {
        update::update(&*self.log, key, value, expected).await
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        delete::delete(&*self.log, key, expected).await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        watch::watch(&self.log, prefix, after).await
    }

    async fn current_revision(&self) -> Result<Revision> {
        Ok(self.log.revisions().await?.current)
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        compact::compact(&*self.log, revision).await
    }
}

/// The value a live (not deleted) row holds.
fn key_value(row: &Row) -> KeyValue {
    KeyValue {
        key: row.key.clone(),
        value: row.value.clone(),
        create_revision: row.create_revision(),
        mod_revision: row.revision,
    }
}

/// The value a row replaced or deleted.
fn prev_value(row: &Row) -> KeyValue {
    KeyValue {
        key: row.key.clone(),
        value: row.old_value.clone(),
        create_revision: row.create_revision(),
        mod_revision: row.prev_revision,
    }
}

/// The event a row stands for.
fn event(row: &Row) -> Event {
    if row.deleted {
        let prev = prev_value(row);
        Event {
            kind: EventKind::Delete,
            kv: KeyValue {
                mod_revision: row.revision,
                ..prev.clone()
            },
            prev: Some(prev),
        }
    } else {
        Event {
            kind: EventKind::Put,
            kv: key_value(row),
            prev: (!row.created).then(|| prev_value(row)),
        }
    }
}
