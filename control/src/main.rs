//! kcontrol: a small Kubernetes control plane. So far: `kcontrol apiserver`.

mod apiserver;

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
    }
}
