//! `kcontrol all`: one node in one process — apiserver, scheduler,
//! controller-manager and kubelet on one tokio runtime, the components
//! talking to the apiserver over HTTPS like separate processes would (as
//! k3s runs them).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::{apiserver, client_from, controllers, kubelet, scheduler};

pub struct Options {
    pub data_dir: PathBuf,
    /// `etcd://…`, or the embedded store in `data_dir` when `None`.
    pub store: Option<String>,
    pub listen: SocketAddr,
    pub service_cidr: String,
    pub node_name: Option<String>,
    pub pod_cidr: String,
    pub bridge: String,
    pub busybox_rootfs: PathBuf,
    pub node_monitor_grace_period: Duration,
    pub lease_renew_interval: Duration,
}

/// How long the apiserver may take to answer its first request.
const APISERVER_START_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run(o: Options) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(o))
}

fn host_name() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name (use --node-name)")?;
    let name = name.trim().to_ascii_lowercase();
    if name.is_empty() {
        bail!("the host name is empty: use --node-name");
    }
    Ok(name)
}

async fn run_async(o: Options) -> Result<()> {
    let node_name = match o.node_name {
        Some(n) => n,
        None => host_name()?,
    };
    std::fs::create_dir_all(&o.data_dir)
        .with_context(|| format!("creating {}", o.data_dir.display()))?;
    // The apiserver writes a fresh kubeconfig (address, token, CA) once it
    // listens; its appearance is the first readiness signal.
    let kubeconfig = o.data_dir.join("kubeconfig.yaml");
    let _ = std::fs::remove_file(&kubeconfig);

    let mut api = tokio::spawn(apiserver::run(apiserver::Config {
        data_dir: o.data_dir.clone(),
        store: o.store.clone(),
        listen: o.listen,
        service_cidr: o.service_cidr,
        node_port_range: "30000-32767".into(),
        compaction_interval: Duration::from_secs(300),
        bookmark_interval: Duration::from_secs(60),
    }));

    let started = Instant::now();
    let client = loop {
        if api.is_finished() {
            return match (&mut api).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.context("apiserver")),
                Err(e) => Err(anyhow!("apiserver task: {e}")),
            };
        }
        if kubeconfig.exists()
            && let Ok(c) = client_from(&kubeconfig).await
            && c.apiserver_version().await.is_ok()
        {
            break c;
        }
        if started.elapsed() > APISERVER_START_TIMEOUT {
            api.abort();
            bail!("the apiserver did not answer within {APISERVER_START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "kcontrol: all: apiserver ready, starting scheduler, controller-manager and kubelet (node {node_name})"
    );

    let mut sched = tokio::spawn(scheduler::run(client.clone(), scheduler::Config::default()));
    let mut ctl = tokio::spawn(controllers::run(
        client.clone(),
        controllers::Config {
            node_monitor_grace_period: o.node_monitor_grace_period,
            ..controllers::Config::default()
        },
    ));
    let mut kcfg = kubelet::Config::new(&node_name, &o.pod_cidr, &o.data_dir.join("kubelet"));
    kcfg.bridge = o.bridge;
    kcfg.busybox_rootfs = o.busybox_rootfs;
    kcfg.lease_renew_interval = o.lease_renew_interval;
    let kubelet_run = kubelet::run(client, kcfg.clone());
    tokio::pin!(kubelet_run);

    let failed = |what: &str, r: std::result::Result<Result<()>, tokio::task::JoinError>| match r {
        Ok(Ok(())) => anyhow!("{what} stopped"),
        Ok(Err(e)) => e.context(what.to_string()),
        Err(e) => anyhow!("{what} task: {e}"),
    };
    let result = tokio::select! {
        // SIGINT/SIGTERM: the kubelet stops its pods and removes what it made.
        r = &mut kubelet_run => r.context("kubelet"),
        r = &mut api => match r {
            // The apiserver saw the same signal: let the kubelet finish.
            Ok(Ok(())) => kubelet_run.await.context("kubelet"),
            r => Err(failed("apiserver", r)),
        },
        r = &mut sched => Err(failed("scheduler", r)),
        r = &mut ctl => Err(failed("controller-manager", r)),
    };
    sched.abort();
    ctl.abort();
    if result.is_err() {
        // The kubelet future may have been dropped mid-way: clean up what
        // it made so nothing is left behind.
        if let Err(e) = kubelet::shutdown(&kcfg).await {
            eprintln!("kcontrol: all: kubelet cleanup: {e:#}");
        }
    }
    api.abort();
    println!("kcontrol: all: stopped");
    result
}
