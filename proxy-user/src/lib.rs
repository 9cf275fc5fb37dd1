//! kproxy, the node agent: desired state from Kubernetes objects, a pure
//! diff, and a datapath (eBPF or iptables) that applies the diff.
//!
//! Object path: `source` (manifest files) or `kube_source` (the API) →
//! `model` → `reconcile` → `datapath::Datapath::apply` → eBPF maps or
//! iptables rules; `agent` is the loop that drives it.

pub mod agent;
pub mod datapath;
pub mod index;
pub mod kube_source;
pub mod links;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod pktgen;
pub mod reconcile;
pub mod source;
pub mod watch;

// The paths tests and benchmarks have used since before `datapath/`.
pub use datapath::ebpf as dataplane;
pub use datapath::iptables;
