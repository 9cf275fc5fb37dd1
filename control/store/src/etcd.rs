//! The etcd backend: the [`Store`] trait mapped onto etcd's own revisioned
//! key-value store, for users who outgrow one machine (several apiservers
//! on one etcd cluster).
//!
//! Mapping:
//! - a store key `K` is the etcd key `PREFIX K` (the prefix is empty unless
//!   several kcontrol clusters share one etcd); values are stored as is;
//! - a key's `mod_revision`/`create_revision` are etcd's, and the store's
//!   revision is etcd's revision (the header revision of the response), so
//!   resourceVersions are etcd revisions, as in Kubernetes;
//! - create = transaction `create_revision(K) == 0 → put`; update =
//!   `mod_revision(K) == expected ∧ version(K) > 0 → put`; delete =
//!   `version(K) > 0 [∧ mod_revision(K) == expected] → delete`; the `else`
//!   branch reads the key, which tells `NotFound` from `Conflict` atomically;
//! - list = a range read at a revision (`limit`, `more`), pages after the
//!   first read at the first page's revision;
//! - watch = an etcd watch from `after + 1` with previous values; etcd's
//!   compaction notice becomes `Err(Compacted)`;
//! - compact = etcd compaction.
//!
//! Failure handling: every request has a deadline (no hangs when etcd is
//! unreachable). Requests that fail in a way that can be transient (no
//! connection, no leader, a member going away) are retried until the
//! deadline, across the endpoints. A retried write that may have been
//! applied the first time is recognised by its value (see
//! [`EtcdStore::create`]), so a retry never turns a success into an error.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, GetResponse,
    Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::{
    Event, EventKind, KeyValue, ListPage, Result, Revision, Store, StoreError, WatchStream,
};

/// Events buffered per watcher (as the embedded store).
pub const WATCH_BUFFER: usize = 128;

/// Parses `etcd://HOST:PORT[,HOST:PORT…]` into client endpoints
/// (`http://HOST:PORT`).
pub fn parse_url(url: &str) -> anyhow::Result<Vec<String>> {
    let rest = url
        .strip_prefix("etcd://")
        .ok_or_else(|| anyhow::anyhow!("{url:?}: expected etcd://HOST:PORT[,HOST:PORT…]"))?;
    let rest = rest.trim_end_matches('/');
    let mut out = Vec::new();
    for ep in rest.split(',') {
        let ep = ep.trim();
        let Some((host, port)) = ep.rsplit_once(':') else {
            anyhow::bail!("{url:?}: endpoint {ep:?} has no port (HOST:PORT)");
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            anyhow::bail!("{url:?}: endpoint {ep:?} is not HOST:PORT");
        }
        out.push(format!("http://{ep}"));
    }
    Ok(out)
}

#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Prepended to every key (for several clusters on one etcd).
    pub key_prefix: String,
    /// How long one store operation may take, retries included.
    pub request_timeout: Duration,
    /// How long one attempt may take.
    pub attempt_timeout: Duration,
    /// How long a watch keeps trying to reconnect before its stream ends.
    pub watch_retry: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            key_prefix: String::new(),
            request_timeout: Duration::from_secs(15),
            attempt_timeout: Duration::from_secs(5),
            watch_retry: Duration::from_secs(30),
        }
    }
}

struct Inner {
    client: Client,
    endpoints: Vec<String>,
    opts: EtcdOptions,
}

/// A [`Store`] on an etcd cluster. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

/// Why an attempt failed.
enum Failure {
    /// Worth another attempt (connection, leader election, timeout).
    Transient(String),
    /// An answer that retrying will not change.
    Final(StoreError),
}

fn classify(e: etcd_client::Error) -> Failure {
    use etcd_client::Error as E;
    match e {
        E::TransportError(e) => Failure::Transient(format!("transport: {e}")),
        E::IoError(e) => Failure::Transient(format!("io: {e}")),
        E::GRpcStatus(s) => {
            use tonic::Code;
            let msg = s.message().to_string();
            match s.code() {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Aborted
                | Code::Unknown
                | Code::ResourceExhausted
                | Code::Cancelled => Failure::Transient(format!("{:?}: {msg}", s.code())),
                _ => Failure::Final(StoreError::Backend(anyhow::anyhow!(
                    "etcd: {:?}: {msg}",
                    s.code()
                ))),
            }
        }
        E::WatchError(e) => Failure::Transient(format!("watch: {e}")),
        other => Failure::Final(StoreError::Backend(anyhow::anyhow!("etcd: {other}"))),
    }
}

fn is_compacted(msg: &str) -> bool {
    msg.contains("required revision has been compacted")
}

fn is_future(msg: &str) -> bool {
    msg.contains("required revision is a future revision")
}

/// The smallest key after every key starting with `prefix` (etcd's
/// `range_end` for a prefix); `[0]` (to the end of the keyspace) if none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
    h.map(|h| h.revision())
        .ok_or_else(|| StoreError::Backend(anyhow::anyhow!("etcd: a response without a header")))
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://HOST:PORT`) and checks that the
    /// cluster answers within the request timeout.
    pub async fn connect(endpoints: &[String], opts: EtcdOptions) -> Result<EtcdStore> {
        let connect = ConnectOptions::new()
            .with_connect_timeout(opts.attempt_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
        let client = tokio::time::timeout(
            opts.request_timeout,
            Client::connect(endpoints, Some(connect)),
        )
        .await
        .map_err(|_| {
            StoreError::Backend(anyhow::anyhow!(
                "etcd at {}: no connection within {:?}",
                endpoints.join(","),
                opts.request_timeout
            ))
        })?
        .map_err(|e| {
            StoreError::Backend(anyhow::anyhow!("etcd at {}: {e}", endpoints.join(",")))
        })?;
        let store = EtcdStore {
            inner: Arc::new(Inner {
                client,
                endpoints: endpoints.to_vec(),
                opts,
            }),
        };
        store.current_revision().await.map_err(|e| {
            StoreError::Backend(anyhow::anyhow!(
                "etcd at {} does not answer: {e}",
                endpoints.join(",")
            ))
        })?;
        Ok(store)
    }

    /// Connects to an `etcd://HOST:PORT[,…]` URL.
    pub async fn connect_url(url: &str, opts: EtcdOptions) -> Result<EtcdStore> {
        let endpoints = parse_url(url)?;
        EtcdStore::connect(&endpoints, opts).await
    }

    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    fn key(&self, key: &str) -> Vec<u8> {
        let mut k = self.inner.opts.key_prefix.as_bytes().to_vec();
        k.extend_from_slice(key.as_bytes());
        k
    }

    fn unkey(&self, key: &[u8]) -> Result<String> {
        let p = self.inner.opts.key_prefix.as_bytes();
        let k = key.strip_prefix(p).ok_or_else(|| {
            StoreError::Backend(anyhow::anyhow!(
                "etcd returned a key outside the prefix: {}",
                String::from_utf8_lossy(key)
            ))
        })?;
        String::from_utf8(k.to_vec())
            .map_err(|_| StoreError::Backend(anyhow::anyhow!("etcd key is not UTF-8")))
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue> {
        Ok(KeyValue {
            key: self.unkey(kv.key())?,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
        })
    }

    /// `[start, end)` for every key starting with `prefix`. etcd wants a
    /// non-empty start key: the empty one is `[0]`.
    fn range(&self, prefix: &str) -> (Vec<u8>, Vec<u8>) {
        let start = self.key(prefix);
        let end = prefix_end(&start);
        let start = if start.is_empty() { vec![0] } else { start };
        (start, end)
    }

    /// Runs `attempt` until it answers, fails for good, or the request
    /// deadline passes. `what` names the operation in errors.
    async fn call<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Failure>>,
    {
        let opts = &self.inner.opts;
        let deadline = Instant::now() + opts.request_timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let per_try = left.min(opts.attempt_timeout);
            let err = match tokio::time::timeout(per_try, attempt(self.inner.client.clone())).await
            {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(Failure::Final(e))) => return Err(e),
                Ok(Err(Failure::Transient(e))) => e,
                Err(_) => format!("no answer within {per_try:?}"),
            };
            if Instant::now() + backoff >= deadline {
                return Err(StoreError::Backend(anyhow::anyhow!(
                    "etcd {what}: gave up after {:?} (endpoints {}): {err}",
                    opts.request_timeout,
                    self.inner.endpoints.join(",")
                )));
            }
            log::debug!("etcd {what}: retrying: {err}");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    async fn txn(&self, what: &str, txn: Txn) -> Result<TxnResponse> {
        self.call(what, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await.map_err(classify) }
        })
        .await
    }

    /// A range read; `Compacted`/`FutureRevision` for a revision out of
    /// etcd's window.
    async fn range_at(
        &self,
        what: &str,
        start: Vec<u8>,
        opts: GetOptions,
        at: Option<Revision>,
    ) -> Result<GetResponse> {
        let r = self
            .call(what, |mut c| {
                let (start, opts) = (start.clone(), opts.clone());
                async move {
                    match c.get(start, Some(opts)).await {
                        Ok(r) => Ok(Ok(r)),
                        Err(etcd_client::Error::GRpcStatus(s)) if is_compacted(s.message()) => {
                            Ok(Err(true))
                        }
                        Err(etcd_client::Error::GRpcStatus(s)) if is_future(s.message()) => {
                            Ok(Err(false))
                        }
                        Err(e) => Err(classify(e)),
                    }
                }
            })
            .await?;
        match (r, at) {
            (Ok(r), _) => Ok(r),
            (Err(true), Some(at)) => Err(StoreError::Compacted {
                requested: at,
                compacted: self.compaction_point(at).await,
            }),
            (Err(false), Some(at)) => Err(StoreError::FutureRevision(at)),
            (Err(_), None) => Err(StoreError::Backend(anyhow::anyhow!(
                "etcd {what}: revision error on a read at the latest revision"
            ))),
        }
    }

    /// The compaction point, learned as etcd tells it: a watch from a
    /// compacted revision is refused with the compaction revision. Falls
    /// back to `requested + 1` (a lower bound) if etcd does not say.
    async fn compaction_point(&self, requested: Revision) -> Revision {
        let probe = async {
            let mut c = self.inner.client.clone();
            let key = self.key("\u{0}compaction-probe");
            let mut stream = c
                .watch(
                    key,
                    Some(WatchOptions::new().with_start_revision(requested.max(1))),
                )
                .await
                .ok()?;
            while let Ok(Some(resp)) = stream.message().await {
                if resp.compact_revision() > 0 {
                    return Some(resp.compact_revision());
                }
                if resp.canceled() {
                    return None;
                }
            }
            None
        };
        tokio::time::timeout(self.inner.opts.attempt_timeout, probe)
            .await
            .ok()
            .flatten()
            .unwrap_or(requested + 1)
    }

    /// The key's current value, read in a failed transaction's `else`.
    fn else_kv(&self, resp: &TxnResponse) -> Result<Option<KeyValue>> {
        for r in resp.op_responses() {
            if let TxnOpResponse::Get(g) = r {
                return g.kvs().first().map(|kv| self.kv(kv)).transpose();
            }
        }
        Ok(None)
    }

    /// Every `(key, value)` under `prefix`, read at one revision in pages
    /// (for migration and checks).
    pub async fn dump(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let mut out = Vec::new();
        let mut at = None;
        let mut after: Option<String> = None;
        loop {
            let page = self.list(prefix, at, after.as_deref(), Some(1000)).await?;
            at = Some(page.revision);
            after = page.items.last().map(|kv| kv.key.clone()).or(after);
            out.extend(page.items);
            if !page.more {
                return Ok((out, page.revision));
            }
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let k = self.key(key);
        let r = self.range_at("get", k, GetOptions::new(), None).await?;
        r.kvs().first().map(|kv| self.kv(kv)).transpose()
    }

    async fn list(
        &self,
        prefix: &str,
        at: Option<Revision>,
        start_after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<ListPage> {
        let (mut start, end) = self.range(prefix);
        if let Some(after) = start_after {
            let mut next = self.key(after);
            next.push(0);
            start = start.max(next);
        }
        let mut opts = GetOptions::new().with_range(end.clone());
        if let Some(at) = at {
            if at <= 0 {
                return Err(StoreError::Compacted {
                    requested: at,
                    compacted: self.compaction_point(1).await,
                });
            }
            opts = opts.with_revision(at);
        }
        if let Some(limit) = limit {
            opts = opts.with_limit(limit.max(1) as i64);
        }
        // A start past the end of the range (start_after beyond it) is empty,
        // but still at a revision.
        let past_end = end != [0] && start >= end;
        if past_end {
            let revision = match at {
                Some(at) => at,
                None => self.current_revision().await?,
            };
            return Ok(ListPage {
                items: Vec::new(),
                revision,
                more: false,
            });
        }
        let r = self.range_at("list", start, opts, at).await?;
        let items = r
            .kvs()
            .iter()
            .map(|kv| self.kv(kv))
            .collect::<Result<Vec<_>>>()?;
        let revision = match at {
            Some(at) => at,
            None => header_revision(r.header())?,
        };
        Ok(ListPage {
            items,
            revision,
            more: r.more(),
        })
    }

    /// A retried create that finds the key holding exactly its value took
    /// effect the first time (values carry a uid and timestamps, so another
    /// writer's value is never byte-identical).
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        let k = self.key(key);
        let txn = Txn::new()
            .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(k.clone(), value.clone(), None)])
            .or_else([TxnOp::get(k, None)]);
        let resp = self.txn("create", txn).await?;
        if resp.succeeded() {
            return header_revision(resp.header());
        }
        match self.else_kv(&resp)? {
            Some(kv) if kv.value == value && kv.create_revision == kv.mod_revision => {
                Ok(kv.mod_revision)
            }
            _ => Err(StoreError::AlreadyExists(key.to_string())),
        }
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: Revision) -> Result<Revision> {
        let k = self.key(key);
        let txn = Txn::new()
            .when([
                Compare::mod_revision(k.clone(), CompareOp::Equal, expected),
                Compare::version(k.clone(), CompareOp::Greater, 0),
            ])
            .and_then([TxnOp::put(k.clone(), value.clone(), None)])
            .or_else([TxnOp::get(k, None)]);
        let resp = self.txn("update", txn).await?;
        if resp.succeeded() {
            return header_revision(resp.header());
        }
        match self.else_kv(&resp)? {
            None => Err(StoreError::NotFound(key.to_string())),
            // Our own write, applied by an attempt whose answer was lost.
            Some(kv) if kv.value == value && kv.mod_revision > expected => Ok(kv.mod_revision),
            Some(kv) => Err(StoreError::Conflict {
                key: key.to_string(),
                current: kv.mod_revision,
            }),
        }
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        let k = self.key(key);
        let mut when = vec![Compare::version(k.clone(), CompareOp::Greater, 0)];
        if let Some(e) = expected {
            when.push(Compare::mod_revision(k.clone(), CompareOp::Equal, e));
        }
        let txn = Txn::new()
            .when(when)
            .and_then([TxnOp::delete(
                k.clone(),
                Some(DeleteOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(k, None)]);
        let resp = self.txn("delete", txn).await?;
        if resp.succeeded() {
            let rev = header_revision(resp.header())?;
            for r in resp.op_responses() {
                if let TxnOpResponse::Delete(d) = r
                    && let Some(prev) = d.prev_kvs().first()
                {
                    return Ok((rev, self.kv(prev)?));
                }
            }
            return Err(StoreError::Backend(anyhow::anyhow!(
                "etcd delete of {key}: no previous value in the answer"
            )));
        }
        match self.else_kv(&resp)? {
            None => Err(StoreError::NotFound(key.to_string())),
            Some(kv) => Err(StoreError::Conflict {
                key: key.to_string(),
                current: kv.mod_revision,
            }),
        }
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        // Reading at `after` reports `Compacted` (or a future revision) to
        // the caller rather than the stream, as the embedded store does.
        if after > 0 {
            let (start, _) = self.range(prefix);
            self.range_at(
                "watch",
                start,
                GetOptions::new().with_count_only().with_revision(after),
                Some(after),
            )
            .await?;
        }
        let (start, end) = self.range(prefix);
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let watcher = Watcher {
            store: self.clone(),
            start,
            end,
            cursor: after,
            tx,
        };
        tokio::spawn(watcher.run());
        Ok(rx)
    }

    async fn current_revision(&self) -> Result<Revision> {
        let (start, end) = self.range("");
        let r = self
            .range_at(
                "current revision",
                start,
                GetOptions::new()
                    .with_range(end)
                    .with_count_only()
                    .with_limit(1),
                None,
            )
            .await?;
        header_revision(r.header())
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        enum Outcome {
            Done,
            Already,
            Future,
        }
        let r = self
            .call("compact", |mut c| async move {
                match c.compact(revision, None).await {
                    Ok(_) => Ok(Outcome::Done),
                    Err(etcd_client::Error::GRpcStatus(s)) if is_compacted(s.message()) => {
                        Ok(Outcome::Already)
                    }
                    Err(etcd_client::Error::GRpcStatus(s)) if is_future(s.message()) => {
                        Ok(Outcome::Future)
                    }
                    Err(e) => Err(classify(e)),
                }
            })
            .await?;
        match r {
            Outcome::Done | Outcome::Already => Ok(()),
            Outcome::Future => Err(StoreError::FutureRevision(revision)),
        }
    }
}

/// Forwards one etcd watch to a [`WatchStream`].
///
/// It never stops reading etcd while its consumer is slow (that would hold
/// up the gRPC connection shared with other requests): when the channel is
/// full it drops its etcd watch, hands over what it holds as the consumer
/// reads, and watches again from its cursor. If compaction passed the
/// cursor meanwhile, the consumer gets `Err(Compacted)` — never a gap. A
/// broken etcd stream (member down) is re-established from the cursor on
/// another member, for up to `watch_retry`.
struct Watcher {
    store: EtcdStore,
    start: Vec<u8>,
    end: Vec<u8>,
    /// Every event at or below it has been handed over.
    cursor: Revision,
    tx: mpsc::Sender<Result<Event>>,
}

/// Why the forwarding of one etcd watch stopped.
enum Stop {
    /// The consumer is gone or the stream is over (an error was sent).
    Done,
    /// The consumer was slow: watch again from the cursor.
    Resume,
    /// The etcd stream broke.
    Broken(String),
}

impl Watcher {
    async fn run(mut self) {
        let retry = self.store.inner.opts.watch_retry;
        let mut failing_since: Option<Instant> = None;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.follow().await {
                Stop::Done => return,
                Stop::Resume => {
                    failing_since = None;
                    backoff = Duration::from_millis(50);
                }
                Stop::Broken(why) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= retry {
                        log::warn!("etcd watch: giving up after {retry:?}: {why}");
                        return;
                    }
                    log::debug!("etcd watch: re-watching from {}: {why}", self.cursor);
                    tokio::select! {
                        _ = self.tx.closed() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn convert(&self, e: &etcd_client::Event) -> Result<Event> {
        let s = &self.store;
        let kv = e
            .kv()
            .ok_or_else(|| StoreError::Backend(anyhow::anyhow!("etcd event without a key")))?;
        let prev = e.prev_kv().map(|p| s.kv(p)).transpose()?;
        Ok(match e.event_type() {
            EventType::Put => Event {
                kind: EventKind::Put,
                kv: s.kv(kv)?,
                prev,
            },
            EventType::Delete => {
                let mut last = prev.clone().unwrap_or(KeyValue {
                    key: s.unkey(kv.key())?,
                    value: Vec::new(),
                    create_revision: 0,
                    mod_revision: 0,
                });
                last.mod_revision = kv.mod_revision();
                Event {
                    kind: EventKind::Delete,
                    kv: last,
                    prev,
                }
            }
        })
    }

    async fn follow(&mut self) -> Stop {
        let opts = WatchOptions::new()
            .with_range(self.end.clone())
            .with_start_revision(self.cursor + 1)
            .with_prev_key();
        let mut client = self.store.inner.client.clone();
        let attempt = self.store.inner.opts.attempt_timeout;
        let mut stream =
            match tokio::time::timeout(attempt, client.watch(self.start.clone(), Some(opts))).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Stop::Broken(e.to_string()),
                Err(_) => return Stop::Broken(format!("no watch within {attempt:?}")),
            };
        loop {
            let msg = tokio::select! {
                _ = self.tx.closed() => return Stop::Done,
                m = stream.message() => m,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => return Stop::Broken("the watch stream ended".into()),
                Err(e) => return Stop::Broken(e.to_string()),
            };
            if resp.compact_revision() > 0 {
                let _ = self
                    .tx
                    .send(Err(StoreError::Compacted {
                        requested: self.cursor,
                        compacted: resp.compact_revision(),
                    }))
                    .await;
                return Stop::Done;
            }
            if resp.canceled() {
                return Stop::Broken(format!("canceled: {}", resp.cancel_reason()));
            }
            let mut pending: VecDeque<Event> = VecDeque::new();
            for e in resp.events() {
                match self.convert(e) {
                    Ok(ev) if ev.kv.mod_revision > self.cursor => pending.push_back(ev),
                    Ok(_) => {}
                    Err(err) => {
                        let _ = self.tx.send(Err(err)).await;
                        return Stop::Done;
                    }
                }
            }
            while let Some(ev) = pending.pop_front() {
                let rev = ev.kv.mod_revision;
                match self.tx.try_send(Ok(ev)) {
                    Ok(()) => self.cursor = rev,
                    Err(mpsc::error::TrySendError::Closed(_)) => return Stop::Done,
                    Err(mpsc::error::TrySendError::Full(Ok(ev))) => {
                        // Slow consumer: stop reading etcd, hand over the
                        // rest of this response as it reads, then re-watch.
                        drop(stream);
                        pending.push_front(ev);
                        for ev in pending {
                            let rev = ev.kv.mod_revision;
                            if self.tx.send(Ok(ev)).await.is_err() {
                                return Stop::Done;
                            }
                            self.cursor = rev;
                        }
                        // Wait for room before watching again.
                        match self.tx.reserve().await {
                            Ok(permit) => drop(permit),
                            Err(_) => return Stop::Done,
                        }
                        return Stop::Resume;
                    }
                    Err(mpsc::error::TrySendError::Full(Err(_))) => unreachable!("sent Ok"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("etcd://127.0.0.1:2379").unwrap(),
            ["http://127.0.0.1:2379"]
        );
        assert_eq!(
            parse_url("etcd://a:1,b:2/").unwrap(),
            ["http://a:1", "http://b:2"]
        );
        assert!(parse_url("http://a:1").is_err());
        assert!(parse_url("etcd://a").is_err());
        assert!(parse_url("etcd://a:x").is_err());
        assert!(parse_url("etcd://:1").is_err());
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), [0]);
        assert_eq!(prefix_end(b""), [0]);
    }
}
