//! A whole single-node cluster for end-to-end tests: testbed's cluster
//! runner ([`testbed::cluster`]) with `kcontrol all` (or its components as
//! separate processes) inside a node network namespace of its own, kproxy
//! (eBPF, unpinned) following its API and attaching to each pod's veth, and
//! real kubectl as the client.
//!
//! Dropping the cluster stops kproxy, then kcontrol with SIGTERM (the
//! kubelet removes pods, namespaces, veths, bridge and cgroups), then
//! checks and force-removes anything left; the node namespace goes last.

use std::sync::Arc;

use anyhow::Result;
use testbed::cluster::{Layout, Options, Place, Store};
use testbed::log::{Echo, Log};

pub use testbed::cluster::{Cluster, Container};

use crate::apiserver::kcontrol_bin;
use crate::kproxy::{KPROXY_LOG_LEVEL_ENV, kproxy_bin};

/// Node name, bridge and pod CIDR of the test node (distinct from what
/// `cargo xtask up` uses on the host).
pub const NODE: &str = "e2e-node";
pub const BRIDGE: &str = "kce2e0";
pub const POD_CIDR: &str = "10.244.77.0/24";
/// Host-side pod veths carry this prefix (the kubelet's naming rules).
pub const VETH_PREFIX: &str = kcontrol_names::VETH_PREFIX;

fn options(layout: Layout, store: Store, extra: &[&str]) -> Options {
    let mut kproxy_args = vec!["--no-pin".to_string()];
    if let Ok(level) = std::env::var(KPROXY_LOG_LEVEL_ENV) {
        kproxy_args.extend(["--log-level".to_string(), level]);
    }
    Options {
        kcontrol: kcontrol_bin(),
        kproxy: kproxy_bin(),
        data_dir: std::env::temp_dir().join(format!("kpt-cluster-{}", std::process::id())),
        place: Place::Netns,
        layout,
        store,
        node: NODE.into(),
        bridge: BRIDGE.into(),
        pod_cidr: POD_CIDR.into(),
        listen: Some("127.0.0.1:6443".into()),
        kcontrol_args: extra.iter().map(|s| s.to_string()).collect(),
        kproxy_args,
        pin_dir: None,
        suite_lock: true,
        remove_data_dir: true,
    }
}

fn start_with(opts: Options) -> Result<Cluster> {
    Cluster::start(opts, Arc::new(Log::new(Echo::Stderr)))
}

/// Starts `kcontrol all` in a fresh node namespace, then kproxy, and waits
/// for the node to be Ready and kproxy to be ready. `extra` goes to
/// `kcontrol all`.
pub fn start(extra: &[&str]) -> Result<Cluster> {
    start_with(options(Layout::All, Store::Embedded, extra))
}

/// [`start`] with `kcontrol all --store etcd://…`: a one-member etcd runs
/// in the node namespace (loopback) and is stopped after kcontrol.
pub fn start_on_etcd() -> Result<Cluster> {
    start_with(options(Layout::All, Store::Etcd, &[]))
}

/// The same node as separate processes — apiserver, scheduler,
/// controller-manager (node monitor grace `grace`), kubelet (lease renewed
/// every second) — so one of them can be paused ([`Cluster::signal`]).
pub fn start_split(grace: &str) -> Result<Cluster> {
    let layout = Layout::Split {
        node_monitor_grace: grace.into(),
    };
    start_with(options(layout, Store::Embedded, &[]))
}
