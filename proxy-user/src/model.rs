//! The desired state: which frontends exist and which ready backends each
//! has. Built from Kubernetes `Service` and `discovery.k8s.io/v1`
//! `EndpointSlice` objects, whatever their source (manifest files or the
//! API, through the index); the reconciler diffs two of these and the
//! datapath applies the difference.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => proxy_common::IPPROTO_TCP,
            Proto::Udp => proxy_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// A service frontend: ClusterIP, port, protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.proto)
    }
}

/// A backend endpoint: pod IP and target port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    /// `namespace/name:port-name`, for messages and counters.
    pub name: String,
    /// Ready backends. Empty means "reject".
    pub backends: BTreeSet<BackendAddr>,
    /// Terminating endpoints that are still serving (not ready, `serving`
    /// and `terminating` true): they get no new flows, but the flows they
    /// already have keep going to them until they leave the slice — a pod
    /// finishing its requests during its grace period (kubernetes#85643).
    pub draining: BTreeSet<BackendAddr>,
}

impl DesiredService {
    /// A service with `backends` and nothing draining.
    pub fn new(name: impl Into<String>, backends: BTreeSet<BackendAddr>) -> DesiredService {
        DesiredService {
            name: name.into(),
            backends,
            draining: BTreeSet::new(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<Frontend, DesiredService>,
}

impl DesiredState {
    pub fn backend_count(&self) -> usize {
        self.services.values().map(|s| s.backends.len()).sum()
    }
}

/// An object that could not be turned into desired state, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectError {
    /// `Service default/web`, `EndpointSlice default/web-abc`.
    pub object: String,
    pub message: String,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

impl std::error::Error for ObjectError {}

fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn parse_proto(p: Option<&str>) -> Result<Option<Proto>, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Some(Proto::Tcp)),
        "UDP" => Ok(Some(Proto::Udp)),
        // SCTP is a valid Kubernetes protocol the datapath does not handle.
        "SCTP" => Ok(None),
        other => Err(format!("protocol {other:?} is not one of TCP, UDP, SCTP")),
    }
}

fn port_u16(v: i32, what: &str) -> Result<u16, String> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what} {v} is out of range 1-65535"))
}

/// One Service port after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvcPort {
    pub name: String,
    pub port: u16,
    pub proto: Proto,
}

/// Validated view of a Service: namespace, name, ClusterIP (None for
/// headless or non-ClusterIP services we do not program) and ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvcView {
    pub ns: String,
    pub name: String,
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<SvcPort>,
}

pub fn view_service(svc: &Service) -> Result<SvcView, ObjectError> {
    let (ns, name) = ns_name(&svc.metadata);
    let err = |message: String| ObjectError {
        object: format!("Service {ns}/{name}"),
        message,
    };
    if name.is_empty() {
        return Err(err("metadata.name is missing".into()));
    }
    let spec = svc
        .spec
        .as_ref()
        .ok_or_else(|| err("spec is missing".into()))?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(SvcView {
            ns,
            name,
            cluster_ip: None,
            ports: vec![],
        });
    }
    let cluster_ip = match spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => None,
        Some(ip) => Some(
            ip.parse::<Ipv4Addr>()
                .map_err(|_| err(format!("spec.clusterIP {ip:?} is not an IPv4 address")))?,
        ),
    };
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let port = port_u16(p.port, &format!("spec.ports[{i}].port")).map_err(err)?;
        let proto =
            parse_proto(p.protocol.as_deref()).map_err(|m| err(format!("spec.ports[{i}]: {m}")))?;
        if let Some(proto) = proto {
            ports.push(SvcPort {
                name: p.name.clone().unwrap_or_default(),
                port,
                proto,
            });
        }
    }
    Ok(SvcView {
        ns,
        name,
        cluster_ip,
        ports,
    })
}

/// Ready endpoints of one slice, per (port name, protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceView {
    pub ns: String,
    /// The slice's own name.
    pub name: String,
    /// The service it belongs to (`kubernetes.io/service-name`).
    pub service: String,
    /// (port name, proto) → backends
    pub ports: BTreeMap<(String, Proto), BTreeSet<BackendAddr>>,
    /// (port name, proto) → terminating endpoints still serving.
    pub draining: BTreeMap<(String, Proto), BTreeSet<BackendAddr>>,
}

pub fn view_slice(slice: &EndpointSlice) -> Result<Option<SliceView>, ObjectError> {
    let (ns, name) = ns_name(&slice.metadata);
    let err = |message: String| ObjectError {
        object: format!("EndpointSlice {ns}/{name}"),
        message,
    };
    if name.is_empty() {
        return Err(err("metadata.name is missing".into()));
    }
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
        .ok_or_else(|| err(format!("label {SERVICE_NAME_LABEL} is missing")))?;
    match slice.address_type.as_str() {
        "IPv4" => {}
        // Valid, but this datapath is IPv4-only: skip, do not fail.
        "IPv6" | "FQDN" => return Ok(None),
        other => {
            return Err(err(format!(
                "addressType {other:?} is not one of IPv4, IPv6, FQDN"
            )));
        }
    }
    let mut ready = BTreeSet::new();
    let mut draining = BTreeSet::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        if ep.addresses.is_empty() {
            return Err(err(format!("endpoints[{i}].addresses is empty")));
        }
        let mut ips = Vec::new();
        for (j, a) in ep.addresses.iter().enumerate() {
            ips.push(a.parse::<Ipv4Addr>().map_err(|_| {
                err(format!(
                    "endpoints[{i}].addresses[{j}] {a:?} is not an IPv4 address"
                ))
            })?);
        }
        // Kubernetes: a nil `ready` condition means ready; a nil `serving`
        // means the same as `ready`; a nil `terminating` means false.
        let cond = ep.conditions.as_ref();
        let is_ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(is_ready);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        // Kubernetes uses only the first address of an endpoint.
        if is_ready {
            ready.insert(ips[0]);
        } else if serving && terminating {
            draining.insert(ips[0]);
        }
    }
    // An address listed both ways (two endpoints) counts as ready.
    draining.retain(|ip| !ready.contains(ip));
    let mut ports = BTreeMap::new();
    let mut draining_ports = BTreeMap::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let Some(port) = p.port else {
            // A port without a number means "all ports"; not applicable to
            // ClusterIP translation.
            continue;
        };
        let port = port_u16(port, &format!("ports[{i}].port")).map_err(err)?;
        let Some(proto) =
            parse_proto(p.protocol.as_deref()).map_err(|m| err(format!("ports[{i}]: {m}")))?
        else {
            continue;
        };
        let key = (p.name.clone().unwrap_or_default(), proto);
        let set: &mut BTreeSet<BackendAddr> = ports.entry(key.clone()).or_default();
        set.extend(ready.iter().map(|&ip| BackendAddr { ip, port }));
        let set: &mut BTreeSet<BackendAddr> = draining_ports.entry(key).or_default();
        set.extend(draining.iter().map(|&ip| BackendAddr { ip, port }));
    }
    Ok(Some(SliceView {
        ns,
        name,
        service,
        ports,
        draining: draining_ports,
    }))
}

/// The frontends of one service and their ready backends, from the
/// slices that belong to it.
pub fn frontends<'a>(
    svc: &SvcView,
    slices: impl Iterator<Item = &'a SliceView> + Clone,
) -> Vec<(Frontend, DesiredService)> {
    let Some(ip) = svc.cluster_ip else {
        return Vec::new();
    };
    svc.ports
        .iter()
        .map(|p| {
            let fe = Frontend {
                ip,
                port: p.port,
                proto: p.proto,
            };
            let key = (p.name.clone(), p.proto);
            let backends: BTreeSet<BackendAddr> = slices
                .clone()
                .filter_map(|v| v.ports.get(&key))
                .flatten()
                .copied()
                .collect();
            let draining: BTreeSet<BackendAddr> = slices
                .clone()
                .filter_map(|v| v.draining.get(&key))
                .flatten()
                .filter(|b| !backends.contains(b))
                .copied()
                .collect();
            let name = if p.name.is_empty() {
                format!("{}/{}", svc.ns, svc.name)
            } else {
                format!("{}/{}:{}", svc.ns, svc.name, p.name)
            };
            (
                fe,
                DesiredService {
                    name,
                    backends,
                    draining,
                },
            )
        })
        .collect()
}

/// Builds the desired state. Every object is validated; the first invalid
/// one is returned as the error (so a bad object never half-applies).
pub fn build(services: &[Service], slices: &[EndpointSlice]) -> Result<DesiredState, ObjectError> {
    let svcs = services
        .iter()
        .map(view_service)
        .collect::<Result<Vec<_>, _>>()?;
    let mut by_service: BTreeMap<(String, String), Vec<SliceView>> = BTreeMap::new();
    for s in slices {
        if let Some(v) = view_slice(s)? {
            by_service
                .entry((v.ns.clone(), v.service.clone()))
                .or_default()
                .push(v);
        }
    }
    let mut state = DesiredState::default();
    for svc in svcs {
        let slices = by_service
            .get(&(svc.ns.clone(), svc.name.clone()))
            .map(|v| v.as_slice())
            .unwrap_or_default();
        for (fe, desired) in frontends(&svc, slices.iter()) {
            if let Some(prev) = state.services.get(&fe) {
                return Err(ObjectError {
                    object: format!("Service {}/{}", svc.ns, svc.name),
                    message: format!("frontend {fe} is already used by {}", prev.name),
                });
            }
            state.services.insert(fe, desired);
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_saphyr::from_str(yaml).unwrap()
    }
    fn slice(yaml: &str) -> EndpointSlice {
        serde_saphyr::from_str(yaml).unwrap()
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
"#;

    const WEB_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
- addresses: [10.0.0.2]
- addresses: [10.0.0.3]
  conditions: {ready: false}
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
"#;

    #[test]
    fn ready_endpoints_matched_by_port_name() {
        let st = build(&[svc(WEB)], &[slice(WEB_SLICE)]).unwrap();
        assert_eq!(st.services.len(), 2);
        let http = &st.services[&Frontend {
            ip: "10.96.0.10".parse().unwrap(),
            port: 80,
            proto: Proto::Tcp,
        }];
        let ips: Vec<String> = http.backends.iter().map(|b| b.to_string()).collect();
        assert_eq!(ips, ["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(http.name, "default/web:http");
        let dns = &st.services[&Frontend {
            ip: "10.96.0.10".parse().unwrap(),
            port: 53,
            proto: Proto::Udp,
        }];
        assert!(dns.backends.iter().all(|b| b.port == 5353));
    }

    #[test]
    fn service_without_slices_has_no_backends() {
        let st = build(&[svc(WEB)], &[]).unwrap();
        assert!(st.services.values().all(|s| s.backends.is_empty()));
    }

    #[test]
    fn headless_service_is_not_programmed() {
        let st = build(&[svc(&WEB.replace("10.96.0.10", "None"))], &[]).unwrap();
        assert!(st.services.is_empty());
    }

    #[test]
    fn bad_ip_names_object_and_field() {
        let e = build(
            &[svc(WEB)],
            &[slice(&WEB_SLICE.replace("10.0.0.2", "10.0.0.300"))],
        )
        .unwrap_err();
        assert_eq!(e.object, "EndpointSlice default/web-1");
        assert!(e.message.contains("endpoints[1].addresses[0]"), "{e}");
        let e = build(&[svc(&WEB.replace("10.96.0.10", "banana"))], &[]).unwrap_err();
        assert_eq!(e.object, "Service default/web");
        assert!(e.message.contains("spec.clusterIP"), "{e}");
    }

    #[test]
    fn bad_port_and_protocol_are_rejected() {
        let e = build(&[svc(&WEB.replace("port: 80,", "port: 70000,"))], &[]).unwrap_err();
        assert!(e.message.contains("spec.ports[0].port 70000"), "{e}");
        let e = build(&[svc(&WEB.replace("protocol: TCP", "protocol: QUIC"))], &[]).unwrap_err();
        assert!(e.message.contains("QUIC"), "{e}");
    }

    #[test]
    fn duplicate_frontend_is_an_error() {
        let other = WEB.replace("name: web,", "name: web2,");
        let e = build(&[svc(WEB), svc(&other)], &[]).unwrap_err();
        assert!(e.message.contains("already used"), "{e}");
    }
}
