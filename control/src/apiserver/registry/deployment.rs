//! Deployments: a pod template rolled out through ReplicaSets.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
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
    plural: "deployments",
    singular: "deployment",
    kind: "Deployment",
    namespaced: true,
    short_names: &["deploy"],
    categories: &["all"],
    subresources: &["status", "scale"],
    field_labels: &[],
    delete_returns_object: false,
    strategy: &DeploymentStrategy,
};

pub struct DeploymentStrategy;

impl Strategy for DeploymentStrategy {
    fn normalize(
        &self,
        rt: &ResourceType,
        input: &Value,
        old: Option<&Value>,
    ) -> ApiResult<(Value, Vec<FieldError>)> {
        typed::<Deployment>(rt, input, old, default_deployment, validate_deployment)
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
            col("Ready", "string", 0, "Number of the pod with ready state"),
            col(
                "Up-to-date",
                "integer",
                0,
                "Total number of non-terminated pods targeted by this deployment that have the desired template spec.",
            ),
            col(
                "Available",
                "integer",
                0,
                "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.",
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
            col("Selector", "string", 1, "Label selector for pods."),
        ]
    }

    fn cells(&self, o: &Value, now: jiff::Timestamp) -> Vec<Value> {
        workload::cells(o, now, |desired| {
            [
                json!(format!("{}/{desired}", i(o, "/status/readyReplicas"))),
                json!(i(o, "/status/updatedReplicas")),
                json!(i(o, "/status/availableReplicas")),
            ]
        })
    }
}

fn default_deployment(d: &mut Deployment) {
    if let Some(spec) = d.spec.as_mut() {
        spec.replicas.get_or_insert(1);
        spec.revision_history_limit.get_or_insert(10);
        spec.progress_deadline_seconds.get_or_insert(600);
        let strategy = spec.strategy.get_or_insert_with(Default::default);
        let ty = strategy
            .type_
            .get_or_insert_with(|| "RollingUpdate".into())
            .clone();
        if ty == "RollingUpdate" {
            let ru = strategy.rolling_update.get_or_insert_with(Default::default);
            ru.max_surge
                .get_or_insert_with(|| IntOrString::String("25%".into()));
            ru.max_unavailable
                .get_or_insert_with(|| IntOrString::String("25%".into()));
        }
        default_template(&mut spec.template);
    }
}

fn validate_deployment(d: &Deployment, old: Option<&Deployment>) -> Vec<FieldError> {
    let Some(spec) = &d.spec else {
        return vec![FieldError::required("spec", "")];
    };
    let mut errs = validate_workload(
        &spec.selector,
        Some(&spec.template),
        spec.replicas,
        old.and_then(|o| o.spec.as_ref()).map(|s| &s.selector),
    );
    if let Some(s) = &spec.strategy {
        check_enum(
            s.type_.as_deref(),
            "spec.strategy.type",
            &["Recreate", "RollingUpdate"],
            &mut errs,
        );
        if s.type_.as_deref() == Some("Recreate") && s.rolling_update.is_some() {
            errs.push(FieldError::forbidden(
                "spec.strategy.rollingUpdate",
                "may not be specified when strategy `type` is 'Recreate'",
            ));
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use crate::apiserver::validate::norm;
    use serde_json::json;

    #[test]
    fn deployment_selector_must_match() {
        let e = norm(
            "deployments",
            "apps",
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "default"},
                   "spec": {"selector": {"matchLabels": {"app": "a"}},
                            "template": {"metadata": {"labels": {"app": "b"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}}),
        )
        .err()
        .unwrap();
        assert!(
            e.message.contains("spec.template.metadata.labels"),
            "{}",
            e.message
        );
        let ok = norm(
            "deployments",
            "apps",
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "default"},
                   "spec": {"selector": {"matchLabels": {"app": "a"}},
                            "template": {"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}}}}),
        )
        .unwrap()
        .object;
        assert_eq!(ok["spec"]["replicas"], 1);
        assert_eq!(ok["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(
            ok["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"],
            "IfNotPresent"
        );
    }
}
