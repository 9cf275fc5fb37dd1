//! The Kubernetes API source: Services and EndpointSlices from any
//! apiserver (kcontrol or a real cluster) through kube-rs runtime watchers.
//!
//! Each watched object is one [`Origin::Api`] of an [`Index`], set through
//! [`Index::set_origin`]; the manifests mode feeds the same kind of index
//! from files, so both modes share one desired-state model and one
//! diff-and-apply path. The watchers re-list after the apiserver comes
//! back; a re-list only upserts what it sees and, when it is complete,
//! removes what it did not see — working state is never flushed.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Config, ResourceExt};
use tokio::sync::mpsc;

use crate::index::{ApiKind, Index, Origin, Refresh};

/// An event from one of the two watchers.
pub enum ApiEvent {
    // Boxed: the two object types differ a lot in size.
    Service(Box<Event<Service>>),
    Slice(Box<Event<EndpointSlice>>),
    /// A watcher error (it retries with backoff).
    Error(String),
}

/// Builds a client from a kubeconfig file, or in-cluster / $KUBECONFIG
/// inference when `kubeconfig` is `None`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => Config::infer()
            .await
            .context("no kubeconfig given and no in-cluster configuration found")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// Starts both watchers; events arrive on the returned channel.
/// The `topology.kubernetes.io/zone` label of Node `name`, read once at
/// start (`None`: no such node, no label, or the read failed — logged;
/// topology hints are then ignored, never a reason not to start).
pub async fn node_zone(client: &Client, name: &str) -> Option<String> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    match nodes.get_opt(name).await {
        Ok(Some(n)) => {
            let zone = n.labels().get(ZONE_LABEL).cloned();
            if let Some(z) = &zone {
                log::info!("node {name} is in zone {z} ({ZONE_LABEL})");
            }
            zone
        }
        Ok(None) => None,
        Err(e) => {
            log::warn!("reading Node {name} for its zone: {e}; topology hints ignored");
            None
        }
    }
}

/// The Node label naming its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

pub fn spawn_watchers(client: Client) -> mpsc::Receiver<ApiEvent> {
    let (tx, rx) = mpsc::channel(1024);
    let svc_tx = tx.clone();
    let services: Api<Service> = Api::all(client.clone());
    tokio::spawn(async move {
        let mut s = watcher::watcher(services, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = s.next().await {
            let msg = match ev {
                Ok(ev) => ApiEvent::Service(Box::new(ev)),
                Err(e) => ApiEvent::Error(format!("Service watch: {e}")),
            };
            if svc_tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    let slices: Api<EndpointSlice> = Api::all(client);
    tokio::spawn(async move {
        let mut s = watcher::watcher(slices, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = s.next().await {
            let msg = match ev {
                Ok(ev) => ApiEvent::Slice(Box::new(ev)),
                Err(e) => ApiEvent::Error(format!("EndpointSlice watch: {e}")),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    rx
}

fn origin(kind: ApiKind, ns: Option<String>, name: String) -> Origin {
    Origin::Api {
        kind,
        namespace: ns.unwrap_or_else(|| "default".into()),
        name,
    }
}

/// Folds watcher events into an [`Index`]. Tracks re-lists per kind.
#[derive(Default)]
pub struct ApiState {
    svc_relist: Option<BTreeSet<Origin>>,
    slice_relist: Option<BTreeSet<Origin>>,
    /// Both watchers finished their first list.
    services_listed: bool,
    slices_listed: bool,
}

impl ApiState {
    pub fn synced(&self) -> bool {
        self.services_listed && self.slices_listed
    }

    pub fn handle(&mut self, index: &mut Index, ev: ApiEvent) -> Refresh {
        match ev {
            ApiEvent::Service(ev) => {
                let (relist, listed) = (&mut self.svc_relist, &mut self.services_listed);
                fold(index, *ev, ApiKind::Service, relist, listed, |i, o| {
                    i.set_origin(o.0, std::slice::from_ref(o.1), &[])
                })
            }
            ApiEvent::Slice(ev) => {
                let (relist, listed) = (&mut self.slice_relist, &mut self.slices_listed);
                fold(
                    index,
                    *ev,
                    ApiKind::EndpointSlice,
                    relist,
                    listed,
                    |i, o| i.set_origin(o.0, &[], std::slice::from_ref(o.1)),
                )
            }
            ApiEvent::Error(e) => {
                log::warn!("{e} (retrying)");
                Refresh::default()
            }
        }
    }
}

fn fold<K: kube::Resource + Clone>(
    index: &mut Index,
    ev: Event<K>,
    kind: ApiKind,
    relist: &mut Option<BTreeSet<Origin>>,
    listed: &mut bool,
    set: impl Fn(&mut Index, (&Origin, &K)) -> Refresh,
) -> Refresh {
    let key = |o: &K| origin(kind, o.namespace(), o.name_any());
    match ev {
        Event::Apply(o) => set(index, (&key(&o), &o)),
        Event::InitApply(o) => {
            let k = key(&o);
            relist.get_or_insert_with(BTreeSet::new).insert(k.clone());
            set(index, (&k, &o))
        }
        Event::Delete(o) => index.set_origin(&key(&o), &[], &[]),
        Event::Init => {
            *relist = Some(BTreeSet::new());
            Refresh::default()
        }
        Event::InitDone => {
            *listed = true;
            // Objects that disappeared while we were not watching.
            let seen = relist.take().unwrap_or_default();
            let mut out = Refresh::default();
            let origins: Vec<Origin> = index.origins().cloned().collect();
            for o in origins {
                let this_kind = matches!(&o, Origin::Api { kind: k, .. } if *k == kind);
                if this_kind && !seen.contains(&o) {
                    let r = index.set_origin(&o, &[], &[]);
                    out.changes.extend(r.changes);
                    out.rejected.extend(r.rejected);
                }
            }
            out
        }
    }
}
