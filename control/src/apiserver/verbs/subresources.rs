//! The binding (pods) and scale (deployments) subresources; status is the
//! update and patch verbs in status mode.

use kcontrol_store::StoreError;
use serde_json::{Value, json};

use http::{HeaderMap, Method};

use super::{Mode, apply_patch, parse_patch};
use crate::apiserver::http::{Query, decode_body};
use crate::apiserver::object::*;
use crate::apiserver::resources::ResourceType;
use crate::apiserver::resources::lookup;
use crate::apiserver::state::State;
use crate::apiserver::status::{ApiError, ApiResult, FieldError, success};

impl State {
    /// PUT or PATCH of `…/scale`: a change of `spec.replicas`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn update_scale(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        m: &Method,
        headers: &HeaderMap,
        body: &[u8],
        q: &Query,
    ) -> ApiResult<Value> {
        for attempt in 0.. {
            let kv = self.get_kv(rt, ns, name).await?;
            let dep = from_kv(&kv)?;
            let current = scale_of(&dep);
            let scale = if *m == Method::PUT {
                decode_body(headers, body)?
            } else {
                let (ptype, patch) = parse_patch(headers, body)?;
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
                        &[FieldError::required("spec.replicas", "")],
                    )
                })?;
            if replicas < 0 {
                return Err(ApiError::invalid(
                    "autoscaling",
                    "Scale",
                    name,
                    &[FieldError::invalid(
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
            let pinned = *m == Method::PUT && scale.pointer("/metadata/resourceVersion").is_some();
            match self.update_from(rt, ns, name, kv, new, q, Mode::Main).await {
                Ok((d, _)) => return Ok(scale_of(&d)),
                Err(e) if e.code == 409 && !pinned && attempt < 5 => continue,
                Err(e) => return Err(e),
            }
        }
        unreachable!()
    }

    /// `POST …/pods/{name}/binding`: assigns the pod to a node, once.
    pub(crate) async fn bind(&self, ns: Option<&str>, name: &str, body: Value) -> ApiResult<Value> {
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
                &[FieldError::required("target.name", "")],
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
pub fn scale_of(dep: &Value) -> Value {
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
