//! What the watchers saw: sessions (a list, then a watch from its
//! resourceVersion), their events, and where the run is.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Instant;

use serde_json::Value;

use crate::CATCH_UP_BOUND;
use crate::writes::Op;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Json,
    Table,
}

/// One event as a client got it.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) ty: String,
    pub(crate) name: String,
    /// `None` where the output does not show it (kubectl's tables).
    pub(crate) rv: Option<i64>,
    pub(crate) seq: u64,
    pub(crate) at: Instant,
    /// Latency counts from here at the earliest: the watch's start, or the
    /// end of the client's last stall.
    pub(crate) since: Instant,
}

/// One list followed by one watch from the list's resourceVersion.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) client: String,
    pub(crate) selector: Option<usize>,
    /// The list's resourceVersion, where the watch started.
    pub(crate) list_rv: i64,
    /// The list's items (name, rv), when the client shows them.
    pub(crate) listed: Option<Vec<(String, i64)>>,
    /// When the watch had its 200.
    pub(crate) watching: Instant,
    pub(crate) events: Vec<Seen>,
    /// (name, seq) of the events other than deletes, to tell quickly
    /// whether the last writes arrived.
    arrived: HashSet<(String, u64)>,
    /// (resourceVersion, events before it) of each BOOKMARK.
    pub(crate) bookmarks: Vec<(i64, usize)>,
    /// Ran until every last write after its list had arrived.
    pub(crate) to_the_end: bool,
    pub(crate) error: Option<String>,
}

impl Session {
    pub(crate) fn new(client: &str, selector: Option<usize>) -> Session {
        Session {
            client: client.to_string(),
            selector,
            list_rv: 0,
            listed: None,
            watching: Instant::now(),
            events: Vec::new(),
            arrived: HashSet::new(),
            bookmarks: Vec::new(),
            to_the_end: false,
            error: None,
        }
    }

    pub(crate) fn selects(&self, writer: usize) -> bool {
        self.selector.is_none_or(|s| s == writer)
    }

    /// Whether every last write (once they are all known) that comes after
    /// the list and that this session selects has arrived.
    pub(crate) fn complete(&self, phase: &Phase) -> bool {
        let lasts = phase.lasts.lock().unwrap();
        let Some((_, lasts)) = &*lasts else {
            return false;
        };
        lasts
            .iter()
            .filter(|o| self.selects(o.writer) && o.rv.unwrap_or(0) > self.list_rv)
            .all(|o| self.arrived.contains(&(o.name.clone(), o.seq)))
    }

    pub(crate) fn push(&mut self, e: Seen) {
        if e.ty != "DELETED" {
            self.arrived.insert((e.name.clone(), e.seq));
        }
        self.events.push(e);
    }
}

/// Where the run is, shared by the writers and the clients.
#[derive(Default)]
pub(crate) struct Phase {
    /// Sessions held throughout that are watching (the writers wait for
    /// them, so that every write is seen by one that shows revisions).
    pub(crate) ready: AtomicUsize,
    /// The writers are done: the next session of every client is its last.
    pub(crate) writes_done: AtomicBool,
    /// When the writers were done, and the last write of every key.
    pub(crate) lasts: Mutex<Option<(Instant, Vec<Op>)>>,
}

impl Phase {
    /// Err once the writers have been done for longer than
    /// [`CATCH_UP_BOUND`]: a session still waiting then has lost something.
    pub(crate) fn catch_up_over(&self) -> Result<(), String> {
        match &*self.lasts.lock().unwrap() {
            Some((done, _)) if done.elapsed() > CATCH_UP_BOUND => Err(format!(
                "not caught up {CATCH_UP_BOUND:?} after the last write"
            )),
            _ => Ok(()),
        }
    }
}

/// When a session stops: at `until`, or (`None`: it is the client's last)
/// once complete.
#[derive(Clone, Copy)]
pub(crate) struct Stop {
    pub(crate) until: Option<Instant>,
}

pub(crate) fn seq_label(meta: &Value) -> Option<u64> {
    meta["labels"]["seq"].as_str()?.parse().ok()
}

pub(crate) fn rv_of(meta: &Value) -> Option<i64> {
    meta["resourceVersion"].as_str()?.parse().ok()
}

/// The metadata of a watch event's object, or of a Table's single row.
pub(crate) fn event_meta(object: &Value, format: Format) -> Option<&Value> {
    match format {
        Format::Json => object.get("metadata"),
        Format::Table => object["rows"].get(0)?["object"].get("metadata"),
    }
}
