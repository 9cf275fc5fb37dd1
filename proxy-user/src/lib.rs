//! kproxy, the node agent: desired state from Kubernetes objects, a pure
//! diff, and a datapath (eBPF or iptables) that applies the diff.
//!
//! Object path: `source` (manifest files) or `kube_source` (the API) →
//! `index` (objects by origin, validated and turned into the desired state
//! by `model`) → `reconcile` (the diff, as `Change`s) →
//! `datapath::Datapath::apply` → eBPF maps or iptables rules; `agent` is
//! the loop that drives it; `health` serves `healthCheckNodePort`s.

pub mod agent;
pub mod datapath;
pub mod health;
pub mod index;
pub mod inspect;
pub mod kube_source;
pub mod links;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod pktgen;
pub mod reconcile;
pub mod source;
pub mod watch;
