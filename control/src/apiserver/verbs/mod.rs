//! The generic verbs on resources, one file each: get/list, create,
//! update, patch, server-side apply, delete, and the status, binding and
//! scale subresources. They know no kind: what differs per kind is asked
//! of its strategy (`registry/`).
//!
//! Every write is a compare-and-swap against the revision that was read,
//! so concurrent writers get 409 Conflict instead of losing updates.

mod apply;
mod create;
mod delete;
mod get_list;
mod patch;
mod subresources;
mod update;

use kcontrol_store::Revision;
use serde_json::{Value, json};

use super::object::meta_mut;
use super::resources::ResourceType;
use super::status::{ApiError, ApiResult};

pub use create::bootstrap;
pub use delete::check_delete_options;
pub use patch::{apply_patch, parse_patch};
pub use subresources::scale_of;

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
pub enum Mode {
    Main,
    Status,
}

/// A page of a list.
pub struct ListResult {
    pub items: Vec<Value>,
    pub revision: Revision,
    pub cont: Option<String>,
}
