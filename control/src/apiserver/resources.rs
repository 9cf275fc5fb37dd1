//! The table of served resources. Everything generic (routing, discovery,
//! storage keys, list/watch, field selectors, the verbs) is driven by this
//! table; the per-kind rules are each kind's [`Strategy`] (`registry/`),
//! its table columns included (printed by `table.rs`).

use super::registry::{self, Strategy};

/// One served resource type.
#[derive(Debug)]
pub struct ResourceType {
    /// API group, "" for the legacy core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Subresources: `status`, `binding`, `scale`.
    pub subresources: &'static [&'static str],
    /// Field selector labels beyond `metadata.name`/`metadata.namespace`
    /// (the real apiserver rejects the others with 400).
    pub field_labels: &'static [&'static str],
    /// Delete answers with the deleted object (pods, services) rather than a
    /// success Status, as the real registry does.
    pub delete_returns_object: bool,
    pub strategy: &'static dyn Strategy,
}

impl ResourceType {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn has_subresource(&self, sub: &str) -> bool {
        self.subresources.contains(&sub)
    }

    fn group_segment(&self) -> &'static str {
        if self.group.is_empty() {
            "core"
        } else {
            self.group
        }
    }

    /// Prefix of every key of this resource, or of one namespace's keys.
    /// Always ends in `/`, so namespace `a` never matches `ab`.
    pub fn prefix(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) if self.namespaced => {
                format!("/registry/{}/{}/{ns}/", self.group_segment(), self.plural)
            }
            _ => format!("/registry/{}/{}/", self.group_segment(), self.plural),
        }
    }

    /// `/registry/<group>/<plural>/<ns>/<name>` (no namespace segment for
    /// cluster-scoped kinds).
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.prefix(namespace))
    }

    pub fn supports_field_label(&self, label: &str) -> bool {
        label == "metadata.name"
            || label == "metadata.namespace"
            || self.field_labels.contains(&label)
    }
}

/// Every served kind, in discovery order: one line per file of `registry/`.
pub static RESOURCES: &[ResourceType] = &[
    registry::namespace::RESOURCE,
    registry::pod::RESOURCE,
    registry::service::RESOURCE,
    registry::endpoints::RESOURCE,
    registry::node::RESOURCE,
    registry::event::RESOURCE,
    registry::configmap::RESOURCE,
    registry::serviceaccount::RESOURCE,
    registry::deployment::RESOURCE,
    registry::replicaset::RESOURCE,
    registry::endpointslice::RESOURCE,
    registry::lease::RESOURCE,
];

pub fn lookup(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Groups other than core, in discovery order, with their one version.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES {
        if !r.group.is_empty() && !out.iter().any(|(g, _)| *g == r.group) {
            out.push((r.group, r.version));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_prefixes() {
        let pods = lookup("", "v1", "pods").unwrap();
        assert_eq!(
            pods.key(Some("default"), "a"),
            "/registry/core/pods/default/a"
        );
        assert_eq!(pods.prefix(None), "/registry/core/pods/");
        let nodes = lookup("", "v1", "nodes").unwrap();
        assert_eq!(nodes.key(Some("ignored"), "n1"), "/registry/core/nodes/n1");
        let deps = lookup("apps", "v1", "deployments").unwrap();
        assert_eq!(deps.prefix(Some("ns")), "/registry/apps/deployments/ns/");
        assert_eq!(deps.api_version(), "apps/v1");
        assert!(lookup("apps", "v1", "pods").is_none());
    }
}
