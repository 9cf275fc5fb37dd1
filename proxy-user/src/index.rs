//! Every accepted object, by the origin it came from, and the desired state
//! they make. Sources (manifest files, the Kubernetes API) replace the
//! objects of one origin at a time; the index recomputes only the services
//! those objects belong to and records what the touched frontends held
//! before, for [`reconcile::diff_touched`](crate::reconcile::diff_touched).
//!
//! An origin is rejected as a whole (an invalid object, an object another
//! origin already defines, a frontend another service already uses) and
//! then keeps its previous objects.
//!
//! [`ManifestSource`](crate::source::ManifestSource) owns an index for the
//! files of a manifest directory; the Kubernetes API source feeds one
//! through [`Index::set_origin`], one origin per watched object.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{self, DesiredService, DesiredState, Frontend, Node, SliceView, SvcView};
use crate::reconcile::{self, Before, Change};

/// Where objects came from: what a source replaces as a whole.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// A manifest file: all its documents.
    File(PathBuf),
    /// One object watched from the Kubernetes API.
    Api {
        kind: ApiKind,
        namespace: String,
        name: String,
    },
}

/// The kinds watched from the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ApiKind {
    Service,
    EndpointSlice,
}

impl fmt::Display for ApiKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ApiKind::Service => "Service",
            ApiKind::EndpointSlice => "EndpointSlice",
        })
    }
}

impl fmt::Display for Origin {
    /// The file's path; `api/<Kind>/<namespace>/<name>` for API objects
    /// (how `kproxy: rejected …` lines name them).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Api {
                kind,
                namespace,
                name,
            } => write!(f, "api/{kind}/{namespace}/{name}"),
        }
    }
}

/// Objects of an origin that were refused, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub origin: Origin,
    pub message: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

impl std::error::Error for Rejected {}

/// What one update of the index did.
#[derive(Default)]
pub struct Refresh {
    /// Changes to apply, removals first.
    pub changes: Vec<Change>,
    /// Origins rejected in this update (their previous content is kept).
    pub rejected: Vec<Rejected>,
    /// Manifest files re-read (always 0 for [`Index::set_origin`]).
    pub files_read: usize,
}

/// (namespace, name) of a Service.
type SvcId = (String, String);

/// The validated objects of one origin.
#[derive(Clone, Debug, Default)]
pub struct Entry {
    services: Vec<SvcView>,
    slices: Vec<SliceView>,
}

impl Entry {
    /// Validates objects; the first invalid one rejects them all, as does
    /// the same object twice.
    pub fn new<'a>(
        origin: &Origin,
        node: &Node,
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
    ) -> Result<Entry, Rejected> {
        let reject = |message: String| Rejected {
            origin: origin.clone(),
            message,
        };
        let err = |e: model::ObjectError| reject(e.to_string());
        let mut entry = Entry::default();
        for s in services {
            entry
                .services
                .push(model::view_service(s, node).map_err(err)?);
        }
        for s in slices {
            if let Some(v) = model::view_slice(s).map_err(err)? {
                entry.slices.push(v);
            }
        }
        // The same object twice in one file is as wrong as in two files.
        let mut ids = BTreeSet::new();
        for s in &entry.services {
            if !ids.insert(("Service", &s.ns, &s.name)) {
                return Err(reject(format!(
                    "Service {}/{}: defined twice in this file",
                    s.ns, s.name
                )));
            }
        }
        for s in &entry.slices {
            if !ids.insert(("EndpointSlice", &s.ns, &s.name)) {
                return Err(reject(format!(
                    "EndpointSlice {}/{}: defined twice in this file",
                    s.ns, s.name
                )));
            }
        }
        Ok(entry)
    }

    fn is_empty(&self) -> bool {
        self.services.is_empty() && self.slices.is_empty()
    }

    fn svc_ids(&self) -> impl Iterator<Item = SvcId> + '_ {
        self.services
            .iter()
            .map(|s| (s.ns.clone(), s.name.clone()))
            .chain(
                self.slices
                    .iter()
                    .map(|s| (s.ns.clone(), s.service.clone())),
            )
    }
}

/// The objects of every origin and the desired state they make.
#[derive(Default)]
pub struct Index {
    origins: BTreeMap<Origin, Entry>,
    services: BTreeMap<SvcId, (Origin, SvcView)>,
    /// service → (origin, slice name) → slice
    slices: BTreeMap<SvcId, BTreeMap<(Origin, String), SliceView>>,
    /// (namespace, slice name) → origin, to catch a slice defined twice.
    slice_origins: BTreeMap<(String, String), Origin>,
    frontends_of: BTreeMap<SvcId, Vec<Frontend>>,
    owner: BTreeMap<Frontend, SvcId>,
    /// healthCheckNodePort → the service holding it.
    health_owner: BTreeMap<u16, SvcId>,
    state: DesiredState,
    node: Node,
}

impl Index {
    /// An empty index for `node` (which endpoints are local, which
    /// nodePorts are valid).
    pub fn new(node: Node) -> Index {
        Index {
            node,
            ..Index::default()
        }
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The desired state of every accepted origin.
    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// Origins that currently contribute objects.
    pub fn origins(&self) -> impl Iterator<Item = &Origin> {
        self.origins.keys()
    }

    /// Sets the objects of one origin — in practice one object watched from
    /// the Kubernetes API — and returns the changes. A rejected origin keeps
    /// its previous content, exactly like a rejected manifest file.
    pub fn set_origin(
        &mut self,
        origin: &Origin,
        services: &[Service],
        slices: &[EndpointSlice],
    ) -> Refresh {
        let mut out = Refresh::default();
        let mut before = Before::new();
        match Entry::new(origin, &self.node, services, slices) {
            Ok(entry) => {
                if let Err(e) = self.replace(origin, entry, &mut before) {
                    out.rejected.push(e);
                }
            }
            Err(e) => out.rejected.push(e),
        }
        out.changes = reconcile::diff_touched(&before, self.state());
        out
    }

    /// Swaps an origin's objects for `new` and returns the old ones, or
    /// rejects `new` and keeps the old. Every frontend whose value may
    /// change gets its value from before the first swap in `before`.
    pub fn replace(
        &mut self,
        origin: &Origin,
        new: Entry,
        before: &mut Before,
    ) -> Result<Entry, Rejected> {
        let reject = |message: String| Rejected {
            origin: origin.clone(),
            message,
        };
        // Objects defined by another origin too.
        for s in &new.services {
            let id = (s.ns.clone(), s.name.clone());
            if let Some((other, _)) = self.services.get(&id).filter(|(o, _)| o != origin) {
                return Err(reject(format!(
                    "Service {}/{}: also defined in {other}",
                    s.ns, s.name
                )));
            }
        }
        for s in &new.slices {
            if let Some(other) = self
                .slice_origins
                .get(&(s.ns.clone(), s.name.clone()))
                .filter(|o| *o != origin)
            {
                return Err(reject(format!(
                    "EndpointSlice {}/{}: also defined in {other}",
                    s.ns, s.name
                )));
            }
        }
        let old = self.origins.remove(origin).unwrap_or_default();
        let affected: BTreeSet<SvcId> = old.svc_ids().chain(new.svc_ids()).collect();
        self.unindex(origin, &old);
        self.index(origin, &new);
        // New frontends of the affected services; a frontend already owned
        // by a service outside this change is a conflict.
        let mut computed: BTreeMap<SvcId, Vec<(Frontend, DesiredService)>> = BTreeMap::new();
        let mut claimed: BTreeMap<Frontend, SvcId> = BTreeMap::new();
        let mut health: BTreeMap<u16, (SvcId, model::HealthCheck)> = BTreeMap::new();
        let mut conflict = None;
        for id in &affected {
            let (fes, check) = match self.services.get(id) {
                Some((_, svc)) => {
                    let slices = self.slices.get(id);
                    let slices = slices.into_iter().flat_map(|m| m.values());
                    (
                        model::frontends(svc, &self.node, slices.clone()),
                        model::health_check(svc, &self.node, slices),
                    )
                }
                None => (Vec::new(), None),
            };
            if let Some((port, check)) = check {
                let holder = health.get(&port).map(|(o, _)| o).or_else(|| {
                    self.health_owner
                        .get(&port)
                        .filter(|o| !affected.contains(*o))
                });
                if let Some(holder) = holder {
                    conflict = Some(format!(
                        "Service {}/{}: healthCheckNodePort {port} is already used by Service {}/{}",
                        id.0, id.1, holder.0, holder.1
                    ));
                }
                health.insert(port, (id.clone(), check));
            }
            for (fe, _) in &fes {
                let holder = claimed
                    .get(fe)
                    .or_else(|| self.owner.get(fe).filter(|o| !affected.contains(*o)));
                if let Some(holder) = holder {
                    conflict = Some(format!(
                        "Service {}/{}: frontend {fe} is already used by Service {}/{}",
                        id.0, id.1, holder.0, holder.1
                    ));
                }
                claimed.insert(*fe, id.clone());
            }
            computed.insert(id.clone(), fes);
        }
        if let Some(message) = conflict {
            self.unindex(origin, &new);
            self.index(origin, &old);
            if !old.is_empty() {
                self.origins.insert(origin.clone(), old);
            }
            return Err(reject(message));
        }
        self.health_owner.retain(|port, id| {
            let keep = !affected.contains(id);
            if !keep {
                self.state.health_checks.remove(port);
            }
            keep
        });
        for (port, (id, check)) in health {
            self.health_owner.insert(port, id);
            self.state.health_checks.insert(port, check);
        }
        for id in &affected {
            for fe in self.frontends_of.remove(id).unwrap_or_default() {
                before
                    .entry(fe)
                    .or_insert_with(|| self.state.services.get(&fe).cloned());
                self.state.services.remove(&fe);
                self.owner.remove(&fe);
            }
        }
        for (id, fes) in computed {
            let mut list = Vec::with_capacity(fes.len());
            for (fe, desired) in fes {
                before
                    .entry(fe)
                    .or_insert_with(|| self.state.services.get(&fe).cloned());
                self.state.services.insert(fe, desired);
                self.owner.insert(fe, id.clone());
                list.push(fe);
            }
            if !list.is_empty() {
                self.frontends_of.insert(id, list);
            }
        }
        if !new.is_empty() {
            self.origins.insert(origin.clone(), new);
        }
        Ok(old)
    }

    fn index(&mut self, origin: &Origin, e: &Entry) {
        for s in &e.services {
            self.services
                .insert((s.ns.clone(), s.name.clone()), (origin.clone(), s.clone()));
        }
        for s in &e.slices {
            self.slices
                .entry((s.ns.clone(), s.service.clone()))
                .or_default()
                .insert((origin.clone(), s.name.clone()), s.clone());
            self.slice_origins
                .insert((s.ns.clone(), s.name.clone()), origin.clone());
        }
    }

    fn unindex(&mut self, origin: &Origin, e: &Entry) {
        for s in &e.services {
            self.services.remove(&(s.ns.clone(), s.name.clone()));
        }
        for s in &e.slices {
            let id = (s.ns.clone(), s.service.clone());
            if let Some(m) = self.slices.get_mut(&id) {
                m.remove(&(origin.clone(), s.name.clone()));
                if m.is_empty() {
                    self.slices.remove(&id);
                }
            }
            self.slice_origins.remove(&(s.ns.clone(), s.name.clone()));
        }
    }
}
