//! ConfigMaps.

use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::{Value, json};

use super::Strategy;
use crate::apiserver::resources::ResourceType;
use crate::apiserver::status::{ApiResult, FieldError};
use crate::apiserver::table::{self, *};
use crate::apiserver::validate::*;

pub const RESOURCE: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "configmaps",
    singular: "configmap",
    kind: "ConfigMap",
    namespaced: true,
    short_names: &["cm"],
    categories: &[],
    subresources: &[],
    field_labels: &[],
    delete_returns_object: false,
    strategy: &ConfigMapStrategy,
};

pub struct ConfigMapStrategy;

impl Strategy for ConfigMapStrategy {
    fn normalize(
        &self,
        rt: &ResourceType,
        input: &Value,
        old: Option<&Value>,
    ) -> ApiResult<(Value, Vec<FieldError>)> {
        typed::<ConfigMap>(rt, input, old, |_| {}, validate_configmap)
    }

    fn columns(&self) -> Vec<Value> {
        let name = table::name_column();
        let age = table::age_column();
        vec![
            name,
            col("Data", "string", 0, "Data contains the configuration data."),
            age,
        ]
    }

    fn cells(&self, o: &Value, now: jiff::Timestamp) -> Vec<Value> {
        let name = table::name_cell(o);
        let a = table::age_cell(o, now);
        let n = o
            .get("data")
            .and_then(Value::as_object)
            .map_or(0, |m| m.len())
            + o.get("binaryData")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len());
        vec![name, json!(n.to_string()), a]
    }
}

fn validate_configmap(cm: &ConfigMap, _old: Option<&ConfigMap>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut total = 0;
    for (k, v) in cm.data.iter().flatten() {
        total += v.len();
        if !is_config_key(k) {
            errs.push(FieldError::invalid(
                "data",
                k.as_str(),
                "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
            ));
        }
    }
    for (k, v) in cm.binary_data.iter().flatten() {
        total += v.0.len();
        if !is_config_key(k) {
            errs.push(FieldError::invalid(
                "binaryData",
                k.as_str(),
                "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
            ));
        }
        if cm.data.as_ref().is_some_and(|d| d.contains_key(k)) {
            errs.push(FieldError::invalid(
                "data",
                k.as_str(),
                "duplicate of key present in binaryData",
            ));
        }
    }
    if total > 1024 * 1024 {
        errs.push(FieldError::invalid(
            "data",
            "",
            "Too long: must have at most 1048576 bytes",
        ));
    }
    errs
}
