//! Create, and the objects that always exist.

use kcontrol_store::StoreError;
use serde_json::{Value, json};

use super::{check_namespace, check_type, unknown_field_error, warnings};
use crate::apiserver::http::Query;
use crate::apiserver::object::*;
use crate::apiserver::registry::Write;
use crate::apiserver::resources::{RESOURCES, ResourceType};
use crate::apiserver::state::State;
use crate::apiserver::status::{ApiError, ApiResult};
use crate::apiserver::validate::normalize;

/// Readies the kinds (a Service's addresses in use) and creates the objects
/// that always exist (`default`, `kube-system`, …) if missing.
pub async fn bootstrap(state: &State) -> anyhow::Result<()> {
    for rt in RESOURCES {
        rt.strategy.start(state).await?;
    }
    for rt in RESOURCES {
        for obj in rt.strategy.initial_objects() {
            let name = meta_str(&obj, "name").unwrap_or_default().to_string();
            match state.create(rt, None, obj, &Query::default()).await {
                Ok(_) => {}
                Err(e) if e.reason == "AlreadyExists" => {}
                Err(e) => anyhow::bail!("creating {} {name}: {e}", rt.singular),
            }
        }
    }
    Ok(())
}

impl State {
    /// Creates an object; returns it and the warnings.
    pub(crate) async fn create(
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
            if rt.strategy.tracks_generation() {
                meta.insert("generation".into(), json!(1));
            } else {
                meta.remove("generation");
            }
        }
        rt.strategy
            .reset_status_on_create(obj.as_object_mut().expect("check_type made it an object"));
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
            let write = Write {
                rt,
                name: &name,
                key: &key,
                old: None,
                dry_run,
            };
            let mut held = rt.strategy.prepare(self, write, &mut out).await?;
            if dry_run {
                return Ok((out, warnings(&norm.unknown_fields)));
            }
            let store = self.store.clone();
            let (k, bytes) = (key.clone(), to_bytes(&out));
            let result = held
                .commit(async move { store.create(&k, bytes).await })
                .await?;
            let stored = result.is_ok().then_some(&out);
            held.release_unused(&*self.store, &key, uid_of(&out), stored)
                .await;
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
}
