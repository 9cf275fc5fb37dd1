//! DELETE: preconditions, graceful deletion and finalizers; what differs
//! per kind is the strategy's.

use kcontrol_store::StoreError;
use serde_json::{Value, json};

use crate::apiserver::http::Query;
use crate::apiserver::object::*;
use crate::apiserver::resources::ResourceType;
use crate::apiserver::state::State;
use crate::apiserver::status::{ApiError, ApiResult, FieldError};

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

impl State {
    /// Marks an object as being deleted (deletionTimestamp `at`, the grace
    /// period) and stores it, unless `dry_run`: a graceful delete, or one
    /// that waits for finalizers.
    #[allow(clippy::too_many_arguments)]
    async fn mark_deleted(
        &self,
        rt: &ResourceType,
        name: &str,
        key: &str,
        kv: &kcontrol_store::KeyValue,
        obj: &mut Value,
        at: Value,
        grace: i64,
        dry_run: bool,
    ) -> ApiResult<()> {
        let meta = meta_mut(obj);
        meta.insert("deletionTimestamp".into(), at);
        meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
        if !dry_run {
            let rev = self
                .store
                .update(key, to_bytes(obj), kv.mod_revision)
                .await
                .map_err(|e| match e {
                    StoreError::Conflict { .. } => ApiError::conflict(rt.group, rt.plural, name),
                    other => internal(other),
                })?;
            set_rv(obj, rev);
        }
        Ok(())
    }

    /// Deletes an object (or marks it for deletion while it has
    /// finalizers). Returns the object as last stored.
    pub(crate) async fn delete(
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
        rt.strategy.before_delete(self, name, dry_run).await?;
        if let Some(grace) = rt.strategy.grace_period(&obj, opts, q)? {
            let current = obj
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64);
            if current.is_none_or(|c| grace < c) {
                let at = json!(after_seconds(grace));
                self.mark_deleted(rt, name, &key, &kv, &mut obj, at, grace, dry_run)
                    .await?;
            }
            return Ok(obj);
        }
        let has_finalizers = obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if has_finalizers && rt.strategy.finalizers_hold_delete() {
            let graceful = obj
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .is_some_and(|g| g != 0);
            if obj.pointer("/metadata/deletionTimestamp").is_none() || graceful {
                self.mark_deleted(rt, name, &key, &kv, &mut obj, json!(now()), 0, dry_run)
                    .await?;
            }
            return Ok(obj);
        }
        if dry_run {
            return Ok(obj);
        }
        match self.store.delete(&key, Some(kv.mod_revision)).await {
            Ok((rev, _)) => {
                rt.strategy.after_delete(self, &key, rev, &obj).await;
                Ok(obj)
            }
            Err(StoreError::Conflict { .. }) => Err(ApiError::conflict(rt.group, rt.plural, name)),
            Err(StoreError::NotFound(_)) => Err(ApiError::not_found(rt.group, rt.plural, name)),
            Err(e) => Err(internal(e)),
        }
    }
}
