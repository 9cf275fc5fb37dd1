//! Test harness of kproxy's namespace-based integration tests.
//!
//! - [`netns`]: a [`Netns`] guard (`kpt-<pid>-<n>-<role>`, deleted on drop)
//!   and [`run_in`] to run code (and create sockets) inside a namespace;
//! - [`topology`]: client/node/backend namespaces wired with veths;
//! - [`servers`]: "which backend are you" TCP/UDP servers in the backends;
//! - [`client`]: probes run from the client namespace;
//! - [`manifest`]: Service/EndpointSlice YAML and an atomically written
//!   manifest directory;
//! - [`kproxy`]: the kproxy process guard;
//! - [`mode`]: the datapath under test (`KPROXY_MODE`: eBPF or iptables);
//! - [`fixture`]: the standard `web` scenario used by the tests;
//! - [`bpf`]: what is attached to an interface (tc, tcx links);
//! - [`iptables`]: kproxy's `KUBE-` rules in a namespace (iptables mode).
//!
//! Everything here needs root. See README.md for the rules of the suite.

pub mod apiserver;
pub mod bpf;
pub mod client;
pub mod cluster;
pub mod fixture;
pub mod iptables;
pub mod kproxy;
pub mod manifest;
pub mod mode;
pub mod netns;
pub mod nftables;
pub mod servers;
pub mod topology;
pub mod util;

pub use client::{
    TcpSession, UdpSession, http_get, tcp_ask, tcp_connect_error, udp_ask, udp_connect_error,
};
pub use fixture::Fixture;
pub use kproxy::Kproxy;
pub use manifest::{ManifestDir, endpointslice_yaml, multi_doc, service_yaml};
pub use mode::{Mode, mode};
pub use netns::{Netns, run_in};
pub use servers::{BackendServer, Servers};
pub use topology::{Backend, Client, Topology, backend_ip, backend_name};
pub use util::{SuiteLock, poll_until, require_root};
