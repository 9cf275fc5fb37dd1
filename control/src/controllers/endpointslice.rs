//! The EndpointSlice controller (and the legacy Endpoints one): for each
//! Service with a selector, the pods it selects that have an IP, with
//! `ready` (Ready condition, not terminating), `serving` (Ready condition)
//! and `terminating` (deletionTimestamp set), and the service ports
//! resolved per pod (a named targetPort is looked up in the pod's container
//! ports). Pods that resolve to the same ports share slices of at most 100
//! endpoints. Slices carry `kubernetes.io/service-name` (what kproxy keys
//! on) and `endpointslice.kubernetes.io/managed-by`. Each endpoint names
//! its node's zone (`topology.kubernetes.io/zone`); for a Service with
//! `trafficDistribution: PreferClose` (or `PreferSameZone`) every endpoint
//! is hinted for its own zone, as upstream — when every endpoint has one
//! (a hint set that misses an endpoint would steer traffic away from it).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Pod, Service,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointSlice, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Resource, ResourceExt};

use super::Ctx;
use crate::informer::{Key, Next};
use crate::podutil;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
const MAX_ENDPOINTS: usize = 100;
/// The Node label that names its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Whether the Service asks for zone hints.
fn prefers_close(svc: &Service) -> bool {
    matches!(
        svc.spec
            .as_ref()
            .and_then(|s| s.traffic_distribution.as_deref()),
        Some("PreferClose" | "PreferSameZone")
    )
}

pub fn is_ours(s: &EndpointSlice) -> bool {
    s.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
}

fn selects(svc: &Service, p: &Pod) -> bool {
    let Some(sel) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    !sel.is_empty() && sel.iter().all(|(k, v)| p.labels().get(k) == Some(v))
}

/// Services that select `p` now, and those whose slices list it (its
/// labels may have changed so that they no longer do).
pub(super) fn enqueue_services_of_pod(ctx: &Ctx, p: &Pod) {
    let ns = p.namespace().unwrap_or_default();
    for svc in ctx
        .services
        .state_filter(|s| s.metadata.namespace.as_deref() == Some(ns.as_str()) && selects(s, p))
    {
        ctx.q.service.add(Key::of(svc.as_ref()));
    }
    let name = p.name_any();
    for s in ctx.slices.state_filter(|s| {
        s.metadata.namespace.as_deref() == Some(ns.as_str())
            && s.endpoints.iter().any(|e| {
                e.target_ref.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
            })
    }) {
        if let Some(svc) = s.labels().get(SERVICE_NAME_LABEL) {
            ctx.q.service.add(Key::new(&ns, svc));
        }
    }
}

/// One port of a slice, comparable.
type Port = (String, i32, String, Option<String>);

/// The service ports as this pod serves them; a named targetPort the pod
/// does not declare leaves that port out.
fn pod_ports(svc: &Service, p: &Pod) -> Vec<Port> {
    let mut out = Vec::new();
    for sp in svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
    {
        let proto = sp.protocol.clone().unwrap_or_else(|| "TCP".into());
        let number = match &sp.target_port {
            None => Some(sp.port),
            Some(IntOrString::Int(n)) => Some(*n),
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => Some(n),
                Err(_) => p
                    .spec
                    .as_ref()
                    .into_iter()
                    .flat_map(|s| s.containers.iter())
                    .flat_map(|c| c.ports.iter().flatten())
                    .find(|cp| {
                        cp.name.as_deref() == Some(s.as_str())
                            && cp.protocol.as_deref().unwrap_or("TCP") == proto
                    })
                    .map(|cp| cp.container_port),
            },
        };
        if let Some(n) = number {
            out.push((
                sp.name.clone().unwrap_or_default(),
                n,
                proto,
                sp.app_protocol.clone(),
            ));
        }
    }
    out
}

fn target_ref(p: &Pod) -> ObjectReference {
    ObjectReference {
        kind: Some("Pod".into()),
        namespace: p.metadata.namespace.clone(),
        name: p.metadata.name.clone(),
        uid: p.metadata.uid.clone(),
        ..Default::default()
    }
}

fn slice_ports(ports: &[Port]) -> Vec<k8s_openapi::api::discovery::v1::EndpointPort> {
    ports
        .iter()
        .map(
            |(name, port, proto, app)| k8s_openapi::api::discovery::v1::EndpointPort {
                name: Some(name.clone()),
                port: Some(*port),
                protocol: Some(proto.clone()),
                app_protocol: app.clone(),
            },
        )
        .collect()
}

fn existing_ports(s: &EndpointSlice) -> Vec<Port> {
    let mut v: Vec<Port> = s
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.port.unwrap_or(0),
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                p.app_protocol.clone(),
            )
        })
        .collect();
    v.sort();
    v
}

pub(super) async fn reconcile(ctx: &Ctx, key: Key) -> Result<Next> {
    let ns = key.ns().to_string();
    let slices_api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let eps_api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &ns);
    let existing: Vec<Arc<EndpointSlice>> = ctx.slices.state_filter(|s| {
        s.metadata.namespace.as_deref() == Some(ns.as_str())
            && is_ours(s)
            && s.labels().get(SERVICE_NAME_LABEL) == Some(&key.name)
    });
    let svc = key.get(&ctx.services);
    let selector_set = svc
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.selector.as_ref())
        .is_some_and(|s| !s.is_empty());
    let Some(svc) = svc.filter(|_| selector_set) else {
        // Gone, or not ours to fill (no selector): our slices go; the
        // Endpoints of a deleted service too.
        for s in existing {
            delete_ignoring_404(&slices_api, &s.name_any()).await?;
        }
        if key.get(&ctx.services).is_none() {
            match eps_api.get_opt(&key.name).await? {
                Some(e)
                    if e.labels()
                        .contains_key("endpointslice.kubernetes.io/skip-mirror") =>
                {
                    delete_ignoring_404(&eps_api, &key.name).await?
                }
                _ => {}
            }
        }
        return Ok(Next::Done);
    };
    let publish_not_ready = svc
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let mut pods: Vec<Arc<Pod>> = ctx.pods.state_filter(|p| {
        p.metadata.namespace.as_deref() == Some(ns.as_str())
            && selects(&svc, p)
            && !podutil::is_terminal(p)
            && p.status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .is_some_and(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok())
    });
    pods.sort_by_key(|p| p.name_any());

    // Group the pods by the ports they resolve to.
    let mut groups: BTreeMap<Vec<Port>, Vec<Endpoint>> = BTreeMap::new();
    let mut subsets: BTreeMap<Vec<Port>, (Vec<EndpointAddress>, Vec<EndpointAddress>)> =
        BTreeMap::new();
    for p in &pods {
        let mut ports = pod_ports(&svc, p);
        ports.sort();
        let ip = p
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default();
        let ready = podutil::is_ready(p);
        let terminating = podutil::is_deleting(p);
        let node = podutil::node_name(p).map(str::to_string);
        let zone = node.as_deref().and_then(|n| {
            ctx.nodes
                .state_filter(|o| o.metadata.name.as_deref() == Some(n))
                .first()
                .and_then(|o| o.labels().get(ZONE_LABEL).cloned())
        });
        groups.entry(ports.clone()).or_default().push(Endpoint {
            zone,
            addresses: vec![ip.clone()],
            conditions: Some(EndpointConditions {
                ready: Some((ready || publish_not_ready) && !terminating),
                serving: Some(ready || publish_not_ready),
                terminating: Some(terminating),
            }),
            node_name: node.clone(),
            target_ref: Some(target_ref(p)),
            ..Default::default()
        });
        if terminating && !publish_not_ready {
            continue;
        }
        let addr = EndpointAddress {
            ip,
            node_name: node,
            target_ref: Some(target_ref(p)),
            hostname: None,
        };
        let e = subsets.entry(ports).or_default();
        if ready || publish_not_ready {
            e.0.push(addr);
        } else {
            e.1.push(addr);
        }
    }
    // Zone hints: each endpoint for its own zone, if every one has a zone.
    if prefers_close(&svc)
        && groups
            .values()
            .flatten()
            .all(|e| e.zone.as_deref().is_some_and(|z| !z.is_empty()))
    {
        for e in groups.values_mut().flatten() {
            e.hints = Some(EndpointHints {
                for_zones: Some(vec![ForZone {
                    name: e.zone.clone().unwrap_or_default(),
                }]),
                ..Default::default()
            });
        }
    }
    // No pods: one empty placeholder slice, as upstream.
    if groups.is_empty() {
        groups.insert(Vec::new(), Vec::new());
    }

    let mut labels: BTreeMap<String, String> = svc.labels().clone();
    labels.insert(SERVICE_NAME_LABEL.into(), key.name.clone());
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    let owner = OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: key.name.clone(),
        uid: svc.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };

    // Reuse existing slices with the same ports, in name order.
    let mut pool: BTreeMap<Vec<Port>, Vec<Arc<EndpointSlice>>> = BTreeMap::new();
    let mut sorted = existing.clone();
    sorted.sort_by_key(|s| s.name_any());
    for s in sorted {
        pool.entry(existing_ports(&s)).or_default().push(s);
    }
    for (ports, eps) in &groups {
        let chunks: Vec<Vec<Endpoint>> = if eps.is_empty() {
            vec![Vec::new()]
        } else {
            eps.chunks(MAX_ENDPOINTS)
                .map(<[Endpoint]>::to_vec)
                .collect()
        };
        for chunk in chunks {
            let reuse = pool
                .get_mut(ports)
                .and_then(|v| (!v.is_empty()).then(|| v.remove(0)));
            let mut want = EndpointSlice {
                metadata: ObjectMeta {
                    generate_name: Some(format!("{}-", key.name)),
                    namespace: Some(ns.clone()),
                    labels: Some(labels.clone()),
                    owner_references: Some(vec![owner.clone()]),
                    ..Default::default()
                },
                address_type: "IPv4".into(),
                endpoints: chunk,
                ports: Some(slice_ports(ports)),
            };
            match reuse {
                Some(cur) => {
                    let same = cur.endpoints == want.endpoints
                        && cur.labels() == &labels
                        && cur.metadata.owner_references == want.metadata.owner_references
                        && existing_ports(&cur) == *ports;
                    if !same {
                        want.metadata.name = cur.metadata.name.clone();
                        want.metadata.generate_name = cur.metadata.generate_name.clone();
                        want.metadata.resource_version = cur.metadata.resource_version.clone();
                        slices_api
                            .replace(&cur.name_any(), &PostParams::default(), &want)
                            .await
                            .context("updating an endpoint slice")?;
                    }
                }
                None => {
                    slices_api
                        .create(&PostParams::default(), &want)
                        .await
                        .context("creating an endpoint slice")?;
                }
            }
        }
    }
    for leftover in pool.into_values().flatten() {
        delete_ignoring_404(&slices_api, &leftover.name_any()).await?;
    }

    sync_endpoints(ctx, &svc, &key, subsets).await?;
    Ok(Next::Done)
}

async fn sync_endpoints(
    _ctx: &Ctx,
    svc: &Service,
    key: &Key,
    subsets: BTreeMap<Vec<Port>, (Vec<EndpointAddress>, Vec<EndpointAddress>)>,
) -> Result<()> {
    let api: Api<Endpoints> = Api::namespaced(_ctx.client.clone(), key.ns());
    let mut want_subsets: Vec<EndpointSubset> = subsets
        .into_iter()
        .filter(|(_, (r, n))| !r.is_empty() || !n.is_empty())
        .map(|(ports, (mut ready, mut not_ready))| {
            ready.sort_by(|a, b| a.ip.cmp(&b.ip));
            not_ready.sort_by(|a, b| a.ip.cmp(&b.ip));
            EndpointSubset {
                addresses: (!ready.is_empty()).then_some(ready),
                not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
                ports: Some(
                    ports
                        .into_iter()
                        .map(|(name, port, proto, app)| EndpointPort {
                            name: (!name.is_empty()).then_some(name),
                            port,
                            protocol: Some(proto),
                            app_protocol: app,
                        })
                        .collect(),
                ),
            }
        })
        .collect();
    want_subsets.retain(|s| s.ports.as_ref().is_some_and(|p| !p.is_empty()));
    let mut labels = svc.labels().clone();
    labels.insert(
        "endpointslice.kubernetes.io/skip-mirror".into(),
        "true".into(),
    );
    let cur = api.get_opt(&key.name).await.context("reading endpoints")?;
    let want = Endpoints {
        metadata: ObjectMeta {
            name: Some(key.name.clone()),
            namespace: Some(key.ns().to_string()),
            labels: Some(labels.clone()),
            resource_version: cur
                .as_ref()
                .and_then(|c| c.metadata.resource_version.clone()),
            ..Default::default()
        },
        subsets: (!want_subsets.is_empty()).then_some(want_subsets),
    };
    match cur {
        None => {
            api.create(&PostParams::default(), &want)
                .await
                .context("creating endpoints")?;
        }
        Some(c) => {
            let same = c.subsets.clone().filter(|s| !s.is_empty()) == want.subsets
                && c.labels() == &labels;
            if !same {
                api.replace(&key.name, &PostParams::default(), &want)
                    .await
                    .context("updating endpoints")?;
            }
        }
    }
    Ok(())
}

async fn delete_ignoring_404<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting {name}")),
    }
}
