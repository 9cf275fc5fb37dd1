//! Services: defaulting and validation, and their addresses — a ClusterIP
//! and node ports allocated before the write (`allocate/`), released
//! when the Service lets them go.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kcontrol_store::Revision;
use serde_json::{Map, Value, json};

use super::{BoxFuture, Held, Strategy, Write};
use crate::apiserver::allocate::{self, ClaimError, Family};
use crate::apiserver::object::{internal, uid_of};
use crate::apiserver::resources::{ResourceType, lookup};
use crate::apiserver::state::State;
use crate::apiserver::status::{ApiError, ApiResult, FieldError};
use crate::apiserver::table::{self, *};
use crate::apiserver::validate::*;

pub const RESOURCE: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "services",
    singular: "service",
    kind: "Service",
    namespaced: true,
    short_names: &["svc"],
    categories: &["all"],
    subresources: &["status"],
    field_labels: &[],
    delete_returns_object: true,
    strategy: &ServiceStrategy,
};

pub struct ServiceStrategy;

impl Strategy for ServiceStrategy {
    fn normalize(
        &self,
        rt: &ResourceType,
        input: &Value,
        old: Option<&Value>,
    ) -> ApiResult<(Value, Vec<FieldError>)> {
        typed::<Service>(rt, input, old, default_service, validate_service)
    }

    fn check_name(&self, name: &str) -> Result<(), &'static str> {
        dns1035_name(name)
    }

    fn reset_status_on_create(&self, obj: &mut Map<String, Value>) {
        obj.remove("status");
    }

    fn start<'a>(&'a self, state: &'a State) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(load_addresses(state))
    }

    fn prepare<'a>(
        &'a self,
        state: &'a State,
        w: Write<'a>,
        out: &'a mut Value,
    ) -> BoxFuture<'a, ApiResult<Held>> {
        Box::pin(async move {
            let (ticket, claimed) =
                allocate(state, w.rt, w.name, w.key, out, w.old, w.dry_run).await?;
            Ok(Held::new(ticket, claimed))
        })
    }

    fn after_update<'a>(
        &'a self,
        state: &'a State,
        key: &'a str,
        old: &'a Value,
        new: &'a Value,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if state.alloc.shared() {
                allocate::release_dropped(&*state.store, key, old, Some(new)).await;
            }
        })
    }

    fn after_delete<'a>(
        &'a self,
        state: &'a State,
        key: &'a str,
        rev: Revision,
        obj: &'a Value,
    ) -> BoxFuture<'a, ()> {
        Box::pin(deleted(state, key, rev, obj))
    }

    fn columns(&self) -> Vec<Value> {
        let name = table::name_column();
        let age = table::age_column();
        vec![
            name,
            col(
                "Type",
                "string",
                0,
                "type determines how the Service is exposed.",
            ),
            col(
                "Cluster-IP",
                "string",
                0,
                "clusterIP is the IP address of the service.",
            ),
            col(
                "External-IP",
                "string",
                0,
                "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service.",
            ),
            col(
                "Port(s)",
                "string",
                0,
                "The list of ports that are exposed by this service.",
            ),
            age,
            col(
                "Selector",
                "string",
                1,
                "Route service traffic to pods with label keys and values matching this selector.",
            ),
        ]
    }

    fn cells(&self, o: &Value, now: jiff::Timestamp) -> Vec<Value> {
        let name = table::name_cell(o);
        let a = table::age_cell(o, now);
        let ty = s(o, "/spec/type");
        let mut external: Vec<String> = arr(o, "/status/loadBalancer/ingress")
            .iter()
            .map(|i| {
                let ip = s(i, "/ip");
                if ip.is_empty() {
                    s(i, "/hostname").to_string()
                } else {
                    ip.to_string()
                }
            })
            .collect();
        external.extend(
            arr(o, "/spec/externalIPs")
                .iter()
                .filter_map(Value::as_str)
                .map(String::from),
        );
        let external = match ty {
            "ExternalName" => s(o, "/spec/externalName").to_string(),
            "LoadBalancer" if external.is_empty() => "<pending>".into(),
            _ => or_none(external.join(",")),
        };
        let ports: Vec<String> = arr(o, "/spec/ports")
            .iter()
            .map(|p| {
                let port = i(p, "/port");
                let proto = s(p, "/protocol");
                match p.get("nodePort").and_then(Value::as_i64) {
                    Some(np) => format!("{port}:{np}/{proto}"),
                    None => format!("{port}/{proto}"),
                }
            })
            .collect();
        vec![
            name,
            json!(ty),
            json!(or_none(s(o, "/spec/clusterIP").into())),
            json!(external),
            json!(or_none(ports.join(","))),
            a,
            json!(or_none(selector_string(
                o.pointer("/spec/selector").and_then(Value::as_object)
            ))),
        ]
    }
}

/// Tells the allocator which addresses the stored Services hold — and,
/// on a shared store, which are claimed — as of one revision (at start,
/// before anything is served; on a shared store again whenever an
/// allocation finds its picture out of date).
pub async fn load_addresses(state: &State) -> anyhow::Result<()> {
    let svc = lookup("", "v1", "services").expect("services");
    let services = state.list_all(&svc.prefix(None), None).await?;
    let at = services.0;
    let mut items = Vec::with_capacity(services.1.len());
    for kv in services.1 {
        let obj: Value = serde_json::from_slice(&kv.value)
            .with_context(|| format!("stored Service {} is not JSON", kv.key))?;
        items.push((kv.key, kv.mod_revision, obj));
    }
    let claims = if state.alloc.shared() {
        state.list_all(allocate::CLAIM_PREFIX, Some(at)).await?.1
    } else {
        Vec::new()
    };
    state.alloc.resynced(at, items, &claims);
    Ok(())
}

/// Fills in a Service's addresses (see [`allocate::Allocator::assign`]) and claims
/// them in memory until the returned ticket is settled. On a shared
/// store a real write also claims, in the store, the addresses `old`
/// did not hold, so that no other apiserver hands them out; those
/// claims are returned (to release if the write fails). An address
/// claimed in the store by someone else, or a range that looks full,
/// makes the allocator re-read the store and try again (a range still
/// full with a fresh picture waits for writes in flight here first):
/// auto-picked addresses are picked again, requested ones taken are
/// refused.
async fn allocate(
    state: &State,
    rt: &ResourceType,
    name: &str,
    key: &str,
    out: &mut Value,
    old: Option<&Value>,
    dry_run: bool,
) -> ApiResult<(allocate::Ticket, Vec<String>)> {
    let held = old.map(allocate::claim_keys).unwrap_or_default();
    let shared = state.alloc.shared();
    // The picture in memory was just re-read and nothing learned since.
    let mut fresh = false;
    for _ in 0..16 {
        let mut candidate = out.clone();
        let ticket = match state.alloc.claim(key, &mut candidate, old) {
            Ok(t) => t,
            Err(errs) if shared => {
                // Taken or full even so: only writes in flight here can
                // still free something.
                if fresh
                    && !state
                        .alloc
                        .settled_elsewhere(key, Duration::from_secs(5))
                        .await
                {
                    return Err(ApiError::invalid(rt.group, rt.kind, name, &errs));
                }
                resync_addresses(state).await?;
                fresh = true;
                continue;
            }
            Err(errs) => return Err(ApiError::invalid(rt.group, rt.kind, name, &errs)),
        };
        if !shared || dry_run {
            *out = candidate;
            return Ok((ticket, Vec::new()));
        }
        let wanted = allocate::claim_keys(&candidate)
            .difference(&held)
            .cloned()
            .collect();
        match allocate::claim(&*state.store, &wanted, key, uid_of(&candidate)).await {
            Ok(claimed) => {
                *out = candidate;
                return Ok((ticket, claimed));
            }
            Err(ClaimError::Taken(k)) => {
                drop(ticket);
                resync_addresses(state).await?;
                state.alloc.claimed_elsewhere(&k);
                fresh = false;
            }
            Err(ClaimError::Store(e)) => return Err(internal(e)),
        }
    }
    Err(ApiError::internal(
        "could not claim free Service addresses after 16 tries",
    ))
}

/// The Service `svc` at `key` was deleted at `rev`: its addresses are
/// free, here and (shared store) for the other apiservers.
async fn deleted(state: &State, key: &str, rev: Revision, svc: &Value) {
    state.alloc.deleted(key, rev);
    if state.alloc.shared() {
        allocate::release_dropped(&*state.store, key, svc, None).await;
    }
}

async fn resync_addresses(state: &State) -> ApiResult<()> {
    load_addresses(state)
        .await
        .map_err(|e| ApiError::internal(format!("reading Service addresses: {e:#}")))
}

fn default_service(svc: &mut Service) {
    let spec = svc.spec.get_or_insert_with(Default::default);
    let ty = spec.type_.get_or_insert_with(|| "ClusterIP".into()).clone();
    spec.session_affinity.get_or_insert_with(|| "None".into());
    for p in spec.ports.iter_mut().flatten() {
        p.protocol.get_or_insert_with(|| "TCP".into());
        if p.target_port.is_none() {
            p.target_port = Some(IntOrString::Int(p.port));
        }
    }
    // ipFamilyPolicy and ipFamilies depend on the families the cluster
    // serves: the allocator defaults them (`allocate/cluster_ips.rs`).
    if ty != "ExternalName" {
        spec.internal_traffic_policy
            .get_or_insert_with(|| "Cluster".into());
    }
    if ty == "NodePort" || ty == "LoadBalancer" {
        spec.external_traffic_policy
            .get_or_insert_with(|| "Cluster".into());
    }
    if ty == "LoadBalancer" {
        spec.allocate_load_balancer_node_ports.get_or_insert(true);
    }
    // `clusterIPs[0]` and `clusterIP` are the same field. The plural one
    // is filled in from the singular by the allocator, which knows what
    // an update's Service had (an old client sending only `clusterIP`
    // keeps both addresses of a dual-stack Service).
    if let (None, Some(ips)) = (&spec.cluster_ip, &spec.cluster_ips)
        && !ips.is_empty()
    {
        spec.cluster_ip = Some(ips[0].clone());
    }
    svc.status
        .get_or_insert_with(|| k8s_openapi::api::core::v1::ServiceStatus {
            load_balancer: Some(Default::default()),
            ..Default::default()
        });
}

const SERVICE_TYPES: &[&str] = &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];

fn validate_service(svc: &Service, old: Option<&Service>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = svc.spec.clone().unwrap_or_default();
    let ty = spec.type_.clone().unwrap_or_default();
    check_enum(Some(&ty), "spec.type", SERVICE_TYPES, &mut errs);
    check_enum(
        spec.session_affinity.as_deref(),
        "spec.sessionAffinity",
        &["ClientIP", "None"],
        &mut errs,
    );
    let cluster_ip = spec.cluster_ip.clone().unwrap_or_default();
    let headless = cluster_ip == "None";
    if !cluster_ip.is_empty() && !headless {
        check_ip(&cluster_ip, "spec.clusterIPs[0]", &mut errs);
    }
    if ty != "ExternalName" {
        check_ip_families(&spec, &mut errs);
    }
    if let (Some(a), Some(b)) = (
        &spec.cluster_ip,
        spec.cluster_ips.as_ref().and_then(|v| v.first()),
    ) && a != b
    {
        errs.push(FieldError::invalid(
            "spec.clusterIPs",
            json!(spec.cluster_ips),
            "must match `spec.clusterIP` if set",
        ));
    }
    if ty == "ExternalName" {
        match spec.external_name.as_deref() {
            None | Some("") => errs.push(FieldError::required("spec.externalName", "")),
            Some(n) if !is_dns1123_subdomain(n.trim_end_matches('.')) => errs.push(
                FieldError::invalid("spec.externalName", n, "must be a valid DNS name"),
            ),
            _ => {}
        }
    } else if headless && ty != "ClusterIP" {
        errs.push(FieldError::invalid(
            "spec.clusterIPs[0]",
            "None",
            format!("may not be set to 'None' for {ty} services"),
        ));
    }
    let ports = spec.ports.clone().unwrap_or_default();
    if ports.is_empty() && !headless && ty != "ExternalName" {
        errs.push(FieldError::required("spec.ports", ""));
    }
    let mut names = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let pp = format!("spec.ports[{i}]");
        match p.name.as_deref() {
            None | Some("") if ports.len() > 1 => errs.push(FieldError::required(format!("{pp}.name"), "")),
            None | Some("") => {}
            Some(n) if !is_dns1123_label(n) => errs.push(FieldError::invalid(
                format!("{pp}.name"),
                n,
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
            )),
            Some(n) => {
                if !names.insert(n.to_string()) {
                    errs.push(FieldError::duplicate(format!("{pp}.name"), n));
                }
            }
        }
        if !(1..=65535).contains(&p.port) {
            errs.push(FieldError::invalid(
                format!("{pp}.port"),
                p.port,
                "must be between 1 and 65535, inclusive",
            ));
        }
        check_protocol(p.protocol.as_deref(), &format!("{pp}.protocol"), &mut errs);
        if !seen.insert((p.port, p.protocol.clone())) {
            errs.push(FieldError::duplicate(
                pp.clone(),
                json!({ "port": p.port, "protocol": p.protocol }),
            ));
        }
        match &p.target_port {
            Some(IntOrString::Int(t)) if !(1..=65535).contains(t) => errs.push(FieldError::invalid(
                format!("{pp}.targetPort"),
                *t,
                "must be between 1 and 65535, inclusive",
            )),
            Some(IntOrString::String(s)) if !is_iana_svc_name(s) => errs.push(FieldError::invalid(
                format!("{pp}.targetPort"),
                s.as_str(),
                "must contain at least one letter (a-z) and consist of at most 15 lower case alphanumeric characters or '-'",
            )),
            _ => {}
        }
        // A node port left over from before a change to ClusterIP is
        // dropped by the allocator; a new one is an error.
        let kept = old
            .and_then(|o| o.spec.as_ref())
            .and_then(|s| s.ports.as_ref())
            .is_some_and(|ops| {
                ops.iter()
                    .any(|o| o.port == p.port && o.node_port == p.node_port)
            });
        if let Some(np) = p.node_port
            && np != 0
            && !kept
            && ty != "NodePort"
            && ty != "LoadBalancer"
        {
            errs.push(FieldError::forbidden(
                format!("{pp}.nodePort"),
                format!("may not be used when `type` is '{ty}'"),
            ));
        }
    }
    if let Some(sel) = &spec.selector {
        let m: serde_json::Map<String, Value> =
            sel.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        check_labels(Some(&m), "spec.selector", &mut errs);
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        check_ip(ip, &format!("spec.externalIPs[{i}]"), &mut errs);
    }
    if let Some(old) = old.and_then(|o| o.spec.as_ref()) {
        let old_ip = old.cluster_ip.clone().unwrap_or_default();
        let old_ty = old.type_.clone().unwrap_or_default();
        // ClusterIP is immutable while the service keeps one (a change to
        // or from ExternalName gets or drops it).
        if !old_ip.is_empty()
            && !cluster_ip.is_empty()
            && old_ip != cluster_ip
            && old_ty != "ExternalName"
            && ty != "ExternalName"
        {
            errs.push(FieldError::invalid(
                "spec.clusterIPs[0]",
                cluster_ip.as_str(),
                "may not change once set",
            ));
        }
    }
    errs
}

const IP_FAMILY_POLICIES: &[&str] = &["PreferDualStack", "RequireDualStack", "SingleStack"];

/// What dual-stack fields must be whatever the cluster serves: known
/// values, at most one address and one entry per family, `None` alone.
fn check_ip_families(spec: &ServiceSpec, errs: &mut Vec<FieldError>) {
    check_enum(
        spec.ip_family_policy.as_deref(),
        "spec.ipFamilyPolicy",
        IP_FAMILY_POLICIES,
        errs,
    );
    let families = spec.ip_families.clone().unwrap_or_default();
    if families.len() > 2 {
        errs.push(FieldError::invalid(
            "spec.ipFamilies",
            json!(families),
            "may specify no more than two IP families (one IPv4, one IPv6)",
        ));
    }
    for (i, f) in families.iter().enumerate() {
        let field = format!("spec.ipFamilies[{i}]");
        if Family::parse(f).is_none() {
            errs.push(FieldError::not_supported(
                field,
                f.as_str(),
                &["IPv4", "IPv6"],
            ));
        } else if families[..i].contains(f) {
            errs.push(FieldError::duplicate(field, f.as_str()));
        }
    }
    let ips = spec.cluster_ips.clone().unwrap_or_default();
    if ips.len() > 2 {
        errs.push(FieldError::invalid(
            "spec.clusterIPs",
            json!(ips),
            "may only hold up to 2 values (one per IP family)",
        ));
    }
    let primary = ips
        .first()
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .map(Family::of);
    for (i, ip) in ips.iter().enumerate().skip(1) {
        let field = format!("spec.clusterIPs[{i}]");
        if ip == "None" || ips[0] == "None" {
            errs.push(FieldError::invalid(
                field,
                ip.as_str(),
                "must be empty when the first value is 'None', and may only be 'None' at index 0",
            ));
            continue;
        }
        let Some(addr) = check_ip(ip, &field, errs) else {
            continue;
        };
        if primary == Some(Family::of(addr)) {
            errs.push(FieldError::invalid(
                field,
                ip.as_str(),
                "may specify no more than one IP for each IP family",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::apiserver::validate::norm;
    use serde_json::json;

    #[test]
    fn service_rules() {
        let e = norm(
            "services",
            "",
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "default"},
                   "spec": {"clusterIP": "1.2.3", "selector": {"app": "-x"},
                            "ports": [{"name": "a", "port": 0}, {"port": 80, "protocol": "ICMP"}]}}),
        )
        .err()
        .unwrap();
        for f in [
            "spec.clusterIPs[0]",
            "spec.selector",
            "spec.ports[0].port",
            "spec.ports[1].name",
            "spec.ports[1].protocol",
        ] {
            assert!(e.message.contains(f), "{f} missing from {}", e.message);
        }
        let ok = norm(
            "services",
            "",
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "default"},
                   "spec": {"ports": [{"port": 80}]}}),
        )
        .unwrap()
        .object;
        assert_eq!(ok["spec"]["type"], "ClusterIP");
        assert_eq!(ok["spec"]["ports"][0]["targetPort"], 80);
    }
}
