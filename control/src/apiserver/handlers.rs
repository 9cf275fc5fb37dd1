//! The verbs on resources: get, list, create, update, patch, delete,
//! deletecollection, and the status/binding/scale subresources.
//!
//! Objects are stored as JSON without `metadata.resourceVersion`; the
//! store's `mod_revision` is injected on every read, and every write is a
//! compare-and-swap against the revision that was read, so concurrent
//! writers get 409 Conflict instead of losing updates.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Method, Response, header};
use kcontrol_store::{KeyValue, Revision, Store, StoreError};
use serde_json::{Map, Value, json};

use super::allocate::{self, Allocator, ClaimError};
use super::http::{Body, Output, Query, decode_body, encode};
use super::patch;
use super::resources::{RESOURCES, ResourceType, lookup};
use super::selectors::{FieldSelector, LabelSelector};
use super::status::{ApiError, ApiResult, FieldError, success};
use super::table;
use super::validate::normalize;

pub struct State {
    pub store: Arc<dyn Store>,
    pub alloc: Allocator,
    pub token: String,
    /// `host:port` clients reach this server at (discovery).
    pub server_address: String,
    /// How often a watch that allows bookmarks gets one.
    pub bookmark_interval: Duration,
}

/// Namespaces that always exist and cannot be deleted.
pub const SYSTEM_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

/// What a resource path names.
#[derive(Debug)]
pub struct Target {
    pub rt: &'static ResourceType,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

/// Parses the segments after `/api/v1` or `/apis/{group}/{version}`.
/// Returns the target and whether the path had the legacy `watch/` prefix.
pub fn parse_target(group: &str, version: &str, segs: &[&str]) -> Option<(Target, bool)> {
    let (watch, segs) = match segs.first() {
        Some(&"watch") => (true, &segs[1..]),
        _ => (false, segs),
    };
    let owned = |s: &str| Some(s.to_string());
    // /namespaces/{ns}/{plural}[/{name}[/{sub}]]
    if segs.len() >= 3
        && segs[0] == "namespaces"
        && let Some(rt) = lookup(group, version, segs[2]).filter(|r| r.namespaced)
    {
        if segs.len() > 5 || segs[1].is_empty() {
            return None;
        }
        return Some((
            Target {
                rt,
                namespace: owned(segs[1]),
                name: segs.get(3).and_then(|s| owned(s)),
                sub: segs.get(4).and_then(|s| owned(s)),
            },
            watch,
        ));
    }
    // /{plural}[/{name}[/{sub}]]: cluster-scoped kinds, or a namespaced
    // kind across all namespaces (collection only).
    let rt = lookup(group, version, segs.first()?)?;
    if segs.len() > 3 || (rt.namespaced && segs.len() > 1) {
        return None;
    }
    Some((
        Target {
            rt,
            namespace: None,
            name: segs.get(1).and_then(|s| owned(s)),
            sub: segs.get(2).and_then(|s| owned(s)),
        },
        watch,
    ))
}

// ---------------------------------------------------------------------------
// Stored form.

pub fn set_rv(v: &mut Value, rev: Revision) {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), json!(rev.to_string()));
    }
}

/// The object of a stored key-value, with its resourceVersion.
pub fn from_kv(kv: &KeyValue) -> ApiResult<Value> {
    let mut v: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::internal(format!("stored object {} is corrupt: {e}", kv.key)))?;
    set_rv(&mut v, kv.mod_revision);
    Ok(v)
}

fn without_rv(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("selfLink");
    }
    v
}

fn to_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(&without_rv(v)).expect("JSON values serialize")
}

/// Runs a Service write that holds an address claim in a task of its own,
/// settling the claim with the outcome: a client that goes away cannot stop
/// it between the commit and the bookkeeping. Other writes run inline.
async fn settle(
    ticket: Option<super::allocate::Ticket>,
    write: impl std::future::Future<Output = Result<Revision, StoreError>> + Send + 'static,
) -> ApiResult<Result<Revision, StoreError>> {
    let Some(ticket) = ticket else {
        return Ok(write.await);
    };
    tokio::spawn(async move {
        let res = write.await;
        ticket.settle(res.as_ref().ok().copied());
        res
    })
    .await
    .map_err(|e| ApiError::internal(format!("store write task: {e}")))
}

fn internal(e: StoreError) -> ApiError {
    ApiError::internal(format!("storage: {e}"))
}

fn uid_of(v: &Value) -> &str {
    meta_str(v, "uid").unwrap_or_default()
}

fn meta_str<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// `now` plus `secs`, in the same format.
fn after_seconds(secs: i64) -> String {
    let t = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(secs))
        .unwrap_or_else(|_| jiff::Timestamp::now());
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The grace period a DELETE of `pod` gets, `None` when it goes at once:
/// unbound pods, pods that already ended, and gracePeriodSeconds=0 (from
/// DeleteOptions or the query) are removed immediately; a bound pod
/// otherwise gets the requested period, else its
/// spec.terminationGracePeriodSeconds, else 30 s.
fn pod_grace_period(pod: &Value, opts: &Value, q: &Query) -> ApiResult<Option<i64>> {
    let requested = match opts.get("gracePeriodSeconds") {
        Some(Value::Null) | None => match q.get("gracePeriodSeconds") {
            None | Some("") => None,
            Some(s) => Some(s.parse::<i64>().map_err(|_| {
                ApiError::bad_request(format!("gracePeriodSeconds: invalid integer {s:?}"))
            })?),
        },
        Some(v) => Some(v.as_i64().ok_or_else(|| {
            ApiError::bad_request(format!("gracePeriodSeconds: not an integer: {v}"))
        })?),
    };
    let bound = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let ended = matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    );
    if !bound || ended {
        return Ok(None);
    }
    let grace = requested
        .or_else(|| {
            pod.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
        })
        .unwrap_or(30);
    Ok((grace > 0).then_some(grace))
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("getrandom");
    b
}

fn new_uid() -> String {
    let mut b: [u8; 16] = random_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The 5-character suffix of `generateName` (consonants and digits, as
/// upstream, so no words are spelled).
fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    random_bytes::<5>()
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// Kinds whose spec changes bump `metadata.generation`.
fn tracks_generation(rt: &ResourceType) -> bool {
    matches!(rt.kind, "Deployment" | "ReplicaSet")
}

fn encode_continue(rev: Revision, key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&json!({ "rv": rev, "start": key })).expect("json"))
}

fn decode_continue(token: &str) -> ApiResult<(Revision, String)> {
    let bad = || ApiError::bad_request("continue key is not valid: invalid continue token");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let rv = v.get("rv").and_then(Value::as_i64).ok_or_else(bad)?;
    let key = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    Ok((rv, key.to_string()))
}

/// Checks a DELETE's options (body and query) before anything is read or
/// written: wrong types are a 400 naming the field, unsupported values a
/// 422, as upstream.
pub fn check_delete_options(opts: &Value, q: &Query) -> ApiResult<()> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::DeleteOptions;
    let mut typed = opts.clone();
    if let Some(m) = typed.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
    } else {
        return Err(ApiError::bad_request(
            "DeleteOptions in body must be a JSON object",
        ));
    }
    let o: DeleteOptions = serde_path_to_error::deserialize(&typed).map_err(|e| {
        ApiError::bad_request(format!(
            "DeleteOptions in body is invalid: {}: {}",
            e.path(),
            e.inner()
        ))
    })?;
    let mut errs = Vec::new();
    let policy = q
        .get("propagationPolicy")
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .or(o.propagation_policy);
    if let Some(p) = policy
        && !["Orphan", "Background", "Foreground"].contains(&p.as_str())
    {
        errs.push(FieldError::invalid(
            "propagationPolicy",
            json!(p),
            "supported values: \"Orphan\", \"Background\", \"Foreground\"",
        ));
    }
    if let Some(g) = q.get("gracePeriodSeconds").filter(|g| !g.is_empty())
        && g.parse::<i64>().is_err()
    {
        return Err(ApiError::bad_request(format!(
            "invalid value for gracePeriodSeconds: {g:?} is not an integer"
        )));
    }
    for d in o.dry_run.iter().flatten() {
        if d != "All" {
            errs.push(FieldError::invalid(
                "dryRun",
                json!(d),
                "supported values: \"All\"",
            ));
        }
    }
    if let Some(rv) = o
        .preconditions
        .as_ref()
        .and_then(|p| p.resource_version.as_deref())
    {
        parse_rv(rv)?;
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid("meta.k8s.io", "DeleteOptions", "", &errs))
    }
}

pub fn parse_rv(s: &str) -> ApiResult<Revision> {
    s.parse::<Revision>()
        .ok()
        .filter(|r| *r >= 0)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "invalid resource version {s:?}: must be an integer"
            ))
        })
}

/// Checks (and fills in) `apiVersion`/`kind` of a request body.
fn check_type(rt: &ResourceType, obj: &mut Value) -> ApiResult<()> {
    let Some(m) = obj.as_object_mut() else {
        return Err(ApiError::bad_request(format!(
            "the request body must be a JSON object (a {})",
            rt.kind
        )));
    };
    let api_version = rt.api_version();
    match m.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => {
            m.insert("apiVersion".into(), json!(api_version));
        }
        Some(v) if v == api_version => {}
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            )));
        }
    }
    match m.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            m.insert("kind".into(), json!(rt.kind));
        }
        Some(k) if k == rt.kind => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                rt.kind
            )));
        }
    }
    match m.get("metadata") {
        None | Some(Value::Null) => {
            m.insert("metadata".into(), json!({}));
        }
        Some(Value::Object(_)) => {}
        Some(_) => return Err(ApiError::bad_request("metadata must be an object")),
    }
    Ok(())
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    obj.get_mut("metadata")
        .and_then(Value::as_object_mut)
        .expect("check_type made metadata an object")
}

/// Namespace of a request body against the one in the URL.
fn check_namespace(rt: &ResourceType, obj: &mut Value, ns: Option<&str>) -> ApiResult<()> {
    let meta = meta_mut(obj);
    if !rt.namespaced {
        meta.remove("namespace");
        return Ok(());
    }
    let ns = ns
        .ok_or_else(|| ApiError::bad_request("a namespaced object needs a namespace in the URL"))?;
    match meta.get("namespace").and_then(Value::as_str) {
        None | Some("") => {
            meta.insert("namespace".into(), json!(ns));
            Ok(())
        }
        Some(n) if n == ns => Ok(()),
        Some(_) => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
    }
}

/// Status fields a client may not set on create, reset as upstream does.
fn reset_status_on_create(rt: &ResourceType, obj: &mut Value) {
    let m = obj.as_object_mut().expect("object");
    match rt.kind {
        "Pod" | "Service" | "Namespace" => {
            m.remove("status");
        }
        "Deployment" | "ReplicaSet" => {
            m.insert("status".into(), json!({}));
        }
        _ => {}
    }
}

fn unknown_field_error(fields: &[String]) -> ApiError {
    let list: Vec<String> = fields
        .iter()
        .map(|f| format!("unknown field {f:?}"))
        .collect();
    ApiError::bad_request(format!("strict decoding error: {}", list.join(", ")))
}

fn warnings(fields: &[String]) -> Vec<String> {
    fields
        .iter()
        .map(|f| format!("unknown field {f:?}"))
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Main,
    Status,
}

/// A page of a list.
pub struct ListResult {
    pub items: Vec<Value>,
    pub revision: Revision,
    pub cont: Option<String>,
}

impl State {
    async fn get_kv(&self, rt: &ResourceType, ns: Option<&str>, name: &str) -> ApiResult<KeyValue> {
        self.store
            .get(&rt.key(ns, name))
            .await
            .map_err(internal)?
            .ok_or_else(|| ApiError::not_found(rt.group, rt.plural, name))
    }

    async fn ensure_namespace(&self, ns: &str) -> ApiResult<()> {
        let nsrt = lookup("", "v1", "namespaces").expect("namespaces");
        let kv = self.get_kv(nsrt, None, ns).await?;
        let obj = from_kv(&kv)?;
        if obj.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(ApiError::forbidden(format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            )));
        }
        Ok(())
    }

    /// Tells the allocator which addresses the stored Services hold — and,
    /// on a shared store, which are claimed — as of one revision (at start,
    /// before anything is served; on a shared store again whenever an
    /// allocation finds its picture out of date).
    pub async fn load_service_addresses(&self) -> anyhow::Result<()> {
        let svc = lookup("", "v1", "services").expect("services");
        let services = self.list_all(&svc.prefix(None), None).await?;
        let at = services.0;
        let mut items = Vec::with_capacity(services.1.len());
        for kv in services.1 {
            let obj: Value = serde_json::from_slice(&kv.value)
                .with_context(|| format!("stored Service {} is not JSON", kv.key))?;
            items.push((kv.key, kv.mod_revision, obj));
        }
        let claims = if self.alloc.shared() {
            self.list_all(allocate::CLAIM_PREFIX, Some(at)).await?.1
        } else {
            Vec::new()
        };
        self.alloc.resynced(at, items, &claims);
        Ok(())
    }

    /// Every key under `prefix` at revision `at` (latest if `None`), and
    /// the revision read at.
    async fn list_all(
        &self,
        prefix: &str,
        mut at: Option<Revision>,
    ) -> Result<(Revision, Vec<KeyValue>), StoreError> {
        let mut after: Option<String> = None;
        let mut out = Vec::new();
        loop {
            let page = self
                .store
                .list(prefix, at, after.as_deref(), Some(1000))
                .await?;
            at = Some(page.revision);
            after = page.items.last().map(|kv| kv.key.clone()).or(after);
            out.extend(page.items);
            if !page.more {
                return Ok((page.revision, out));
            }
        }
    }

    /// Fills in a Service's addresses (see [`Allocator::assign`]) and claims
    /// them in memory until the returned ticket is settled. On a shared
    /// store a real write also claims, in the store, the addresses `old`
    /// did not hold, so that no other apiserver hands them out; those
    /// claims are returned (to release if the write fails). An address
    /// claimed in the store by someone else, or a range that looks full,
    /// makes the allocator re-read the store and try again (a range still
    /// full with a fresh picture waits for writes in flight here first):
    /// auto-picked addresses are picked again, requested ones taken are
    /// refused.
    async fn allocate_service(
        &self,
        rt: &ResourceType,
        name: &str,
        key: &str,
        out: &mut Value,
        old: Option<&Value>,
        dry_run: bool,
    ) -> ApiResult<(allocate::Ticket, Vec<String>)> {
        let held = old.map(allocate::claim_keys).unwrap_or_default();
        let shared = self.alloc.shared();
        // The picture in memory was just re-read and nothing learned since.
        let mut fresh = false;
        for _ in 0..16 {
            let mut candidate = out.clone();
            let ticket = match self.alloc.claim(key, &mut candidate, old) {
                Ok(t) => t,
                Err(errs) if shared => {
                    // Taken or full even so: only writes in flight here can
                    // still free something.
                    if fresh
                        && !self
                            .alloc
                            .settled_elsewhere(key, Duration::from_secs(5))
                            .await
                    {
                        return Err(ApiError::invalid(rt.group, rt.kind, name, &errs));
                    }
                    self.resync_service_addresses().await?;
                    fresh = true;
                    continue;
                }
                Err(errs) => return Err(ApiError::invalid(rt.group, rt.kind, name, &errs)),
            };
            if !shared || dry_run {
                *out = candidate;
                return Ok((ticket, Vec::new()));
            }
            let wanted = allocate::claim_keys(&candidate)
                .difference(&held)
                .cloned()
                .collect();
            match allocate::claim(&*self.store, &wanted, key, uid_of(&candidate)).await {
                Ok(claimed) => {
                    *out = candidate;
                    return Ok((ticket, claimed));
                }
                Err(ClaimError::Taken(k)) => {
                    drop(ticket);
                    self.resync_service_addresses().await?;
                    self.alloc.claimed_elsewhere(&k);
                    fresh = false;
                }
                Err(ClaimError::Store(e)) => return Err(internal(e)),
            }
        }
        Err(ApiError::internal(
            "could not claim free Service addresses after 16 tries",
        ))
    }

    /// The Service `svc` at `key` was deleted at `rev`: its addresses are
    /// free, here and (shared store) for the other apiservers.
    async fn service_deleted(&self, key: &str, rev: Revision, svc: &Value) {
        self.alloc.deleted(key, rev);
        if self.alloc.shared() {
            allocate::release_dropped(&*self.store, key, svc, None).await;
        }
    }

    async fn resync_service_addresses(&self) -> ApiResult<()> {
        self.load_service_addresses()
            .await
            .map_err(|e| ApiError::internal(format!("reading Service addresses: {e:#}")))
    }

    /// List with selectors, limit/continue and resourceVersion semantics.
    pub async fn list_objects(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        q: &Query,
    ) -> ApiResult<ListResult> {
        let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or_default())?;
        let fields = FieldSelector::parse(q.get("fieldSelector").unwrap_or_default(), rt)?;
        let limit = q.int("limit")?.filter(|l| *l > 0).map(|l| l as usize);
        let prefix = rt.prefix(ns);
        let mut at: Option<Revision> = None;
        let mut start_after: Option<String> = None;
        let rv = q.get("resourceVersion").unwrap_or_default();
        let rv_match = q.get("resourceVersionMatch").unwrap_or_default();
        if let Some(token) = q.get("continue").filter(|c| !c.is_empty()) {
            if !rv.is_empty() && rv != "0" {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let (rev, key) = decode_continue(token)?;
            if !key.starts_with(&prefix) {
                return Err(ApiError::bad_request(
                    "continue key is not valid: it belongs to another list",
                ));
            }
            at = Some(rev);
            start_after = Some(key);
        } else {
            match (rv, rv_match) {
                ("", "") => {}
                ("", _) => {
                    return Err(ApiError::bad_request(
                        "resourceVersionMatch is forbidden unless resourceVersion is provided",
                    ));
                }
                (rv, "Exact") => {
                    if rv == "0" {
                        return Err(ApiError::bad_request(
                            "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
                        ));
                    }
                    at = Some(parse_rv(rv)?);
                }
                (rv, "" | "NotOlderThan") => {
                    // Served from the latest state, which is never older.
                    if rv != "0" {
                        let want = parse_rv(rv)?;
                        let cur = self.store.current_revision().await.map_err(internal)?;
                        if want > cur {
                            return Err(ApiError::timeout(format!(
                                "Too large resource version: {want}, current: {cur}"
                            )));
                        }
                    }
                }
                (_, other) => {
                    return Err(ApiError::bad_request(format!(
                        "resourceVersionMatch: unsupported value {other:?}: supported values: \"Exact\", \"NotOlderThan\""
                    )));
                }
            }
        }
        let page_size = limit.map_or(1000, |l| l.clamp(50, 1000));
        let mut items = Vec::new();
        let mut revision = None;
        let mut cont_key = None;
        'pages: loop {
            let page = self
                .store
                .list(&prefix, at, start_after.as_deref(), Some(page_size))
                .await
                .map_err(|e| match e {
                    StoreError::Compacted { requested, compacted } => ApiError::gone(format!(
                        "The resourceVersion for the provided list is too old (requested {requested}, oldest kept {compacted}); start a new list without a continue token or resourceVersion"
                    )),
                    StoreError::FutureRevision(r) => {
                        ApiError::timeout(format!("Too large resource version: {r}"))
                    }
                    other => internal(other),
                })?;
            at = Some(page.revision);
            revision.get_or_insert(page.revision);
            let n = page.items.len();
            for (i, kv) in page.items.iter().enumerate() {
                start_after = Some(kv.key.clone());
                let obj = from_kv(kv)?;
                if labels.matches(&obj) && fields.matches(&obj) {
                    items.push(obj);
                    if limit == Some(items.len()) {
                        if i + 1 < n || page.more {
                            cont_key = Some(kv.key.clone());
                        }
                        break 'pages;
                    }
                }
            }
            if !page.more {
                break;
            }
        }
        let revision = revision.unwrap_or(0);
        Ok(ListResult {
            cont: cont_key.map(|k| encode_continue(revision, &k)),
            items,
            revision,
        })
    }

    /// Creates an object; returns it and the warnings.
    async fn create(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        mut obj: Value,
        q: &Query,
    ) -> ApiResult<(Value, Vec<String>)> {
        check_type(rt, &mut obj)?;
        check_namespace(rt, &mut obj, ns)?;
        let dry_run = q.dry_run()?;
        let strict = q.strict_fields()?;
        {
            let meta = meta_mut(&mut obj);
            for f in [
                "resourceVersion",
                "selfLink",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ] {
                meta.remove(f);
            }
            meta.insert("uid".into(), json!(new_uid()));
            meta.insert("creationTimestamp".into(), json!(now()));
            if tracks_generation(rt) {
                meta.insert("generation".into(), json!(1));
            } else {
                meta.remove("generation");
            }
        }
        reset_status_on_create(rt, &mut obj);
        let generated = meta_str(&obj, "name").is_none_or(str::is_empty)
            && meta_str(&obj, "generateName").is_some_and(|g| !g.is_empty());
        if rt.namespaced
            && let Some(ns) = ns
        {
            self.ensure_namespace(ns).await?;
        }
        // A generated name that collides is tried again with another suffix.
        for _ in 0..5 {
            if generated {
                let base = meta_str(&obj, "generateName")
                    .unwrap_or_default()
                    .to_string();
                meta_mut(&mut obj).insert("name".into(), json!(format!("{base}{}", name_suffix())));
            }
            let norm = normalize(rt, &obj, None)?;
            if strict && !norm.unknown_fields.is_empty() {
                return Err(unknown_field_error(&norm.unknown_fields));
            }
            let mut out = norm.object;
            let name = meta_str(&out, "name").unwrap_or_default().to_string();
            let key = rt.key(ns, &name);
            let mut claimed = Vec::new();
            let ticket = if rt.kind == "Service" {
                let (ticket, c) = self
                    .allocate_service(rt, &name, &key, &mut out, None, dry_run)
                    .await?;
                claimed = c;
                Some(ticket)
            } else {
                None
            };
            if dry_run {
                return Ok((out, warnings(&norm.unknown_fields)));
            }
            let store = self.store.clone();
            let (k, bytes) = (key.clone(), to_bytes(&out));
            let result = settle(ticket, async move { store.create(&k, bytes).await }).await?;
            if result.is_err() && !claimed.is_empty() {
                allocate::release(&*self.store, &claimed, &key, uid_of(&out)).await;
            }
            match result {
                Ok(rev) => {
                    set_rv(&mut out, rev);
                    return Ok((out, warnings(&norm.unknown_fields)));
                }
                Err(StoreError::AlreadyExists(_)) if generated => continue,
                Err(StoreError::AlreadyExists(_)) => {
                    return Err(ApiError::already_exists(rt.group, rt.plural, &name));
                }
                Err(e) => return Err(internal(e)),
            }
        }
        Err(ApiError::new(
            500,
            "AlreadyExists",
            "could not find a free generated name after 5 tries",
        ))
    }

    /// Replaces the object read as `kv` with `body` (a full object). In
    /// status mode only `.status` is taken from the body.
    #[allow(clippy::too_many_arguments)]
    async fn update_from(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        kv: KeyValue,
        mut body: Value,
        q: &Query,
        mode: Mode,
    ) -> ApiResult<(Value, Vec<String>)> {
        let dry_run = q.dry_run()?;
        let strict = q.strict_fields()?;
        let old = from_kv(&kv)?;
        check_type(rt, &mut body)?;
        check_namespace(rt, &mut body, ns)?;
        match meta_str(&body, "name") {
            None | Some("") => {
                meta_mut(&mut body).insert("name".into(), json!(name));
            }
            Some(n) if n == name => {}
            Some(n) => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
        }
        if let Some(rv) = meta_str(&body, "resourceVersion").filter(|r| !r.is_empty())
            && parse_rv(rv)? != kv.mod_revision
        {
            return Err(ApiError::conflict(rt.group, rt.plural, name));
        }
        let mut new = match mode {
            Mode::Main => {
                let mut n = body;
                let old_meta = old.get("metadata").cloned().unwrap_or_default();
                let meta = meta_mut(&mut n);
                for f in [
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "generation",
                ] {
                    match old_meta.get(f) {
                        Some(v) => meta.insert(f.into(), v.clone()),
                        None => meta.remove(f),
                    };
                }
                if rt.has_subresource("status") {
                    let m = n.as_object_mut().expect("object");
                    match old.get("status") {
                        Some(s) => m.insert("status".into(), s.clone()),
                        None => m.remove("status"),
                    };
                }
                n
            }
            Mode::Status => {
                let mut n = old.clone();
                let m = n.as_object_mut().expect("object");
                match body.get("status") {
                    Some(s) => m.insert("status".into(), s.clone()),
                    None => m.remove("status"),
                };
                // Server-side apply of status records its field set.
                if let Some(mf) = body.pointer("/metadata/managedFields") {
                    meta_mut(&mut n).insert("managedFields".into(), mf.clone());
                }
                n
            }
        };
        if tracks_generation(rt) && new.get("spec") != old.get("spec") {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            meta_mut(&mut new).insert("generation".into(), json!(g + 1));
        }
        let norm = normalize(rt, &new, Some(&old))?;
        if strict && mode == Mode::Main && !norm.unknown_fields.is_empty() {
            return Err(unknown_field_error(&norm.unknown_fields));
        }
        let warns = warnings(&norm.unknown_fields);
        let mut out = norm.object;
        let key = rt.key(ns, name);
        let mut claimed = Vec::new();
        let ticket = if rt.kind == "Service" && mode == Mode::Main {
            let (ticket, c) = self
                .allocate_service(rt, name, &key, &mut out, Some(&old), dry_run)
                .await?;
            claimed = c;
            Some(ticket)
        } else {
            None
        };
        let result = self
            .write_update(rt, name, &key, &kv, &old, out, warns, dry_run, ticket)
            .await;
        // A write that failed or did not happen leaves the new claims unused.
        let release_new = match &result {
            Ok((stored, _)) => claimed
                .iter()
                .any(|k| !allocate::claim_keys(stored).contains(k)),
            Err(_) => true,
        };
        if release_new && !claimed.is_empty() {
            let keep = result
                .as_ref()
                .map(|(stored, _)| allocate::claim_keys(stored))
                .unwrap_or_default();
            let unused: Vec<String> = claimed.into_iter().filter(|k| !keep.contains(k)).collect();
            allocate::release(&*self.store, &unused, &key, uid_of(&old)).await;
        }
        result
    }

    /// The store write of [`State::update_from`]: an update, or the delete
    /// of an object whose last finalizer went.
    #[allow(clippy::too_many_arguments)]
    async fn write_update(
        &self,
        rt: &ResourceType,
        name: &str,
        key: &str,
        kv: &KeyValue,
        old: &Value,
        mut out: Value,
        warns: Vec<String>,
        dry_run: bool,
        ticket: Option<allocate::Ticket>,
    ) -> ApiResult<(Value, Vec<String>)> {
        // A write that changes nothing is not a write (no new revision, no
        // watch event), as upstream.
        if without_rv(&out) == without_rv(old) {
            return Ok((old.clone(), warns));
        }
        set_rv(&mut out, kv.mod_revision);
        if dry_run {
            return Ok((out, warns));
        }
        // The last finalizer removed from an object being deleted ends it.
        let finalized = out.pointer("/metadata/deletionTimestamp").is_some()
            && out
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .is_none_or(|g| g == 0)
            && out
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty);
        if finalized {
            return match self.store.delete(key, Some(kv.mod_revision)).await {
                Ok((rev, _)) => {
                    if rt.kind == "Service" {
                        self.service_deleted(key, rev, old).await;
                    }
                    set_rv(&mut out, rev);
                    Ok((out, warns))
                }
                Err(StoreError::Conflict { .. }) => {
                    Err(ApiError::conflict(rt.group, rt.plural, name))
                }
                Err(StoreError::NotFound(_)) => Err(ApiError::not_found(rt.group, rt.plural, name)),
                Err(e) => Err(internal(e)),
            };
        }
        let store = self.store.clone();
        let (k, bytes, expected) = (key.to_string(), to_bytes(&out), kv.mod_revision);
        match settle(
            ticket,
            async move { store.update(&k, bytes, expected).await },
        )
        .await?
        {
            Ok(rev) => {
                if rt.kind == "Service" && self.alloc.shared() {
                    allocate::release_dropped(&*self.store, key, old, Some(&out)).await;
                }
                set_rv(&mut out, rev);
                Ok((out, warns))
            }
            Err(StoreError::Conflict { .. }) => Err(ApiError::conflict(rt.group, rt.plural, name)),
            Err(StoreError::NotFound(_)) => Err(ApiError::not_found(rt.group, rt.plural, name)),
            Err(e) => Err(internal(e)),
        }
    }

    async fn update(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        body: Value,
        q: &Query,
        mode: Mode,
    ) -> ApiResult<(Value, Vec<String>)> {
        let kv = self.get_kv(rt, ns, name).await?;
        self.update_from(rt, ns, name, kv, body, q, mode).await
    }

    /// Applies a patch to the current object and stores the result,
    /// retrying on a concurrent write unless the patch pins a
    /// resourceVersion.
    #[allow(clippy::too_many_arguments)]
    async fn patch(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        headers: &HeaderMap,
        body: &[u8],
        q: &Query,
        mode: Mode,
    ) -> ApiResult<(Value, Vec<String>, u16)> {
        if patch_mime(headers) == "application/apply-patch+yaml" {
            return self.server_side_apply(rt, ns, name, body, q, mode).await;
        }
        let (ptype, patch) = parse_patch(headers, body)?;
        let pins_rv = match ptype {
            PatchType::Json => patch.as_array().is_some_and(|ops| {
                ops.iter()
                    .any(|o| o.get("path") == Some(&json!("/metadata/resourceVersion")))
            }),
            _ => patch.pointer("/metadata/resourceVersion").is_some(),
        };
        for attempt in 0.. {
            let kv = self.get_kv(rt, ns, name).await?;
            let current = from_kv(&kv)?;
            let patched = apply_patch(ptype, &current, &patch, rt.kind)?;
            match self.update_from(rt, ns, name, kv, patched, q, mode).await {
                Err(e) if e.code == 409 && e.reason == "Conflict" && !pins_rv && attempt < 5 => {
                    continue;
                }
                r => return r.map(|(o, w)| (o, w, 200)),
            }
        }
        unreachable!()
    }

    /// Server-side apply (`apply.rs`): creates the object if missing.
    #[allow(clippy::too_many_arguments)]
    async fn server_side_apply(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        body: &[u8],
        q: &Query,
        mode: Mode,
    ) -> ApiResult<(Value, Vec<String>, u16)> {
        let manager = q
            .get("fieldManager")
            .filter(|m| !m.is_empty())
            .ok_or_else(|| ApiError::bad_request("fieldManager is required for apply requests"))?
            .to_string();
        let applied: Value = serde_yaml::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!(
                "the applied configuration is not valid YAML/JSON: {e}"
            ))
        })?;
        if !applied.is_object() {
            return Err(ApiError::bad_request(
                "the applied configuration must be an object",
            ));
        }
        let mut applied = applied;
        match applied.get("metadata") {
            None | Some(Value::Null) => {
                applied["metadata"] = json!({ "name": name });
            }
            Some(Value::Object(_)) => {}
            Some(_) => return Err(ApiError::bad_request("metadata must be an object")),
        }
        for (field, want) in [
            ("apiVersion", rt.api_version()),
            ("kind", rt.kind.to_string()),
        ] {
            match applied.get(field).and_then(Value::as_str) {
                Some(v) if v == want => {}
                Some(v) => {
                    return Err(ApiError::bad_request(format!(
                        "{field} {v:?} in the applied configuration does not match the request ({want})"
                    )));
                }
                None => {
                    return Err(ApiError::bad_request(format!(
                        "{field} must be set in an applied configuration"
                    )));
                }
            }
        }
        if let Some(n) = meta_str(&applied, "name").filter(|n| *n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        let status = mode == Mode::Status;
        for attempt in 0.. {
            let key = rt.key(ns, name);
            match self.store.get(&key).await.map_err(internal)? {
                None if status => return Err(ApiError::not_found(rt.group, rt.plural, name)),
                None => {
                    let mut obj =
                        super::apply::apply(None, &applied, &manager, rt.kind, false, &now())
                            .map_err(ApiError::bad_request)?;
                    meta_mut(&mut obj).insert("name".into(), json!(name));
                    match self.create(rt, ns, obj, q).await {
                        Err(e) if e.reason == "AlreadyExists" && attempt < 5 => continue,
                        r => return r.map(|(o, w)| (o, w, 201)),
                    }
                }
                Some(kv) => {
                    let current = from_kv(&kv)?;
                    let out = super::apply::apply(
                        Some(&current),
                        &applied,
                        &manager,
                        rt.kind,
                        status,
                        &now(),
                    )
                    .map_err(ApiError::bad_request)?;
                    match self.update_from(rt, ns, name, kv, out, q, mode).await {
                        Err(e) if e.code == 409 && e.reason == "Conflict" && attempt < 5 => {
                            continue;
                        }
                        r => return r.map(|(o, w)| (o, w, 200)),
                    }
                }
            }
        }
        unreachable!()
    }

    /// Deletes an object (or marks it for deletion while it has
    /// finalizers). Returns the object as last stored.
    async fn delete(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        opts: &Value,
        q: &Query,
    ) -> ApiResult<Value> {
        let dry_run = q.dry_run()? || opts.get("dryRun") == Some(&json!(["All"]));
        let kv = self.get_kv(rt, ns, name).await?;
        let mut obj = from_kv(&kv)?;
        if let Some(uid) = opts.pointer("/preconditions/uid").and_then(Value::as_str)
            && Some(uid) != meta_str(&obj, "uid")
        {
            return Err(ApiError::conflict_message(
                rt.group,
                rt.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&obj, "uid").unwrap_or_default()
                ),
            ));
        }
        if let Some(rv) = opts
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            && parse_rv(rv)? != kv.mod_revision
        {
            return Err(ApiError::conflict_message(
                rt.group,
                rt.plural,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    kv.mod_revision
                ),
            ));
        }
        let key = rt.key(ns, name);
        if rt.kind == "Namespace" {
            if SYSTEM_NAMESPACES.contains(&name) {
                return Err(ApiError::forbidden(format!(
                    "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
                )));
            }
            if !dry_run {
                self.delete_namespace_contents(name).await?;
            }
        }
        if rt.kind == "Pod"
            && let Some(grace) = pod_grace_period(&obj, opts, q)?
        {
            // Graceful deletion: the kubelet running the pod stops it and
            // then deletes it again with gracePeriodSeconds=0.
            let current = obj
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64);
            if current.is_none_or(|c| grace < c) {
                let meta = meta_mut(&mut obj);
                meta.insert("deletionTimestamp".into(), json!(after_seconds(grace)));
                meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
                if !dry_run {
                    let rev = self
                        .store
                        .update(&key, to_bytes(&obj), kv.mod_revision)
                        .await
                        .map_err(|e| match e {
                            StoreError::Conflict { .. } => {
                                ApiError::conflict(rt.group, rt.plural, name)
                            }
                            other => internal(other),
                        })?;
                    set_rv(&mut obj, rev);
                }
            }
            return Ok(obj);
        }
        let has_finalizers = obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if has_finalizers && rt.kind != "Namespace" {
            let graceful = obj
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .is_some_and(|g| g != 0);
            if obj.pointer("/metadata/deletionTimestamp").is_none() || graceful {
                let meta = meta_mut(&mut obj);
                meta.insert("deletionTimestamp".into(), json!(now()));
                meta.insert("deletionGracePeriodSeconds".into(), json!(0));
                if !dry_run {
                    let rev = self
                        .store
                        .update(&key, to_bytes(&obj), kv.mod_revision)
                        .await
                        .map_err(|e| match e {
                            StoreError::Conflict { .. } => {
                                ApiError::conflict(rt.group, rt.plural, name)
                            }
                            other => internal(other),
                        })?;
                    set_rv(&mut obj, rev);
                }
            }
            return Ok(obj);
        }
        if dry_run {
            return Ok(obj);
        }
        match self.store.delete(&key, Some(kv.mod_revision)).await {
            Ok((rev, _)) => {
                if rt.kind == "Service" {
                    self.service_deleted(&key, rev, &obj).await;
                }
                Ok(obj)
            }
            Err(StoreError::Conflict { .. }) => Err(ApiError::conflict(rt.group, rt.plural, name)),
            Err(StoreError::NotFound(_)) => Err(ApiError::not_found(rt.group, rt.plural, name)),
            Err(e) => Err(internal(e)),
        }
    }

    /// What the namespace controller does upstream, done inline: every
    /// namespaced object in `ns` goes.
    async fn delete_namespace_contents(&self, ns: &str) -> ApiResult<()> {
        for rt in RESOURCES.iter().filter(|r| r.namespaced) {
            loop {
                let page = self
                    .store
                    .list(&rt.prefix(Some(ns)), None, None, Some(500))
                    .await
                    .map_err(internal)?;
                for kv in &page.items {
                    match self.store.delete(&kv.key, None).await {
                        Ok((rev, last)) if rt.kind == "Service" => {
                            let svc = from_kv(&last).unwrap_or_default();
                            self.service_deleted(&kv.key, rev, &svc).await;
                        }
                        Ok(_) | Err(StoreError::NotFound(_)) => {}
                        Err(e) => return Err(internal(e)),
                    }
                }
                if !page.more {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Creates `default`, `kube-system`, … if missing.
    pub async fn bootstrap(&self) -> anyhow::Result<()> {
        self.load_service_addresses().await?;
        let nsrt = lookup("", "v1", "namespaces").expect("namespaces");
        for ns in SYSTEM_NAMESPACES {
            let obj =
                json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns } });
            match self.create(nsrt, None, obj, &Query::default()).await {
                Ok(_) => {}
                Err(e) if e.reason == "AlreadyExists" => {}
                Err(e) => anyhow::bail!("creating namespace {ns}: {e}"),
            }
        }
        Ok(())
    }

    /// `POST …/pods/{name}/binding`: assigns the pod to a node, once.
    async fn bind(&self, ns: Option<&str>, name: &str, body: Value) -> ApiResult<Value> {
        let pods = lookup("", "v1", "pods").expect("pods");
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a Binding object",
            ));
        }
        let node = body
            .pointer("/target/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if node.is_empty() {
            return Err(ApiError::invalid(
                "",
                "Binding",
                name,
                &[super::status::FieldError::required("target.name", "")],
            ));
        }
        if let Some(n) = meta_str(&body, "name").filter(|n| !n.is_empty() && *n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        loop {
            let kv = self.get_kv(pods, ns, name).await?;
            let mut pod = from_kv(&kv)?;
            if let Some(uid) = body.pointer("/metadata/uid").and_then(Value::as_str)
                && Some(uid) != meta_str(&pod, "uid")
            {
                return Err(ApiError::conflict_message(
                    "",
                    "pods",
                    name,
                    "the UID in the binding does not match the pod",
                ));
            }
            if let Some(cur) = pod
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
            {
                return Err(ApiError::conflict_message(
                    "",
                    "pods",
                    name,
                    &format!("pod {name} is already assigned to node \"{cur}\""),
                ));
            }
            if pod.pointer("/metadata/deletionTimestamp").is_some() {
                return Err(ApiError::conflict_message(
                    "",
                    "pods",
                    name,
                    "pod is being deleted, cannot be assigned to a host",
                ));
            }
            pod["spec"]["nodeName"] = json!(node);
            let conds = pod["status"]
                .as_object_mut()
                .map(|s| s.entry("conditions").or_insert(json!([])));
            if let Some(Value::Array(conds)) = conds {
                conds.retain(|c| c.get("type") != Some(&json!("PodScheduled")));
                conds.push(json!({ "type": "PodScheduled", "status": "True", "lastTransitionTime": now() }));
            }
            match self
                .store
                .update(&kv.key, to_bytes(&pod), kv.mod_revision)
                .await
            {
                Ok(_) => {
                    let mut s = success("", "pods", name, None);
                    s["code"] = json!(201);
                    return Ok(s);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(StoreError::NotFound(_)) => return Err(ApiError::not_found("", "pods", name)),
                Err(e) => return Err(internal(e)),
            }
        }
    }
}

/// `autoscaling/v1` Scale of a Deployment.
fn scale_of(dep: &Value) -> Value {
    let selector = dep
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": dep.pointer("/metadata/name"),
            "namespace": dep.pointer("/metadata/namespace"),
            "uid": dep.pointer("/metadata/uid"),
            "resourceVersion": dep.pointer("/metadata/resourceVersion"),
            "creationTimestamp": dep.pointer("/metadata/creationTimestamp"),
        },
        "spec": { "replicas": dep.pointer("/spec/replicas").cloned().unwrap_or(json!(1)) },
        "status": {
            "replicas": dep.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": selector,
        },
    })
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum PatchType {
    Json,
    Merge,
    Strategic,
}

fn patch_mime(headers: &HeaderMap) -> String {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    ctype
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn parse_patch(headers: &HeaderMap, body: &[u8]) -> ApiResult<(PatchType, Value)> {
    let mime = patch_mime(headers);
    let ptype = match mime.as_str() {
        "application/json-patch+json" => PatchType::Json,
        "application/merge-patch+json" => PatchType::Merge,
        "application/strategic-merge-patch+json" => PatchType::Strategic,
        "application/apply-patch+yaml" => {
            return Err(ApiError::unsupported_media_type(
                "server-side apply is not supported on this subresource",
            ));
        }
        other => {
            return Err(ApiError::unsupported_media_type(format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {other:?})"
            )));
        }
    };
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the patch is not valid JSON: {e}")))?;
    Ok((ptype, patch))
}

fn apply_patch(ptype: PatchType, current: &Value, patch: &Value, kind: &str) -> ApiResult<Value> {
    match ptype {
        PatchType::Merge => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            let mut v = current.clone();
            patch::merge_patch(&mut v, patch);
            Ok(v)
        }
        PatchType::Strategic => {
            patch::strategic_merge(current, patch, kind).map_err(ApiError::bad_request)
        }
        PatchType::Json => {
            if !patch.is_array() {
                return Err(ApiError::bad_request(
                    "a JSON patch must be a list of operations",
                ));
            }
            let mut v = current.clone();
            patch::json_patch(&mut v, patch).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the JSON patch could not be applied: {e}"),
                )
            })?;
            Ok(v)
        }
    }
}

// ---------------------------------------------------------------------------
// Dispatch.

fn list_object(rt: &ResourceType, res: &ListResult, items: Vec<Value>) -> Value {
    let mut meta = json!({ "resourceVersion": res.revision.to_string() });
    if let Some(c) = &res.cont {
        meta["continue"] = json!(c);
    }
    json!({
        "kind": format!("{}List", rt.kind),
        "apiVersion": rt.api_version(),
        "metadata": meta,
        "items": items,
    })
}

/// Formats one object or a list for the negotiated output.
fn render(
    rt: &ResourceType,
    objects: Vec<Value>,
    list: Option<&ListResult>,
    out: Output,
    q: &Query,
) -> ApiResult<Value> {
    match out {
        Output::Table(v) => {
            let meta = match list {
                Some(l) => {
                    let mut m = json!({ "resourceVersion": l.revision.to_string() });
                    if let Some(c) = &l.cont {
                        m["continue"] = json!(c);
                    }
                    m
                }
                None => {
                    json!({ "resourceVersion": objects.first().and_then(|o| o.pointer("/metadata/resourceVersion")).cloned().unwrap_or(json!("")) })
                }
            };
            Ok(table::table(rt, &objects, meta, q.include_object()?, v))
        }
        Output::PartialMeta(v) => {
            let api_version = format!("meta.k8s.io/{v}");
            let items: Vec<Value> = objects
                .iter()
                .map(|o| table::partial_metadata(o, &api_version))
                .collect();
            match list {
                Some(l) => {
                    let mut doc = list_object(rt, l, items);
                    doc["kind"] = json!("PartialObjectMetadataList");
                    doc["apiVersion"] = json!(api_version);
                    Ok(doc)
                }
                None => Ok(items.into_iter().next().unwrap_or_default()),
            }
        }
        _ => match list {
            Some(l) => Ok(list_object(rt, l, objects)),
            None => Ok(objects.into_iter().next().unwrap_or_default()),
        },
    }
}

fn respond(code: u16, v: Value, out: Output, warns: &[String]) -> Response<Body> {
    encode(code, &v, out, warns)
}

/// Serves one request on a resource path.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    state: &Arc<State>,
    method: &Method,
    target: Target,
    watch_prefix: bool,
    mut q: Query,
    headers: &HeaderMap,
    body: Bytes,
    out: Output,
) -> ApiResult<Response<Body>> {
    let Target {
        rt,
        namespace,
        name,
        sub,
    } = target;
    let ns = namespace.as_deref();
    let out = if out == Output::Protobuf {
        Output::Json
    } else {
        out
    };
    let body_value = || decode_body(headers, &body);
    match (name.as_deref(), sub.as_deref()) {
        // Collections.
        (None, None) => {
            if watch_prefix || q.flag("watch") {
                if *method != Method::GET {
                    return Err(ApiError::method_not_allowed("watch needs GET"));
                }
                return super::watch::serve(state.clone(), rt, namespace, &q, out).await;
            }
            match *method {
                Method::GET => {
                    let mut res = state.list_objects(rt, ns, &q).await?;
                    let items = std::mem::take(&mut res.items);
                    Ok(respond(
                        200,
                        render(rt, items, Some(&res), out, &q)?,
                        out,
                        &[],
                    ))
                }
                Method::POST => {
                    if rt.namespaced && ns.is_none() {
                        return Err(ApiError::method_not_allowed(format!(
                            "{} are namespaced: POST to /namespaces/{{namespace}}/{}",
                            rt.plural, rt.plural
                        )));
                    }
                    let (obj, warns) = state.create(rt, ns, body_value()?, &q).await?;
                    Ok(respond(201, obj, out, &warns))
                }
                Method::DELETE => {
                    let opts = if body.is_empty() {
                        json!({})
                    } else {
                        body_value()?
                    };
                    check_delete_options(&opts, &q)?;
                    let res = state.list_objects(rt, ns, &q).await?;
                    let mut deleted = Vec::new();
                    for item in &res.items {
                        let n = meta_str(item, "name").unwrap_or_default().to_string();
                        let ins = meta_str(item, "namespace").map(String::from);
                        match state.delete(rt, ins.as_deref(), &n, &opts, &q).await {
                            Ok(o) => deleted.push(o),
                            Err(e) if e.code == 404 => {}
                            Err(e) => return Err(e),
                        }
                    }
                    let doc = list_object(
                        rt,
                        &ListResult {
                            items: Vec::new(),
                            revision: res.revision,
                            cont: None,
                        },
                        deleted,
                    );
                    Ok(respond(200, doc, out, &[]))
                }
                _ => Err(ApiError::method_not_allowed(format!(
                    "{method} is not supported on a collection"
                ))),
            }
        }
        // Objects.
        (Some(name), None) => {
            if watch_prefix || q.flag("watch") {
                let sel = match q.get("fieldSelector").filter(|s| !s.is_empty()) {
                    Some(s) => format!("{s},metadata.name={name}"),
                    None => format!("metadata.name={name}"),
                };
                q.set("fieldSelector", &sel);
                return super::watch::serve(state.clone(), rt, namespace, &q, out).await;
            }
            match *method {
                Method::GET => {
                    // Any resourceVersion is served from the newest state
                    // (upstream's "0" and "" behave so too), but it must
                    // be one.
                    if let Some(rv) = q.get("resourceVersion").filter(|r| !r.is_empty()) {
                        parse_rv(rv)?;
                    }
                    let obj = from_kv(&state.get_kv(rt, ns, name).await?)?;
                    Ok(respond(
                        200,
                        render(rt, vec![obj], None, out, &q)?,
                        out,
                        &[],
                    ))
                }
                Method::PUT => {
                    let (obj, warns) = state
                        .update(rt, ns, name, body_value()?, &q, Mode::Main)
                        .await?;
                    Ok(respond(200, obj, out, &warns))
                }
                Method::PATCH => {
                    let (obj, warns, code) = state
                        .patch(rt, ns, name, headers, &body, &q, Mode::Main)
                        .await?;
                    Ok(respond(code, obj, out, &warns))
                }
                Method::DELETE => {
                    let opts = if body.iter().all(u8::is_ascii_whitespace) {
                        json!({})
                    } else {
                        body_value()?
                    };
                    check_delete_options(&opts, &q)?;
                    let obj = state.delete(rt, ns, name, &opts, &q).await?;
                    let pending = obj.pointer("/metadata/deletionTimestamp").is_some();
                    if rt.delete_returns_object || pending {
                        Ok(respond(200, obj, out, &[]))
                    } else {
                        let uid = meta_str(&obj, "uid").map(String::from);
                        Ok(respond(
                            200,
                            success(rt.group, rt.plural, name, uid.as_deref()),
                            out,
                            &[],
                        ))
                    }
                }
                _ => Err(ApiError::method_not_allowed(format!(
                    "{method} is not supported on an object"
                ))),
            }
        }
        // Subresources.
        (Some(name), Some(sub)) if rt.has_subresource(sub) => match (sub, method.clone()) {
            ("status", Method::GET) => {
                let obj = from_kv(&state.get_kv(rt, ns, name).await?)?;
                Ok(respond(200, obj, out, &[]))
            }
            ("status", Method::PUT) => {
                let (obj, warns) = state
                    .update(rt, ns, name, body_value()?, &q, Mode::Status)
                    .await?;
                Ok(respond(200, obj, out, &warns))
            }
            ("status", Method::PATCH) => {
                let (obj, warns, code) = state
                    .patch(rt, ns, name, headers, &body, &q, Mode::Status)
                    .await?;
                Ok(respond(code, obj, out, &warns))
            }
            ("binding", Method::POST) => {
                let s = state.bind(ns, name, body_value()?).await?;
                Ok(respond(201, s, out, &[]))
            }
            ("scale", Method::GET) => {
                let dep = from_kv(&state.get_kv(rt, ns, name).await?)?;
                Ok(respond(200, scale_of(&dep), out, &[]))
            }
            ("scale", m @ (Method::PUT | Method::PATCH)) => {
                for attempt in 0.. {
                    let kv = state.get_kv(rt, ns, name).await?;
                    let dep = from_kv(&kv)?;
                    let current = scale_of(&dep);
                    let scale = if m == Method::PUT {
                        body_value()?
                    } else {
                        let (ptype, patch) = parse_patch(headers, &body)?;
                        apply_patch(ptype, &current, &patch, "Scale")?
                    };
                    let replicas = scale
                        .pointer("/spec/replicas")
                        .and_then(Value::as_i64)
                        .ok_or_else(|| {
                            ApiError::invalid(
                                "autoscaling",
                                "Scale",
                                name,
                                &[super::status::FieldError::required("spec.replicas", "")],
                            )
                        })?;
                    if replicas < 0 {
                        return Err(ApiError::invalid(
                            "autoscaling",
                            "Scale",
                            name,
                            &[super::status::FieldError::invalid(
                                "spec.replicas",
                                replicas,
                                "must be greater than or equal to 0",
                            )],
                        ));
                    }
                    let mut new = dep.clone();
                    new["spec"]["replicas"] = json!(replicas);
                    // A resourceVersion in the Scale is a precondition on the Deployment.
                    match scale
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                    {
                        Some(rv) if !rv.is_empty() => set_rv(&mut new, parse_rv(rv)?),
                        _ => set_rv(&mut new, kv.mod_revision),
                    }
                    let pinned =
                        m == Method::PUT && scale.pointer("/metadata/resourceVersion").is_some();
                    match state
                        .update_from(rt, ns, name, kv, new, &q, Mode::Main)
                        .await
                    {
                        Ok((d, _)) => return Ok(respond(200, scale_of(&d), out, &[])),
                        Err(e) if e.code == 409 && !pinned && attempt < 5 => continue,
                        Err(e) => return Err(e),
                    }
                }
                unreachable!()
            }
            _ => Err(ApiError::method_not_allowed(format!(
                "{method} is not supported on {}/{sub}",
                rt.plural
            ))),
        },
        _ => Err(ApiError::no_route()),
    }
}
