//! Discovery documents (legacy, unaggregated: clients asking for aggregated
//! discovery see `application/json` and fall back), `/version`, and a
//! minimal OpenAPI v2 document.

use serde_json::{Value, json};

use super::resources::{RESOURCES, ResourceType, groups};
use super::reviews::REVIEW_GROUPS;

pub const KUBE_MAJOR: &str = "1";
pub const KUBE_MINOR: &str = "33";

pub fn version() -> Value {
    json!({
        "major": KUBE_MAJOR,
        "minor": KUBE_MINOR,
        "gitVersion": format!("v{KUBE_MAJOR}.{KUBE_MINOR}.0+kcontrol-{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": format!("{}/{}", std::env::consts::OS, match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        }),
    })
}

/// `/api`.
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": server_address }],
    })
}

fn group_doc(name: &str, version: &str) -> Value {
    let gv = json!({ "groupVersion": format!("{name}/{version}"), "version": version });
    json!({ "name": name, "versions": [gv.clone()], "preferredVersion": gv })
}

/// `/apis`.
/// Every group: those of the resource table, then the review-only ones.
fn all_groups() -> Vec<(&'static str, &'static str)> {
    let mut gs = groups();
    gs.extend(REVIEW_GROUPS.iter().map(|(g, v, _)| (*g, *v)));
    gs
}

pub fn group_list() -> Value {
    let groups: Vec<Value> = all_groups()
        .into_iter()
        .map(|(g, v)| group_doc(g, v))
        .collect();
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
}

/// `/apis/{group}`.
pub fn group(name: &str) -> Option<Value> {
    all_groups()
        .into_iter()
        .find(|(g, _)| *g == name)
        .map(|(g, v)| {
            let mut d = group_doc(g, v);
            d["kind"] = json!("APIGroup");
            d["apiVersion"] = json!("v1");
            d
        })
}

const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn entries(r: &ResourceType) -> Vec<Value> {
    let mut main = json!({
        "name": r.plural,
        "singularName": r.singular,
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": ALL_VERBS,
    });
    if !r.short_names.is_empty() {
        main["shortNames"] = json!(r.short_names);
    }
    if !r.categories.is_empty() {
        main["categories"] = json!(r.categories);
    }
    let mut out = vec![main];
    for sub in r.subresources {
        let mut e = json!({
            "name": format!("{}/{sub}", r.plural),
            "singularName": "",
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": ["get", "patch", "update"],
        });
        match *sub {
            "binding" => {
                e["kind"] = json!("Binding");
                e["verbs"] = json!(["create"]);
            }
            "scale" => {
                e["group"] = json!("autoscaling");
                e["version"] = json!("v1");
                e["kind"] = json!("Scale");
            }
            _ => {}
        }
        out.push(e);
    }
    out
}

/// `/api/v1` or `/apis/{group}/{version}`.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let rs: Vec<&ResourceType> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if rs.is_empty() {
        return super::reviews::resource_list(group, version);
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let resources: Vec<Value> = rs.into_iter().flat_map(entries).collect();
    Some(
        json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources }),
    )
}

/// An OpenAPI v2 document with no paths or definitions, as protobuf (what
/// kubectl asks for). kubectl's client-side validation then finds no schema
/// for the kind and accepts the object (the server validates), and `apply`
/// falls back to its built-in strategic-merge metadata.
pub fn openapi_v2_protobuf() -> Vec<u8> {
    fn field(tag: u8, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![tag, bytes.len() as u8];
        v.extend_from_slice(bytes);
        v
    }
    // Document { swagger = 1; info = 2 { title = 1; version = 2 }; paths = 8; definitions = 9 }
    let mut info = field(0x0a, b"kcontrol");
    info.extend(field(
        0x12,
        format!("v{KUBE_MAJOR}.{KUBE_MINOR}.0").as_bytes(),
    ));
    let mut doc = field(0x0a, b"2.0");
    doc.extend(field(0x12, &info));
    doc.extend(field(0x42, &[]));
    doc.extend(field(0x4a, &[]));
    doc
}

pub fn openapi_v2_json() -> Value {
    json!({
        "swagger": "2.0",
        "info": { "title": "kcontrol", "version": format!("v{KUBE_MAJOR}.{KUBE_MINOR}.0") },
        "paths": {},
        "definitions": {},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents() {
        let core = resource_list("", "v1").unwrap();
        let names: Vec<&str> = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert!(
            names.contains(&"pods")
                && names.contains(&"pods/binding")
                && names.contains(&"namespaces")
        );
        assert!(resource_list("apps", "v2").is_none());
        let apps = resource_list("apps", "v1").unwrap();
        assert_eq!(apps["groupVersion"], "apps/v1");
        assert_eq!(group_list()["groups"][0]["name"], "apps");
        assert!(resource_list("authorization.k8s.io", "v1").is_some());
        assert!(group("nope").is_none());
        let pb = openapi_v2_protobuf();
        assert_eq!(&pb[..5], &[0x0a, 3, b'2', b'.', b'0']);
    }
}
