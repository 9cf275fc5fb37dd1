//! Watch: the tail of the log. A watcher subscribes to the rows the driver
//! publishes after each commit, then reads the backlog (revision > `after`)
//! from the log; from there it follows the published rows, and reads the log
//! again whenever it misses some (it lagged, or a revision is skipped). The
//! log is the truth and the cursor only moves forward, so events come in
//! revision order with none lost between backlog and live.
//!
//! Writers never wait for watchers: a watcher whose consumer is slow waits on
//! its own bounded channel while the published rows pass it by, then catches
//! up from the log. If compaction has passed its cursor by then, its stream
//! gets `Err(Compacted)` and ends (the consumer re-lists, as after a 410).

use std::sync::{Arc, Weak};

use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;

use crate::driver::{KeyRange, Log, Row, Rows};
use crate::{Event, Result, Revision, WatchStream};

/// Events buffered per watcher before it stops reading.
pub const WATCH_BUFFER: usize = 128;
/// Rows read from the log at a time when catching up.
pub const CATCH_UP_BATCH: usize = 500;

pub(super) async fn watch<L: Log>(
    log: &Arc<L>,
    prefix: &str,
    after: Revision,
) -> Result<WatchStream> {
    let range = KeyRange::prefix(prefix);
    // Subscribe before reading the backlog: a row committed after the
    // backlog's snapshot is then published to us.
    let live = log.subscribe();
    // Reading here reports `Compacted` to the caller rather than the stream.
    let backlog = log.after(&range, after, CATCH_UP_BATCH).await?;
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    let watcher = Watcher {
        log: Arc::downgrade(log),
        range,
        cursor: after,
        tx,
        live,
    };
    tokio::spawn(watcher.run(backlog));
    Ok(rx)
}

/// The stream is over: the consumer went away, or an error was sent.
struct Stop;

struct Watcher<L> {
    /// Weak, so that dropping the store ends its watch streams.
    log: Weak<L>,
    range: KeyRange,
    /// Every row at or below it has been seen.
    cursor: Revision,
    tx: mpsc::Sender<Result<Event>>,
    live: broadcast::Receiver<Arc<Row>>,
}

impl<L: Log> Watcher<L> {
    async fn run(mut self, backlog: Rows) {
        let _ = self.follow(backlog).await;
    }

    async fn follow(&mut self, backlog: Rows) -> Result<(), Stop> {
        if self.deliver(backlog).await? {
            self.catch_up().await?;
        }
        loop {
            let received = tokio::select! {
                _ = self.tx.closed() => return Err(Stop),
                r = self.live.recv() => r,
            };
            match received {
                Ok(row) if row.revision <= self.cursor => {}
                Ok(row) if row.revision == self.cursor + 1 => {
                    self.cursor = row.revision;
                    if self.range.contains(&row.key) {
                        self.send(Ok(super::event(&row))).await?;
                    }
                }
                Ok(_) | Err(RecvError::Lagged(_)) => self.catch_up().await?,
                Err(RecvError::Closed) => return Err(Stop),
            }
        }
    }

    /// Reads the log from the cursor until it is caught up.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        loop {
            let Some(log) = self.log.upgrade() else {
                return Err(Stop);
            };
            let read = log.after(&self.range, self.cursor, CATCH_UP_BATCH).await;
            drop(log);
            match read {
                Ok(rows) => {
                    if !self.deliver(rows).await? {
                        return Ok(());
                    }
                }
                // `Compacted` if compaction passed the cursor.
                Err(e) => {
                    self.send(Err(e)).await?;
                    return Err(Stop);
                }
            }
        }
    }

    /// Sends rows read from the log; true if more may follow (a full batch).
    async fn deliver(&mut self, rows: Rows) -> Result<bool, Stop> {
        let full = rows.rows.len() >= CATCH_UP_BATCH;
        for row in &rows.rows {
            self.send(Ok(super::event(row))).await?;
            self.cursor = row.revision;
        }
        if !full {
            // The read saw every row up to its snapshot's revision.
            self.cursor = self.cursor.max(rows.revisions.current);
        }
        Ok(full)
    }

    async fn send(&self, event: Result<Event>) -> Result<(), Stop> {
        self.tx.send(event).await.map_err(|_| Stop)
    }
}
