//! What the kproxy tests, benchmarks and `cargo xtask` run things on.
//!
//! - [`netns`]: a [`Netns`] guard (`kpt-<pid>-<n>-<role>`, deleted on drop,
//!   with the veths in it) and [`run_in`] to run code inside a namespace;
//! - [`etcd`]: real etcd members on loopback ([`EtcdCluster`]);
//! - [`cluster`]: a single-node cluster (kcontrol + kproxy) on the host or
//!   in a namespace of its own, checked clean after it stops;
//! - [`log`]: the stdout lines of a cluster's processes, searchable;
//! - [`kubectl`] and [`python`]: the real clients;
//! - [`process`], [`util`]: children, commands, polling, the suite lock.
//!
//! Light on purpose (see Cargo.toml): xtask builds it before anything is
//! installed.

pub mod cluster;
pub mod etcd;
pub mod kubectl;
pub mod log;
pub mod netns;
pub mod process;
pub mod python;
pub mod util;

pub use etcd::EtcdCluster;
pub use kubectl::Kubectl;
pub use netns::{Netns, run_in};
pub use util::{SuiteLock, poll_until, require_root};
