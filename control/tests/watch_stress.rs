//! Watch under load, in the style of etcd's robustness tests: concurrent
//! writers and many list-then-watch clients against the real apiserver, on
//! the embedded store and on a one-member etcd, while busy threads of the
//! test itself keep both cores loaded. Every client checks that it got every
//! change after its list's resourceVersion exactly once, in order, and
//! within a bound of the write's acknowledgement (issue 22).
//!
//! Clients: raw HTTP with JSON and Table events (with and without a label
//! selector, paged lists, bookmarks), each reconnecting often so that many
//! list→watch handoffs race the writers; and the real kubectl (`get -w
//! --watch-only`, Table and JSON), whose watch starts at the resourceVersion
//! of the list it made (read from its `-v=6` log).
//!
//! The short run is part of `cargo test`. `KCONTROL_WATCH_STRESS_SECS`
//! lengthens the write phase and `KCONTROL_WATCH_STRESS_REPORT=FILE` appends
//! one JSON line of figures per store (`cargo xtask bench watch` does both).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::{Server, TempDir};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use testbed::EtcdCluster;

/// Writers, each owning [`KEYS_PER_WRITER`] ConfigMaps.
const WRITERS: usize = 6;
const KEYS_PER_WRITER: usize = 3;
/// Write phase of the short run (the whole test stays well under 30 s).
const SHORT_WRITE_PHASE: Duration = Duration::from_secs(8);
/// An event must arrive within this of its write's acknowledgement (or of
/// its watch's start, for the backlog). A lost event shows up as a stall
/// that no amount of load explains.
const LATENCY_BOUND: Duration = Duration::from_secs(10);
/// After the last write, every open watch must have caught up within this.
const CATCH_UP_BOUND: Duration = Duration::from_secs(30);
const NS: &str = "default";
/// The label selector of the selecting clients: one writer's keys.
const SELECTED_WRITER: usize = 1;

#[test]
fn watch_stress_sqlite() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("watch-stress-sqlite");
    let server = Server::start(&dir.0, &["--bookmark-interval-seconds", "1"]);
    run("sqlite", &server);
}

#[test]
fn watch_stress_etcd() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = EtcdCluster::start(1).expect("starting etcd (/usr/bin/etcd)");
    let dir = TempDir::new("watch-stress-etcd");
    let server = Server::start(
        &dir.0,
        &[
            "--store",
            &cluster.url(),
            "--bookmark-interval-seconds",
            "1",
        ],
    );
    run("etcd", &server);
}

/// The two stores are stressed one after the other: each run makes its own
/// load and measures its own latencies.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------
// What was written.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Create,
    Update,
    Delete,
}

impl Kind {
    /// The watch event type a watcher of everything sees for it.
    fn event(self) -> &'static str {
        match self {
            Kind::Create => "ADDED",
            Kind::Update => "MODIFIED",
            Kind::Delete => "DELETED",
        }
    }
}

/// One acknowledged write.
#[derive(Clone, Debug)]
struct Op {
    name: String,
    writer: usize,
    kind: Kind,
    /// The `seq` label the event carries (a delete's event carries the
    /// deleted object, so the seq of the write before it).
    seq: u64,
    /// From the answer; a delete's (its answer is a Status) is learned from
    /// the watchers, which must all agree on it.
    rv: Option<i64>,
    acked: Instant,
    /// The key's last write, made after the write phase.
    last: bool,
}

/// Deterministic pseudo-random numbers (xorshift), so a failing run can be
/// told apart from another by its seed only.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn path(name: Option<&str>) -> String {
    match name {
        Some(n) => format!("/api/v1/namespaces/{NS}/configmaps/{n}"),
        None => format!("/api/v1/namespaces/{NS}/configmaps"),
    }
}

fn configmap(name: &str, writer: usize, seq: u64) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "labels": { "writer": writer.to_string(), "seq": seq.to_string() },
        },
        "data": { "seq": seq.to_string() },
    })
}

/// Writes the writer's keys (create, update, now and then delete) until
/// `phase_end`, then once more each (so every key ends on a write whose
/// revision is known). Returns its acknowledged writes in order.
async fn writer(client: kube::Client, w: usize, phase_end: Instant) -> Result<Vec<Op>, String> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((w as u64 + 1) * 0x1000_0001));
    let names: Vec<String> = (0..KEYS_PER_WRITER).map(|k| format!("w{w}-k{k}")).collect();
    // Per key: exists, seq of the last write.
    let mut state = [(false, 0u64); KEYS_PER_WRITER];
    let mut ops = Vec::new();
    let mut write = async |k: usize, last: bool, rng: &mut Rng| -> Result<Op, String> {
        let name = &names[k];
        let (exists, seq) = state[k];
        let (kind, reply) = if !exists {
            let body = configmap(name, w, seq + 1);
            (
                Kind::Create,
                common::post_json(&client, &path(None), &body).await,
            )
        } else if !last && rng.below(6) == 0 {
            (
                Kind::Delete,
                common::delete(&client, &path(Some(name))).await,
            )
        } else {
            let body = configmap(name, w, seq + 1);
            (
                Kind::Update,
                common::put_json(&client, &path(Some(name)), &body).await,
            )
        };
        if !(200..300).contains(&reply.code) {
            return Err(format!(
                "writer {w}: {kind:?} {name} answered {}: {}",
                reply.code,
                String::from_utf8_lossy(&reply.body)
            ));
        }
        let acked = Instant::now();
        let (seq, rv) = match kind {
            Kind::Delete => (seq, None),
            _ => {
                let rv = reply.json()["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|r| r.parse().ok())
                    .ok_or_else(|| format!("writer {w}: {kind:?} {name}: no resourceVersion"))?;
                (seq + 1, Some(rv))
            }
        };
        state[k] = (kind != Kind::Delete, seq);
        Ok(Op {
            name: name.clone(),
            writer: w,
            kind,
            seq,
            rv,
            acked,
            last,
        })
    };
    while Instant::now() < phase_end {
        let k = rng.below(KEYS_PER_WRITER as u64) as usize;
        ops.push(write(k, false, &mut rng).await?);
    }
    for k in 0..KEYS_PER_WRITER {
        ops.push(write(k, true, &mut rng).await?);
    }
    Ok(ops)
}

// ---------------------------------------------------------------------------
// What the watchers saw.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Table,
}

/// One event as a client got it.
#[derive(Clone, Debug)]
struct Seen {
    ty: String,
    name: String,
    /// `None` where the output does not show it (kubectl's tables).
    rv: Option<i64>,
    seq: u64,
    at: Instant,
    /// Latency counts from here at the earliest: the watch's start, or the
    /// end of the client's last stall.
    since: Instant,
}

/// One list followed by one watch from the list's resourceVersion.
#[derive(Debug)]
struct Session {
    client: String,
    selector: Option<usize>,
    /// The list's resourceVersion, where the watch started.
    list_rv: i64,
    /// The list's items (name, rv), when the client shows them.
    listed: Option<Vec<(String, i64)>>,
    /// When the watch had its 200.
    watching: Instant,
    events: Vec<Seen>,
    /// (name, seq) of the events other than deletes, to tell quickly
    /// whether the last writes arrived.
    arrived: HashSet<(String, u64)>,
    /// (resourceVersion, events before it) of each BOOKMARK.
    bookmarks: Vec<(i64, usize)>,
    /// Ran until every last write after its list had arrived.
    to_the_end: bool,
    error: Option<String>,
}

impl Session {
    fn new(client: &str, selector: Option<usize>) -> Session {
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

    fn selects(&self, writer: usize) -> bool {
        self.selector.is_none_or(|s| s == writer)
    }

    /// Whether every last write (once they are all known) that comes after
    /// the list and that this session selects has arrived.
    fn complete(&self, phase: &Phase) -> bool {
        let lasts = phase.lasts.lock().unwrap();
        let Some((_, lasts)) = &*lasts else {
            return false;
        };
        lasts
            .iter()
            .filter(|o| self.selects(o.writer) && o.rv.unwrap_or(0) > self.list_rv)
            .all(|o| self.arrived.contains(&(o.name.clone(), o.seq)))
    }

    fn push(&mut self, e: Seen) {
        if e.ty != "DELETED" {
            self.arrived.insert((e.name.clone(), e.seq));
        }
        self.events.push(e);
    }
}

/// Where the run is, shared by the writers and the clients.
#[derive(Default)]
struct Phase {
    /// Sessions held throughout that are watching (the writers wait for
    /// them, so that every write is seen by one that shows revisions).
    ready: AtomicUsize,
    /// The writers are done: the next session of every client is its last.
    writes_done: AtomicBool,
    /// When the writers were done, and the last write of every key.
    lasts: Mutex<Option<(Instant, Vec<Op>)>>,
}

impl Phase {
    /// Err once the writers have been done for longer than
    /// [`CATCH_UP_BOUND`]: a session still waiting then has lost something.
    fn catch_up_over(&self) -> Result<(), String> {
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
struct Stop {
    until: Option<Instant>,
}

fn seq_label(meta: &Value) -> Option<u64> {
    meta["labels"]["seq"].as_str()?.parse().ok()
}

fn rv_of(meta: &Value) -> Option<i64> {
    meta["resourceVersion"].as_str()?.parse().ok()
}

/// The metadata of a watch event's object, or of a Table's single row.
fn event_meta(object: &Value, format: Format) -> Option<&Value> {
    match format {
        Format::Json => object.get("metadata"),
        Format::Table => object["rows"].get(0)?["object"].get("metadata"),
    }
}

const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";

/// A raw HTTP client's way of listing and watching.
struct RawSpec {
    name: &'static str,
    format: Format,
    /// Only this writer's keys (a label selector).
    selector: Option<usize>,
    /// The list in pages of this size.
    page: Option<usize>,
    bookmarks: bool,
    /// Lengths of its sessions while the writers write, in turn; none: one
    /// session throughout.
    holds: Vec<Duration>,
    /// Stops reading for [`STALL`] every [`STALL_EVERY`], as a consumer
    /// that falls behind: its connection's buffers fill and the apiserver's
    /// watch task waits on them, then everything must still come, in order.
    /// (Loopback TCP buffers hold megabytes, more than 3 s of this load, so
    /// this does not reach the stores' own lag paths — a watcher behind the
    /// published rows, an etcd forwarder dropping its watch: injecting a
    /// lost event there went unnoticed here. `conformance::slow_watcher`
    /// covers those on both stores.)
    stalls: bool,
}

const STALL: Duration = Duration::from_secs(3);
const STALL_EVERY: Duration = Duration::from_secs(4);

/// A raw HTTP list (paged when `spec.page` is set) then a watch from its
/// resourceVersion, read frame by frame.
async fn raw_session(
    client: &kube::Client,
    spec: &RawSpec,
    name: &str,
    stop: Stop,
    phase: &Phase,
) -> Session {
    let mut s = Session::new(name, spec.selector);
    if let Err(e) = raw_watch(client, &mut s, spec, stop, phase).await {
        s.error = Some(e);
    }
    s
}

async fn raw_watch(
    client: &kube::Client,
    s: &mut Session,
    spec: &RawSpec,
    stop: Stop,
    phase: &Phase,
) -> Result<(), String> {
    let (format, page, bookmarks) = (spec.format, spec.page, spec.bookmarks);
    let accept = match format {
        Format::Json => "application/json",
        Format::Table => TABLE,
    };
    let mut query = String::new();
    if let Some(w) = s.selector {
        query += &format!("labelSelector=writer%3D{w}&");
    }
    // The list, all its pages at one resourceVersion.
    let mut listed = Vec::new();
    let mut cont: Option<String> = None;
    let mut list_rv = None;
    loop {
        let mut q = query.clone();
        if let Some(n) = page {
            q += &format!("limit={n}&");
        }
        if let Some(c) = &cont {
            q += &format!("continue={c}&");
        }
        let reply = common::try_send(
            client,
            "GET",
            &format!("{}?{q}", path(None)),
            None,
            Vec::new(),
            Some(accept),
        )
        .await
        .ok_or("list: no answer")?;
        if reply.code != 200 {
            return Err(format!(
                "list answered {}: {}",
                reply.code,
                String::from_utf8_lossy(&reply.body)
            ));
        }
        let doc = reply.json();
        let rv = rv_of(&doc["metadata"]).ok_or("list without a resourceVersion")?;
        if *list_rv.get_or_insert(rv) != rv {
            return Err(format!("list pages at {list_rv:?} and {rv}"));
        }
        let items = match format {
            Format::Json => doc["items"].as_array().cloned().unwrap_or_default(),
            Format::Table => doc["rows"]
                .as_array()
                .map(|rows| rows.iter().map(|r| r["object"].clone()).collect())
                .unwrap_or_default(),
        };
        for item in &items {
            let meta = &item["metadata"];
            let name = meta["name"].as_str().ok_or("list item without a name")?;
            listed.push((name.to_string(), rv_of(meta).ok_or("item without rv")?));
        }
        cont = doc["metadata"]["continue"]
            .as_str()
            .filter(|c| !c.is_empty())
            .map(str::to_string);
        if cont.is_none() {
            break;
        }
    }
    s.list_rv = list_rv.unwrap_or(0);
    s.listed = Some(listed);

    let mut q = format!("{query}watch=1&resourceVersion={}", s.list_rv);
    if bookmarks {
        q += "&allowWatchBookmarks=true";
    }
    let req = http::Request::get(format!("{}?{q}", path(None)))
        .header("accept", accept)
        .body(kube::client::Body::empty())
        .unwrap();
    let resp = client.send(req).await.map_err(|e| format!("watch: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("watch answered {}", resp.status()));
    }
    s.watching = Instant::now();
    if stop.until.is_none() {
        phase.ready.fetch_add(1, Ordering::SeqCst);
    }
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let mut since = s.watching;
    loop {
        if spec.stalls && since.elapsed() >= STALL_EVERY {
            tokio::time::sleep(STALL).await;
            since = Instant::now();
        }
        if stop.until.is_some_and(|u| Instant::now() >= u) {
            return Ok(());
        }
        if stop.until.is_none() && s.complete(phase) {
            s.to_the_end = true;
            return Ok(());
        }
        phase.catch_up_over()?;
        let frame = match tokio::time::timeout(Duration::from_millis(100), body.frame()).await {
            Err(_) => continue,
            Ok(None) => return Err("the watch ended".into()),
            Ok(Some(Err(e))) => return Err(format!("watch body: {e}")),
            Ok(Some(Ok(f))) => f,
        };
        let at = Instant::now();
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let ev: Value = serde_json::from_slice(&line)
                .map_err(|e| format!("event {e}: {}", String::from_utf8_lossy(&line)))?;
            let ty = ev["type"].as_str().unwrap_or_default().to_string();
            match ty.as_str() {
                "BOOKMARK" => {
                    let rv = rv_of(&ev["object"]["metadata"]).ok_or("bookmark without rv")?;
                    s.bookmarks.push((rv, s.events.len()));
                }
                "ADDED" | "MODIFIED" | "DELETED" => {
                    let meta = event_meta(&ev["object"], format)
                        .ok_or_else(|| format!("event without metadata: {ev}"))?;
                    s.push(Seen {
                        ty,
                        name: meta["name"].as_str().unwrap_or_default().to_string(),
                        rv: Some(rv_of(meta).ok_or("event without rv")?),
                        seq: seq_label(meta).ok_or("event without a seq label")?,
                        at,
                        since,
                    });
                }
                _ => return Err(format!("unexpected event {ev}")),
            }
        }
    }
}

/// One raw client: sessions of `spec.holds` (in turn) back to back while
/// the writers write, then one last session that runs until it has every
/// last write. No `holds`: a single session throughout.
async fn raw_client(client: kube::Client, spec: RawSpec, phase: Arc<Phase>) -> Vec<Session> {
    let mut sessions = Vec::new();
    for i in 0.. {
        let until = match spec.holds.get(i % spec.holds.len().max(1)) {
            Some(h) if !phase.writes_done.load(Ordering::SeqCst) => Some(Instant::now() + *h),
            _ => None,
        };
        let name = format!("{}#{i}", spec.name);
        let s = raw_session(&client, &spec, &name, Stop { until }, &phase).await;
        let failed = s.error.is_some();
        sessions.push(s);
        if until.is_none() || failed {
            break;
        }
    }
    sessions
}

/// kubectl sessions, as [`raw_client`]'s (`hold`: each session's length).
fn kubectl_client(
    server: &Server,
    name: &str,
    format: Format,
    hold: Option<Duration>,
    phase: &Phase,
) -> Vec<Session> {
    let cache = server.data_dir.join(format!("kube-cache-{name}"));
    let mut sessions = Vec::new();
    for i in 0.. {
        let until = match hold {
            Some(h) if !phase.writes_done.load(Ordering::SeqCst) => Some(Instant::now() + h),
            _ => None,
        };
        let s = kubectl_session(
            server,
            &cache,
            &format!("{name}#{i}"),
            format,
            Stop { until },
            phase,
        );
        let failed = s.error.is_some();
        sessions.push(s);
        if until.is_none() || failed {
            break;
        }
    }
    sessions
}

/// A `kubectl get configmaps -w --watch-only` session; its watch starts at
/// its list's resourceVersion, which its `-v=6` log shows.
fn kubectl_session(
    server: &Server,
    cache: &std::path::Path,
    name: &str,
    format: Format,
    stop: Stop,
    phase: &Phase,
) -> Session {
    let mut s = Session::new(name, None);
    let mut cmd = testbed::Kubectl::new(&server.kubeconfig)
        .cache_dir(cache)
        .command();
    cmd.args([
        "get",
        "configmaps",
        "-n",
        NS,
        "--watch-only",
        "--output-watch-events",
    ])
    .arg("-v=6");
    match format {
        Format::Json => cmd.args(["-o", "json"]),
        Format::Table => cmd.args(["--no-headers", "-L", "seq"]),
    };
    let mut child = match cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => {
            s.error = Some(format!("running kubectl: {e}"));
            return s;
        }
    };
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let _child = Kill(child);
    // The watch's start: resourceVersion=N in the URL of the request that
    // got a 200 with watch=true.
    let (rv_tx, rv_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && l.contains("watch=true") && l.contains("200 OK") {
                let rv = l
                    .split("resourceVersion=")
                    .nth(1)
                    .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|r| r.parse::<i64>().ok());
                let _ = rv_tx.send(rv.ok_or(l));
                sent = true;
            }
        }
    });
    let (ev_tx, ev_rx) = mpsc::channel::<Result<Seen, String>>();
    std::thread::spawn(move || match format {
        Format::Table => {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                // EVENT NAME DATA AGE SEQ
                let f: Vec<&str> = l.split_whitespace().collect();
                let seen = match (f.first(), f.get(1), f.last().and_then(|q| q.parse().ok())) {
                    (Some(ty), Some(name), Some(seq)) if f.len() >= 5 => Ok(Seen {
                        ty: ty.to_string(),
                        name: name.to_string(),
                        rv: None,
                        seq,
                        at: Instant::now(),
                        // Set when it is taken in.
                        since: Instant::now(),
                    }),
                    _ => Err(format!("unexpected line {l:?}")),
                };
                if ev_tx.send(seen).is_err() {
                    return;
                }
            }
        }
        Format::Json => {
            let values = serde_json::Deserializer::from_reader(stdout).into_iter::<Value>();
            for v in values {
                let seen = match v {
                    Ok(ev) => {
                        let meta = &ev["object"]["metadata"];
                        match (ev["type"].as_str(), meta["name"].as_str(), seq_label(meta)) {
                            (Some(ty), Some(name), Some(seq)) => Ok(Seen {
                                ty: ty.to_string(),
                                name: name.to_string(),
                                rv: rv_of(meta),
                                seq,
                                at: Instant::now(),
                                since: Instant::now(),
                            }),
                            _ => Err(format!("unexpected event {ev}")),
                        }
                    }
                    Err(e) => Err(format!("kubectl -o json printed no JSON: {e}")),
                };
                let stop = seen.is_err();
                if ev_tx.send(seen).is_err() || stop {
                    return;
                }
            }
        }
    });
    match rv_rx.recv_timeout(CATCH_UP_BOUND) {
        Ok(Ok(rv)) => s.list_rv = rv,
        Ok(Err(line)) => {
            s.error = Some(format!("no resourceVersion in the watch request: {line}"));
            return s;
        }
        Err(_) => {
            s.error = Some(format!("kubectl did not watch within {CATCH_UP_BOUND:?}"));
            return s;
        }
    }
    s.watching = Instant::now();
    if stop.until.is_none() {
        phase.ready.fetch_add(1, Ordering::SeqCst);
    }
    loop {
        if stop.until.is_some_and(|u| Instant::now() >= u) {
            return s;
        }
        if stop.until.is_none() && s.complete(phase) {
            s.to_the_end = true;
            return s;
        }
        if let Err(e) = phase.catch_up_over() {
            s.error = Some(e);
            return s;
        }
        match ev_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(seen)) => {
                let since = s.watching;
                s.push(Seen { since, ..seen })
            }
            Ok(Err(e)) => {
                s.error = Some(e);
                return s;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                s.error = Some("kubectl exited".into());
                return s;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The run and its verdict.

/// Busy threads, one per core, until dropped.
struct CpuLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl CpuLoad {
    fn start() -> CpuLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 1u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..10_000 {
                            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                        }
                    }
                    x
                })
            })
            .collect();
        CpuLoad { stop, threads }
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The figures of one run.
#[derive(Debug, Default)]
struct Figures {
    writes: usize,
    sessions: usize,
    events_checked: usize,
    worst_latency: Duration,
    p99_latency: Duration,
}

fn run(store: &str, server: &Server) {
    let write_phase = std::env::var("KCONTROL_WATCH_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(SHORT_WRITE_PHASE, Duration::from_secs);
    let load = CpuLoad::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let phase = Arc::new(Phase::default());
    let started = Instant::now();
    let ms = Duration::from_millis;
    let raw = [
        RawSpec {
            name: "raw-json-stalls",
            format: Format::Json,
            selector: None,
            page: None,
            bookmarks: true,
            holds: vec![],
            stalls: true,
        },
        RawSpec {
            name: "raw-json-all",
            format: Format::Json,
            selector: None,
            page: None,
            bookmarks: true,
            holds: vec![],
            stalls: false,
        },
        RawSpec {
            name: "raw-table-all",
            format: Format::Table,
            selector: None,
            page: None,
            bookmarks: false,
            holds: vec![],
            stalls: false,
        },
        RawSpec {
            name: "raw-table-selector",
            format: Format::Table,
            selector: Some(SELECTED_WRITER),
            page: Some(2),
            bookmarks: false,
            holds: vec![],
            stalls: false,
        },
        RawSpec {
            name: "raw-json-restart",
            format: Format::Json,
            selector: None,
            page: None,
            bookmarks: false,
            holds: vec![ms(300), ms(900), ms(150)],
            stalls: false,
        },
        RawSpec {
            name: "raw-json-paged",
            format: Format::Json,
            selector: None,
            page: Some(4),
            bookmarks: true,
            holds: vec![ms(700), ms(200)],
            stalls: false,
        },
        RawSpec {
            name: "raw-table-restart",
            format: Format::Table,
            selector: None,
            page: None,
            bookmarks: true,
            holds: vec![ms(250), ms(1100)],
            stalls: false,
        },
        RawSpec {
            name: "raw-json-selector",
            format: Format::Json,
            selector: Some(SELECTED_WRITER),
            page: None,
            bookmarks: true,
            holds: vec![ms(400), ms(800)],
            stalls: false,
        },
    ];
    // kubectl: Table and JSON throughout, and Table sessions of two seconds
    // back to back.
    let kubectl = [
        ("kubectl-table", Format::Table, None),
        ("kubectl-json", Format::Json, None),
        (
            "kubectl-table-restart",
            Format::Table,
            Some(Duration::from_secs(2)),
        ),
    ];
    let throughout = raw.iter().filter(|r| r.holds.is_empty()).count()
        + kubectl.iter().filter(|k| k.2.is_none()).count();
    let (written, mut sessions) = std::thread::scope(|scope| {
        let kubectls: Vec<_> = kubectl
            .into_iter()
            .map(|(name, format, hold)| {
                let phase = &*phase;
                scope.spawn(move || kubectl_client(server, name, format, hold, phase))
            })
            .collect();
        let (written, mut sessions) = rt.block_on(async {
            let mut clients = Vec::new();
            for spec in raw {
                let client = server.client().await;
                clients.push(tokio::spawn(raw_client(client, spec, phase.clone())));
            }
            // The sessions held throughout watch before the first write.
            let ready_by = Instant::now() + CATCH_UP_BOUND;
            while phase.ready.load(Ordering::SeqCst) < throughout && Instant::now() < ready_by {
                tokio::time::sleep(ms(20)).await;
            }
            let phase_end = Instant::now() + write_phase;
            let mut writers = Vec::new();
            for w in 0..WRITERS {
                writers.push(tokio::spawn(writer(server.client().await, w, phase_end)));
            }
            let mut written = Ok(Vec::new());
            for w in writers {
                match (w.await.unwrap(), &mut written) {
                    (Ok(o), Ok(all)) => all.extend(o),
                    (Err(e), _) => written = Err(e),
                    (Ok(_), Err(_)) => {}
                }
            }
            let lasts = match &written {
                Ok(ops) => ops.iter().filter(|o| o.last).cloned().collect(),
                Err(_) => Vec::new(),
            };
            *phase.lasts.lock().unwrap() = Some((Instant::now(), lasts));
            phase.writes_done.store(true, Ordering::SeqCst);
            let mut sessions = Vec::new();
            for c in clients {
                sessions.extend(c.await.unwrap());
            }
            (written, sessions)
        });
        for k in kubectls {
            sessions.extend(k.join().unwrap());
        }
        (written, sessions)
    });
    drop(load);
    let elapsed = started.elapsed();
    let ops = written.unwrap_or_else(|e| panic!("watch stress on {store}: a write failed: {e}"));
    let figures = verdict(store, ops, &mut sessions);
    eprintln!(
        "watch stress on {store}: {} writes, {} sessions, {} events checked, worst latency {:?}, p99 {:?}, {:?} in all",
        figures.writes,
        figures.sessions,
        figures.events_checked,
        figures.worst_latency,
        figures.p99_latency,
        elapsed
    );
    if let Some(file) = std::env::var_os("KCONTROL_WATCH_STRESS_REPORT") {
        use std::io::Write;
        let line = json!({
            "store": store,
            "write_phase_s": write_phase.as_secs(),
            "writes": figures.writes,
            "sessions": figures.sessions,
            "events_checked": figures.events_checked,
            "worst_latency_ms": figures.worst_latency.as_secs_f64() * 1000.0,
            "p99_latency_ms": figures.p99_latency.as_secs_f64() * 1000.0,
            "latency_bound_ms": LATENCY_BOUND.as_millis() as u64,
            "elapsed_s": elapsed.as_secs_f64(),
        });
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
            .expect("opening KCONTROL_WATCH_STRESS_REPORT");
        writeln!(f, "{line}").unwrap();
    }
}

/// Checks every session against the acknowledged writes; panics with every
/// violation found.
fn verdict(store: &str, mut ops: Vec<Op>, sessions: &mut [Session]) -> Figures {
    let mut failures: Vec<String> = Vec::new();
    // A delete's revision, from the watchers that show revisions; they
    // must agree, and it must fall between the key's writes around it.
    let mut delete_rvs: HashMap<(String, u64), i64> = HashMap::new();
    for s in sessions.iter() {
        for e in s.events.iter().filter(|e| e.ty == "DELETED") {
            let Some(rv) = e.rv else { continue };
            let key = (e.name.clone(), e.seq);
            match delete_rvs.get(&key) {
                Some(&other) if other != rv => failures.push(format!(
                    "{}: delete of {}#{} at {rv}, another watcher saw it at {other}",
                    s.client, e.name, e.seq
                )),
                _ => {
                    delete_rvs.insert(key, rv);
                }
            }
        }
    }
    for op in ops.iter_mut().filter(|o| o.kind == Kind::Delete) {
        match delete_rvs.get(&(op.name.clone(), op.seq)) {
            Some(&rv) => op.rv = Some(rv),
            None => failures.push(format!(
                "the delete of {}#{} was acknowledged but no watcher saw it",
                op.name, op.seq
            )),
        }
    }
    // Per key, revisions follow the writer's order.
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in &ops {
        by_key.entry(&op.name).or_default().push(op);
    }
    for (key, key_ops) in &by_key {
        for pair in key_ops.windows(2) {
            if let (Some(a), Some(b)) = (pair[0].rv, pair[1].rv)
                && a >= b
            {
                failures.push(format!(
                    "{key}: {:?}#{} at {a} before {:?}#{} at {b}",
                    pair[0].kind, pair[0].seq, pair[1].kind, pair[1].seq
                ));
            }
        }
    }
    let mut truth: Vec<&Op> = ops.iter().filter(|o| o.rv.is_some()).collect();
    truth.sort_by_key(|o| o.rv);
    for pair in truth.windows(2) {
        if pair[0].rv == pair[1].rv {
            failures.push(format!(
                "{} and {} both at revision {:?}",
                pair[0].name, pair[1].name, pair[0].rv
            ));
        }
    }

    let mut latencies: Vec<Duration> = Vec::new();
    let mut checked = 0;
    for s in sessions.iter() {
        let fail = |what: String| format!("{store} {} (from {}): {what}", s.client, s.list_rv);
        if let Some(e) = &s.error {
            failures.push(fail(format!("{e}; saw {} events", s.events.len())));
            continue;
        }
        // The list: each selected key's state at the list's revision.
        if let Some(listed) = &s.listed {
            let mut want: BTreeMap<&str, i64> = BTreeMap::new();
            for op in truth
                .iter()
                .filter(|o| o.rv <= Some(s.list_rv) && s.selects(o.writer))
            {
                match op.kind {
                    Kind::Delete => want.remove(op.name.as_str()),
                    _ => want.insert(&op.name, op.rv.unwrap()),
                };
            }
            let got: BTreeMap<&str, i64> = listed.iter().map(|(n, r)| (n.as_str(), *r)).collect();
            if got != want {
                failures.push(fail(format!("listed {got:?}, the writes say {want:?}")));
            }
        }
        // The events: exactly the selected writes after the list, in order.
        let want: Vec<&&Op> = truth
            .iter()
            .filter(|o| o.rv > Some(s.list_rv) && s.selects(o.writer))
            .collect();
        if s.to_the_end && s.events.len() != want.len() {
            failures.push(fail(format!(
                "{} events for {} writes after the list",
                s.events.len(),
                want.len()
            )));
        }
        for (i, e) in s.events.iter().enumerate() {
            let Some(op) = want.get(i) else {
                failures.push(fail(format!("event {i} ({e:?}) after all the writes")));
                break;
            };
            let same = e.ty == op.kind.event()
                && e.name == op.name
                && e.seq == op.seq
                && e.rv.is_none_or(|rv| Some(rv) == op.rv);
            if !same {
                failures.push(fail(format!(
                    "event {i} is {} {}#{} at {:?}, the write is {} {}#{} at {:?}",
                    e.ty,
                    e.name,
                    e.seq,
                    e.rv,
                    op.kind.event(),
                    op.name,
                    op.seq,
                    op.rv
                )));
                break;
            }
            checked += 1;
            let latency =
                e.at.saturating_duration_since(op.acked.max(s.watching).max(e.since));
            if latency > LATENCY_BOUND {
                failures.push(fail(format!(
                    "event {i} ({} {}#{}) took {latency:?}",
                    e.ty, e.name, e.seq
                )));
            }
            latencies.push(latency);
        }
        // Bookmarks never go back, nor behind an event already sent, and
        // no event at or below one follows it.
        let mut floor = s.list_rv;
        for &(rv, before) in &s.bookmarks {
            let last_event = before
                .checked_sub(1)
                .and_then(|i| s.events[i].rv)
                .unwrap_or(s.list_rv);
            if rv < floor || rv < last_event {
                failures.push(fail(format!(
                    "bookmark at {rv} after revision {}",
                    floor.max(last_event)
                )));
            }
            floor = floor.max(rv);
            if let Some(next) = s.events.get(before).and_then(|e| e.rv)
                && next <= rv
            {
                failures.push(fail(format!("event at {next} after a bookmark at {rv}")));
            }
        }
    }
    latencies.sort();
    let figures = Figures {
        writes: ops.len(),
        sessions: sessions.len(),
        events_checked: checked,
        worst_latency: latencies.last().copied().unwrap_or_default(),
        p99_latency: latencies
            .get(latencies.len().saturating_mul(99) / 100)
            .or(latencies.last())
            .copied()
            .unwrap_or_default(),
    };
    assert!(
        failures.is_empty(),
        "watch stress on {store}: {} violations ({figures:?}):\n{}",
        failures.len(),
        failures.join("\n")
    );
    // A run that checked nothing proves nothing.
    assert!(
        checked > 0 && sessions.iter().filter(|s| s.to_the_end).count() >= 5,
        "watch stress on {store} checked {checked} events in {} sessions",
        sessions.len()
    );
    figures
}
