//! `kcontrol apiserver`: a subset of the Kubernetes API over HTTPS, on the
//! durable store of `kcontrol-store`.
//!
//! A request goes: TLS + HTTP/1.1 or HTTP/2 (this file) → authentication
//! (`auth.rs`) → routing (`router.rs`; discovery in `discovery.rs`) → a
//! generic verb (`verbs/`), which asks the kind's strategy (`registry/`)
//! for defaulting, validation (shared validators in `validate.rs`) and
//! side effects (Service addresses in `allocate/`) → the store (objects
//! and revisions: `object.rs`) → watchers (`watch.rs`). Responses are
//! JSON, YAML or Tables (`table.rs`).

pub mod allocate;
pub mod apply;
pub mod auth;
pub mod discovery;
pub mod http;
pub mod object;
pub mod patch;
pub mod protobuf;
pub mod registry;
pub mod resources;
pub mod reviews;
pub mod router;
pub mod selectors;
pub mod state;
pub mod status;
pub mod table;
pub mod tls;
pub mod validate;
pub mod verbs;
pub mod watch;

#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kcontrol_store::Store;
use tokio::net::TcpListener;

pub use self::state::State;

pub struct Config {
    /// Certificates, token and kubeconfig; the embedded store too unless
    /// `store` names another.
    pub data_dir: PathBuf,
    /// `etcd://HOST:PORT[,HOST:PORT…]`, or `None` for the embedded store in
    /// the data dir.
    pub store: Option<String>,
    pub listen: SocketAddr,
    pub service_cidr: String,
    pub node_port_range: String,
    /// Period of history compaction (history older than one period goes).
    pub compaction_interval: Duration,
    pub bookmark_interval: Duration,
}

/// Opens the store: etcd when `url` names it, else the embedded store in
/// the data dir.
pub async fn open_store(dir: &std::path::Path, url: Option<&str>) -> Result<Arc<dyn Store>> {
    match url {
        None | Some("") => {
            let path = dir.join("store.db");
            let store = kcontrol_store::SqliteStore::open(&path)
                .with_context(|| format!("opening the store {}", path.display()))?;
            Ok(Arc::new(store))
        }
        Some(url) if url.starts_with("etcd://") => {
            let store =
                kcontrol_store::EtcdStore::connect_url(url, kcontrol_store::EtcdOptions::default())
                    .await
                    .with_context(|| format!("--store {url}"))?;
            Ok(Arc::new(store))
        }
        Some(other) => anyhow::bail!(
            "--store {other:?}: expected etcd://HOST:PORT[,HOST:PORT…] (leave it out for the embedded store in --data-dir)"
        ),
    }
}

pub async fn run(cfg: Config) -> Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    // etcd may be shared with other apiservers; the embedded store is ours.
    let shared = cfg
        .store
        .as_deref()
        .is_some_and(|u| u.starts_with("etcd://"));
    let alloc =
        allocate::Allocator::new(&cfg.service_cidr, &cfg.node_port_range)?.shared_store(shared);
    let store = open_store(&cfg.data_dir, cfg.store.as_deref()).await?;
    let token = auth::ensure_token(&cfg.data_dir)?;
    let pki = tls::ensure(&cfg.data_dir, cfg.listen.ip())?;

    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let local = listener.local_addr()?;
    // Clients reach an unspecified address through loopback.
    let host = if local.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else if local.is_ipv6() {
        format!("[{}]", local.ip())
    } else {
        local.ip().to_string()
    };
    let server_address = format!("{host}:{}", local.port());

    let state = start(State {
        store: store.clone(),
        alloc,
        token: token.clone(),
        server_address: server_address.clone(),
        bookmark_interval: cfg.bookmark_interval,
    })
    .await?;
    auth::write_kubeconfig(
        &cfg.data_dir,
        &format!("https://{server_address}"),
        &pki.ca_pem,
        &token,
    )?;
    tokio::spawn(compactor(store, cfg.compaction_interval));

    println!(
        "kcontrol: apiserver listening on https://{server_address} (kubeconfig {})",
        cfg.data_dir.join("kubeconfig.yaml").display()
    );

    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("kcontrol: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => {
                println!("kcontrol: apiserver stopped");
                return Ok(());
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(router::handle(state, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

/// Readies `state` to serve (the kinds' start hooks, the objects that
/// always exist). Requests then go to [`router::handle`]: [`run`] feeds it
/// from TLS connections, tests call it in-process.
pub async fn start(state: State) -> Result<Arc<State>> {
    verbs::bootstrap(&state).await?;
    Ok(Arc::new(state))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Compacts history older than one interval, every interval (like the
/// real apiserver's etcd compaction), so watches from very old
/// resourceVersions get 410 and relist. On etcd every apiserver does it;
/// compacting at a revision already compacted is a no-op.
async fn compactor(store: Arc<dyn Store>, every: Duration) {
    let mut previous = None;
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        if let Some(rev) = previous
            && let Err(e) = store.compact(rev).await
        {
            eprintln!("kcontrol: compaction at revision {rev}: {e}");
        }
        previous = store.current_revision().await.ok();
    }
}
