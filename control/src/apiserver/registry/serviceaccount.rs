//! ServiceAccounts: stored as given (no token controller yet).

use k8s_openapi::api::core::v1::ServiceAccount;
use serde_json::{Value, json};

use super::Strategy;
use crate::apiserver::resources::ResourceType;
use crate::apiserver::status::{ApiResult, FieldError};
use crate::apiserver::table::{self, *};
use crate::apiserver::validate::*;

pub const RESOURCE: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "serviceaccounts",
    singular: "serviceaccount",
    kind: "ServiceAccount",
    namespaced: true,
    short_names: &["sa"],
    categories: &[],
    subresources: &[],
    field_labels: &[],
    delete_returns_object: false,
    strategy: &ServiceAccountStrategy,
};

pub struct ServiceAccountStrategy;

impl Strategy for ServiceAccountStrategy {
    fn normalize(
        &self,
        rt: &ResourceType,
        input: &Value,
        old: Option<&Value>,
    ) -> ApiResult<(Value, Vec<FieldError>)> {
        typed::<ServiceAccount>(rt, input, old, |_| {}, |_, _| Vec::new())
    }

    fn columns(&self) -> Vec<Value> {
        let name = table::name_column();
        let age = table::age_column();
        vec![
            name,
            col(
                "Secrets",
                "string",
                0,
                "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use.",
            ),
            age,
        ]
    }

    fn cells(&self, o: &Value, now: jiff::Timestamp) -> Vec<Value> {
        let name = table::name_cell(o);
        let a = table::age_cell(o, now);
        vec![name, json!(arr(o, "/secrets").len().to_string()), a]
    }
}
