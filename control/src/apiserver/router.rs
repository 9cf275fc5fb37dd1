//! Routing: discovery, reviews and resource paths, and the dispatch of a
//! resource request to its verb (`verbs/`) or to a watch (`watch.rs`).

use std::sync::Arc;

use ::http::{HeaderMap, Method, Request, Response, header};
use bytes::Bytes;
use serde_json::{Value, json};

use super::http::{self, Body, Output, Query, decode_body, encode};
use super::object::{from_kv, meta_str, parse_rv};
use super::resources::{ResourceType, lookup};
use super::state::State;
use super::status::{ApiError, ApiResult, success};
use super::verbs::{ListResult, Mode, check_delete_options, scale_of};
use super::{auth, discovery, reviews, table, watch};

/// Answers one request. `B` is hyper's body when serving, any body in
/// tests.
pub async fn handle<B>(state: Arc<State>, req: Request<B>) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    let path = parts.uri.path().to_string();
    let result = route(&state, &parts, body).await;
    match result {
        Ok(r) => r,
        Err(e) => {
            if e.code >= 500 {
                eprintln!("kcontrol: {method} {path}: {e}");
            }
            http::error(&e)
        }
    }
}

async fn route<B>(
    state: &Arc<State>,
    parts: &::http::request::Parts,
    body: B,
) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let path = parts.uri.path().trim_end_matches('/');
    let path = if path.is_empty() { "/" } else { path };
    let accept = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok());

    match path {
        "/healthz" | "/livez" | "/readyz" => return Ok(http::text(200, "ok")),
        "/version" => return Ok(http::encode(200, &discovery::version(), Output::Json, &[])),
        _ => {}
    }
    if auth::is_public(path) {
        return Ok(http::text(200, "ok"));
    }
    let authz = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !auth::authorized(authz, &state.token) {
        return Err(ApiError::unauthorized());
    }

    let out = http::negotiate(accept, path == "/openapi/v2")?;
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    let get_only = |doc: Option<serde_json::Value>| -> Result<Response<Body>, ApiError> {
        if parts.method != Method::GET {
            return Err(ApiError::method_not_allowed(format!(
                "{} is not supported here",
                parts.method
            )));
        }
        let doc = doc.ok_or_else(ApiError::no_route)?;
        Ok(http::encode(200, &doc, out, &[]))
    };
    match segs.as_slice() {
        ["api"] => get_only(Some(discovery::core_versions(&state.server_address))),
        ["api", "v1"] => get_only(discovery::resource_list("", "v1")),
        ["apis"] => get_only(Some(discovery::group_list())),
        ["apis", g] => get_only(discovery::group(g)),
        ["apis", g, v] => get_only(discovery::resource_list(g, v)),
        ["openapi", "v2"] => {
            if out == Output::Protobuf {
                let mut r = Response::new(http::full(discovery::openapi_v2_protobuf()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
                        .parse()
                        .expect("static header"),
                );
                Ok(r)
            } else {
                get_only(Some(discovery::openapi_v2_json()))
            }
        }
        ["apis", g, v, plural] if reviews::is_review(g, v, plural) => {
            if parts.method != Method::POST {
                return Err(ApiError::method_not_allowed(
                    "reviews are only created (POST)",
                ));
            }
            let bytes = http::read_body(&parts.headers, body).await?;
            let review = reviews::answer(g, plural, http::decode_body(&parts.headers, &bytes)?)?;
            Ok(http::encode(201, &review, out, &[]))
        }
        ["api", "v1", rest @ ..] => resource(state, parts, body, "", "v1", rest, out).await,
        ["apis", g, v, rest @ ..] => resource(state, parts, body, g, v, rest, out).await,
        _ => Err(ApiError::no_route()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn resource<B>(
    state: &Arc<State>,
    parts: &::http::request::Parts,
    body: B,
    group: &str,
    version: &str,
    rest: &[&str],
    out: Output,
) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let (target, watch_prefix) =
        parse_target(group, version, rest).ok_or_else(ApiError::no_route)?;
    let q = Query::parse(parts.uri.query());
    let body = http::read_body(&parts.headers, body).await?;
    serve(
        state,
        &parts.method,
        target,
        watch_prefix,
        q,
        &parts.headers,
        body,
        out,
    )
    .await
}

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
                return watch::serve(state.clone(), rt, namespace, &q, out).await;
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
                return watch::serve(state.clone(), rt, namespace, &q, out).await;
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
                let scale = state
                    .update_scale(rt, ns, name, &m, headers, &body, &q)
                    .await?;
                Ok(respond(200, scale, out, &[]))
            }
            _ => Err(ApiError::method_not_allowed(format!(
                "{method} is not supported on {}/{sub}",
                rt.plural
            ))),
        },
        _ => Err(ApiError::no_route()),
    }
}
