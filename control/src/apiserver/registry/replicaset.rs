//! ReplicaSets: a number of pods from one template.

use k8s_openapi::api::apps::v1::ReplicaSet;
use serde_json::{Map, Value, json};

use super::Strategy;
use super::workload::{self, default_template, validate_workload};
use crate::apiserver::resources::ResourceType;
use crate::apiserver::status::{ApiResult, FieldError};
use crate::apiserver::table::{self, *};
use crate::apiserver::validate::*;

pub const RESOURCE: ResourceType = ResourceType {
    group: "apps",
    version: "v1",
    plural: "replicasets",
    singular: "replicaset",
    kind: "ReplicaSet",
    namespaced: true,
    short_names: &["rs"],
    categories: &["all"],
    subresources: &["status"],
    field_labels: &["status.replicas"],
    delete_returns_object: false,
    strategy: &ReplicaSetStrategy,
};

pub struct ReplicaSetStrategy;

impl Strategy for ReplicaSetStrategy {
    fn normalize(
        &self,
        rt: &ResourceType,
        input: &Value,
        old: Option<&Value>,
    ) -> ApiResult<(Value, Vec<FieldError>)> {
        typed::<ReplicaSet>(rt, input, old, default_replicaset, validate_replicaset)
    }

    fn tracks_generation(&self) -> bool {
        true
    }

    fn reset_status_on_create(&self, obj: &mut Map<String, Value>) {
        obj.insert("status".into(), json!({}));
    }

    fn columns(&self) -> Vec<Value> {
        let name = table::name_column();
        let age = table::age_column();
        vec![
            name,
            col(
                "Desired",
                "integer",
                0,
                "Replicas is the number of desired replicas.",
            ),
            col(
                "Current",
                "integer",
                0,
                "Replicas is the most recently observed number of replicas.",
            ),
            col(
                "Ready",
                "integer",
                0,
                "The number of ready replicas for this replica set.",
            ),
            age,
            col(
                "Containers",
                "string",
                1,
                "Names of each container in the template.",
            ),
            col(
                "Images",
                "string",
                1,
                "Images referenced by each container in the template.",
            ),
            col(
                "Selector",
                "string",
                1,
                "Selector is a label query over pods that should match the replica count.",
            ),
        ]
    }

    fn cells(&self, o: &Value, now: jiff::Timestamp) -> Vec<Value> {
        workload::cells(o, now, |desired| {
            [
                json!(desired),
                json!(i(o, "/status/replicas")),
                json!(i(o, "/status/readyReplicas")),
            ]
        })
    }
}

fn default_replicaset(rs: &mut ReplicaSet) {
    if let Some(spec) = rs.spec.as_mut() {
        spec.replicas.get_or_insert(1);
        if let Some(t) = spec.template.as_mut() {
            default_template(t);
        }
    }
}

fn validate_replicaset(rs: &ReplicaSet, old: Option<&ReplicaSet>) -> Vec<FieldError> {
    let Some(spec) = &rs.spec else {
        return vec![FieldError::required("spec", "")];
    };
    validate_workload(
        &spec.selector,
        spec.template.as_ref(),
        spec.replicas,
        old.and_then(|o| o.spec.as_ref()).map(|s| &s.selector),
    )
}
