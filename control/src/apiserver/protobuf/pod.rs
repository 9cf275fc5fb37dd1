//! How Go writes a Pod (also a Deployment's template) as JSON (see the
//! parent module).

use serde_json::{Map, Value};

#[cfg(test)]
use super::openapi;
use super::{ToJson, pb};

messages! {
    core::PodTemplateSpec { keep metadata, keep spec }
    core::Pod { keep metadata, keep spec, keep status }
    core::PodStatus { omit phase, omit message, omit reason }
    core::PodSpec {
        keep volumes, keep containers, omit restart_policy, keep termination_grace_period_seconds,
        keep active_deadline_seconds, omit dns_policy, keep node_selector,
        omit service_account_name, omit service_account, omit node_name, omit host_network,
        omit host_pid = "hostPID", omit host_ipc = "hostIPC", keep security_context,
        keep image_pull_secrets, omit hostname, omit subdomain, keep affinity, omit scheduler_name,
        keep init_containers, keep automount_service_account_token, keep tolerations,
        keep host_aliases, omit priority_class_name, keep priority, keep dns_config,
        keep share_process_namespace, keep readiness_gates, keep runtime_class_name,
        keep enable_service_links, keep preemption_policy, keep overhead,
        keep topology_spread_constraints, keep ephemeral_containers,
        keep set_hostname_as_fqdn = "setHostnameAsFQDN", keep os, keep host_users,
        keep scheduling_gates, keep resources,
    }
    core::PodReadinessGate { keep condition_type }
    core::PodOs as PodOS { keep name }
    core::PodSchedulingGate { keep name }
    core::Container {
        keep name, omit image, keep command, keep args, omit working_dir, keep ports, keep env,
        keep resources, keep volume_mounts, keep liveness_probe, keep readiness_probe,
        keep lifecycle, omit termination_message_path, omit image_pull_policy,
        keep security_context, omit stdin, omit stdin_once, omit tty, keep env_from,
        omit termination_message_policy, keep volume_devices, keep startup_probe,
        keep resize_policy, keep restart_policy,
    }
    // Container's fields.
    core::EphemeralContainerCommon [inline] {
        keep name, omit image, keep command, keep args, omit working_dir, keep ports, keep env,
        keep resources, keep volume_mounts, keep liveness_probe, keep readiness_probe,
        keep lifecycle, omit termination_message_path, omit image_pull_policy,
        keep security_context, omit stdin, omit stdin_once, omit tty, keep env_from,
        omit termination_message_policy, keep volume_devices, keep startup_probe,
        keep resize_policy, keep restart_policy,
    }
    core::EphemeralContainer { inline ephemeral_container_common, omit target_container_name }
    core::ContainerPort {
        omit name, omit host_port, keep container_port, omit protocol, omit host_ip = "hostIP",
    }
    core::EnvVar { keep name, omit value, keep value_from }
    core::EnvVarSource {
        keep field_ref, keep resource_field_ref, keep config_map_key_ref, keep secret_key_ref,
    }
    core::ObjectFieldSelector { omit api_version, keep field_path }
    core::ResourceFieldSelector { omit container_name, keep resource, keep divisor }
    core::ConfigMapKeySelector { inline local_object_reference, keep key, keep optional }
    core::SecretKeySelector { inline local_object_reference, keep key, keep optional }
    core::EnvFromSource { omit prefix, keep config_map_ref, keep secret_ref }
    core::ConfigMapEnvSource { inline local_object_reference, keep optional }
    core::SecretEnvSource { inline local_object_reference, keep optional }
    core::ResourceRequirements { keep limits, keep requests, keep claims }
    core::ResourceClaim { keep name, omit request }
    core::VolumeMount {
        keep name, omit read_only, keep mount_path, omit sub_path, keep mount_propagation,
        omit sub_path_expr, keep recursive_read_only,
    }
    core::VolumeDevice { keep name, keep device_path }
    core::ContainerResizePolicy { keep resource_name, keep restart_policy }
    core::Probe {
        inline handler, omit initial_delay_seconds, omit timeout_seconds, omit period_seconds,
        omit success_threshold, omit failure_threshold, keep termination_grace_period_seconds,
    }
    // Probe's handler fields.
    core::ProbeHandler [inline] { keep exec, keep http_get, keep tcp_socket, keep grpc }
    core::Lifecycle { keep post_start, keep pre_stop, keep stop_signal }
    core::LifecycleHandler { keep exec, keep http_get, keep tcp_socket, keep sleep }
    core::ExecAction { keep command }
    core::HttpGetAction as HTTPGetAction {
        omit path, keep port, omit host, omit scheme, keep http_headers,
    }
    core::HttpHeader as HTTPHeader { keep name, keep value }
    core::TcpSocketAction as TCPSocketAction { keep port, omit host }
    core::GrpcAction as GRPCAction { keep port, keep service }
    core::SleepAction { keep seconds }
    core::SecurityContext {
        keep capabilities, keep privileged, keep se_linux_options, keep run_as_user,
        keep run_as_non_root, keep read_only_root_filesystem, keep allow_privilege_escalation,
        keep run_as_group, keep proc_mount, keep windows_options, keep seccomp_profile,
        keep app_armor_profile,
    }
    core::PodSecurityContext {
        keep se_linux_options, keep run_as_user, keep run_as_non_root, keep supplemental_groups,
        keep fs_group, keep run_as_group, keep sysctls, keep windows_options,
        keep fs_group_change_policy, keep seccomp_profile, keep app_armor_profile,
        keep supplemental_groups_policy, keep se_linux_change_policy,
    }
    core::Capabilities { keep add, keep drop }
    core::SeLinuxOptions as SELinuxOptions { omit user, omit role, omit r#type, omit level }
    core::WindowsSecurityContextOptions {
        keep gmsa_credential_spec_name, keep gmsa_credential_spec, keep run_as_user_name,
        keep host_process,
    }
    core::SeccompProfile { keep r#type, keep localhost_profile }
    core::AppArmorProfile { keep r#type, keep localhost_profile }
    core::Sysctl { keep name, keep value }
    core::Toleration { omit key, omit operator, omit value, omit effect, keep toleration_seconds }
    core::HostAlias { keep ip, keep hostnames }
    core::PodDnsConfig as PodDNSConfig { keep nameservers, keep searches, keep options }
    core::PodDnsConfigOption as PodDNSConfigOption { omit name, keep value }
    core::Affinity { keep node_affinity, keep pod_affinity, keep pod_anti_affinity }
    core::NodeAffinity {
        keep required_during_scheduling_ignored_during_execution,
        keep preferred_during_scheduling_ignored_during_execution,
    }
    core::NodeSelector { keep node_selector_terms }
    core::NodeSelectorTerm { keep match_expressions, keep match_fields }
    core::PreferredSchedulingTerm { keep weight, keep preference }
    core::PodAffinity {
        keep required_during_scheduling_ignored_during_execution,
        keep preferred_during_scheduling_ignored_during_execution,
    }
    core::PodAntiAffinity {
        keep required_during_scheduling_ignored_during_execution,
        keep preferred_during_scheduling_ignored_during_execution,
    }
    core::WeightedPodAffinityTerm { keep weight, keep pod_affinity_term }
    core::PodAffinityTerm {
        keep label_selector, keep namespaces, keep topology_key, keep namespace_selector,
        keep match_label_keys, keep mismatch_label_keys,
    }
    core::TopologySpreadConstraint {
        keep max_skew, keep topology_key, keep when_unsatisfiable, keep label_selector,
        keep min_domains, keep node_affinity_policy, keep node_taints_policy, keep match_label_keys,
    }
    core::Volume { keep name, inline volume_source }
    // The common volume types; the others are not converted.
    core::VolumeSource [inline] {
        keep host_path, keep empty_dir, keep secret, keep nfs, keep persistent_volume_claim,
        keep downward_api = "downwardAPI", keep config_map, keep projected, keep csi, keep image,
    }
    core::HostPathVolumeSource { keep path, keep r#type }
    core::EmptyDirVolumeSource { omit medium, keep size_limit }
    core::SecretVolumeSource { omit secret_name, keep items, keep default_mode, keep optional }
    core::NfsVolumeSource as NFSVolumeSource { keep server, keep path, omit read_only }
    core::PersistentVolumeClaimVolumeSource { keep claim_name, omit read_only }
    core::DownwardAPIVolumeSource { keep items, keep default_mode }
    core::DownwardAPIVolumeFile { keep path, keep field_ref, keep resource_field_ref, keep mode }
    core::ConfigMapVolumeSource {
        inline local_object_reference, keep items, keep default_mode, keep optional,
    }
    core::KeyToPath { keep key, keep path, keep mode }
    core::ProjectedVolumeSource { keep sources, keep default_mode }
    core::VolumeProjection {
        keep secret, keep downward_api = "downwardAPI", keep config_map, keep service_account_token,
    }
    core::SecretProjection { inline local_object_reference, keep items, keep optional }
    core::ConfigMapProjection { inline local_object_reference, keep items, keep optional }
    core::DownwardAPIProjection { keep items }
    core::ServiceAccountTokenProjection { omit audience, keep expiration_seconds, keep path }
    core::CSIVolumeSource {
        keep driver, keep read_only, keep fs_type, keep volume_attributes,
        keep node_publish_secret_ref,
    }
    core::ImageVolumeSource { omit reference, omit pull_policy }
}
