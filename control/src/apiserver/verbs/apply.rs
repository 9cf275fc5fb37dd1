//! Server-side apply (`application/apply-patch+yaml`): the field
//! ownership algorithm is in `apiserver/apply.rs`.

use serde_json::{Value, json};

use super::Mode;
use crate::apiserver::apply;
use crate::apiserver::http::Query;
use crate::apiserver::object::*;
use crate::apiserver::resources::ResourceType;
use crate::apiserver::state::State;
use crate::apiserver::status::{ApiError, ApiResult};

impl State {
    /// Server-side apply (`apply.rs`): creates the object if missing.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn server_side_apply(
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
        let applied: Value = crate::apiserver::http::yaml_from_slice(body).map_err(|e| {
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
                    let mut obj = apply::apply(None, &applied, &manager, rt.kind, false, &now())
                        .map_err(ApiError::bad_request)?;
                    meta_mut(&mut obj).insert("name".into(), json!(name));
                    match self.create(rt, ns, obj, q).await {
                        Err(e) if e.reason == "AlreadyExists" && attempt < 5 => continue,
                        r => return r.map(|(o, w)| (o, w, 201)),
                    }
                }
                Some(kv) => {
                    let current = from_kv(&kv)?;
                    let out =
                        apply::apply(Some(&current), &applied, &manager, rt.kind, status, &now())
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
}
