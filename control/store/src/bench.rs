//! A small benchmark of any [`Store`]: write throughput and watch latency.
//! It writes under `/bench/<revision>/`; use a scratch store.

use std::time::{Duration, Instant};

use crate::conformance::join_all;
use crate::{Result, Store, StoreError};

/// Concurrent writers in the concurrent phase.
pub const CONCURRENT_WRITERS: usize = 16;

#[derive(Clone, Debug)]
pub struct BenchReport {
    /// Writes in each phase.
    pub writes: usize,
    /// Sequential creates: each awaited before the next.
    pub sequential_writes_per_sec: f64,
    pub write_p50: Duration,
    pub write_p99: Duration,
    /// [`CONCURRENT_WRITERS`] writers creating `writes` keys in all.
    pub concurrent_writes_per_sec: f64,
    /// From the start of an update to its event arriving on a watch.
    pub watch_p50: Duration,
    pub watch_p99: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub async fn bench<S: Store + ?Sized>(store: &S, n: usize) -> Result<BenchReport> {
    let n = n.max(1);
    let prefix = format!("/bench/{}/", store.current_revision().await?);

    // Sequential creates.
    let mut latencies = Vec::with_capacity(n);
    let mut revisions = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        revisions.push(
            store
                .create(&format!("{prefix}seq/{i:08}"), vec![b'x'; 256])
                .await?,
        );
        latencies.push(t.elapsed());
    }
    let sequential_writes_per_sec = n as f64 / start.elapsed().as_secs_f64();
    latencies.sort();

    // Concurrent creates.
    let start = Instant::now();
    let writers = (0..CONCURRENT_WRITERS).map(|w| {
        let prefix = &prefix;
        async move {
            for i in (w..n).step_by(CONCURRENT_WRITERS) {
                store
                    .create(&format!("{prefix}par/{i:08}"), vec![b'x'; 256])
                    .await?;
            }
            Ok::<_, StoreError>(())
        }
    });
    for r in join_all(writers.collect()).await {
        r?;
    }
    let concurrent_writes_per_sec = n as f64 / start.elapsed().as_secs_f64();

    // Watch latency: update, then wait for that update's event.
    let mut watch = store
        .watch(&format!("{prefix}seq/"), store.current_revision().await?)
        .await?;
    let mut watch_latencies = Vec::with_capacity(n);
    for (i, revision) in revisions.into_iter().enumerate() {
        let t = Instant::now();
        let written = store
            .update(&format!("{prefix}seq/{i:08}"), vec![b'y'; 256], revision)
            .await?;
        loop {
            match watch.recv().await {
                Some(Ok(e)) if e.kv.mod_revision == written => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(StoreError::Backend(anyhow::anyhow!(
                        "bench: the watch ended"
                    )));
                }
            }
        }
        watch_latencies.push(t.elapsed());
    }
    watch_latencies.sort();

    Ok(BenchReport {
        writes: n,
        sequential_writes_per_sec,
        write_p50: percentile(&latencies, 0.50),
        write_p99: percentile(&latencies, 0.99),
        concurrent_writes_per_sec,
        watch_p50: percentile(&watch_latencies, 0.50),
        watch_p99: percentile(&watch_latencies, 0.99),
    })
}
