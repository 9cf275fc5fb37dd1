//! Decoding, defaulting and validation of incoming objects.
//!
//! Every object a client writes goes through [`normalize`]: it is decoded
//! into its `k8s-openapi` type (so a wrong type anywhere is a 400 naming the
//! field, and unknown fields fall away as in the real apiserver), defaulted
//! like the upstream `SetDefaults_*` functions for the fields clients rely
//! on, validated (422 listing every bad field) and encoded back to JSON —
//! the form that is stored.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Endpoints, Event, Namespace, Node, Pod, PodSpec, PodTemplateSpec,
    Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::resources::ResourceType;
use super::status::{ApiError, ApiResult, FieldError};

/// An object ready to store, and the warnings to send back.
pub struct Normalized {
    pub object: Value,
    /// Paths of fields the type does not have (dropped).
    pub unknown_fields: Vec<String>,
}

pub const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];

/// Decodes, defaults and validates `input` (a full object, metadata already
/// filled in by the handler). `old` is the stored object on updates.
pub fn normalize(rt: &ResourceType, input: &Value, old: Option<&Value>) -> ApiResult<Normalized> {
    let mut input = input.clone();
    stringify_quantities(&mut input, false);
    let name = input
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut errs = validate_meta(rt, &input);
    let (object, kind_errs) = match rt.kind {
        "Namespace" => typed::<Namespace>(rt, &input, old, default_namespace, |_, _| Vec::new())?,
        "Pod" => typed::<Pod>(rt, &input, old, default_pod, validate_pod)?,
        "Service" => typed::<Service>(rt, &input, old, default_service, validate_service)?,
        "Endpoints" => typed::<Endpoints>(rt, &input, old, default_endpoints, validate_endpoints)?,
        "Node" => typed::<Node>(rt, &input, old, |_| {}, validate_node)?,
        "Event" => typed::<Event>(rt, &input, old, |_| {}, |_, _| Vec::new())?,
        "ConfigMap" => typed::<ConfigMap>(rt, &input, old, |_| {}, validate_configmap)?,
        "ServiceAccount" => typed::<ServiceAccount>(rt, &input, old, |_| {}, |_, _| Vec::new())?,
        "Deployment" => {
            typed::<Deployment>(rt, &input, old, default_deployment, validate_deployment)?
        }
        "ReplicaSet" => {
            typed::<ReplicaSet>(rt, &input, old, default_replicaset, validate_replicaset)?
        }
        "EndpointSlice" => typed::<EndpointSlice>(
            rt,
            &input,
            old,
            default_endpointslice,
            validate_endpointslice,
        )?,
        "Lease" => typed::<Lease>(rt, &input, old, |_| {}, validate_lease)?,
        other => return Err(ApiError::internal(format!("no codec for kind {other}"))),
    };
    errs.extend(kind_errs);
    if !errs.is_empty() {
        return Err(ApiError::invalid(rt.group, rt.kind, &name, &errs));
    }
    let mut unknown_fields = Vec::new();
    unknown(&input, &object, "", &mut unknown_fields);
    Ok(Normalized {
        object,
        unknown_fields,
    })
}

/// Decodes into `T`, naming the field on error: a missing required field
/// is a 422 `Required value`, anything else (wrong type, bad enum…) a 400.
pub fn decode<T: DeserializeOwned>(rt: &ResourceType, input: &Value) -> ApiResult<T> {
    serde_path_to_error::deserialize::<_, T>(input).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        if let Some(field) = inner
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            let full = if path == "." || path.is_empty() {
                field.to_string()
            } else {
                format!("{path}.{field}")
            };
            let name = input
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            return ApiError::invalid(rt.group, rt.kind, name, &[FieldError::required(full, "")]);
        }
        let path = if path == "." {
            String::new()
        } else {
            format!("{path}: ")
        };
        ApiError::bad_request(format!("{} in body is invalid: {path}{inner}", rt.kind))
    })
}

fn typed<T: DeserializeOwned + Serialize>(
    rt: &ResourceType,
    input: &Value,
    old: Option<&Value>,
    default: fn(&mut T),
    validate: fn(&T, Option<&T>) -> Vec<FieldError>,
) -> ApiResult<(Value, Vec<FieldError>)> {
    let mut t: T = decode(rt, input)?;
    default(&mut t);
    let old_t: Option<T> = old.and_then(|o| serde_json::from_value(o.clone()).ok());
    let errs = validate(&t, old_t.as_ref());
    let v = serde_json::to_value(&t).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((v, errs))
}

/// YAML/JSON writers often give quantities as numbers (`cpu: 1`); the API
/// accepts that, `k8s-openapi`'s `Quantity` wants a string.
fn stringify_quantities(v: &mut Value, in_quantity_map: bool) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if in_quantity_map && x.is_number() {
                    *x = Value::String(x.to_string());
                } else {
                    let q = matches!(
                        k.as_str(),
                        "limits"
                            | "requests"
                            | "capacity"
                            | "allocatable"
                            | "overhead"
                            | "hard"
                            | "used"
                    );
                    stringify_quantities(x, q);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| stringify_quantities(x, false)),
        _ => {}
    }
}

/// Paths present (and not null) in `input` but absent from the decoded form.
fn unknown(input: &Value, out: &Value, path: &str, acc: &mut Vec<String>) {
    match (input, out) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, v) in i {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match o.get(k) {
                    Some(ov) => unknown(v, ov, &p, acc),
                    None if v.is_null() => {}
                    None => acc.push(p),
                }
            }
        }
        (Value::Array(i), Value::Array(o)) if i.len() == o.len() => {
            for (n, (a, b)) in i.iter().zip(o).enumerate() {
                unknown(a, b, &format!("{path}[{n}]"), acc);
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// Name and label syntax (k8s.io/apimachinery/pkg/util/validation).

pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

pub fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters.
fn is_label_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// A label or annotation key: `[prefix/]name`.
pub fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_label_name_part(name),
        None => is_label_name_part(s),
    }
}

pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name_part(s)
}

/// IANA service name (named ports).
fn is_iana_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && s.bytes().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn is_env_var_name(s: &str) -> bool {
    !s.is_empty() && !s.contains('=') && s.bytes().all(|c| (0x20..0x7f).contains(&c))
}

fn is_config_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn name_ok(rt: &ResourceType, name: &str) -> Result<(), &'static str> {
    let ok = match rt.kind {
        "Namespace" => is_dns1123_label(name),
        "Service" => is_dns1035_label(name),
        // Events are named `<object>.<hex>`; any path segment will do.
        "Event" => !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '%']),
        _ => is_dns1123_subdomain(name),
    };
    if ok {
        return Ok(());
    }
    Err(match rt.kind {
        "Namespace" => {
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
        }
        "Service" => {
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
        }
        "Event" => "may not be '.' or '..' and may not contain '/' or '%'",
        _ => {
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        }
    })
}

pub fn check_labels(
    map: Option<&serde_json::Map<String, Value>>,
    path: &str,
    errs: &mut Vec<FieldError>,
) {
    let Some(map) = map else { return };
    for (k, v) in map {
        if !is_qualified_name(k) {
            errs.push(FieldError::invalid(
                path,
                k.as_str(),
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            ));
        }
        match v.as_str() {
            Some(s) if is_label_value(s) => {}
            _ => errs.push(FieldError::invalid(
                path,
                v.clone(),
                "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            )),
        }
    }
}

/// The metadata rules shared by every kind.
fn validate_meta(rt: &ResourceType, obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let meta = obj.get("metadata").cloned().unwrap_or(json!({}));
    match meta.get("name").and_then(Value::as_str) {
        None | Some("") => errs.push(FieldError::required(
            "metadata.name",
            "name or generateName is required",
        )),
        Some(name) => {
            if let Err(why) = name_ok(rt, name) {
                errs.push(FieldError::invalid("metadata.name", name, why));
            }
        }
    }
    if rt.namespaced {
        if meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .is_empty()
        {
            errs.push(FieldError::required("metadata.namespace", ""));
        }
    } else if meta
        .get("namespace")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
    {
        errs.push(FieldError::forbidden(
            "metadata.namespace",
            "not allowed on this type",
        ));
    }
    check_labels(
        meta.get("labels").and_then(Value::as_object),
        "metadata.labels",
        &mut errs,
    );
    if let Some(ann) = meta.get("annotations").and_then(Value::as_object) {
        let mut total = 0;
        for (k, v) in ann {
            total += k.len() + v.as_str().map_or(0, str::len);
            if !is_qualified_name(&k.to_ascii_lowercase()) {
                errs.push(FieldError::invalid(
                    "metadata.annotations",
                    k.as_str(),
                    "name part must consist of alphanumeric characters, '-', '_' or '.'",
                ));
            }
        }
        if total > 256 * 1024 {
            errs.push(FieldError::invalid(
                "metadata.annotations",
                "",
                "Too long: must have at most 262144 bytes",
            ));
        }
    }
    errs
}

// ---------------------------------------------------------------------------
// Namespaces.

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

// ---------------------------------------------------------------------------
// Pods and pod templates.

fn default_pod(pod: &mut Pod) {
    if let Some(spec) = pod.spec.as_mut() {
        default_pod_spec(spec);
        // Set on pods by the Priority admission plugin upstream.
        spec.priority.get_or_insert(0);
        spec.preemption_policy
            .get_or_insert_with(|| "PreemptLowerPriority".into());
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let status = pod.status.get_or_insert_with(Default::default);
    status.phase.get_or_insert_with(|| "Pending".into());
    status
        .qos_class
        .get_or_insert_with(|| qos_class(&spec).into());
}

pub fn default_pod_spec(spec: &mut PodSpec) {
    spec.restart_policy.get_or_insert_with(|| "Always".into());
    spec.dns_policy.get_or_insert_with(|| "ClusterFirst".into());
    spec.scheduler_name
        .get_or_insert_with(|| "default-scheduler".into());
    spec.termination_grace_period_seconds.get_or_insert(30);
    spec.security_context.get_or_insert_with(Default::default);
    spec.enable_service_links.get_or_insert(true);
    for c in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
    {
        default_container(c);
    }
}

fn default_container(c: &mut Container) {
    let image = c.image.clone().unwrap_or_default();
    c.image_pull_policy.get_or_insert_with(|| {
        // `:latest` or no tag (ignoring a registry port and digests).
        let last = image.rsplit('/').next().unwrap_or_default();
        if image.contains('@') {
            "IfNotPresent".into()
        } else if !last.contains(':') || last.ends_with(":latest") {
            "Always".into()
        } else {
            "IfNotPresent".into()
        }
    });
    c.termination_message_path
        .get_or_insert_with(|| "/dev/termination-log".into());
    c.termination_message_policy
        .get_or_insert_with(|| "File".into());
    c.resources.get_or_insert_with(Default::default);
    for p in c.ports.iter_mut().flatten() {
        p.protocol.get_or_insert_with(|| "TCP".into());
    }
}

/// The pod's QoS class from its containers' requests and limits.
fn qos_class(spec: &PodSpec) -> &'static str {
    let mut any = false;
    let mut guaranteed = true;
    for c in &spec.containers {
        let r = c.resources.clone().unwrap_or_default();
        let limits = r.limits.unwrap_or_default();
        let requests = r.requests.unwrap_or_default();
        if !limits.is_empty() || !requests.is_empty() {
            any = true;
        }
        for res in ["cpu", "memory"] {
            match (limits.get(res), requests.get(res)) {
                (Some(l), Some(q)) if l == q => {}
                (Some(_), None) => {}
                _ => guaranteed = false,
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

fn validate_pod(pod: &Pod, old: Option<&Pod>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    match &pod.spec {
        None => errs.push(FieldError::required("spec", "")),
        Some(spec) => validate_pod_spec(spec, "spec", &mut errs),
    }
    if let (Some(old), Some(new)) = (old.and_then(|o| o.spec.as_ref()), pod.spec.as_ref()) {
        // Only images, activeDeadlineSeconds, tolerations and the grace
        // period of a pod's spec may change after creation.
        let strip = |s: &PodSpec| {
            let mut s = s.clone();
            for c in s
                .containers
                .iter_mut()
                .chain(s.init_containers.iter_mut().flatten())
            {
                c.image = None;
            }
            s.active_deadline_seconds = None;
            s.tolerations = None;
            s.termination_grace_period_seconds = None;
            s
        };
        if strip(old) != strip(new) {
            errs.push(FieldError::forbidden(
                "spec",
                "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
            ));
        }
    }
    errs
}

fn validate_pod_spec(spec: &PodSpec, path: &str, errs: &mut Vec<FieldError>) {
    let mut volumes = BTreeSet::new();
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        let p = format!("{path}.volumes[{i}].name");
        if !is_dns1123_label(&v.name) {
            errs.push(FieldError::invalid(
                &p,
                v.name.as_str(),
                "must be a lowercase RFC 1123 label",
            ));
        } else if !volumes.insert(v.name.clone()) {
            errs.push(FieldError::duplicate(&p, v.name.as_str()));
        }
    }
    if spec.containers.is_empty() {
        errs.push(FieldError::required(format!("{path}.containers"), ""));
    }
    let mut names = BTreeSet::new();
    let mut port_names = BTreeSet::new();
    let no_init = Vec::new();
    let lists = [
        ("containers", &spec.containers),
        (
            "initContainers",
            spec.init_containers.as_ref().unwrap_or(&no_init),
        ),
    ];
    for (list, containers) in lists {
        for (i, c) in containers.iter().enumerate() {
            let cp = format!("{path}.{list}[{i}]");
            if !is_dns1123_label(&c.name) {
                errs.push(FieldError::invalid(
                    format!("{cp}.name"),
                    c.name.as_str(),
                    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
                ));
            } else if !names.insert(c.name.clone()) {
                errs.push(FieldError::duplicate(format!("{cp}.name"), c.name.as_str()));
            }
            if c.image.as_deref().unwrap_or_default().trim().is_empty() {
                errs.push(FieldError::required(format!("{cp}.image"), ""));
            }
            if let Some(p) = &c.image_pull_policy
                && !["Always", "IfNotPresent", "Never"].contains(&p.as_str())
            {
                errs.push(FieldError::not_supported(
                    format!("{cp}.imagePullPolicy"),
                    p.as_str(),
                    &["Always", "IfNotPresent", "Never"],
                ));
            }
            for (j, port) in c.ports.iter().flatten().enumerate() {
                let pp = format!("{cp}.ports[{j}]");
                if !(1..=65535).contains(&port.container_port) {
                    errs.push(FieldError::invalid(
                        format!("{pp}.containerPort"),
                        port.container_port,
                        "must be between 1 and 65535, inclusive",
                    ));
                }
                if let Some(h) = port.host_port
                    && !(0..=65535).contains(&h)
                {
                    errs.push(FieldError::invalid(
                        format!("{pp}.hostPort"),
                        h,
                        "must be between 1 and 65535, inclusive",
                    ));
                }
                check_protocol(port.protocol.as_deref(), &format!("{pp}.protocol"), errs);
                if let Some(n) = &port.name {
                    if !is_iana_svc_name(n) {
                        errs.push(FieldError::invalid(
                            format!("{pp}.name"),
                            n.as_str(),
                            "must be no more than 15 characters and consist of lower case alphanumeric characters or '-', with at least one letter",
                        ));
                    } else if !port_names.insert(n.clone()) {
                        errs.push(FieldError::duplicate(format!("{pp}.name"), n.as_str()));
                    }
                }
            }
            for (j, e) in c.env.iter().flatten().enumerate() {
                if !is_env_var_name(&e.name) {
                    errs.push(FieldError::invalid(
                        format!("{cp}.env[{j}].name"),
                        e.name.as_str(),
                        "a valid environment variable name must consist only of printable ASCII characters other than '='",
                    ));
                }
            }
            for (j, m) in c.volume_mounts.iter().flatten().enumerate() {
                if !volumes.contains(&m.name) {
                    errs.push(FieldError::not_found_volume(
                        format!("{cp}.volumeMounts[{j}].name"),
                        &m.name,
                    ));
                }
                if m.mount_path.is_empty() {
                    errs.push(FieldError::required(
                        format!("{cp}.volumeMounts[{j}].mountPath"),
                        "",
                    ));
                }
            }
        }
    }
    check_enum(
        spec.restart_policy.as_deref(),
        &format!("{path}.restartPolicy"),
        &["Always", "Never", "OnFailure"],
        errs,
    );
    check_enum(
        spec.dns_policy.as_deref(),
        &format!("{path}.dnsPolicy"),
        &["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"],
        errs,
    );
    if let Some(n) = spec.node_name.as_deref()
        && !n.is_empty()
        && !is_dns1123_subdomain(n)
    {
        errs.push(FieldError::invalid(
            format!("{path}.nodeName"),
            n,
            "must be a lowercase RFC 1123 subdomain",
        ));
    }
    if let Some(t) = spec.termination_grace_period_seconds
        && t < 0
    {
        errs.push(FieldError::invalid(
            format!("{path}.terminationGracePeriodSeconds"),
            t,
            "must be greater than or equal to 0",
        ));
    }
}

impl FieldError {
    fn not_found_volume(field: String, name: &str) -> FieldError {
        FieldError {
            field,
            kind: super::status::FieldErrorKind::Invalid {
                value: json!(name),
                detail: "volume not found".into(),
            },
        }
    }
}

fn check_enum(v: Option<&str>, path: &str, allowed: &[&str], errs: &mut Vec<FieldError>) {
    if let Some(v) = v
        && !allowed.contains(&v)
    {
        errs.push(FieldError::not_supported(path, v, allowed));
    }
}

fn check_protocol(p: Option<&str>, path: &str, errs: &mut Vec<FieldError>) {
    check_enum(p, path, PROTOCOLS, errs);
}

fn check_ip(ip: &str, path: &str, errs: &mut Vec<FieldError>) -> Option<IpAddr> {
    match ip.parse::<IpAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errs.push(FieldError::invalid(
                path,
                ip,
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            ));
            None
        }
    }
}

/// Endpoint addresses may not be loopback, link-local or multicast.
fn check_endpoint_ip(ip: &str, path: &str, errs: &mut Vec<FieldError>) {
    if let Some(a) = check_ip(ip, path, errs) {
        let special = match a {
            IpAddr::V4(v4) => {
                v4.is_loopback() || v4.is_link_local() || v4.is_multicast() || v4.is_unspecified()
            }
            IpAddr::V6(v6) => {
                v6.is_loopback()
                    || v6.is_multicast()
                    || v6.is_unspecified()
                    || (v6.segments()[0] & 0xffc0) == 0xfe80
            }
        };
        if special {
            errs.push(FieldError::invalid(
                path,
                ip,
                "may not be unspecified, loopback, link-local or multicast",
            ));
        }
    }
}

// ---------------------------------------------------------------------------
// Services. ClusterIP/NodePort allocation happens after validation
// (`allocate.rs`), which also checks ranges and collisions.

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
    if ty != "ExternalName" {
        spec.internal_traffic_policy
            .get_or_insert_with(|| "Cluster".into());
        spec.ip_families.get_or_insert_with(|| vec!["IPv4".into()]);
        spec.ip_family_policy
            .get_or_insert_with(|| "SingleStack".into());
    }
    if ty == "NodePort" || ty == "LoadBalancer" {
        spec.external_traffic_policy
            .get_or_insert_with(|| "Cluster".into());
    }
    if ty == "LoadBalancer" {
        spec.allocate_load_balancer_node_ports.get_or_insert(true);
    }
    // `clusterIPs[0]` and `clusterIP` are the same field.
    match (&spec.cluster_ip, &spec.cluster_ips) {
        (Some(ip), None) if !ip.is_empty() => spec.cluster_ips = Some(vec![ip.clone()]),
        (None, Some(ips)) if !ips.is_empty() => spec.cluster_ip = Some(ips[0].clone()),
        _ => {}
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

// ---------------------------------------------------------------------------
// Endpoints and EndpointSlices.

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

// ---------------------------------------------------------------------------
// Nodes, ConfigMaps, Leases.

fn validate_node(node: &Node, _old: Option<&Node>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(spec) = &node.spec {
        for (i, cidr) in spec.pod_cidrs.iter().flatten().enumerate() {
            if super::allocate::parse_cidr(cidr).is_none() {
                errs.push(FieldError::invalid(
                    format!("spec.podCIDRs[{i}]"),
                    cidr.as_str(),
                    "must be a valid CIDR",
                ));
            }
        }
        for (i, t) in spec.taints.iter().flatten().enumerate() {
            check_enum(
                Some(&t.effect),
                &format!("spec.taints[{i}].effect"),
                &["NoExecute", "NoSchedule", "PreferNoSchedule"],
                &mut errs,
            );
            if !is_qualified_name(&t.key) {
                errs.push(FieldError::invalid(
                    format!("spec.taints[{i}].key"),
                    t.key.as_str(),
                    "must be a qualified name",
                ));
            }
        }
    }
    errs
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

fn validate_lease(l: &Lease, _old: Option<&Lease>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(spec) = &l.spec {
        if let Some(d) = spec.lease_duration_seconds
            && d <= 0
        {
            errs.push(FieldError::invalid(
                "spec.leaseDurationSeconds",
                d,
                "must be greater than 0",
            ));
        }
        if let Some(t) = spec.lease_transitions
            && t < 0
        {
            errs.push(FieldError::invalid(
                "spec.leaseTransitions",
                t,
                "must be greater than or equal to 0",
            ));
        }
    }
    errs
}

// ---------------------------------------------------------------------------
// Deployments and ReplicaSets.

fn default_template(t: &mut PodTemplateSpec) {
    if let Some(spec) = t.spec.as_mut() {
        default_pod_spec(spec);
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

fn default_replicaset(rs: &mut ReplicaSet) {
    if let Some(spec) = rs.spec.as_mut() {
        spec.replicas.get_or_insert(1);
        if let Some(t) = spec.template.as_mut() {
            default_template(t);
        }
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
        if !is_qualified_name(&e.key) {
            errs.push(FieldError::invalid(
                format!("{ep}.key"),
                e.key.as_str(),
                "must be a qualified name",
            ));
        }
    }
}

/// Shared by Deployments and ReplicaSets: selector, template, replicas.
fn validate_workload(
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

#[cfg(test)]
mod tests {
    use super::super::resources::lookup;
    use super::*;

    fn norm(plural: &str, group: &str, v: Value) -> ApiResult<Normalized> {
        normalize(lookup(group, "v1", plural).unwrap(), &v, None)
    }

    #[test]
    fn name_syntax() {
        assert!(is_dns1123_label("a-1"));
        assert!(!is_dns1123_label("A"));
        assert!(!is_dns1123_label("-a"));
        assert!(is_dns1123_subdomain("a.b-c"));
        assert!(!is_dns1035_label("1a"));
        assert!(is_qualified_name("app.kubernetes.io/name"));
        assert!(!is_qualified_name("a/b/c"));
        assert!(is_label_value(""));
        assert!(!is_label_value("-x"));
        assert!(is_iana_svc_name("http"));
        assert!(!is_iana_svc_name("80"));
    }

    #[test]
    fn pod_defaults_and_unknown_fields() {
        let n = norm(
            "pods",
            "",
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"},
                   "spec": {"containers": [{"name": "c", "image": "nginx", "ports": [{"containerPort": 80}],
                            "resources": {"limits": {"cpu": 1}}}], "bogus": 1}}),
        )
        .unwrap();
        let o = n.object;
        assert_eq!(o["spec"]["restartPolicy"], "Always");
        assert_eq!(o["spec"]["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(o["spec"]["containers"][0]["ports"][0]["protocol"], "TCP");
        assert_eq!(
            o["spec"]["containers"][0]["resources"]["limits"]["cpu"],
            "1"
        );
        assert_eq!(o["status"]["phase"], "Pending");
        assert_eq!(n.unknown_fields, vec!["spec.bogus".to_string()]);
    }

    #[test]
    fn pod_errors_name_fields() {
        let e = norm(
            "pods",
            "",
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "Bad_Name", "namespace": "default"},
                   "spec": {"containers": [{"name": "c", "image": "", "ports": [{"containerPort": 70000, "protocol": "FOO"}]}]}}),
        )
        .err()
        .unwrap();
        assert_eq!(e.code, 422);
        for f in [
            "metadata.name",
            "spec.containers[0].image",
            "spec.containers[0].ports[0].containerPort",
            "spec.containers[0].ports[0].protocol",
        ] {
            assert!(e.message.contains(f), "{f} missing from {}", e.message);
        }
        let e = norm(
            "pods",
            "",
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"},
                   "spec": {"containers": [{"name": "c", "image": "x", "ports": [{"containerPort": "eighty"}]}]}}),
        )
        .err()
        .unwrap();
        assert_eq!(e.code, 400);
        assert!(
            e.message
                .contains("spec.containers[0].ports[0].containerPort"),
            "{}",
            e.message
        );
        let e = norm(
            "pods",
            "",
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"}, "spec": {}}),
        )
        .err()
        .unwrap();
        assert_eq!(e.code, 422);
        assert!(
            e.message.contains("spec.containers: Required value"),
            "{}",
            e.message
        );
    }

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
