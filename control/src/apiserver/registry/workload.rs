//! What Deployments and ReplicaSets share: pod templates and selectors.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::{Value, json};

use super::pod::{default_pod_spec, validate_pod_spec};
use crate::apiserver::status::FieldError;
use crate::apiserver::table::{self, arr, label_selector_string, or_none, s};
use crate::apiserver::validate::check_labels;

pub(super) fn default_template(t: &mut PodTemplateSpec) {
    if let Some(spec) = t.spec.as_mut() {
        default_pod_spec(spec);
    }
}

/// Whether `labels` satisfy a `LabelSelector` (matchLabels and
/// matchExpressions).
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let ml = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let me = sel.match_expressions.iter().flatten().all(|e| {
        let vals = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| vals.contains(v)),
            "NotIn" => !labels.get(&e.key).is_some_and(|v| vals.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    ml && me
}

fn validate_selector(sel: &LabelSelector, path: &str, errs: &mut Vec<FieldError>) {
    let empty = sel.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
        && sel.match_expressions.as_ref().is_none_or(Vec::is_empty);
    if empty {
        errs.push(FieldError::invalid(
            path,
            json!(sel),
            "empty selector is invalid for deployment",
        ));
        return;
    }
    if let Some(ml) = &sel.match_labels {
        let m: serde_json::Map<String, Value> =
            ml.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        check_labels(Some(&m), &format!("{path}.matchLabels"), errs);
    }
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let ep = format!("{path}.matchExpressions[{i}]");
        let vals = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" | "NotIn" if vals.is_empty() => errs.push(FieldError::required(
                format!("{ep}.values"),
                "must be specified when `operator` is 'In' or 'NotIn'",
            )),
            "Exists" | "DoesNotExist" if !vals.is_empty() => errs.push(FieldError::forbidden(
                format!("{ep}.values"),
                "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => errs.push(FieldError::not_supported(
                format!("{ep}.operator"),
                other,
                &["DoesNotExist", "Exists", "In", "NotIn"],
            )),
        }
        if !crate::apiserver::validate::is_qualified_name(&e.key) {
            errs.push(FieldError::invalid(
                format!("{ep}.key"),
                e.key.as_str(),
                "must be a qualified name",
            ));
        }
    }
}

/// Shared by Deployments and ReplicaSets: selector, template, replicas.
pub(super) fn validate_workload(
    selector: &LabelSelector,
    template: Option<&PodTemplateSpec>,
    replicas: Option<i32>,
    old_selector: Option<&LabelSelector>,
) -> Vec<FieldError> {
    let mut errs = Vec::new();
    validate_selector(selector, "spec.selector", &mut errs);
    if let Some(r) = replicas
        && r < 0
    {
        errs.push(FieldError::invalid(
            "spec.replicas",
            r,
            "must be greater than or equal to 0",
        ));
    }
    match template {
        None => errs.push(FieldError::required("spec.template", "")),
        Some(t) => {
            let labels = t
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default();
            if errs.is_empty() && !selector_matches(selector, &labels) {
                errs.push(FieldError::invalid(
                    "spec.template.metadata.labels",
                    json!(labels),
                    "`selector` does not match template `labels`",
                ));
            }
            let m: serde_json::Map<String, Value> =
                labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            check_labels(Some(&m), "spec.template.metadata.labels", &mut errs);
            match &t.spec {
                None => errs.push(FieldError::required("spec.template.spec", "")),
                Some(spec) => {
                    validate_pod_spec(spec, "spec.template.spec", &mut errs);
                    if spec
                        .restart_policy
                        .as_deref()
                        .is_some_and(|p| p != "Always")
                    {
                        errs.push(FieldError::not_supported(
                            "spec.template.spec.restartPolicy",
                            spec.restart_policy.clone().unwrap_or_default(),
                            &["Always"],
                        ));
                    }
                }
            }
        }
    }
    if let Some(old) = old_selector
        && old != selector
    {
        errs.push(FieldError::invalid(
            "spec.selector",
            json!(selector),
            "field is immutable",
        ));
    }
    errs
}

/// A Deployment's or ReplicaSet's table row: name, the kind's three
/// replica columns (from the desired count), age, containers, images,
/// selector.
pub(super) fn cells(
    o: &Value,
    now: jiff::Timestamp,
    counts: impl FnOnce(i64) -> [Value; 3],
) -> Vec<Value> {
    let containers = arr(o, "/spec/template/spec/containers");
    let names: Vec<&str> = containers.iter().map(|c| s(c, "/name")).collect();
    let images: Vec<&str> = containers.iter().map(|c| s(c, "/image")).collect();
    let selector = json!(or_none(label_selector_string(
        o.pointer("/spec/selector").unwrap_or(&Value::Null)
    )));
    let desired = o
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let mut row = vec![table::name_cell(o)];
    row.extend(counts(desired));
    row.push(table::age_cell(o, now));
    row.extend([json!(names.join(",")), json!(images.join(",")), selector]);
    row
}
