//! `cargo run --release -p kcontrol-store --example store-bench -- [DIR] [N]`:
//! the store benchmark at each `synchronous` setting, in a scratch directory
//! (default: a temporary one; pass a directory on the disk the apiserver uses).

use kcontrol_store::bench::bench;
use kcontrol_store::{SqliteOptions, SqliteStore, Synchronous};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let tmp = tempfile::tempdir()?;
    let dir = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let n: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(1000);
    for synchronous in [Synchronous::Full, Synchronous::Normal, Synchronous::Off] {
        let path = dir.join(format!("bench-{synchronous:?}-{}.db", std::process::id()));
        let store = SqliteStore::open_with(
            &path,
            SqliteOptions {
                synchronous,
                ..Default::default()
            },
        )?;
        let r = bench(&store, n).await?;
        println!(
            "synchronous={synchronous:?}: {n} writes; sequential {:.0}/s (p50 {:?}, p99 {:?}); \
             {} writers {:.0}/s; watch p50 {:?} p99 {:?}",
            r.sequential_writes_per_sec,
            r.write_p50,
            r.write_p99,
            kcontrol_store::bench::CONCURRENT_WRITERS,
            r.concurrent_writes_per_sec,
            r.watch_p50,
            r.watch_p99
        );
        drop(store);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
    Ok(())
}
