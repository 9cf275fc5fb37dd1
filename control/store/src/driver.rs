//! The boundary between the revision-log layer (`logstructured`, which knows
//! what create, update, delete, watch and compact mean) and a storage driver
//! (`sqlite`, which only stores rows of the log). The same split as kine's
//! `logstructured` / `sqllog`.
//!
//! The log is append-only: every write is one row keyed by a global revision.
//! A row also names the row it supersedes (`prev_revision`, 0 if none), which
//! is what compare-and-swap and compaction work on.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::{Result, Revision};

/// One row of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub revision: Revision,
    pub key: String,
    /// The write created the key (it was absent or deleted before).
    pub created: bool,
    /// The write deleted the key (a tombstone).
    pub deleted: bool,
    /// Revision that created the key; 0 in the row that created it (the row's
    /// own revision, unknown until it is appended): see
    /// [`Row::create_revision`].
    pub create_revision: Revision,
    /// The row this one supersedes (the key's latest row when it was
    /// appended), 0 if none.
    pub prev_revision: Revision,
    /// The new value; empty in a tombstone.
    pub value: Vec<u8>,
    /// The value before (the deleted value in a tombstone); empty if none.
    pub old_value: Vec<u8>,
}

impl Row {
    pub fn create_revision(&self) -> Revision {
        if self.created {
            self.revision
        } else {
            self.create_revision
        }
    }
}

/// A row to append; the driver assigns the revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRow {
    pub created: bool,
    pub deleted: bool,
    pub create_revision: Revision,
    pub prev_revision: Revision,
    pub value: Vec<u8>,
    pub old_value: Vec<u8>,
}

/// Decides, from the key's latest row (tombstones included), what to append;
/// an error aborts the write. Runs inside the driver's write transaction, so
/// the check and the append are one atomic step.
pub type Decide = Box<dyn FnOnce(Option<&Row>) -> Result<NewRow> + Send>;

/// The newest revision written and the compaction point (history at or
/// below it is gone, except each key's latest row).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Revisions {
    pub current: Revision,
    pub compacted: Revision,
}

/// Keys `>= start` and `< end` (no upper bound if `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub start: String,
    pub end: Option<String>,
}

impl KeyRange {
    /// All keys starting with `prefix`. UTF-8 byte order is code point
    /// order, so the end is the prefix with its last incrementable char
    /// incremented.
    pub fn prefix(prefix: &str) -> KeyRange {
        let mut end: Vec<char> = prefix.chars().collect();
        let end = loop {
            match end.pop() {
                None => break None,
                Some(c) => {
                    let next = match c {
                        '\u{D7FF}' => Some('\u{E000}'),
                        c => char::from_u32(c as u32 + 1),
                    };
                    if let Some(n) = next {
                        end.push(n);
                        break Some(end.into_iter().collect());
                    }
                }
            }
        };
        KeyRange {
            start: prefix.to_string(),
            end,
        }
    }

    pub fn contains(&self, key: &str) -> bool {
        key >= self.start.as_str() && self.end.as_deref().is_none_or(|e| key < e)
    }
}

/// Rows read in one snapshot, with that snapshot's revisions.
#[derive(Clone, Debug, Default)]
pub struct Rows {
    pub rows: Vec<Row>,
    pub revisions: Revisions,
}

/// A storage driver for the revision log. Drivers check revisions against
/// their own snapshot (`Compacted`, `FutureRevision`); everything else about
/// keys' lifecycles is decided above them.
#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// Atomically: read `key`'s latest row, call `decide`, append the row it
    /// returns with the next revision, commit durably. Committed rows are
    /// published to [`Log::subscribe`] in revision order before this returns.
    async fn append(&self, key: &str, decide: Decide) -> Result<Arc<Row>>;

    /// The latest row of `key`, tombstones included.
    async fn latest(&self, key: &str) -> Result<Option<Row>>;

    /// For each key in `range` and `> start_after`, its latest row at
    /// revision `at` (latest if `None`) unless that is a tombstone, in key
    /// order, at most `limit` rows (`None`: all). `Compacted` if `at` is
    /// below the compaction point, `FutureRevision` if above the current.
    async fn list(
        &self,
        range: &KeyRange,
        at: Option<Revision>,
        start_after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Rows>;

    /// Rows for keys in `range` with revision `> after`, in revision order,
    /// at most `limit`. `Compacted` if `after` is below the compaction point.
    async fn after(&self, range: &KeyRange, after: Revision, limit: usize) -> Result<Rows>;

    async fn revisions(&self) -> Result<Revisions>;

    /// One compaction step: deletes the rows superseded by a row at or
    /// below `revision` and the tombstones at or below it, and moves the
    /// compaction point there. The caller checks `compacted < revision <=
    /// current` and keeps steps small.
    async fn compact(&self, revision: Revision) -> Result<()>;

    /// Rows as they are committed, in revision order. A receiver that lags
    /// reads the rest from [`Log::after`].
    fn subscribe(&self) -> broadcast::Receiver<Arc<Row>>;
}

#[cfg(test)]
mod tests {
    use super::KeyRange;

    #[test]
    fn prefix_ranges() {
        let r = KeyRange::prefix("/registry/pods/");
        assert_eq!(r.end.as_deref(), Some("/registry/pods0"));
        assert!(r.contains("/registry/pods/a") && r.contains("/registry/pods/"));
        assert!(!r.contains("/registry/pods") && !r.contains("/registry/podsx"));
        assert_eq!(KeyRange::prefix("").end, None);
        assert!(KeyRange::prefix("").contains(""));
        assert_eq!(KeyRange::prefix("a\u{10FFFF}").end.as_deref(), Some("b"));
        assert_eq!(KeyRange::prefix("\u{10FFFF}").end, None);
        assert_eq!(
            KeyRange::prefix("a\u{D7FF}").end.as_deref(),
            Some("a\u{E000}")
        );
        let r = KeyRange::prefix("é");
        assert!(r.contains("é\u{10FFFF}x") && !r.contains("ê"));
    }
}
