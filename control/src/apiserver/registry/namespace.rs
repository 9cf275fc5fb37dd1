//! Namespaces. Deleting one deletes what is in it, inline (upstream's
//! namespace controller does it afterwards); the system ones stay.

use k8s_openapi::api::core::v1::Namespace;
use kcontrol_store::StoreError;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

use super::{BoxFuture, Strategy};
use crate::apiserver::object::{from_kv, internal};
use crate::apiserver::resources::{RESOURCES, ResourceType};
use crate::apiserver::state::State;
use crate::apiserver::status::{ApiError, ApiResult, FieldError};
use crate::apiserver::table::{self, *};
use crate::apiserver::validate::{label_name, typed};

pub const RESOURCE: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "namespaces",
    singular: "namespace",
    kind: "Namespace",
    namespaced: false,
    short_names: &["ns"],
    categories: &[],
    subresources: &["status"],
    field_labels: &["status.phase"],
    delete_returns_object: false,
    strategy: &NamespaceStrategy,
};

/// Namespaces that always exist and cannot be deleted.
pub const SYSTEM_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

pub struct NamespaceStrategy;

impl Strategy for NamespaceStrategy {
    fn normalize(
        &self,
        rt: &ResourceType,
        input: &Value,
        old: Option<&Value>,
    ) -> ApiResult<(Value, Vec<FieldError>)> {
        typed::<Namespace>(rt, input, old, default_namespace, |_, _| Vec::new())
    }

    fn check_name(&self, name: &str) -> Result<(), &'static str> {
        label_name(name)
    }

    fn reset_status_on_create(&self, obj: &mut Map<String, Value>) {
        obj.remove("status");
    }

    fn initial_objects(&self) -> Vec<Value> {
        SYSTEM_NAMESPACES
            .iter()
            .map(
                |ns| json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns } }),
            )
            .collect()
    }

    fn before_delete<'a>(
        &'a self,
        state: &'a State,
        name: &'a str,
        dry_run: bool,
    ) -> BoxFuture<'a, ApiResult<()>> {
        Box::pin(async move {
            if SYSTEM_NAMESPACES.contains(&name) {
                return Err(ApiError::forbidden(format!(
                    "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
                )));
            }
            if !dry_run {
                delete_contents(state, name).await?;
            }
            Ok(())
        })
    }

    /// The contents are gone by the time the namespace is: nothing to wait for.
    fn finalizers_hold_delete(&self) -> bool {
        false
    }

    fn columns(&self) -> Vec<Value> {
        let name = table::name_column();
        let age = table::age_column();
        vec![
            name,
            col("Status", "string", 0, "The status of the namespace"),
            age,
        ]
    }

    fn cells(&self, o: &Value, now: jiff::Timestamp) -> Vec<Value> {
        let name = table::name_cell(o);
        let a = table::age_cell(o, now);
        vec![name, json!(s(o, "/status/phase")), a]
    }
}

/// What the namespace controller does upstream, done inline: every
/// namespaced object in `ns` goes.
async fn delete_contents(state: &State, ns: &str) -> ApiResult<()> {
    for rt in RESOURCES.iter().filter(|r| r.namespaced) {
        loop {
            let page = state
                .store
                .list(&rt.prefix(Some(ns)), None, None, Some(500))
                .await
                .map_err(internal)?;
            for kv in &page.items {
                match state.store.delete(&kv.key, None).await {
                    Ok((rev, last)) => {
                        let obj = from_kv(&last).unwrap_or_default();
                        rt.strategy.after_delete(state, &kv.key, rev, &obj).await;
                    }
                    Err(StoreError::NotFound(_)) => {}
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

fn default_namespace(ns: &mut Namespace) {
    let name = ns.metadata.name.clone().unwrap_or_default();
    ns.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("kubernetes.io/metadata.name".into(), name);
    ns.spec
        .get_or_insert_with(Default::default)
        .finalizers
        .get_or_insert_with(|| vec!["kubernetes".into()]);
    ns.status
        .get_or_insert_with(Default::default)
        .phase
        .get_or_insert_with(|| "Active".into());
}
