//! Update (PUT) of an object or of its status, and the store write that
//! patch, apply and scale share.

use kcontrol_store::{KeyValue, StoreError};
use serde_json::{Value, json};

use super::{Mode, check_namespace, check_type, unknown_field_error, warnings};
use crate::apiserver::http::Query;
use crate::apiserver::object::*;
use crate::apiserver::registry::{Held, Write};
use crate::apiserver::resources::ResourceType;
use crate::apiserver::state::State;
use crate::apiserver::status::{ApiError, ApiResult};
use crate::apiserver::validate::normalize;

impl State {
    pub(crate) async fn update(
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

    /// Replaces the object read as `kv` with `body` (a full object). In
    /// status mode only `.status` is taken from the body.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn update_from(
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
        if rt.strategy.tracks_generation() && new.get("spec") != old.get("spec") {
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
        // A status write keeps what the main resource holds.
        let mut held = if mode == Mode::Main {
            let write = Write {
                rt,
                name,
                key: &key,
                old: Some(&old),
                dry_run,
            };
            rt.strategy.prepare(self, write, &mut out).await?
        } else {
            Held::default()
        };
        let result = self
            .write_update(rt, name, &key, &kv, &old, out, warns, dry_run, &mut held)
            .await;
        // A write that failed or did not happen leaves what it held unused.
        let stored = result.as_ref().ok().map(|(stored, _)| stored);
        held.release_unused(&*self.store, &key, uid_of(&old), stored)
            .await;
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
        held: &mut Held,
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
                    rt.strategy.after_delete(self, key, rev, old).await;
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
        match held
            .commit(async move { store.update(&k, bytes, expected).await })
            .await?
        {
            Ok(rev) => {
                rt.strategy.after_update(self, key, old, &out).await;
                set_rv(&mut out, rev);
                Ok((out, warns))
            }
            Err(StoreError::Conflict { .. }) => Err(ApiError::conflict(rt.group, rt.plural, name)),
            Err(StoreError::NotFound(_)) => Err(ApiError::not_found(rt.group, rt.plural, name)),
            Err(e) => Err(internal(e)),
        }
    }
}
