//! How Go writes the messages of the kinds other than Pod as JSON (see the
//! parent module): meta/v1, Namespace, ConfigMap, ServiceAccount, Service,
//! Deployment and the self-reviews.

use serde_json::{Map, Value};

#[cfg(test)]
use super::openapi;
use super::{ToJson, pb};

messages! {
    meta::ObjectMeta {
        omit name, omit generate_name, omit namespace, omit self_link, omit uid,
        omit resource_version, omit generation, keep creation_timestamp, keep deletion_timestamp,
        keep deletion_grace_period_seconds, keep labels, keep annotations, keep owner_references,
        keep finalizers,
    }
    meta::OwnerReference {
        keep kind, keep name, keep uid, keep api_version, keep controller,
        keep block_owner_deletion,
    }
    meta::LabelSelector { keep match_labels, keep match_expressions }
    meta::LabelSelectorRequirement { keep key, keep operator, keep values }
    core::NodeSelectorRequirement { keep key, keep operator, keep values }
    meta::FieldSelectorRequirement { keep key, keep operator, keep values }
    meta::DeleteOptions {
        keep grace_period_seconds, keep preconditions, keep orphan_dependents,
        keep propagation_policy, keep dry_run,
        keep ignore_store_read_error_with_cluster_breaking_potential,
    }
    meta::Preconditions { keep uid, keep resource_version }
    core::Namespace { keep metadata, keep spec, keep status }
    core::NamespaceSpec { keep finalizers }
    core::NamespaceStatus { omit phase }
    core::ConfigMap { keep metadata, keep data, keep binary_data, keep immutable }
    core::ServiceAccount {
        keep metadata, keep secrets, keep image_pull_secrets, keep automount_service_account_token,
    }
    core::ObjectReference {
        omit kind, omit namespace, omit name, omit uid, omit api_version, omit resource_version,
        omit field_path,
    }
    core::LocalObjectReference { omit name }
    core::Service { keep metadata, keep spec, keep status }
    core::ServiceSpec {
        keep ports, keep selector, omit cluster_ip = "clusterIP", omit r#type,
        keep external_ips = "externalIPs", omit session_affinity,
        omit load_balancer_ip = "loadBalancerIP", keep load_balancer_source_ranges,
        omit external_name, omit external_traffic_policy, omit health_check_node_port,
        omit publish_not_ready_addresses, keep session_affinity_config, keep ip_family_policy,
        keep cluster_ips = "clusterIPs", keep ip_families, keep allocate_load_balancer_node_ports,
        keep load_balancer_class, keep internal_traffic_policy, keep traffic_distribution,
    }
    core::ServicePort {
        omit name, omit protocol, keep port, omit target_port, omit node_port, keep app_protocol,
    }
    core::SessionAffinityConfig { keep client_ip = "clientIP" }
    core::ClientIpConfig as ClientIPConfig { keep timeout_seconds }
    core::ServiceStatus { keep load_balancer }
    core::LoadBalancerStatus { keep ingress }
    core::LoadBalancerIngress { omit ip, omit hostname, keep ip_mode }
    apps::Deployment { keep metadata, keep spec, keep status }
    apps::DeploymentSpec {
        keep replicas, keep selector, keep template, keep strategy, omit min_ready_seconds,
        keep revision_history_limit, omit paused, keep progress_deadline_seconds,
    }
    apps::DeploymentStrategy { omit r#type, keep rolling_update }
    apps::RollingUpdateDeployment { keep max_unavailable, keep max_surge }
    apps::DeploymentStatus {
        omit observed_generation, omit replicas, omit updated_replicas, omit available_replicas,
        omit unavailable_replicas, omit ready_replicas, keep collision_count,
        keep terminating_replicas,
    }
    authz::SelfSubjectAccessReview { keep metadata, keep spec, keep status }
    authz::SelfSubjectAccessReviewSpec { keep resource_attributes, keep non_resource_attributes }
    authz::ResourceAttributes {
        omit namespace, omit verb, omit group, omit version, omit resource, omit subresource,
        omit name, keep field_selector, keep label_selector,
    }
    authz::FieldSelectorAttributes { omit raw_selector, keep requirements }
    authz::LabelSelectorAttributes { omit raw_selector, keep requirements }
    authz::NonResourceAttributes { omit path, omit verb }
    authz::SubjectAccessReviewStatus {
        keep allowed, omit reason, omit evaluation_error, omit denied,
    }
    authz::SelfSubjectRulesReview { keep metadata, keep spec, keep status }
    authz::SelfSubjectRulesReviewSpec { omit namespace }
    // The rule lists are only ever filled in by the server.
    authz::SubjectRulesReviewStatus { keep incomplete, omit evaluation_error }
    authn::SelfSubjectReview { keep metadata, keep status }
    authn::SelfSubjectReviewStatus { keep user_info }
    // `extra` is only ever filled in by the server.
    authn::UserInfo { omit username, omit uid, keep groups }
}
