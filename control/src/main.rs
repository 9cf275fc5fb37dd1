//! kcontrol: a small Kubernetes control plane: `kcontrol apiserver`,
//! `kcontrol kubelet`.

mod apiserver;
mod kubelet;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

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
        /// Address to listen on (port 0 picks a free port; the kubeconfig
        /// and the "listening on" line name the real one).
        #[arg(long, default_value = "127.0.0.1:6443")]
        listen: SocketAddr,
        /// ClusterIPs are allocated from this IPv4 range.
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Apiserver {
            data_dir,
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
                listen,
                service_cidr,
                node_port_range,
                compaction_interval: Duration::from_secs(compaction_interval_seconds.max(1)),
                bookmark_interval: Duration::from_secs(bookmark_interval_seconds.max(1)),
            }))
        }
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
    }
}
