//! Compact: forget history at or below a revision, in small steps so that
//! writers are not held up; plus a background compactor that keeps the last
//! N revisions (kine keeps 1000).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::driver::Log;
use crate::{Result, Revision, Store, StoreError};

/// Revisions compacted per step (one write transaction each).
pub const COMPACT_BATCH: Revision = 1000;

/// `FutureRevision` past the current revision; at or below the compaction
/// point it does nothing.
pub(super) async fn compact<L: Log>(log: &L, revision: Revision) -> Result<()> {
    let revisions = log.revisions().await?;
    if revision > revisions.current {
        return Err(StoreError::FutureRevision(revision));
    }
    let mut at = revisions.compacted;
    while at < revision {
        let step = revision.min(at + COMPACT_BATCH);
        log.compact(step).await?;
        at = step;
    }
    Ok(())
}

/// A running background compactor.
pub struct Compactor {
    /// Abort it to stop compacting.
    pub handle: JoinHandle<()>,
    /// The revision it last compacted to (0 before the first compaction).
    pub compacted: watch::Receiver<Revision>,
}

/// Every `interval` (the first time right away), compacts `store` to its
/// current revision minus `keep`. Errors are logged and retried next time.
pub fn spawn_compactor<S: Store + ?Sized>(
    store: Arc<S>,
    interval: Duration,
    keep: Revision,
) -> Compactor {
    let (tx, compacted) = watch::channel(0);
    let handle = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = 0;
        loop {
            ticks.tick().await;
            let target = match store.current_revision().await {
                Ok(current) => current - keep,
                Err(e) => {
                    log::warn!("compactor: reading the current revision: {e}");
                    continue;
                }
            };
            if target <= last {
                continue;
            }
            match store.compact(target).await {
                Ok(()) => {
                    last = target;
                    tx.send_replace(target);
                }
                Err(e) => log::warn!("compactor: compacting to {target}: {e}"),
            }
        }
    });
    Compactor { handle, compacted }
}
