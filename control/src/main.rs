//! kcontrol: a small Kubernetes control plane. So far: `kcontrol apiserver`
//! and `kcontrol migrate` (embedded store → etcd).

mod apiserver;
mod migrate;

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
        /// `etcd://HOST:PORT[,HOST:PORT…]` keeps the objects in an etcd
        /// cluster (several apiservers can share it); by default they are
        /// in the embedded store in --data-dir.
        #[arg(long)]
        store: Option<String>,
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
    }
}
