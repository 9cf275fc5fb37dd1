//! Watches: the store's revision-ordered events for a key prefix, turned
//! into newline-framed JSON `{"type": …, "object": …}` lines.
//!
//! - `resourceVersion` unset or "0": synthetic ADDED events for the current
//!   state (read at one revision R), then changes after R.
//! - `resourceVersion=N`: changes after N; if N is compacted away, one ERROR
//!   event carrying a 410 Expired Status, then the stream ends (clients
//!   relist).
//! - Selectors filter events; an object that starts or stops matching is
//!   ADDED or DELETED for this watcher, as upstream.
//! - `allowWatchBookmarks`: periodic BOOKMARK events with the newest
//!   revision delivered; `sendInitialEvents=true` ends the initial events
//!   with a bookmark annotated `k8s.io/initial-events-end`.
//! - `timeoutSeconds` ends the stream (default 30 min).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use http_body_util::BodyExt;
use kcontrol_store::{Event, EventKind, Revision, StoreError};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::http::{Body, ChannelBody, Output, Query};
use super::object::{from_kv, parse_rv, set_rv};
use super::resources::ResourceType;
use super::selectors::{FieldSelector, LabelSelector};
use super::state::State;
use super::status::{ApiError, ApiResult};
use super::table;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

struct Filter {
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, o: &Value) -> bool {
        self.labels.matches(o) && self.fields.matches(o)
    }
}

/// Encodes one event line in the negotiated output.
fn line(
    ty: &str,
    obj: Value,
    rt: &ResourceType,
    out: Output,
    include: table::IncludeObject,
) -> Bytes {
    let obj = match out {
        Output::Table(v) if ty != "ERROR" && ty != "BOOKMARK" => {
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .cloned()
                .unwrap_or(json!(""));
            table::table(
                rt,
                std::slice::from_ref(&obj),
                json!({ "resourceVersion": rv }),
                include,
                v,
            )
        }
        Output::PartialMeta(v) if ty != "ERROR" => {
            table::partial_metadata(&obj, &format!("meta.k8s.io/{v}"))
        }
        _ => obj,
    };
    let mut b = serde_json::to_vec(&json!({ "type": ty, "object": obj })).expect("json");
    b.push(b'\n');
    Bytes::from(b)
}

fn bookmark(rt: &ResourceType, rev: Revision, initial_end: bool) -> Value {
    let mut meta = json!({ "resourceVersion": rev.to_string() });
    if initial_end {
        meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    json!({ "kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta })
}

pub async fn serve(
    state: Arc<State>,
    rt: &'static ResourceType,
    ns: Option<String>,
    q: &Query,
    out: Output,
) -> ApiResult<Response<Body>> {
    let filter = Filter {
        labels: LabelSelector::parse(q.get("labelSelector").unwrap_or_default())?,
        fields: FieldSelector::parse(q.get("fieldSelector").unwrap_or_default(), rt)?,
    };
    let include = q.include_object()?;
    let timeout = match q.int("timeoutSeconds")? {
        Some(t) if t > 0 => Duration::from_secs(t as u64),
        _ => DEFAULT_TIMEOUT,
    };
    let bookmarks = q.flag("allowWatchBookmarks");
    let rv = q.get("resourceVersion").unwrap_or_default().to_string();
    let initial = q.bool("sendInitialEvents");
    let explicit_initial = initial == Some(true);
    let send_initial = initial.unwrap_or(rv.is_empty() || rv == "0");
    if explicit_initial {
        if !bookmarks {
            return Err(ApiError::invalid(
                "",
                "ListOptions",
                "",
                &[super::status::FieldError::forbidden(
                    "allowWatchBookmarks",
                    "allowWatchBookmarks required when sendInitialEvents is true",
                )],
            ));
        }
        if !(rv.is_empty() || rv == "0") && q.get("resourceVersionMatch") != Some("NotOlderThan") {
            return Err(ApiError::bad_request(
                "sendInitialEvents with a resourceVersion needs resourceVersionMatch=NotOlderThan",
            ));
        }
    }
    let start: Option<Revision> = if rv.is_empty() || rv == "0" {
        None
    } else {
        Some(parse_rv(&rv)?)
    };

    let (tx, rx) = mpsc::channel::<Bytes>(128);
    let prefix = rt.prefix(ns.as_deref());
    // The starting point is fixed before the response head goes out, as
    // upstream registers its watcher before writing the 200: a client that
    // has its 200 knows that every later write reaches it as an event.
    // Without this, a write racing a `resourceVersion=0` watch can land in
    // the initial state instead — which `kubectl get NAME -w` does not
    // print, since it drops the first event as the object it already showed.
    let first_page = if send_initial {
        Some(state.store.list(&prefix, start, None, Some(500)).await)
    } else {
        None
    };
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let send = |b: Bytes| {
            let tx = tx.clone();
            async move { tx.send(b).await.is_ok() }
        };
        let fail = |e: StoreError| send(store_error(e, rt, out, include));
        // Initial state.
        let mut last = match first_page {
            Some(mut page) => {
                let at = loop {
                    let p = match page {
                        Ok(p) => p,
                        Err(e) => {
                            fail(e).await;
                            return;
                        }
                    };
                    for kv in &p.items {
                        let Ok(obj) = from_kv(kv) else { continue };
                        if filter.matches(&obj) && !send(line("ADDED", obj, rt, out, include)).await
                        {
                            return;
                        }
                    }
                    let Some(after) = p.items.last().filter(|_| p.more) else {
                        break p.revision;
                    };
                    // Later pages are read at the first page's revision.
                    page = state
                        .store
                        .list(&prefix, Some(p.revision), Some(&after.key), Some(500))
                        .await;
                };
                if explicit_initial
                    && !send(line("BOOKMARK", bookmark(rt, at, true), rt, out, include)).await
                {
                    return;
                }
                at
            }
            None => start.unwrap_or(0),
        };

        let mut events = match state.store.watch(&prefix, last).await {
            Ok(s) => s,
            Err(e) => {
                fail(e).await;
                return;
            }
        };
        let mut ticker = tokio::time::interval(state.bookmark_interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
                _ = ticker.tick(), if bookmarks => {
                    if !send(line("BOOKMARK", bookmark(rt, last, false), rt, out, include)).await {
                        return;
                    }
                }
                ev = events.recv() => {
                    match ev {
                        None => return,
                        Some(Err(e)) => {
                            fail(e).await;
                            return;
                        }
                        Some(Ok(ev)) => {
                            last = last.max(ev.kv.mod_revision);
                            if let Some((ty, obj)) = translate(&ev, &filter)
                                && !send(line(ty, obj, rt, out, include)).await
                            {
                                return;
                            }
                        }
                    }
                }
            }
        }
    });

    let mut resp = Response::new(ChannelBody(rx).boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    Ok(resp)
}

/// The ERROR event that ends a watch the store cannot serve: 410 when its
/// revision was compacted away, 504 ("Too large resource version") when it
/// is newer than the store.
fn store_error(
    e: StoreError,
    rt: &ResourceType,
    out: Output,
    include: table::IncludeObject,
) -> Bytes {
    let e = match e {
        StoreError::Compacted {
            requested,
            compacted,
        } => ApiError::gone(format!(
            "too old resource version: {requested} ({compacted})"
        )),
        StoreError::FutureRevision(r) => {
            ApiError::timeout(format!("Too large resource version: {r}"))
        }
        other => ApiError::internal(format!("storage: {other}")),
    };
    line("ERROR", e.to_status(), rt, out, include)
}

/// The event this watcher sees for a store event, if any.
fn translate(ev: &Event, filter: &Filter) -> Option<(&'static str, Value)> {
    match ev.kind {
        EventKind::Put => {
            let new = from_kv(&ev.kv).ok()?;
            let old = ev.prev.as_ref().and_then(|p| from_kv(p).ok());
            let now_matches = filter.matches(&new);
            let was = old.as_ref().is_some_and(|o| filter.matches(o));
            match (old.is_some(), was, now_matches) {
                (false, _, true) => Some(("ADDED", new)),
                (true, true, true) => Some(("MODIFIED", new)),
                (true, false, true) => Some(("ADDED", new)),
                (true, true, false) => Some(("DELETED", new)),
                _ => None,
            }
        }
        EventKind::Delete => {
            let mut obj = from_kv(&ev.kv).ok()?;
            set_rv(&mut obj, ev.kv.mod_revision);
            filter.matches(&obj).then_some(("DELETED", obj))
        }
    }
}
