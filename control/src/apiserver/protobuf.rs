//! Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`).
//!
//! kubectl 1.32+ sends the objects of its typed commands as protobuf and
//! does not fall back to JSON when refused, so the server decodes them into
//! the same JSON the rest of it handles. Responses stay JSON: every client
//! that sends protobuf also accepts JSON.
//!
//! Which bodies arrive as protobuf (checked with kubectl 1.32 and 1.33):
//! `create namespace|configmap|deployment|service <type>|serviceaccount`,
//! `auth can-i` (SelfSubjectAccessReview, and SelfSubjectRulesReview for
//! `--list`), `auth whoami` (SelfSubjectReview), `debug node/…` and
//! `debug --copy-to` (Pod), and `drain`'s pod deletions (DeleteOptions).
//! `run`, `expose`, `create -f`, `replace`, `delete`, `scale` and the patch
//! commands send JSON.
//!
//! Wire form: `k8s\0` + `runtime.Unknown{typeMeta{apiVersion, kind}, raw}`,
//! `raw` being the object's message. The schema is our own table below
//! ([`MESSAGES`]): for each message the field numbers the decoder knows,
//! each with its JSON name, its type and how a zero is read. It covers the
//! kinds above (for Pods the fields `debug` sets and those a copied pod
//! commonly has); a field number it does not know is skipped, with a line
//! on stderr when `KCONTROL_DEBUG` is set.
//!
//! Zeros: the Go types behind the messages are written by gogo-protobuf,
//! which always writes value fields and writes pointer fields only when set.
//! A value field that Go's JSON encoding leaves out when zero (`omitempty`)
//! is therefore dropped when zero ([`omitempty`] in the table); any other
//! scalar (a pointer, or a value without `omitempty`) is kept as sent
//! ([`field`]). Embedded Go structs (`json:",inline"`) are their own
//! message on the wire and have their fields merged into the parent
//! ([`inline`]). A zero Time is unset. The result is the JSON kubectl 1.30
//! sends for the same command (`creationTimestamp: null` aside).

use std::collections::HashMap;
use std::sync::LazyLock;

use base64::Engine;
use serde_json::{Map, Value, json};

/// The type of a field's values.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ty {
    Str,
    Bool,
    I32,
    I64,
    /// Base64 in JSON.
    Bytes,
    /// `{seconds = 1, nanos = 2}`, RFC 3339 in JSON; the zero time is unset.
    Time,
    /// `{string = 1}`, the string in JSON.
    Quantity,
    /// `{type = 1, intVal = 2, strVal = 3}`, a number or a string in JSON.
    IntOrString,
    /// A message of this table.
    Msg(&'static str),
}

/// How a field is laid out.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Shape {
    /// One value; `omit`: a zero value means unset.
    One { omit: bool },
    /// Repeated (a JSON array).
    List,
    /// `map<string, Ty>` (entries: key = 1, value = 2).
    Map,
    /// An embedded message whose fields join the parent's object.
    Inline,
}

#[derive(Debug)]
struct Field {
    num: u64,
    name: &'static str,
    ty: Ty,
    shape: Shape,
}

/// A pointer field, or a value field Go's JSON always writes: kept as sent.
const fn field(num: u64, name: &'static str, ty: Ty) -> Field {
    Field {
        num,
        name,
        ty,
        shape: Shape::One { omit: false },
    }
}

/// A value field with `omitempty`: its zero means unset.
const fn omitempty(num: u64, name: &'static str, ty: Ty) -> Field {
    Field {
        num,
        name,
        ty,
        shape: Shape::One { omit: true },
    }
}

const fn list(num: u64, name: &'static str, ty: Ty) -> Field {
    Field {
        num,
        name,
        ty,
        shape: Shape::List,
    }
}

const fn map(num: u64, name: &'static str, ty: Ty) -> Field {
    Field {
        num,
        name,
        ty,
        shape: Shape::Map,
    }
}

const fn inline(num: u64, message: &'static str) -> Field {
    Field {
        num,
        name: message,
        ty: Ty::Msg(message),
        shape: Shape::Inline,
    }
}

use Ty::{Bool, Bytes, I32, I64, IntOrString, Msg, Quantity, Str, Time};

/// The messages the decoder knows, by their (unqualified) proto name; where
/// upstream has several messages of one layout, one entry (commented) serves
/// them all. Only `Msg` names of this table and the kinds of [`KINDS`] are
/// looked up.
#[rustfmt::skip]
static MESSAGES: &[(&str, &[Field])] = &[
    // meta/v1
    ("ObjectMeta", &[
        omitempty(1, "name", Str),
        omitempty(2, "generateName", Str),
        omitempty(3, "namespace", Str),
        omitempty(4, "selfLink", Str),
        omitempty(5, "uid", Str),
        omitempty(6, "resourceVersion", Str),
        omitempty(7, "generation", I64),
        field(8, "creationTimestamp", Time),
        field(9, "deletionTimestamp", Time),
        field(10, "deletionGracePeriodSeconds", I64),
        map(11, "labels", Str),
        map(12, "annotations", Str),
        list(13, "ownerReferences", Msg("OwnerReference")),
        list(14, "finalizers", Str),
    ]),
    ("OwnerReference", &[
        field(1, "kind", Str),
        field(3, "name", Str),
        field(4, "uid", Str),
        field(5, "apiVersion", Str),
        field(6, "controller", Bool),
        field(7, "blockOwnerDeletion", Bool),
    ]),
    ("LabelSelector", &[
        map(1, "matchLabels", Str),
        list(2, "matchExpressions", Msg("LabelSelectorRequirement")),
    ]),
    // Also NodeSelectorRequirement and FieldSelectorRequirement.
    ("LabelSelectorRequirement", &[
        field(1, "key", Str),
        field(2, "operator", Str),
        list(3, "values", Str),
    ]),
    ("DeleteOptions", &[
        field(1, "gracePeriodSeconds", I64),
        field(2, "preconditions", Msg("Preconditions")),
        field(3, "orphanDependents", Bool),
        field(4, "propagationPolicy", Str),
        list(5, "dryRun", Str),
        field(6, "ignoreStoreReadErrorWithClusterBreakingPotential", Bool),
    ]),
    ("Preconditions", &[field(1, "uid", Str), field(2, "resourceVersion", Str)]),
    // core/v1: Namespace, ConfigMap, ServiceAccount, Service
    ("Namespace", &[
        field(1, "metadata", Msg("ObjectMeta")),
        field(2, "spec", Msg("NamespaceSpec")),
        field(3, "status", Msg("NamespaceStatus")),
    ]),
    ("NamespaceSpec", &[list(1, "finalizers", Str)]),
    ("NamespaceStatus", &[omitempty(1, "phase", Str)]),
    ("ConfigMap", &[
        field(1, "metadata", Msg("ObjectMeta")),
        map(2, "data", Str),
        map(3, "binaryData", Bytes),
        field(4, "immutable", Bool),
    ]),
    ("ServiceAccount", &[
        field(1, "metadata", Msg("ObjectMeta")),
        list(2, "secrets", Msg("ObjectReference")),
        list(3, "imagePullSecrets", Msg("LocalObjectReference")),
        field(4, "automountServiceAccountToken", Bool),
    ]),
    ("ObjectReference", &[
        omitempty(1, "kind", Str),
        omitempty(2, "namespace", Str),
        omitempty(3, "name", Str),
        omitempty(4, "uid", Str),
        omitempty(5, "apiVersion", Str),
        omitempty(6, "resourceVersion", Str),
        omitempty(7, "fieldPath", Str),
    ]),
    ("LocalObjectReference", &[omitempty(1, "name", Str)]),
    ("Service", &[
        field(1, "metadata", Msg("ObjectMeta")),
        field(2, "spec", Msg("ServiceSpec")),
        field(3, "status", Msg("ServiceStatus")),
    ]),
    ("ServiceSpec", &[
        list(1, "ports", Msg("ServicePort")),
        map(2, "selector", Str),
        omitempty(3, "clusterIP", Str),
        omitempty(4, "type", Str),
        list(5, "externalIPs", Str),
        omitempty(7, "sessionAffinity", Str),
        omitempty(8, "loadBalancerIP", Str),
        list(9, "loadBalancerSourceRanges", Str),
        omitempty(10, "externalName", Str),
        omitempty(11, "externalTrafficPolicy", Str),
        omitempty(12, "healthCheckNodePort", I32),
        omitempty(13, "publishNotReadyAddresses", Bool),
        field(14, "sessionAffinityConfig", Msg("SessionAffinityConfig")),
        field(17, "ipFamilyPolicy", Str),
        list(18, "clusterIPs", Str),
        list(19, "ipFamilies", Str),
        field(20, "allocateLoadBalancerNodePorts", Bool),
        field(21, "loadBalancerClass", Str),
        field(22, "internalTrafficPolicy", Str),
        field(23, "trafficDistribution", Str),
    ]),
    ("ServicePort", &[
        omitempty(1, "name", Str),
        omitempty(2, "protocol", Str),
        field(3, "port", I32),
        omitempty(4, "targetPort", IntOrString),
        omitempty(5, "nodePort", I32),
        field(6, "appProtocol", Str),
    ]),
    ("SessionAffinityConfig", &[field(1, "clientIP", Msg("ClientIPConfig"))]),
    ("ClientIPConfig", &[field(1, "timeoutSeconds", I32)]),
    ("ServiceStatus", &[field(1, "loadBalancer", Msg("LoadBalancerStatus"))]),
    ("LoadBalancerStatus", &[list(1, "ingress", Msg("LoadBalancerIngress"))]),
    ("LoadBalancerIngress", &[
        omitempty(1, "ip", Str),
        omitempty(2, "hostname", Str),
        field(3, "ipMode", Str),
    ]),
    // apps/v1
    ("Deployment", &[
        field(1, "metadata", Msg("ObjectMeta")),
        field(2, "spec", Msg("DeploymentSpec")),
        field(3, "status", Msg("DeploymentStatus")),
    ]),
    ("DeploymentSpec", &[
        field(1, "replicas", I32),
        field(2, "selector", Msg("LabelSelector")),
        field(3, "template", Msg("PodTemplateSpec")),
        field(4, "strategy", Msg("DeploymentStrategy")),
        omitempty(5, "minReadySeconds", I32),
        field(6, "revisionHistoryLimit", I32),
        omitempty(7, "paused", Bool),
        field(9, "progressDeadlineSeconds", I32),
    ]),
    ("DeploymentStrategy", &[
        omitempty(1, "type", Str),
        field(2, "rollingUpdate", Msg("RollingUpdateDeployment")),
    ]),
    ("RollingUpdateDeployment", &[
        field(1, "maxUnavailable", IntOrString),
        field(2, "maxSurge", IntOrString),
    ]),
    ("DeploymentStatus", &[
        omitempty(1, "observedGeneration", I64),
        omitempty(2, "replicas", I32),
        omitempty(3, "updatedReplicas", I32),
        omitempty(4, "availableReplicas", I32),
        omitempty(5, "unavailableReplicas", I32),
        omitempty(7, "readyReplicas", I32),
        field(8, "collisionCount", I32),
        field(9, "terminatingReplicas", I32),
    ]),
    // core/v1: Pod
    ("PodTemplateSpec", &[
        field(1, "metadata", Msg("ObjectMeta")),
        field(2, "spec", Msg("PodSpec")),
    ]),
    ("Pod", &[
        field(1, "metadata", Msg("ObjectMeta")),
        field(2, "spec", Msg("PodSpec")),
        field(3, "status", Msg("PodStatus")),
    ]),
    ("PodStatus", &[
        omitempty(1, "phase", Str),
        omitempty(3, "message", Str),
        omitempty(4, "reason", Str),
    ]),
    ("PodSpec", &[
        list(1, "volumes", Msg("Volume")),
        list(2, "containers", Msg("Container")),
        omitempty(3, "restartPolicy", Str),
        field(4, "terminationGracePeriodSeconds", I64),
        field(5, "activeDeadlineSeconds", I64),
        omitempty(6, "dnsPolicy", Str),
        map(7, "nodeSelector", Str),
        omitempty(8, "serviceAccountName", Str),
        omitempty(9, "serviceAccount", Str),
        omitempty(10, "nodeName", Str),
        omitempty(11, "hostNetwork", Bool),
        omitempty(12, "hostPID", Bool),
        omitempty(13, "hostIPC", Bool),
        field(14, "securityContext", Msg("PodSecurityContext")),
        list(15, "imagePullSecrets", Msg("LocalObjectReference")),
        omitempty(16, "hostname", Str),
        omitempty(17, "subdomain", Str),
        field(18, "affinity", Msg("Affinity")),
        omitempty(19, "schedulerName", Str),
        list(20, "initContainers", Msg("Container")),
        field(21, "automountServiceAccountToken", Bool),
        list(22, "tolerations", Msg("Toleration")),
        list(23, "hostAliases", Msg("HostAlias")),
        omitempty(24, "priorityClassName", Str),
        field(25, "priority", I32),
        field(26, "dnsConfig", Msg("PodDNSConfig")),
        field(27, "shareProcessNamespace", Bool),
        list(28, "readinessGates", Msg("PodReadinessGate")),
        field(29, "runtimeClassName", Str),
        field(30, "enableServiceLinks", Bool),
        field(31, "preemptionPolicy", Str),
        map(32, "overhead", Quantity),
        list(33, "topologySpreadConstraints", Msg("TopologySpreadConstraint")),
        list(34, "ephemeralContainers", Msg("EphemeralContainer")),
        field(35, "setHostnameAsFQDN", Bool),
        field(36, "os", Msg("PodOS")),
        field(37, "hostUsers", Bool),
        list(38, "schedulingGates", Msg("PodSchedulingGate")),
        field(40, "resources", Msg("ResourceRequirements")),
    ]),
    ("PodReadinessGate", &[field(1, "conditionType", Str)]),
    ("PodOS", &[field(1, "name", Str)]),
    ("PodSchedulingGate", &[field(1, "name", Str)]),
    ("Container", &[
        field(1, "name", Str),
        omitempty(2, "image", Str),
        list(3, "command", Str),
        list(4, "args", Str),
        omitempty(5, "workingDir", Str),
        list(6, "ports", Msg("ContainerPort")),
        list(7, "env", Msg("EnvVar")),
        field(8, "resources", Msg("ResourceRequirements")),
        list(9, "volumeMounts", Msg("VolumeMount")),
        field(10, "livenessProbe", Msg("Probe")),
        field(11, "readinessProbe", Msg("Probe")),
        field(12, "lifecycle", Msg("Lifecycle")),
        omitempty(13, "terminationMessagePath", Str),
        omitempty(14, "imagePullPolicy", Str),
        field(15, "securityContext", Msg("SecurityContext")),
        omitempty(16, "stdin", Bool),
        omitempty(17, "stdinOnce", Bool),
        omitempty(18, "tty", Bool),
        list(19, "envFrom", Msg("EnvFromSource")),
        omitempty(20, "terminationMessagePolicy", Str),
        list(21, "volumeDevices", Msg("VolumeDevice")),
        field(22, "startupProbe", Msg("Probe")),
        list(23, "resizePolicy", Msg("ContainerResizePolicy")),
        field(24, "restartPolicy", Str),
    ]),
    // The fields of EphemeralContainerCommon are numbered as Container's.
    ("EphemeralContainer", &[inline(1, "Container"), omitempty(2, "targetContainerName", Str)]),
    ("ContainerPort", &[
        omitempty(1, "name", Str),
        omitempty(2, "hostPort", I32),
        field(3, "containerPort", I32),
        omitempty(4, "protocol", Str),
        omitempty(5, "hostIP", Str),
    ]),
    ("EnvVar", &[
        field(1, "name", Str),
        omitempty(2, "value", Str),
        field(3, "valueFrom", Msg("EnvVarSource")),
    ]),
    ("EnvVarSource", &[
        field(1, "fieldRef", Msg("ObjectFieldSelector")),
        field(2, "resourceFieldRef", Msg("ResourceFieldSelector")),
        field(3, "configMapKeyRef", Msg("KeySelector")),
        field(4, "secretKeyRef", Msg("KeySelector")),
    ]),
    ("ObjectFieldSelector", &[omitempty(1, "apiVersion", Str), field(2, "fieldPath", Str)]),
    ("ResourceFieldSelector", &[
        omitempty(1, "containerName", Str),
        field(2, "resource", Str),
        field(3, "divisor", Quantity),
    ]),
    // ConfigMapKeySelector and SecretKeySelector.
    ("KeySelector", &[
        inline(1, "LocalObjectReference"),
        field(2, "key", Str),
        field(3, "optional", Bool),
    ]),
    ("EnvFromSource", &[
        omitempty(1, "prefix", Str),
        field(2, "configMapRef", Msg("EnvSource")),
        field(3, "secretRef", Msg("EnvSource")),
    ]),
    // ConfigMapEnvSource and SecretEnvSource.
    ("EnvSource", &[inline(1, "LocalObjectReference"), field(2, "optional", Bool)]),
    ("ResourceRequirements", &[
        map(1, "limits", Quantity),
        map(2, "requests", Quantity),
        list(3, "claims", Msg("ResourceClaim")),
    ]),
    ("ResourceClaim", &[field(1, "name", Str), omitempty(2, "request", Str)]),
    ("VolumeMount", &[
        field(1, "name", Str),
        omitempty(2, "readOnly", Bool),
        field(3, "mountPath", Str),
        omitempty(4, "subPath", Str),
        field(5, "mountPropagation", Str),
        omitempty(6, "subPathExpr", Str),
        field(7, "recursiveReadOnly", Str),
    ]),
    ("VolumeDevice", &[field(1, "name", Str), field(2, "devicePath", Str)]),
    ("ContainerResizePolicy", &[field(1, "resourceName", Str), field(2, "restartPolicy", Str)]),
    ("Probe", &[
        inline(1, "ProbeHandler"),
        omitempty(2, "initialDelaySeconds", I32),
        omitempty(3, "timeoutSeconds", I32),
        omitempty(4, "periodSeconds", I32),
        omitempty(5, "successThreshold", I32),
        omitempty(6, "failureThreshold", I32),
        field(7, "terminationGracePeriodSeconds", I64),
    ]),
    ("ProbeHandler", &[
        field(1, "exec", Msg("ExecAction")),
        field(2, "httpGet", Msg("HTTPGetAction")),
        field(3, "tcpSocket", Msg("TCPSocketAction")),
        field(4, "grpc", Msg("GRPCAction")),
    ]),
    ("Lifecycle", &[
        field(1, "postStart", Msg("LifecycleHandler")),
        field(2, "preStop", Msg("LifecycleHandler")),
        field(3, "stopSignal", Str),
    ]),
    ("LifecycleHandler", &[
        field(1, "exec", Msg("ExecAction")),
        field(2, "httpGet", Msg("HTTPGetAction")),
        field(3, "tcpSocket", Msg("TCPSocketAction")),
        field(4, "sleep", Msg("SleepAction")),
    ]),
    ("ExecAction", &[list(1, "command", Str)]),
    ("HTTPGetAction", &[
        omitempty(1, "path", Str),
        field(2, "port", IntOrString),
        omitempty(3, "host", Str),
        omitempty(4, "scheme", Str),
        list(5, "httpHeaders", Msg("HTTPHeader")),
    ]),
    ("HTTPHeader", &[field(1, "name", Str), field(2, "value", Str)]),
    ("TCPSocketAction", &[field(1, "port", IntOrString), omitempty(2, "host", Str)]),
    ("GRPCAction", &[field(1, "port", I32), field(2, "service", Str)]),
    ("SleepAction", &[field(1, "seconds", I64)]),
    ("SecurityContext", &[
        field(1, "capabilities", Msg("Capabilities")),
        field(2, "privileged", Bool),
        field(3, "seLinuxOptions", Msg("SELinuxOptions")),
        field(4, "runAsUser", I64),
        field(5, "runAsNonRoot", Bool),
        field(6, "readOnlyRootFilesystem", Bool),
        field(7, "allowPrivilegeEscalation", Bool),
        field(8, "runAsGroup", I64),
        field(9, "procMount", Str),
        field(10, "windowsOptions", Msg("WindowsSecurityContextOptions")),
        field(11, "seccompProfile", Msg("SeccompProfile")),
        field(12, "appArmorProfile", Msg("SeccompProfile")),
    ]),
    ("PodSecurityContext", &[
        field(1, "seLinuxOptions", Msg("SELinuxOptions")),
        field(2, "runAsUser", I64),
        field(3, "runAsNonRoot", Bool),
        list(4, "supplementalGroups", I64),
        field(5, "fsGroup", I64),
        field(6, "runAsGroup", I64),
        list(7, "sysctls", Msg("Sysctl")),
        field(8, "windowsOptions", Msg("WindowsSecurityContextOptions")),
        field(9, "fsGroupChangePolicy", Str),
        field(10, "seccompProfile", Msg("SeccompProfile")),
        field(11, "appArmorProfile", Msg("SeccompProfile")),
        field(12, "supplementalGroupsPolicy", Str),
        field(13, "seLinuxChangePolicy", Str),
    ]),
    ("Capabilities", &[list(1, "add", Str), list(2, "drop", Str)]),
    ("SELinuxOptions", &[
        omitempty(1, "user", Str),
        omitempty(2, "role", Str),
        omitempty(3, "type", Str),
        omitempty(4, "level", Str),
    ]),
    ("WindowsSecurityContextOptions", &[
        field(1, "gmsaCredentialSpecName", Str),
        field(2, "gmsaCredentialSpec", Str),
        field(3, "runAsUserName", Str),
        field(4, "hostProcess", Bool),
    ]),
    // SeccompProfile and AppArmorProfile.
    ("SeccompProfile", &[field(1, "type", Str), field(2, "localhostProfile", Str)]),
    ("Sysctl", &[field(1, "name", Str), field(2, "value", Str)]),
    ("Toleration", &[
        omitempty(1, "key", Str),
        omitempty(2, "operator", Str),
        omitempty(3, "value", Str),
        omitempty(4, "effect", Str),
        field(5, "tolerationSeconds", I64),
    ]),
    ("HostAlias", &[field(1, "ip", Str), list(2, "hostnames", Str)]),
    ("PodDNSConfig", &[
        list(1, "nameservers", Str),
        list(2, "searches", Str),
        list(3, "options", Msg("PodDNSConfigOption")),
    ]),
    ("PodDNSConfigOption", &[omitempty(1, "name", Str), field(2, "value", Str)]),
    ("Affinity", &[
        field(1, "nodeAffinity", Msg("NodeAffinity")),
        field(2, "podAffinity", Msg("PodAffinity")),
        field(3, "podAntiAffinity", Msg("PodAffinity")),
    ]),
    ("NodeAffinity", &[
        field(1, "requiredDuringSchedulingIgnoredDuringExecution", Msg("NodeSelector")),
        list(2, "preferredDuringSchedulingIgnoredDuringExecution", Msg("PreferredSchedulingTerm")),
    ]),
    ("NodeSelector", &[list(1, "nodeSelectorTerms", Msg("NodeSelectorTerm"))]),
    ("NodeSelectorTerm", &[
        list(1, "matchExpressions", Msg("LabelSelectorRequirement")),
        list(2, "matchFields", Msg("LabelSelectorRequirement")),
    ]),
    ("PreferredSchedulingTerm", &[
        field(1, "weight", I32),
        field(2, "preference", Msg("NodeSelectorTerm")),
    ]),
    // PodAffinity and PodAntiAffinity.
    ("PodAffinity", &[
        list(1, "requiredDuringSchedulingIgnoredDuringExecution", Msg("PodAffinityTerm")),
        list(2, "preferredDuringSchedulingIgnoredDuringExecution", Msg("WeightedPodAffinityTerm")),
    ]),
    ("WeightedPodAffinityTerm", &[
        field(1, "weight", I32),
        field(2, "podAffinityTerm", Msg("PodAffinityTerm")),
    ]),
    ("PodAffinityTerm", &[
        field(1, "labelSelector", Msg("LabelSelector")),
        list(2, "namespaces", Str),
        field(3, "topologyKey", Str),
        field(4, "namespaceSelector", Msg("LabelSelector")),
        list(5, "matchLabelKeys", Str),
        list(6, "mismatchLabelKeys", Str),
    ]),
    ("TopologySpreadConstraint", &[
        field(1, "maxSkew", I32),
        field(2, "topologyKey", Str),
        field(3, "whenUnsatisfiable", Str),
        field(4, "labelSelector", Msg("LabelSelector")),
        field(5, "minDomains", I32),
        field(6, "nodeAffinityPolicy", Str),
        field(7, "nodeTaintsPolicy", Str),
        list(8, "matchLabelKeys", Str),
    ]),
    ("Volume", &[field(1, "name", Str), inline(2, "VolumeSource")]),
    // The common volume types; others are skipped.
    ("VolumeSource", &[
        field(1, "hostPath", Msg("HostPathVolumeSource")),
        field(2, "emptyDir", Msg("EmptyDirVolumeSource")),
        field(6, "secret", Msg("SecretVolumeSource")),
        field(7, "nfs", Msg("NFSVolumeSource")),
        field(10, "persistentVolumeClaim", Msg("PersistentVolumeClaimVolumeSource")),
        field(16, "downwardAPI", Msg("DownwardAPIVolumeSource")),
        field(19, "configMap", Msg("ConfigMapVolumeSource")),
        field(26, "projected", Msg("ProjectedVolumeSource")),
        field(28, "csi", Msg("CSIVolumeSource")),
        field(30, "image", Msg("ImageVolumeSource")),
    ]),
    ("HostPathVolumeSource", &[field(1, "path", Str), field(2, "type", Str)]),
    ("EmptyDirVolumeSource", &[omitempty(1, "medium", Str), field(2, "sizeLimit", Quantity)]),
    ("SecretVolumeSource", &[
        omitempty(1, "secretName", Str),
        list(2, "items", Msg("KeyToPath")),
        field(3, "defaultMode", I32),
        field(4, "optional", Bool),
    ]),
    ("NFSVolumeSource", &[
        field(1, "server", Str),
        field(2, "path", Str),
        omitempty(3, "readOnly", Bool),
    ]),
    ("PersistentVolumeClaimVolumeSource", &[
        field(1, "claimName", Str),
        omitempty(2, "readOnly", Bool),
    ]),
    ("DownwardAPIVolumeSource", &[
        list(1, "items", Msg("DownwardAPIVolumeFile")),
        field(2, "defaultMode", I32),
    ]),
    ("DownwardAPIVolumeFile", &[
        field(1, "path", Str),
        field(2, "fieldRef", Msg("ObjectFieldSelector")),
        field(3, "resourceFieldRef", Msg("ResourceFieldSelector")),
        field(4, "mode", I32),
    ]),
    ("ConfigMapVolumeSource", &[
        inline(1, "LocalObjectReference"),
        list(2, "items", Msg("KeyToPath")),
        field(3, "defaultMode", I32),
        field(4, "optional", Bool),
    ]),
    ("KeyToPath", &[field(1, "key", Str), field(2, "path", Str), field(3, "mode", I32)]),
    ("ProjectedVolumeSource", &[
        list(1, "sources", Msg("VolumeProjection")),
        field(2, "defaultMode", I32),
    ]),
    ("VolumeProjection", &[
        field(1, "secret", Msg("KeyProjection")),
        field(2, "downwardAPI", Msg("DownwardAPIProjection")),
        field(3, "configMap", Msg("KeyProjection")),
        field(4, "serviceAccountToken", Msg("ServiceAccountTokenProjection")),
    ]),
    // SecretProjection and ConfigMapProjection.
    ("KeyProjection", &[
        inline(1, "LocalObjectReference"),
        list(2, "items", Msg("KeyToPath")),
        field(4, "optional", Bool),
    ]),
    ("DownwardAPIProjection", &[list(1, "items", Msg("DownwardAPIVolumeFile"))]),
    ("ServiceAccountTokenProjection", &[
        omitempty(1, "audience", Str),
        field(2, "expirationSeconds", I64),
        field(3, "path", Str),
    ]),
    ("CSIVolumeSource", &[
        field(1, "driver", Str),
        field(2, "readOnly", Bool),
        field(3, "fsType", Str),
        map(4, "volumeAttributes", Str),
        field(5, "nodePublishSecretRef", Msg("LocalObjectReference")),
    ]),
    ("ImageVolumeSource", &[omitempty(1, "reference", Str), omitempty(2, "pullPolicy", Str)]),
    // authorization/v1 and authentication/v1 self-reviews
    ("SelfSubjectAccessReview", &[
        field(1, "metadata", Msg("ObjectMeta")),
        field(2, "spec", Msg("SelfSubjectAccessReviewSpec")),
        field(3, "status", Msg("SubjectAccessReviewStatus")),
    ]),
    ("SelfSubjectAccessReviewSpec", &[
        field(1, "resourceAttributes", Msg("ResourceAttributes")),
        field(2, "nonResourceAttributes", Msg("NonResourceAttributes")),
    ]),
    ("ResourceAttributes", &[
        omitempty(1, "namespace", Str),
        omitempty(2, "verb", Str),
        omitempty(3, "group", Str),
        omitempty(4, "version", Str),
        omitempty(5, "resource", Str),
        omitempty(6, "subresource", Str),
        omitempty(7, "name", Str),
        field(8, "fieldSelector", Msg("SelectorAttributes")),
        field(9, "labelSelector", Msg("SelectorAttributes")),
    ]),
    // FieldSelectorAttributes and LabelSelectorAttributes.
    ("SelectorAttributes", &[
        omitempty(1, "rawSelector", Str),
        list(2, "requirements", Msg("LabelSelectorRequirement")),
    ]),
    ("NonResourceAttributes", &[omitempty(1, "path", Str), omitempty(2, "verb", Str)]),
    ("SubjectAccessReviewStatus", &[
        field(1, "allowed", Bool),
        omitempty(2, "reason", Str),
        omitempty(3, "evaluationError", Str),
        omitempty(4, "denied", Bool),
    ]),
    ("SelfSubjectRulesReview", &[
        field(1, "metadata", Msg("ObjectMeta")),
        field(2, "spec", Msg("SelfSubjectRulesReviewSpec")),
        field(3, "status", Msg("SubjectRulesReviewStatus")),
    ]),
    ("SelfSubjectRulesReviewSpec", &[omitempty(1, "namespace", Str)]),
    // The rule lists (1, 2) are only ever filled in by the server.
    ("SubjectRulesReviewStatus", &[
        field(3, "incomplete", Bool),
        omitempty(4, "evaluationError", Str),
    ]),
    ("SelfSubjectReview", &[
        field(1, "metadata", Msg("ObjectMeta")),
        field(2, "status", Msg("SelfSubjectReviewStatus")),
    ]),
    ("SelfSubjectReviewStatus", &[field(1, "userInfo", Msg("UserInfo"))]),
    // `extra` (4) is only ever filled in by the server.
    ("UserInfo", &[
        omitempty(1, "username", Str),
        omitempty(2, "uid", Str),
        list(3, "groups", Str),
    ]),
];

/// The message of each (apiVersion, kind) that may arrive as protobuf.
/// DeleteOptions is accepted under any apiVersion.
const KINDS: &[(&str, &str)] = &[
    ("v1", "Namespace"),
    ("v1", "ConfigMap"),
    ("v1", "ServiceAccount"),
    ("v1", "Service"),
    ("v1", "Pod"),
    ("apps/v1", "Deployment"),
    ("authorization.k8s.io/v1", "SelfSubjectAccessReview"),
    ("authorization.k8s.io/v1", "SelfSubjectRulesReview"),
    ("authentication.k8s.io/v1", "SelfSubjectReview"),
];

static INDEX: LazyLock<HashMap<&'static str, &'static [Field]>> =
    LazyLock::new(|| MESSAGES.iter().map(|(n, f)| (*n, *f)).collect());

static DEBUG: LazyLock<bool> =
    LazyLock::new(|| std::env::var_os("KCONTROL_DEBUG").is_some_and(|v| !v.is_empty()));

/// One field occurrence on the wire (no field of the table is fixed-width;
/// those are only skipped).
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn varint(b: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

fn fields(b: &[u8]) -> Result<Vec<(u64, Wire<'_>)>, String> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < b.len() {
        let key = varint(b, &mut pos)?;
        let (num, wt) = (key >> 3, key & 7);
        let w = match wt {
            0 => Wire::Varint(varint(b, &mut pos)?),
            1 | 5 => {
                let len = if wt == 1 { 8 } else { 4 };
                if b.len() - pos < len {
                    return Err("truncated fixed-width field".into());
                }
                pos += len;
                Wire::Fixed
            }
            2 => {
                let len = usize::try_from(varint(b, &mut pos)?).map_err(|_| "length overflow")?;
                let s = b
                    .get(pos..pos.checked_add(len).ok_or("length overflow")?)
                    .ok_or("truncated field")?;
                pos += len;
                Wire::Bytes(s)
            }
            other => return Err(format!("unsupported wire type {other}")),
        };
        out.push((num, w));
    }
    Ok(out)
}

fn utf8(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8".to_string())
}

/// RFC 3339 (seconds) of a Time message; null for the zero time.
fn time(b: &[u8]) -> Result<Value, String> {
    let (mut secs, mut nanos) = (0i64, 0i32);
    for (n, w) in fields(b)? {
        match (n, w) {
            (1, Wire::Varint(v)) => secs = v as i64,
            (2, Wire::Varint(v)) => nanos = v as i32,
            _ => {}
        }
    }
    if secs == 0 && nanos == 0 {
        return Ok(Value::Null);
    }
    let ts = jiff::Timestamp::new(secs, 0).map_err(|e| e.to_string())?;
    Ok(json!(ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()))
}

fn quantity(b: &[u8]) -> Result<Value, String> {
    let mut s = "0".to_string();
    for (n, w) in fields(b)? {
        if let (1, Wire::Bytes(x)) = (n, w) {
            s = utf8(x)?;
        }
    }
    Ok(json!(s))
}

fn int_or_string(b: &[u8]) -> Result<Value, String> {
    let (mut ty, mut int, mut s) = (0, 0i32, String::new());
    for (n, w) in fields(b)? {
        match (n, w) {
            (1, Wire::Varint(v)) => ty = v,
            (2, Wire::Varint(v)) => int = v as i32,
            (3, Wire::Bytes(x)) => s = utf8(x)?,
            _ => {}
        }
    }
    Ok(if ty == 1 { json!(s) } else { json!(int) })
}

/// The JSON value of one occurrence of a field of type `ty`.
fn value(ty: Ty, w: Wire<'_>, depth: usize) -> Result<Value, String> {
    Ok(match (ty, w) {
        (Ty::Str, Wire::Bytes(s)) => json!(utf8(s)?),
        (Ty::Bytes, Wire::Bytes(s)) => json!(base64::engine::general_purpose::STANDARD.encode(s)),
        (Ty::Bool, Wire::Varint(v)) => json!(v != 0),
        // int32 negatives are sign-extended to 64 bits on the wire.
        (Ty::I32, Wire::Varint(v)) => json!(v as i32),
        (Ty::I64, Wire::Varint(v)) => json!(v as i64),
        (Ty::Time, Wire::Bytes(b)) => time(b)?,
        (Ty::Quantity, Wire::Bytes(b)) => quantity(b)?,
        (Ty::IntOrString, Wire::Bytes(b)) => int_or_string(b)?,
        (Ty::Msg(name), Wire::Bytes(b)) => Value::Object(message(name, b, depth + 1)?),
        (ty, _) => return Err(format!("wire type does not match the schema ({ty:?})")),
    })
}

/// The value of a map entry with no value field (protobuf's default).
fn default_of(ty: Ty) -> Value {
    match ty {
        Ty::Str | Ty::Bytes => json!(""),
        Ty::Bool => json!(false),
        Ty::I32 | Ty::I64 => json!(0),
        Ty::Quantity => json!("0"),
        Ty::Time => Value::Null,
        Ty::IntOrString => json!(0),
        Ty::Msg(_) => json!({}),
    }
}

fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_i64() == Some(0),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

/// The JSON object of a message named `name`.
fn message(name: &str, b: &[u8], depth: usize) -> Result<Map<String, Value>, String> {
    if depth > 64 {
        return Err("message nesting too deep".into());
    }
    let schema = INDEX
        .get(name)
        .ok_or_else(|| format!("no protobuf schema for {name}"))?;
    let mut out = Map::new();
    for (n, w) in fields(b)? {
        let Some(f) = schema.iter().find(|f| f.num == n) else {
            // Like an unknown JSON field; the table covers what kubectl sends.
            if *DEBUG {
                eprintln!("kcontrol: protobuf: skipping unknown field {n} of {name}");
            }
            continue;
        };
        match f.shape {
            Shape::One { omit } => {
                let v = value(f.ty, w, depth)?;
                if v.is_null() || (omit && is_zero(&v)) {
                    out.remove(f.name);
                } else {
                    out.insert(f.name.into(), v);
                }
            }
            Shape::List => {
                let items = out.entry(f.name).or_insert_with(|| json!([]));
                let Value::Array(items) = items else {
                    unreachable!("lists are arrays")
                };
                match (f.ty, w) {
                    // Packed numbers.
                    (Ty::I32 | Ty::I64 | Ty::Bool, Wire::Bytes(packed)) => {
                        let mut pos = 0;
                        while pos < packed.len() {
                            let v = Wire::Varint(varint(packed, &mut pos)?);
                            items.push(value(f.ty, v, depth)?);
                        }
                    }
                    (ty, w) => items.push(value(ty, w, depth)?),
                }
            }
            Shape::Map => {
                let Wire::Bytes(entry) = w else {
                    return Err(format!("{name}.{}: map entry is not a message", f.name));
                };
                let (mut key, mut val) = (String::new(), None);
                for (en, ew) in fields(entry)? {
                    match (en, ew) {
                        (1, Wire::Bytes(k)) => key = utf8(k)?,
                        (2, ew) => val = Some(value(f.ty, ew, depth)?),
                        _ => {}
                    }
                }
                let m = out.entry(f.name).or_insert_with(|| json!({}));
                if let Value::Object(m) = m {
                    m.insert(key, val.unwrap_or_else(|| default_of(f.ty)));
                }
            }
            Shape::Inline => {
                let (Ty::Msg(inner), Wire::Bytes(b)) = (f.ty, w) else {
                    return Err(format!("{name}: embedded {} is not a message", f.name));
                };
                out.extend(message(inner, b, depth + 1)?);
            }
        }
    }
    Ok(out)
}

/// Decodes a `k8s\0`-framed protobuf body into the object's JSON form.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let rest = body
        .strip_prefix(b"k8s\0")
        .ok_or("not a Kubernetes protobuf body (missing the k8s\\0 prefix)")?;
    let (mut api_version, mut kind, mut raw, mut encoding) =
        (String::new(), String::new(), &[][..], String::new());
    for (n, w) in fields(rest)? {
        match (n, w) {
            (1, Wire::Bytes(tm)) => {
                for (tn, tw) in fields(tm)? {
                    match (tn, tw) {
                        (1, Wire::Bytes(s)) => api_version = utf8(s)?,
                        (2, Wire::Bytes(s)) => kind = utf8(s)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(s)) => raw = s,
            (3, Wire::Bytes(s)) => encoding = utf8(s)?,
            _ => {}
        }
    }
    if !encoding.is_empty() {
        return Err(format!("unsupported content encoding {encoding:?}"));
    }
    if kind.is_empty() {
        return Err("the protobuf envelope names no kind".into());
    }
    if kind != "DeleteOptions" && !KINDS.contains(&(api_version.as_str(), kind.as_str())) {
        return Err(format!(
            "{api_version} {kind} is not accepted as protobuf; send it as JSON"
        ));
    }
    let mut obj = message(&kind, raw, 0)?;
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64, wt: u64) -> Vec<u8> {
        let mut v = Vec::new();
        let mut k = (n << 3) | wt;
        loop {
            let b = (k & 0x7f) as u8;
            k >>= 7;
            if k == 0 {
                v.push(b);
                break;
            }
            v.push(b | 0x80);
        }
        v
    }

    fn bytes(n: u64, b: &[u8]) -> Vec<u8> {
        let mut v = key(n, 2);
        v.push(b.len() as u8);
        v.extend_from_slice(b);
        v
    }

    fn varint_field(n: u64, x: u8) -> Vec<u8> {
        let mut v = key(n, 0);
        v.push(x);
        v
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// What the server keeps of a JSON body: `null` is the same as unset.
    fn without_nulls(v: Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.into_iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k, without_nulls(v)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.into_iter().map(without_nulls).collect()),
            v => v,
        }
    }

    #[test]
    fn schema_is_consistent() {
        let mut names = std::collections::HashSet::new();
        for (name, fields) in MESSAGES {
            assert!(names.insert(*name), "{name} twice");
            let mut nums = std::collections::HashSet::new();
            let mut json_names = std::collections::HashSet::new();
            for f in *fields {
                assert!(nums.insert(f.num), "{name}: field {} twice", f.num);
                if let Ty::Msg(m) = f.ty {
                    assert!(INDEX.contains_key(m), "{name}.{}: no message {m}", f.name);
                }
                if f.shape == Shape::Inline {
                    let Ty::Msg(m) = f.ty else {
                        panic!("{name}: inline {} is not a message", f.name)
                    };
                    for g in INDEX[m] {
                        assert!(json_names.insert(g.name), "{name}: {} twice", g.name);
                    }
                } else {
                    assert!(json_names.insert(f.name), "{name}: {} twice", f.name);
                }
                if let Shape::One { omit: true } = f.shape {
                    assert!(!matches!(f.ty, Ty::Msg(_) | Ty::Time | Ty::Quantity));
                }
            }
        }
        for (_, kind) in KINDS {
            assert!(INDEX.contains_key(kind), "{kind}");
        }
    }

    #[test]
    fn decodes_a_configmap() {
        // ConfigMap{metadata{name "cm", namespace "", labels{a: b}}, data{k: v}}
        let mut label = bytes(1, b"a");
        label.extend(bytes(2, b"b"));
        let mut meta = bytes(1, b"cm");
        meta.extend(bytes(3, b""));
        meta.extend(bytes(11, &label));
        meta.extend(bytes(8, &[])); // zero Time
        meta.extend(bytes(99, b"?")); // unknown: skipped
        let mut entry = bytes(1, b"k");
        entry.extend(bytes(2, b"v"));
        let mut cm = bytes(1, &meta);
        cm.extend(bytes(2, &entry));
        cm.extend(bytes(2, &bytes(1, b"empty"))); // no value: ""
        cm.extend(bytes(3, &[bytes(1, b"bin"), bytes(2, &[0, 255])].concat()));
        cm.extend(varint_field(4, 1)); // immutable: true
        let mut tm = bytes(1, b"v1");
        tm.extend(bytes(2, b"ConfigMap"));
        let mut body = b"k8s\0".to_vec();
        body.extend(bytes(1, &tm));
        body.extend(bytes(2, &cm));
        let v = decode(&body).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "immutable": true,
                   "metadata": {"name": "cm", "labels": {"a": "b"}},
                   "data": {"k": "v", "empty": ""}, "binaryData": {"bin": "AP8="}})
        );
        assert!(decode(b"{}").is_err());
        assert!(decode(b"k8s\0\x0a\x05").is_err());
        // Kinds outside the table are refused, not guessed at.
        let mut tm = bytes(1, b"v1");
        tm.extend(bytes(2, b"Secret"));
        let mut body = b"k8s\0".to_vec();
        body.extend(bytes(1, &tm));
        assert!(decode(&body).unwrap_err().contains("Secret"));
    }

    /// `kubectl.1.33 create namespace team` (protobuf) against what
    /// `kubectl.1.30` sends for the same command.
    #[test]
    fn kubectl_namespace() {
        let body = hex(
            "6b387300 0a0f0a02 76311209 4e616d65 73706163 65121c0a 140a0474 65616d12
             001a0022 002a0032 00380042 0012001a 020a001a 002200",
        );
        let json130: Value = serde_json::from_str(
            r#"{"kind":"Namespace","apiVersion":"v1","metadata":{"name":"team",
"creationTimestamp":null},"spec":{},"status":{}}"#,
        )
        .unwrap();
        assert_eq!(decode(&body).unwrap(), without_nulls(json130));
    }

    /// `kubectl.1.33 create deployment api --image=nginx:1.27 --replicas=3
    /// --port=8080` (protobuf) against what `kubectl.1.30` sends.
    #[test]
    fn kubectl_deployment() {
        let body = hex(
            "6b387300 0a150a07 61707073 2f763112 0a446570 6c6f796d 656e7412 be010a1f
             0a036170 6912001a 0022002a 00320038 0042005a 0a0a0361 70701203 61706912
             8c010803 120c0a0a 0a036170 70120361 70691a72 0a1c0a00 12001a00 22002a00
             32003800 42005a0a 0a036170 70120361 70691252 12340a05 6e67696e 78120a6e
             67696e78 3a312e32 372a0032 0b0a0010 0018903f 22002a00 42006a00 72008001
             00880100 900100a2 01001a00 32004200 4a005200 58006000 68008201 008a0100
             9a0100c2 01002202 0a002800 38001a0c 08001000 18002000 28003800 1a002200",
        );
        let json130: Value = serde_json::from_str(
            r#"{"kind":"Deployment","apiVersion":"apps/v1","metadata":{"name":"api",
"creationTimestamp":null,"labels":{"app":"api"}},"spec":{"replicas":3,
"selector":{"matchLabels":{"app":"api"}},
"template":{"metadata":{"creationTimestamp":null,"labels":{"app":"api"}},
"spec":{"containers":[{"name":"nginx","image":"nginx:1.27",
"ports":[{"containerPort":8080}],"resources":{}}]}},"strategy":{}},"status":{}}"#,
        )
        .unwrap();
        assert_eq!(decode(&body).unwrap(), without_nulls(json130));
    }
}
