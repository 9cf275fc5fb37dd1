//! The raw HTTP clients: JSON or Table events, label selectors, paged
//! lists, bookmarks, stalls, and sessions back to back.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use serde_json::Value;

use crate::common;
use crate::sessions::{Format, Phase, Seen, Session, Stop, event_meta, rv_of, seq_label};
use crate::writes::path;

const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";

/// A raw HTTP client's way of listing and watching.
pub(crate) struct RawSpec {
    pub(crate) name: &'static str,
    pub(crate) format: Format,
    /// Only this writer's keys (a label selector).
    pub(crate) selector: Option<usize>,
    /// The list in pages of this size.
    pub(crate) page: Option<usize>,
    pub(crate) bookmarks: bool,
    /// Lengths of its sessions while the writers write, in turn; none: one
    /// session throughout.
    pub(crate) holds: Vec<Duration>,
    /// Stops reading for [`STALL`] every [`STALL_EVERY`], as a consumer
    /// that falls behind: its connection's buffers fill and the apiserver's
    /// watch task waits on them, then everything must still come, in order.
    /// (Loopback TCP buffers hold megabytes, more than 3 s of this load, so
    /// this does not reach the stores' own lag paths — a watcher behind the
    /// published rows, an etcd forwarder dropping its watch: injecting a
    /// lost event there went unnoticed here. `conformance::slow_watcher`
    /// covers those on both stores.)
    pub(crate) stalls: bool,
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
pub(crate) async fn raw_client(
    client: kube::Client,
    spec: RawSpec,
    phase: Arc<Phase>,
) -> Vec<Session> {
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
