//! The embedded driver: the revision log in one SQLite file (WAL mode).
//!
//! One writer thread owns the write connection and commits appends in
//! groups: it takes every request waiting (up to [`MAX_GROUP`]), runs each
//! one's check-and-insert in a single `BEGIN IMMEDIATE` transaction, commits
//! once (one fsync with `synchronous=FULL`), then publishes the rows and
//! answers. Reads run on a small pool of read connections through
//! `spawn_blocking`; in WAL mode they never block the writer nor see an
//! uncommitted row.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use rusqlite::types::Value;
use rusqlite::{
    Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior, params,
};
use tokio::sync::{broadcast, oneshot};

use crate::driver::{Decide, KeyRange, Log, Revisions, Row, Rows};
use crate::logstructured::LogStore;
use crate::{Result, Revision, StoreError};

/// The embedded store.
pub type SqliteStore = LogStore<SqliteLog>;

/// Appends committed together at most.
pub const MAX_GROUP: usize = 64;
/// Idle read connections kept.
const MAX_IDLE_READERS: usize = 4;
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
BEGIN;
CREATE TABLE IF NOT EXISTS log (
    revision        INTEGER PRIMARY KEY AUTOINCREMENT,
    key             TEXT    NOT NULL,
    created         INTEGER NOT NULL,
    deleted         INTEGER NOT NULL,
    create_revision INTEGER NOT NULL,
    prev_revision   INTEGER NOT NULL,
    value           BLOB    NOT NULL,
    old_value       BLOB    NOT NULL,
    UNIQUE (key, prev_revision)
);
CREATE INDEX IF NOT EXISTS log_key_revision ON log (key, revision);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', 1), ('compact_revision', 0);
COMMIT;
";

const COLUMNS: &str =
    "revision, key, created, deleted, create_revision, prev_revision, value, old_value";

/// SQLite's `synchronous` setting for the write connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    // The discriminants are SQLite's numbers for the setting.
    /// No fsync: an acknowledged write survives a crash of the process, not
    /// of the machine.
    Off = 0,
    /// With WAL, fsync at checkpoints only: survives a crash of the process;
    /// a power loss may roll back the last writes (never corrupts).
    Normal = 1,
    /// fsync of the WAL at every commit: survives power loss too.
    #[default]
    Full = 2,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Synchronous::Off => "OFF",
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

#[derive(Clone, Debug)]
pub struct SqliteOptions {
    pub synchronous: Synchronous,
    /// Committed rows kept for watchers that lag before they read the log.
    pub event_buffer: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Full,
            event_buffer: 1024,
        }
    }
}

impl LogStore<SqliteLog> {
    /// Opens (creating it and its directory if needed) the store at `path`
    /// with the default options.
    pub fn open(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        Self::open_with(path, SqliteOptions::default())
    }

    pub fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> anyhow::Result<Self> {
        Ok(LogStore::new(SqliteLog::open(path.as_ref(), &options)?))
    }
}

/// The revision log in an SQLite file. One `SqliteLog` per file: watchers
/// learn of writes from this process's writer thread, so a second writer
/// (another process) is refused (`flock` on `<path>.lock`).
pub struct SqliteLog {
    path: PathBuf,
    writer: std_mpsc::Sender<Request>,
    readers: Arc<Readers>,
    events: broadcast::Sender<Arc<Row>>,
    /// Held (locked) while the store is open.
    _lock: std::fs::File,
}

impl SqliteLog {
    pub fn open(path: &Path, options: &SqliteOptions) -> anyhow::Result<SqliteLog> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                anyhow::bail!(
                    "{} is open in another store (locked: {})",
                    path.display(),
                    lock_path.display()
                )
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(
                    anyhow::Error::new(e).context(format!("locking {}", lock_path.display()))
                );
            }
        }
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        anyhow::ensure!(
            mode.eq_ignore_ascii_case("wal"),
            "{}: journal_mode is {mode}, not wal",
            path.display()
        );
        conn.pragma_update(None, "synchronous", options.synchronous.pragma())?;
        let synchronous: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
        anyhow::ensure!(
            synchronous == options.synchronous as i64,
            "{}: synchronous is {synchronous}, not {:?}",
            path.display(),
            options.synchronous
        );
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("creating the schema in {}", path.display()))?;
        let version: i64 = conn.query_row(
            "SELECT value FROM meta WHERE name = 'schema_version'",
            [],
            |r| r.get(0),
        )?;
        anyhow::ensure!(
            version == SCHEMA_VERSION,
            "{}: schema version {version}, this kcontrol knows {SCHEMA_VERSION}",
            path.display()
        );

        let (writer, requests) = std_mpsc::channel();
        let (events, _) = broadcast::channel(options.event_buffer.max(1));
        let publish = events.clone();
        std::thread::Builder::new()
            .name("kcontrol-store-writer".into())
            .spawn(move || write_loop(conn, requests, publish))
            .context("starting the store's writer thread")?;
        let readers = Arc::new(Readers {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
        });
        Ok(SqliteLog {
            path: path.to_path_buf(),
            writer,
            readers,
            events,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in a read transaction (one snapshot) off the reactor.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || readers.read(f))
            .await
            .map_err(|e| StoreError::Backend(anyhow::anyhow!("store read task: {e}")))?
    }

    async fn request<T>(&self, request: Request, reply: oneshot::Receiver<Result<T>>) -> Result<T> {
        let stopped =
            || StoreError::Backend(anyhow::anyhow!("the store's writer thread has stopped"));
        self.writer.send(request).map_err(|_| stopped())?;
        reply.await.map_err(|_| stopped())?
    }
}

#[async_trait]
impl Log for SqliteLog {
    async fn append(&self, key: &str, decide: Decide) -> Result<Arc<Row>> {
        let (reply, rx) = oneshot::channel();
        self.request(
            Request::Append(Append {
                key: key.to_string(),
                decide,
                reply,
            }),
            rx,
        )
        .await
    }

    async fn latest(&self, key: &str) -> Result<Option<Row>> {
        let key = key.to_string();
        self.read(move |tx| latest(tx, &key)).await
    }

    async fn list(
        &self,
        range: &KeyRange,
        at: Option<Revision>,
        start_after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Rows> {
        let range = range.clone();
        let start_after = start_after.map(str::to_string);
        self.read(move |tx| list(tx, &range, at, start_after.as_deref(), limit))
            .await
    }

    async fn after(&self, range: &KeyRange, after: Revision, limit: usize) -> Result<Rows> {
        let range = range.clone();
        self.read(move |tx| rows_after(tx, &range, after, limit))
            .await
    }

    async fn revisions(&self) -> Result<Revisions> {
        self.read(|tx| revisions(tx)).await
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.request(Request::Compact { revision, reply }, rx).await
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Row>> {
        self.events.subscribe()
    }
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(anyhow::Error::new(e).context("sqlite"))
}

// ---- reads ----

struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    fn read<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => self.open().map_err(backend)?,
        };
        // A deferred transaction: every statement in it reads one snapshot.
        // Dropping it rolls back, which for reads is just the end.
        let result = match conn.transaction() {
            Ok(tx) => f(&tx),
            Err(e) => Err(backend(e)),
        };
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
        result
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open(&self.path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "query_only", true)?;
        Ok(conn)
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        revision: r.get(0)?,
        key: r.get(1)?,
        created: r.get(2)?,
        deleted: r.get(3)?,
        create_revision: r.get(4)?,
        prev_revision: r.get(5)?,
        value: r.get(6)?,
        old_value: r.get(7)?,
    })
}

fn revisions(tx: &Connection) -> Result<Revisions> {
    tx.prepare_cached(
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'log'), 0), \
                (SELECT value FROM meta WHERE name = 'compact_revision')",
    )
    .and_then(|mut s| {
        s.query_row([], |r| {
            Ok(Revisions {
                current: r.get(0)?,
                compacted: r.get(1)?,
            })
        })
    })
    .map_err(backend)
}

fn latest(tx: &Connection, key: &str) -> Result<Option<Row>> {
    tx.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM log WHERE key = ?1 ORDER BY revision DESC LIMIT 1"
    ))
    .and_then(|mut s| s.query_row([key], row).optional())
    .map_err(backend)
}

/// `key >= ? [AND key < ?] [AND key > ?]` on `column`, with its parameters.
fn key_bounds(
    column: &str,
    range: &KeyRange,
    start_after: Option<&str>,
    params: &mut Vec<Value>,
) -> String {
    let mut sql = format!(" AND {column} >= ?");
    params.push(Value::Text(range.start.clone()));
    if let Some(end) = &range.end {
        sql += &format!(" AND {column} < ?");
        params.push(Value::Text(end.clone()));
    }
    if let Some(after) = start_after {
        sql += &format!(" AND {column} > ?");
        params.push(Value::Text(after.to_string()));
    }
    sql
}

fn sql_limit(limit: Option<usize>) -> Value {
    Value::Integer(limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX)))
}

fn list(
    tx: &Connection,
    range: &KeyRange,
    at: Option<Revision>,
    start_after: Option<&str>,
    limit: Option<usize>,
) -> Result<Rows> {
    let revisions = revisions(tx)?;
    let at = at.unwrap_or(revisions.current);
    if at < revisions.compacted {
        return Err(StoreError::Compacted {
            requested: at,
            compacted: revisions.compacted,
        });
    }
    if at > revisions.current {
        return Err(StoreError::FutureRevision(at));
    }
    // Each key's newest row at `at`, unless it is a tombstone.
    let mut params = vec![Value::Integer(at)];
    let bounds = key_bounds("key", range, start_after, &mut params);
    params.push(sql_limit(limit));
    let columns = COLUMNS
        .split(", ")
        .map(|c| format!("l.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT {columns} FROM log AS l \
         JOIN (SELECT MAX(revision) AS revision FROM log WHERE revision <= ?{bounds} GROUP BY key) AS m \
         ON l.revision = m.revision \
         WHERE l.deleted = 0 ORDER BY l.key LIMIT ?"
    );
    let rows = tx
        .prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_map(rusqlite::params_from_iter(params), row)?
                .collect()
        })
        .map_err(backend)?;
    Ok(Rows { rows, revisions })
}

fn rows_after(tx: &Connection, range: &KeyRange, after: Revision, limit: usize) -> Result<Rows> {
    let revisions = revisions(tx)?;
    if after < revisions.compacted {
        return Err(StoreError::Compacted {
            requested: after,
            compacted: revisions.compacted,
        });
    }
    let mut params = vec![Value::Integer(after)];
    let bounds = key_bounds("key", range, None, &mut params);
    params.push(sql_limit(Some(limit)));
    let sql =
        format!("SELECT {COLUMNS} FROM log WHERE revision > ?{bounds} ORDER BY revision LIMIT ?");
    let rows = tx
        .prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_map(rusqlite::params_from_iter(params), row)?
                .collect()
        })
        .map_err(backend)?;
    Ok(Rows { rows, revisions })
}

// ---- writes ----

struct Append {
    key: String,
    decide: Decide,
    reply: oneshot::Sender<Result<Arc<Row>>>,
}

enum Request {
    Append(Append),
    Compact {
        revision: Revision,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// The writer thread: runs until every `SqliteLog` handle is gone.
fn write_loop(
    mut conn: Connection,
    requests: std_mpsc::Receiver<Request>,
    events: broadcast::Sender<Arc<Row>>,
) {
    while let Ok(first) = requests.recv() {
        let mut group = Vec::new();
        let mut next = Some(first);
        while let Some(request) = next {
            match request {
                Request::Append(append) => group.push(append),
                Request::Compact { revision, reply } => {
                    commit_group(&mut conn, std::mem::take(&mut group), &events);
                    let _ = reply.send(compact(&mut conn, revision));
                }
            }
            next = if group.len() < MAX_GROUP {
                requests.try_recv().ok()
            } else {
                None
            };
        }
        commit_group(&mut conn, group, &events);
    }
}

/// Appends a group in one transaction; answers each once it is durable.
fn commit_group(conn: &mut Connection, group: Vec<Append>, events: &broadcast::Sender<Arc<Row>>) {
    if group.is_empty() {
        return;
    }
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let message = format!("starting a write transaction: {e}");
            for append in group {
                let _ = append
                    .reply
                    .send(Err(StoreError::Backend(anyhow::anyhow!("{message}"))));
            }
            return;
        }
    };
    let mut results = Vec::with_capacity(group.len());
    let mut aborted = false;
    for Append { key, decide, reply } in group {
        let result = if aborted {
            Err(StoreError::Backend(anyhow::anyhow!(
                "the write transaction was rolled back"
            )))
        } else {
            append(&tx, &key, decide)
        };
        // Some errors (disk full, I/O) roll the whole transaction back.
        aborted = aborted || (result.is_err() && tx.is_autocommit());
        results.push((reply, result));
    }
    let committed = if aborted {
        Err("it was rolled back".to_string())
    } else {
        tx.commit().map_err(|e| e.to_string())
    };
    for (reply, result) in results {
        let result = match (&committed, result) {
            (Ok(()), Ok(row)) => {
                let row = Arc::new(row);
                let _ = events.send(row.clone());
                Ok(row)
            }
            (Err(e), Ok(_)) => Err(StoreError::Backend(anyhow::anyhow!(
                "committing the write transaction: {e}"
            ))),
            (_, Err(e)) => Err(e),
        };
        let _ = reply.send(result);
    }
}

fn append(tx: &Transaction<'_>, key: &str, decide: Decide) -> Result<Row> {
    let latest = latest(tx, key)?;
    // A panic in `decide` fails this write, not the writer thread.
    let decided =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decide(latest.as_ref())));
    let new = decided.map_err(|_| {
        StoreError::Backend(anyhow::anyhow!("deciding the write to {key} panicked"))
    })??;
    let inserted = tx
        .prepare_cached(
            "INSERT INTO log (key, created, deleted, create_revision, prev_revision, value, old_value) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .and_then(|mut s| {
            s.execute(params![
                key,
                new.created,
                new.deleted,
                new.create_revision,
                new.prev_revision,
                new.value,
                new.old_value
            ])
        });
    match inserted {
        Ok(_) => {}
        // UNIQUE(key, prev_revision): another row already superseded the
        // one this write was decided on. The check above makes it
        // unreachable; the constraint keeps the log sound regardless.
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == ErrorCode::ConstraintViolation => {
            let current = latest.map_or(0, |l| l.revision);
            return Err(StoreError::Conflict {
                key: key.to_string(),
                current,
            });
        }
        Err(e) => return Err(backend(e)),
    }
    Ok(Row {
        revision: tx.last_insert_rowid(),
        key: key.to_string(),
        created: new.created,
        deleted: new.deleted,
        create_revision: new.create_revision,
        prev_revision: new.prev_revision,
        value: new.value,
        old_value: new.old_value,
    })
}

/// One compaction step (see [`Log::compact`]). Rows at or below the old
/// point that were superseded by then are gone already, so the rows to
/// delete now are those that rows in (old, new] supersede (their
/// `prev_revision`), and the tombstones in (old, new].
fn compact(conn: &mut Connection, revision: Revision) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend)?;
    let revisions = revisions(&tx)?;
    if revision > revisions.current {
        return Err(StoreError::FutureRevision(revision));
    }
    if revision <= revisions.compacted {
        return Ok(());
    }
    let range = params![revisions.compacted, revision];
    tx.execute(
        "DELETE FROM log WHERE revision IN \
         (SELECT prev_revision FROM log WHERE revision > ?1 AND revision <= ?2 AND prev_revision > 0)",
        range,
    )
    .map_err(backend)?;
    tx.execute(
        "DELETE FROM log WHERE deleted = 1 AND revision > ?1 AND revision <= ?2",
        range,
    )
    .map_err(backend)?;
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE name = 'compact_revision'",
        [revision],
    )
    .map_err(backend)?;
    tx.commit().map_err(backend)
}
