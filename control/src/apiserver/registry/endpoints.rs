//! Endpoints: one per Service, written by the endpoints controller.

use k8s_openapi::api::core::v1::Endpoints;
use serde_json::{Value, json};

use super::Strategy;
use crate::apiserver::resources::ResourceType;
use crate::apiserver::status::{ApiResult, FieldError};
use crate::apiserver::table::{self, *};
use crate::apiserver::validate::*;

pub const RESOURCE: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "endpoints",
    singular: "endpoints",
    kind: "Endpoints",
    namespaced: true,
    short_names: &["ep"],
    categories: &[],
    subresources: &[],
    field_labels: &[],
    delete_returns_object: false,
    strategy: &EndpointsStrategy,
};

pub struct EndpointsStrategy;

impl Strategy for EndpointsStrategy {
    fn normalize(
        &self,
        rt: &ResourceType,
        input: &Value,
        old: Option<&Value>,
    ) -> ApiResult<(Value, Vec<FieldError>)> {
        typed::<Endpoints>(rt, input, old, default_endpoints, validate_endpoints)
    }

    fn columns(&self) -> Vec<Value> {
        let name = table::name_column();
        let age = table::age_column();
        vec![
            name,
            col(
                "Endpoints",
                "string",
                0,
                "Endpoints is the list of endpoints in the object.",
            ),
            age,
        ]
    }

    fn cells(&self, o: &Value, now: jiff::Timestamp) -> Vec<Value> {
        let name = table::name_cell(o);
        let a = table::age_cell(o, now);
        let mut eps = Vec::new();
        for sub in arr(o, "/subsets") {
            let ports = arr(sub, "/ports");
            for addr in arr(sub, "/addresses") {
                let ip = s(addr, "/ip");
                if ports.is_empty() {
                    eps.push(ip.to_string());
                }
                for p in ports {
                    eps.push(format!("{ip}:{}", i(p, "/port")));
                }
            }
        }
        vec![name, json!(or_none(first_three(eps))), a]
    }
}

fn default_endpoints(ep: &mut Endpoints) {
    for s in ep.subsets.iter_mut().flatten() {
        for p in s.ports.iter_mut().flatten() {
            p.protocol.get_or_insert_with(|| "TCP".into());
        }
    }
}

fn validate_endpoints(ep: &Endpoints, _old: Option<&Endpoints>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    for (i, s) in ep.subsets.iter().flatten().enumerate() {
        let sp = format!("subsets[{i}]");
        for (field, list) in [
            ("addresses", &s.addresses),
            ("notReadyAddresses", &s.not_ready_addresses),
        ] {
            for (j, a) in list.iter().flatten().enumerate() {
                check_endpoint_ip(&a.ip, &format!("{sp}.{field}[{j}].ip"), &mut errs);
            }
        }
        let ports = s.ports.clone().unwrap_or_default();
        for (j, p) in ports.iter().enumerate() {
            let pp = format!("{sp}.ports[{j}]");
            if !(1..=65535).contains(&p.port) {
                errs.push(FieldError::invalid(
                    format!("{pp}.port"),
                    p.port,
                    "must be between 1 and 65535, inclusive",
                ));
            }
            check_protocol(p.protocol.as_deref(), &format!("{pp}.protocol"), &mut errs);
            match p.name.as_deref() {
                None | Some("") if ports.len() > 1 => {
                    errs.push(FieldError::required(format!("{pp}.name"), ""))
                }
                Some(n) if !n.is_empty() && !is_dns1123_label(n) => errs.push(FieldError::invalid(
                    format!("{pp}.name"),
                    n,
                    "must be a lowercase RFC 1123 label",
                )),
                _ => {}
            }
        }
    }
    errs
}
