//! Nodes: registered and heartbeated by kubelets.

use k8s_openapi::api::core::v1::Node;
use serde_json::{Value, json};

use super::Strategy;
use crate::apiserver::resources::ResourceType;
use crate::apiserver::status::{ApiResult, FieldError};
use crate::apiserver::table::{self, *};
use crate::apiserver::validate::*;

pub const RESOURCE: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "nodes",
    singular: "node",
    kind: "Node",
    namespaced: false,
    short_names: &["no"],
    categories: &[],
    subresources: &["status"],
    field_labels: &["spec.unschedulable"],
    delete_returns_object: false,
    strategy: &NodeStrategy,
};

pub struct NodeStrategy;

impl Strategy for NodeStrategy {
    fn normalize(
        &self,
        rt: &ResourceType,
        input: &Value,
        old: Option<&Value>,
    ) -> ApiResult<(Value, Vec<FieldError>)> {
        typed::<Node>(rt, input, old, |_| {}, validate_node)
    }

    fn columns(&self) -> Vec<Value> {
        let name = table::name_column();
        let age = table::age_column();
        vec![
            name,
            col("Status", "string", 0, "The status of the node"),
            col("Roles", "string", 0, "The roles of the node"),
            age,
            col(
                "Version",
                "string",
                0,
                "Kubelet Version reported by the node.",
            ),
            col(
                "Internal-IP",
                "string",
                1,
                "List of addresses reachable to the node.",
            ),
            col(
                "External-IP",
                "string",
                1,
                "List of addresses reachable to the node.",
            ),
            col(
                "OS-Image",
                "string",
                1,
                "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy)).",
            ),
            col(
                "Kernel-Version",
                "string",
                1,
                "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64).",
            ),
            col(
                "Container-Runtime",
                "string",
                1,
                "ContainerRuntime Version reported by the node through runtime remote API (e.g. containerd://1.4.2).",
            ),
        ]
    }

    fn cells(&self, o: &Value, now: jiff::Timestamp) -> Vec<Value> {
        let name = table::name_cell(o);
        let a = table::age_cell(o, now);
        let ready = arr(o, "/status/conditions")
            .iter()
            .find(|c| s(c, "/type") == "Ready")
            // As upstream's printer: any status but True (False or
            // Unknown) prints NotReady; only a missing condition Unknown.
            .map(|c| match s(c, "/status") {
                "True" => "Ready",
                _ => "NotReady",
            })
            .unwrap_or("Unknown");
        let mut status = ready.to_string();
        if o.pointer("/spec/unschedulable") == Some(&json!(true)) {
            status.push_str(",SchedulingDisabled");
        }
        let roles: Vec<String> = o
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/").map(String::from))
            .collect();
        let addr = |t: &str| {
            arr(o, "/status/addresses")
                .iter()
                .filter(|a| s(a, "/type") == t)
                .map(|a| s(a, "/address").to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let runtime = s(o, "/status/nodeInfo/containerRuntimeVersion");
        vec![
            name,
            json!(status),
            json!(or_none(roles.join(","))),
            a,
            json!(s(o, "/status/nodeInfo/kubeletVersion")),
            json!(or_none(addr("InternalIP"))),
            json!(or_none(addr("ExternalIP"))),
            json!(if s(o, "/status/nodeInfo/osImage").is_empty() {
                "<unknown>"
            } else {
                s(o, "/status/nodeInfo/osImage")
            }),
            json!(if s(o, "/status/nodeInfo/kernelVersion").is_empty() {
                "<unknown>"
            } else {
                s(o, "/status/nodeInfo/kernelVersion")
            }),
            json!(if runtime.is_empty() {
                "<unknown>"
            } else {
                runtime
            }),
        ]
    }
}

fn validate_node(node: &Node, _old: Option<&Node>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(spec) = &node.spec {
        for (i, cidr) in spec.pod_cidrs.iter().flatten().enumerate() {
            if crate::apiserver::allocate::parse_cidr(cidr).is_none() {
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
