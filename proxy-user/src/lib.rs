//! kproxy, the node agent: desired state from Kubernetes objects, a pure
//! diff, and an eBPF dataplane that applies the diff to its maps.
//!
//! Object path: `manifests` (or, later, the API) → `model::build` →
//! `reconcile::diff` → `dataplane::Dataplane::apply` → eBPF maps.

pub mod dataplane;
pub mod iptables;
pub mod kube_source;
pub mod links;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod pktgen;
pub mod reconcile;
pub mod source;
pub mod watch;
