//! kcontrol: a small Kubernetes control plane: `kcontrol apiserver`,
//! `kcontrol scheduler`, `kcontrol controller-manager`, `kcontrol kubelet`,
//! `kcontrol all` (all four in one process for a single-node cluster, as k3s),
//! and `kcontrol migrate` (embedded store → etcd).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kcontrol::{
    all, apiserver, client_from, controllers, kubelet, migrate, parse_duration, scheduler,
};

#[derive(Parser)]
#[command(name = "kcontrol", version, about = "A small Kubernetes control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a subset of the Kubernetes API over HTTPS on a durable store.
    Apiserver {
        /// Store, CA, admin token and admin kubeconfig (DIR/kubeconfig.yaml).
        #[arg(long)]
        data_dir: PathBuf,
        /// `etcd://HOST:PORT[,HOST:PORT…]` keeps the objects in an etcd
        /// cluster (several apiservers can share it); by default they are
        /// in the embedded store in --data-dir.
        #[arg(long)]
        store: Option<String>,
        /// Address to listen on (port 0 picks a free port; the kubeconfig
        /// and the "listening on" line name the real one).
        #[arg(long, default_value = "127.0.0.1:6443")]
        listen: SocketAddr,
        /// ClusterIPs are allocated from this range: one CIDR, or an IPv4
        /// and an IPv6 one separated by a comma for dual-stack Services
        /// (the first is the primary family; IPv6: /108 to /126).
        #[arg(long, default_value = "10.96.0.0/12")]
        service_cidr: String,
        /// NodePorts are allocated from this range.
        #[arg(long, default_value = "30000-32767")]
        node_port_range: String,
        /// History older than this is compacted away (watches from before
        /// it get 410 Gone).
        #[arg(long, default_value_t = 300)]
        compaction_interval_seconds: u64,
        /// Period of BOOKMARK events on watches that allow them.
        #[arg(long, default_value_t = 60)]
        bookmark_interval_seconds: u64,
    },
    /// Copy the embedded store of a data dir into etcd (stop the apiserver
    /// first; start it again with --store etcd://…).
    Migrate {
        /// The apiserver's --data-dir (its store.db is read).
        #[arg(long)]
        from: PathBuf,
        /// `etcd://HOST:PORT[,HOST:PORT…]`.
        #[arg(long)]
        to: String,
    },
    /// Assign pending pods to nodes (filters, least-allocated score, binding).
    Scheduler {
        /// Kubeconfig of the apiserver to talk to.
        #[arg(long)]
        kubeconfig: PathBuf,
        /// Pods with this spec.schedulerName are ours.
        #[arg(long, default_value = "default-scheduler")]
        scheduler_name: String,
        /// Unschedulable pods are retried at least this often.
        #[arg(long, default_value_t = 30)]
        retry_interval_seconds: u64,
    },
    /// Run the controllers: deployments, replica sets, endpoint slices and
    /// endpoints, node lifecycle, garbage collection.
    ControllerManager {
        /// Kubeconfig of the apiserver to talk to.
        #[arg(long)]
        kubeconfig: PathBuf,
        /// A node whose heartbeat is older than this turns NotReady.
        #[arg(long, default_value = "40s", value_parser = parse_duration)]
        node_monitor_grace_period: Duration,
        /// Pods of a node NotReady for this long are deleted.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        pod_eviction_timeout: Duration,
        /// Every object is reconciled again at least this often.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        resync_period: Duration,
    },
    /// Run the pods bound to one node as crun containers.
    Kubelet {
        /// kubeconfig of the apiserver to join.
        #[arg(long)]
        kubeconfig: PathBuf,
        #[arg(long)]
        node_name: String,
        /// Pod addresses; the first one goes to the bridge (the gateway).
        #[arg(long, default_value = "10.244.0.0/24")]
        pod_cidr: String,
        /// State: crun root, bundles, container logs, address records.
        #[arg(long, default_value = "/var/lib/kcontrol/kubelet")]
        root_dir: PathBuf,
        #[arg(long, default_value = kubelet::DEFAULT_BRIDGE)]
        bridge: String,
        #[arg(long, default_value = "crun")]
        crun: PathBuf,
        /// The image `busybox` (any tag) resolves to (built by `cargo xtask setup`).
        #[arg(long, default_value = kubelet::DEFAULT_BUSYBOX_ROOTFS)]
        busybox_rootfs: PathBuf,
        #[arg(long, default_value_t = 10)]
        lease_renew_seconds: u64,
        #[arg(long, default_value_t = 60)]
        node_status_seconds: u64,
        /// First container restart back-off (doubling up to 300 s).
        #[arg(long, default_value_t = 10_000)]
        restart_backoff_ms: u64,
    },
    /// One node in one process: apiserver, scheduler, controller-manager and
    /// kubelet, on the embedded store (as k3s does) or on etcd.
    All {
        /// Store, certificates, admin kubeconfig (DIR/kubeconfig.yaml) and
        /// the kubelet's state (DIR/kubelet).
        #[arg(long)]
        data_dir: PathBuf,
        /// `etcd://HOST:PORT[,HOST:PORT…]`: the objects live in etcd
        /// instead of the embedded store in --data-dir.
        #[arg(long)]
        store: Option<String>,
        #[arg(long, default_value = "127.0.0.1:6443")]
        listen: SocketAddr,
        /// ClusterIPs are allocated from this range (as `apiserver
        /// --service-cidr`: an IPv4 and an IPv6 CIDR, comma-separated,
        /// for dual-stack; the kubelet's pods are IPv4 only).
        #[arg(long, default_value = "10.96.0.0/12")]
        service_cidr: String,
        /// Name of this node (default: the host name).
        #[arg(long)]
        node_name: Option<String>,
        #[arg(long, default_value = "10.244.0.0/24")]
        pod_cidr: String,
        #[arg(long, default_value = kubelet::DEFAULT_BRIDGE)]
        bridge: String,
        #[arg(long, default_value = kubelet::DEFAULT_BUSYBOX_ROOTFS)]
        busybox_rootfs: PathBuf,
        /// A node whose heartbeat is older than this turns NotReady.
        #[arg(long, default_value = "40s", value_parser = parse_duration)]
        node_monitor_grace_period: Duration,
        /// How often the kubelet renews its Lease.
        #[arg(long, default_value_t = 10)]
        lease_renew_seconds: u64,
    },
}

/// Runs `f` until it ends or SIGINT/SIGTERM arrives.
fn run_until_signal<F: std::future::Future<Output = anyhow::Result<()>>>(
    f: impl FnOnce() -> F,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = f() => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = term.recv() => Ok(()),
        }
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Apiserver {
            data_dir,
            store,
            listen,
            service_cidr,
            node_port_range,
            compaction_interval_seconds,
            bookmark_interval_seconds,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(apiserver::run(apiserver::Config {
                data_dir,
                store,
                listen,
                service_cidr,
                node_port_range,
                compaction_interval: Duration::from_secs(compaction_interval_seconds.max(1)),
                bookmark_interval: Duration::from_secs(bookmark_interval_seconds.max(1)),
            }))
        }
        Command::Migrate { from, to } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let r = rt.block_on(migrate::run(&from, &to))?;
            println!(
                "kcontrol: migrated {} keys ({} were already there) from {} (revision {}) to {to} (revision {}); \
                 resourceVersions are etcd's from now on: clients relist",
                r.copied + r.already,
                r.already,
                from.display(),
                r.source_revision,
                r.target_revision
            );
            Ok(())
        }
        Command::Scheduler {
            kubeconfig,
            scheduler_name,
            retry_interval_seconds,
        } => run_until_signal(|| async move {
            let client = client_from(&kubeconfig).await?;
            scheduler::run(
                client,
                scheduler::Config {
                    scheduler_name,
                    retry_interval: Duration::from_secs(retry_interval_seconds.max(1)),
                },
            )
            .await
        }),
        Command::ControllerManager {
            kubeconfig,
            node_monitor_grace_period,
            pod_eviction_timeout,
            resync_period,
        } => run_until_signal(|| async move {
            let client = client_from(&kubeconfig).await?;
            controllers::run(
                client,
                controllers::Config {
                    node_monitor_grace_period,
                    pod_eviction_timeout,
                    resync_period: resync_period.max(Duration::from_millis(100)),
                },
            )
            .await
        }),
        Command::Kubelet {
            kubeconfig,
            node_name,
            pod_cidr,
            root_dir,
            bridge,
            crun,
            busybox_rootfs,
            lease_renew_seconds,
            node_status_seconds,
            restart_backoff_ms,
        } => {
            let mut cfg = kubelet::Config::new(&node_name, &pod_cidr, &root_dir);
            cfg.bridge = bridge;
            cfg.crun = crun;
            cfg.busybox_rootfs = busybox_rootfs;
            cfg.lease_renew_interval = Duration::from_secs(lease_renew_seconds.max(1));
            cfg.node_status_interval = Duration::from_secs(node_status_seconds.max(1));
            cfg.restart_backoff_base = Duration::from_millis(restart_backoff_ms.max(1));
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let kc = kube::config::Kubeconfig::read_from(&kubeconfig)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", kubeconfig.display()))?;
                let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| anyhow::anyhow!("kubeconfig {}: {e}", kubeconfig.display()))?;
                let client = kube::Client::try_from(config)?;
                kubelet::run(client, cfg).await
            })
        }
        Command::All {
            data_dir,
            store,
            listen,
            service_cidr,
            node_name,
            pod_cidr,
            bridge,
            busybox_rootfs,
            node_monitor_grace_period,
            lease_renew_seconds,
        } => all::run(all::Options {
            data_dir,
            store,
            listen,
            service_cidr,
            node_name,
            pod_cidr,
            bridge,
            busybox_rootfs,
            node_monitor_grace_period,
            lease_renew_interval: Duration::from_secs(lease_renew_seconds.max(1)),
        }),
    }
}
