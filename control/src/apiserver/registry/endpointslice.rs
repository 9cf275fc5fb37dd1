//! EndpointSlices: the endpoints of a Service as kproxy reads them.

use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::net::IpAddr;

use super::Strategy;
use crate::apiserver::resources::ResourceType;
use crate::apiserver::status::{ApiResult, FieldError};
use crate::apiserver::table::{self, *};
use crate::apiserver::validate::*;

pub const RESOURCE: ResourceType = ResourceType {
    group: "discovery.k8s.io",
    version: "v1",
    plural: "endpointslices",
    singular: "endpointslice",
    kind: "EndpointSlice",
    namespaced: true,
    short_names: &[],
    categories: &[],
    subresources: &[],
    field_labels: &[],
    delete_returns_object: false,
    strategy: &EndpointSliceStrategy,
};

pub struct EndpointSliceStrategy;

impl Strategy for EndpointSliceStrategy {
    fn normalize(
        &self,
        rt: &ResourceType,
        input: &Value,
        old: Option<&Value>,
    ) -> ApiResult<(Value, Vec<FieldError>)> {
        typed::<EndpointSlice>(
            rt,
            input,
            old,
            default_endpointslice,
            validate_endpointslice,
        )
    }

    fn columns(&self) -> Vec<Value> {
        let name = table::name_column();
        let age = table::age_column();
        vec![
            name,
            col("AddressType", "string", 0, "The IP protocol for this slice"),
            col("Ports", "string", 0, "The ports for this slice"),
            col(
                "Endpoints",
                "string",
                0,
                "The addresses of the endpoints in this slice",
            ),
            age,
        ]
    }

    fn cells(&self, o: &Value, now: jiff::Timestamp) -> Vec<Value> {
        let name = table::name_cell(o);
        let a = table::age_cell(o, now);
        let ports: Vec<String> = arr(o, "/ports")
            .iter()
            .map(|p| match p.get("port").and_then(Value::as_i64) {
                Some(n) => n.to_string(),
                None => "<unset>".into(),
            })
            .collect();
        let addrs: Vec<String> = arr(o, "/endpoints")
            .iter()
            .flat_map(|e| {
                arr(e, "/addresses")
                    .iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
            })
            .collect();
        vec![
            name,
            json!(s(o, "/addressType")),
            json!(if ports.is_empty() {
                "<unset>".into()
            } else {
                ports.join(",")
            }),
            json!(if addrs.is_empty() {
                "<unset>".into()
            } else {
                first_three(addrs)
            }),
            a,
        ]
    }
}

fn default_endpointslice(s: &mut EndpointSlice) {
    for p in s.ports.iter_mut().flatten() {
        p.protocol.get_or_insert_with(|| "TCP".into());
        p.name.get_or_insert_with(String::new);
    }
}

fn validate_endpointslice(s: &EndpointSlice, _old: Option<&EndpointSlice>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let at = s.address_type.as_str();
    check_enum(
        Some(at),
        "addressType",
        &["FQDN", "IPv4", "IPv6"],
        &mut errs,
    );
    if s.endpoints.len() > 1000 {
        errs.push(FieldError::invalid(
            "endpoints",
            s.endpoints.len(),
            "must have at most 1000 items",
        ));
    }
    for (i, e) in s.endpoints.iter().enumerate() {
        let ep = format!("endpoints[{i}]");
        if e.addresses.is_empty() || e.addresses.len() > 100 {
            errs.push(FieldError::invalid(
                format!("{ep}.addresses"),
                json!(e.addresses),
                "must contain at least 1 and at most 100 addresses",
            ));
        }
        for (j, a) in e.addresses.iter().enumerate() {
            let path = format!("{ep}.addresses[{j}]");
            match at {
                "IPv4" => match a.parse::<IpAddr>() {
                    Ok(IpAddr::V4(_)) => check_endpoint_ip(a, &path, &mut errs),
                    _ => errs.push(FieldError::invalid(
                        path,
                        a.as_str(),
                        "must be a valid IPv4 address",
                    )),
                },
                "IPv6" => match a.parse::<IpAddr>() {
                    Ok(IpAddr::V6(_)) => check_endpoint_ip(a, &path, &mut errs),
                    _ => errs.push(FieldError::invalid(
                        path,
                        a.as_str(),
                        "must be a valid IPv6 address",
                    )),
                },
                _ => {
                    if !is_dns1123_subdomain(a) {
                        errs.push(FieldError::invalid(
                            path,
                            a.as_str(),
                            "must be a valid DNS name",
                        ));
                    }
                }
            }
        }
    }
    let mut names = BTreeSet::new();
    for (i, p) in s.ports.iter().flatten().enumerate() {
        let pp = format!("ports[{i}]");
        if let Some(port) = p.port
            && !(0..=65535).contains(&port)
        {
            errs.push(FieldError::invalid(
                format!("{pp}.port"),
                port,
                "must be between 0 and 65535, inclusive",
            ));
        }
        check_protocol(p.protocol.as_deref(), &format!("{pp}.protocol"), &mut errs);
        let n = p.name.clone().unwrap_or_default();
        if !n.is_empty() && !is_dns1123_label(&n) {
            errs.push(FieldError::invalid(
                format!("{pp}.name"),
                n.as_str(),
                "must be a lowercase RFC 1123 label",
            ));
        }
        if !names.insert(n.clone()) {
            errs.push(FieldError::duplicate(format!("{pp}.name"), n.as_str()));
        }
    }
    errs
}
