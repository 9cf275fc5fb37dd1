//! Server-side printing: `meta.k8s.io/v1` Tables, which `kubectl get` asks
//! for (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`). Columns
//! follow the upstream printers (`pkg/printers/internalversion`) for the
//! kinds served; priority-1 columns are the ones `-o wide` adds.

use serde_json::{Value, json};

use super::resources::ResourceType;

/// What each row carries besides its cells (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

fn col(name: &str, ty: &str, priority: i32, description: &str) -> Value {
    let mut c = json!({ "name": name, "type": ty, "format": "", "description": description, "priority": priority });
    if name == "Name" {
        c["format"] = json!("name");
    }
    c
}

fn columns(kind: &str) -> Vec<Value> {
    let name = col(
        "Name",
        "string",
        0,
        "Name must be unique within a namespace.",
    );
    let age = col(
        "Age",
        "string",
        0,
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
    );
    match kind {
        "Pod" => vec![
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
        ],
        "Service" => vec![
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
        ],
        "Deployment" => vec![
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
        ],
        "ReplicaSet" => vec![
            name,
            col(
                "Desired",
                "integer",
                0,
                "Replicas is the number of desired replicas.",
            ),
            col(
                "Current",
                "integer",
                0,
                "Replicas is the most recently observed number of replicas.",
            ),
            col(
                "Ready",
                "integer",
                0,
                "The number of ready replicas for this replica set.",
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
            col(
                "Selector",
                "string",
                1,
                "Selector is a label query over pods that should match the replica count.",
            ),
        ],
        "Node" => vec![
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
        ],
        "Namespace" => vec![
            name,
            col("Status", "string", 0, "The status of the namespace"),
            age,
        ],
        "Endpoints" => vec![
            name,
            col(
                "Endpoints",
                "string",
                0,
                "Endpoints is the list of endpoints in the object.",
            ),
            age,
        ],
        "EndpointSlice" => vec![
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
        ],
        "Event" => vec![
            col(
                "Last Seen",
                "string",
                0,
                "The time at which the most recent occurrence of this event was recorded.",
            ),
            col(
                "Type",
                "string",
                0,
                "Type of this event (Normal, Warning), new types could be added in the future.",
            ),
            col(
                "Reason",
                "string",
                0,
                "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.",
            ),
            col(
                "Object",
                "string",
                0,
                "The object that this event is about.",
            ),
            col(
                "Message",
                "string",
                0,
                "A human-readable description of the status of this operation.",
            ),
        ],
        "ConfigMap" => vec![
            name,
            col("Data", "string", 0, "Data contains the configuration data."),
            age,
        ],
        "ServiceAccount" => vec![
            name,
            col(
                "Secrets",
                "string",
                0,
                "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use.",
            ),
            age,
        ],
        "Lease" => vec![
            name,
            col(
                "Holder",
                "string",
                0,
                "holderIdentity contains the identity of the holder of a current lease.",
            ),
            age,
        ],
        _ => vec![name, age],
    }
}

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or_default()
}

fn i(v: &Value, ptr: &str) -> i64 {
    v.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

fn arr<'a>(v: &'a Value, ptr: &str) -> &'a [Value] {
    v.pointer(ptr)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn or_none(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

/// Like `k8s.io/apimachinery/pkg/util/duration.HumanDuration`.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let secs = secs.max(0);
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    let y = d / 365;
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        if secs % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", secs % 60)
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 192 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if y < 2 {
        format!("{d}d")
    } else if y < 8 {
        if d % 365 == 0 {
            format!("{y}y")
        } else {
            format!("{y}y{}d", d % 365)
        }
    } else {
        format!("{y}y")
    }
}

fn age(ts: &str, now: jiff::Timestamp) -> String {
    match ts.parse::<jiff::Timestamp>() {
        Ok(t) => human_duration(now.as_second() - t.as_second()),
        Err(_) => "<unknown>".into(),
    }
}

fn selector_string(map: Option<&serde_json::Map<String, Value>>) -> String {
    map.map(|m| {
        m.iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(",")
    })
    .unwrap_or_default()
}

fn label_selector_string(sel: &Value) -> String {
    let mut parts: Vec<String> = sel
        .get("matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    for e in sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = s(e, "/key");
        let vals: Vec<&str> = arr(e, "/values").iter().filter_map(Value::as_str).collect();
        parts.push(match s(e, "/operator") {
            "In" => format!("{key} in ({})", vals.join(",")),
            "NotIn" => format!("{key} notin ({})", vals.join(",")),
            "Exists" => key.to_string(),
            _ => format!("!{key}"),
        });
    }
    parts.join(",")
}

/// At most three entries, then `+ N more...`, like kubectl.
fn first_three(items: Vec<String>) -> String {
    if items.len() > 3 {
        format!("{} + {} more...", items[..3].join(","), items.len() - 3)
    } else {
        items.join(",")
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

fn cells(kind: &str, o: &Value, now: jiff::Timestamp) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    let a = json!(age(s(o, "/metadata/creationTimestamp"), now));
    match kind {
        "Pod" => {
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
        "Service" => {
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
        "Deployment" | "ReplicaSet" => {
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
            let mut row = if kind == "Deployment" {
                vec![
                    name,
                    json!(format!("{}/{desired}", i(o, "/status/readyReplicas"))),
                    json!(i(o, "/status/updatedReplicas")),
                    json!(i(o, "/status/availableReplicas")),
                    a,
                ]
            } else {
                vec![
                    name,
                    json!(desired),
                    json!(i(o, "/status/replicas")),
                    json!(i(o, "/status/readyReplicas")),
                    a,
                ]
            };
            row.extend([json!(names.join(",")), json!(images.join(",")), selector]);
            row
        }
        "Node" => {
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
        "Namespace" => vec![name, json!(s(o, "/status/phase")), a],
        "Endpoints" => {
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
        "EndpointSlice" => {
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
        "Event" => {
            let last = [
                s(o, "/lastTimestamp"),
                s(o, "/eventTime"),
                s(o, "/metadata/creationTimestamp"),
            ]
            .into_iter()
            .find(|t| !t.is_empty())
            .unwrap_or_default();
            let kind = s(o, "/involvedObject/kind").to_lowercase();
            vec![
                json!(age(last, now)),
                json!(s(o, "/type")),
                json!(s(o, "/reason")),
                json!(format!("{kind}/{}", s(o, "/involvedObject/name"))),
                json!(s(o, "/message")),
            ]
        }
        "ConfigMap" => {
            let n = o
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len())
                + o.get("binaryData")
                    .and_then(Value::as_object)
                    .map_or(0, |m| m.len());
            vec![name, json!(n.to_string()), a]
        }
        "ServiceAccount" => vec![name, json!(arr(o, "/secrets").len().to_string()), a],
        "Lease" => vec![name, json!(s(o, "/spec/holderIdentity")), a],
        _ => vec![name, a],
    }
}

/// `PartialObjectMetadata` of an object (the default row object).
pub fn partial_metadata(o: &Value, api_version: &str) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": api_version,
        "metadata": o.get("metadata").cloned().unwrap_or(json!({})),
    })
}

/// A Table of `objects`; `list_meta` is the list's metadata
/// (resourceVersion, continue). `meta_version` is `v1` or `v1beta1`.
pub fn table(
    rt: &ResourceType,
    objects: &[Value],
    list_meta: Value,
    include: IncludeObject,
    meta_version: &str,
) -> Value {
    let now = jiff::Timestamp::now();
    let api_version = format!("meta.k8s.io/{meta_version}");
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut row = json!({ "cells": cells(rt.kind, o, now) });
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => row["object"] = partial_metadata(o, &api_version),
                IncludeObject::Object => row["object"] = o.clone(),
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": api_version,
        "metadata": list_meta,
        "columnDefinitions": columns(rt.kind),
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::super::resources::lookup;
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(125), "2m5s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(10 * 3600), "10h");
        assert_eq!(human_duration(3 * 86400), "3d");
        assert_eq!(human_duration(30 * 86400), "30d");
    }

    #[test]
    fn service_row() {
        let svc = json!({"metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.5", "selector": {"app": "web"},
                     "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080}]}});
        let t = table(
            lookup("", "v1", "services").unwrap(),
            &[svc],
            json!({}),
            IncludeObject::Metadata,
            "v1",
        );
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[1], "NodePort");
        assert_eq!(cells[2], "10.96.0.5");
        assert_eq!(cells[3], "<none>");
        assert_eq!(cells[4], "80:30080/TCP");
        assert_eq!(cells[6], "app=web");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(t["columnDefinitions"].as_array().unwrap().len(), 7);
    }
}
