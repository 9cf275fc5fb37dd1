//! `cargo run --release -p kcontrol-store --example store-bench-etcd -- [N] [etcd://…]`:
//! the store benchmark on the embedded store (SQLite, synchronous=FULL, in
//! a temporary directory) and on etcd side by side: a one-member and a
//! three-member etcd started on loopback (`/usr/bin/etcd`, data in a
//! temporary directory), or the etcd cluster given as a URL.

use kcontrol_store::bench::{BenchReport, CONCURRENT_WRITERS, bench};
use kcontrol_store::{EtcdOptions, EtcdStore, SqliteStore};
use testbed::etcd::EtcdCluster;

fn row(name: &str, r: &BenchReport) {
    println!(
        "| {name} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} |",
        r.sequential_writes_per_sec,
        r.write_p50.as_secs_f64() * 1e3,
        r.write_p99.as_secs_f64() * 1e3,
        r.concurrent_writes_per_sec,
        r.watch_p50.as_secs_f64() * 1e3,
        r.watch_p99.as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(1000);
    let url = args.next();
    println!(
        "{n} writes per phase, 256-byte values; concurrent = {CONCURRENT_WRITERS} writers; times in ms\n"
    );
    println!(
        "| store | sequential writes/s | write p50 | write p99 | concurrent writes/s | watch p50 | watch p99 |"
    );
    println!("|---|---|---|---|---|---|---|");

    let tmp = tempfile::tempdir()?;
    let sqlite = SqliteStore::open(tmp.path().join("bench.db"))?;
    row(
        "embedded (SQLite, synchronous=FULL)",
        &bench(&sqlite, n).await?,
    );
    drop(sqlite);

    match url {
        Some(url) => {
            let store = EtcdStore::connect_url(&url, EtcdOptions::default()).await?;
            row(&format!("etcd {url}"), &bench(&store, n).await?);
        }
        None => {
            for members in [1, 3] {
                let cluster =
                    tokio::task::spawn_blocking(move || EtcdCluster::start(members)).await??;
                let store =
                    EtcdStore::connect(&cluster.endpoints(), EtcdOptions::default()).await?;
                row(
                    &format!("etcd 3.4, {members} member(s) on loopback"),
                    &bench(&store, n).await?,
                );
            }
        }
    }
    Ok(())
}
