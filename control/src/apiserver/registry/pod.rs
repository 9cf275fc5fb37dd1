//! Pods: defaulting (restart policy, QoS class…), the few spec fields that
//! may change, graceful deletion of bound pods.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use serde_json::{Map, Value, json};

use super::Strategy;
use crate::apiserver::http::Query;
use crate::apiserver::resources::ResourceType;
use crate::apiserver::status::{ApiError, ApiResult, FieldError};
use crate::apiserver::table::{self, *};
use crate::apiserver::validate::*;

pub const RESOURCE: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "pods",
    singular: "pod",
    kind: "Pod",
    namespaced: true,
    short_names: &["po"],
    categories: &["all"],
    subresources: &["status", "binding"],
    field_labels: &[
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    ],
    delete_returns_object: true,
    strategy: &PodStrategy,
};

pub struct PodStrategy;

impl Strategy for PodStrategy {
    fn normalize(
        &self,
        rt: &ResourceType,
        input: &Value,
        old: Option<&Value>,
    ) -> ApiResult<(Value, Vec<FieldError>)> {
        typed::<Pod>(rt, input, old, default_pod, validate_pod)
    }

    fn reset_status_on_create(&self, obj: &mut Map<String, Value>) {
        obj.remove("status");
    }

    /// Graceful deletion: the kubelet running the pod stops it and then
    /// deletes it again with gracePeriodSeconds=0.
    fn grace_period(&self, pod: &Value, opts: &Value, q: &Query) -> ApiResult<Option<i64>> {
        grace_period(pod, opts, q)
    }

    fn columns(&self) -> Vec<Value> {
        let name = table::name_column();
        let age = table::age_column();
        vec![
            name,
            col(
                "Ready",
                "string",
                0,
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            col(
                "Status",
                "string",
                0,
                "The aggregate status of the containers in this pod.",
            ),
            col(
                "Restarts",
                "string",
                0,
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
            ),
            age,
            col(
                "IP",
                "string",
                1,
                "IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.",
            ),
            col(
                "Node",
                "string",
                1,
                "NodeName is a request to schedule this pod onto a specific node.",
            ),
            col(
                "Nominated Node",
                "string",
                1,
                "nominatedNodeName is set only when this pod preempts other pods on the node.",
            ),
            col(
                "Readiness Gates",
                "string",
                1,
                "If specified, all readiness gates will be evaluated for pod readiness.",
            ),
        ]
    }

    fn cells(&self, o: &Value, now: jiff::Timestamp) -> Vec<Value> {
        let name = table::name_cell(o);
        let a = table::age_cell(o, now);
        let statuses = arr(o, "/status/containerStatuses");
        let total = arr(o, "/spec/containers").len();
        let ready = statuses
            .iter()
            .filter(|c| c.get("ready") == Some(&json!(true)))
            .count();
        let restarts: i64 = statuses.iter().map(|c| i(c, "/restartCount")).sum();
        let gates = arr(o, "/spec/readinessGates").len();
        vec![
            name,
            json!(format!("{ready}/{total}")),
            json!(pod_status(o)),
            json!(restarts.to_string()),
            a,
            json!(or_none(s(o, "/status/podIP").into())),
            json!(or_none(s(o, "/spec/nodeName").into())),
            json!(or_none(s(o, "/status/nominatedNodeName").into())),
            json!(if gates == 0 {
                "<none>".to_string()
            } else {
                format!("0/{gates}")
            }),
        ]
    }
}

/// The grace period a DELETE of `pod` gets, `None` when it goes at once:
/// unbound pods, pods that already ended, and gracePeriodSeconds=0 (from
/// DeleteOptions or the query) are removed immediately; a bound pod
/// otherwise gets the requested period, else its
/// spec.terminationGracePeriodSeconds, else 30 s.
fn grace_period(pod: &Value, opts: &Value, q: &Query) -> ApiResult<Option<i64>> {
    let requested = match opts.get("gracePeriodSeconds") {
        Some(Value::Null) | None => match q.get("gracePeriodSeconds") {
            None | Some("") => None,
            Some(s) => Some(s.parse::<i64>().map_err(|_| {
                ApiError::bad_request(format!("gracePeriodSeconds: invalid integer {s:?}"))
            })?),
        },
        Some(v) => Some(v.as_i64().ok_or_else(|| {
            ApiError::bad_request(format!("gracePeriodSeconds: not an integer: {v}"))
        })?),
    };
    let bound = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let ended = matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    );
    if !bound || ended {
        return Ok(None);
    }
    let grace = requested
        .or_else(|| {
            pod.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
        })
        .unwrap_or(30);
    Ok((grace > 0).then_some(grace))
}

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

pub(super) fn validate_pod_spec(spec: &PodSpec, path: &str, errs: &mut Vec<FieldError>) {
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
            kind: crate::apiserver::status::FieldErrorKind::Invalid {
                value: json!(name),
                detail: "volume not found".into(),
            },
        }
    }
}

fn pod_status(o: &Value) -> String {
    if o.pointer("/metadata/deletionTimestamp").is_some() {
        return "Terminating".into();
    }
    let mut reason = s(o, "/status/reason").to_string();
    if reason.is_empty() {
        reason = s(o, "/status/phase").to_string();
    }
    for cs in arr(o, "/status/containerStatuses") {
        let waiting = s(cs, "/state/waiting/reason");
        let terminated = s(cs, "/state/terminated/reason");
        if !waiting.is_empty() {
            reason = waiting.to_string();
        } else if !terminated.is_empty() {
            reason = terminated.to_string();
        }
    }
    reason
}

#[cfg(test)]
mod tests {
    use crate::apiserver::validate::norm;
    use serde_json::json;

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
}
