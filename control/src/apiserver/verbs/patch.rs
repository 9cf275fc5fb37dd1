//! PATCH: JSON patch, merge patch and strategic merge patch (the patch
//! algorithms are in `apiserver/patch.rs`); apply patches go to `apply.rs`.

use http::{HeaderMap, header};
use serde_json::{Value, json};

use super::Mode;
use crate::apiserver::http::Query;
use crate::apiserver::object::from_kv;
use crate::apiserver::patch as merge;
use crate::apiserver::resources::ResourceType;
use crate::apiserver::state::State;
use crate::apiserver::status::{ApiError, ApiResult};

impl State {
    /// Applies a patch to the current object and stores the result,
    /// retrying on a concurrent write unless the patch pins a
    /// resourceVersion.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn patch(
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
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
}

pub(super) fn patch_mime(headers: &HeaderMap) -> String {
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

pub fn parse_patch(headers: &HeaderMap, body: &[u8]) -> ApiResult<(PatchType, Value)> {
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

pub fn apply_patch(
    ptype: PatchType,
    current: &Value,
    patch: &Value,
    kind: &str,
) -> ApiResult<Value> {
    match ptype {
        PatchType::Merge => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            let mut v = current.clone();
            merge::merge_patch(&mut v, patch);
            Ok(v)
        }
        PatchType::Strategic => {
            merge::strategic_merge(current, patch, kind).map_err(ApiError::bad_request)
        }
        PatchType::Json => {
            if !patch.is_array() {
                return Err(ApiError::bad_request(
                    "a JSON patch must be a list of operations",
                ));
            }
            let mut v = current.clone();
            merge::json_patch(&mut v, patch).map_err(|e| {
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
