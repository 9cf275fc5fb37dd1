//! The Node object (capacity from the host, podCIDR, addresses, a Ready
//! condition kept current) and the heartbeat Lease in kube-node-lease.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::Shared;
use super::pod::now;

const LEASE_NS: &str = "kube-node-lease";

fn micro_now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

fn meminfo_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "Linux".into())
}

fn read_trim(p: &str) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The node's status: capacity, conditions (Ready with a fresh heartbeat),
/// addresses and system info.
pub fn status(sh: &Shared, since: &str, runtime_version: &str) -> Value {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let resources = json!({
        "cpu": cpus.to_string(),
        "memory": format!("{}Ki", meminfo_kib()),
        "pods": sh.cfg.max_pods.to_string(),
    });
    let hb = now();
    let cond = |t: &str, ok: bool, reason: &str, msg: &str| {
        json!({
            "type": t,
            "status": if ok { "True" } else { "False" },
            "lastHeartbeatTime": hb,
            "lastTransitionTime": since,
            "reason": reason,
            "message": msg,
        })
    };
    json!({
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            cond("MemoryPressure", false, "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            cond("DiskPressure", false, "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", false, "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            cond("Ready", true, "KubeletReady", "kubelet is posting ready status"),
        ],
        "addresses": [
            { "type": "InternalIP", "address": sh.node_ip.to_string() },
            { "type": "Hostname", "address": sh.cfg.node_name },
        ],
        "daemonEndpoints": { "kubeletEndpoint": { "Port": 0 } },
        "nodeInfo": {
            "machineID": read_trim("/etc/machine-id"),
            "systemUUID": read_trim("/sys/class/dmi/id/product_uuid"),
            "bootID": read_trim("/proc/sys/kernel/random/boot_id"),
            "kernelVersion": read_trim("/proc/sys/kernel/osrelease"),
            "osImage": os_image(),
            "containerRuntimeVersion": format!("crun://{runtime_version}"),
            "kubeletVersion": "v1.33.0-kcontrol",
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        },
    })
}

/// Creates the Node (or takes over an existing one of that name) and posts
/// its status.
pub async fn register(sh: &Shared, since: &str, runtime_version: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(sh.client.clone());
    let name = &sh.cfg.node_name;
    let cidr = sh.cidr.to_string();
    let meta = json!({
        "name": name,
        "labels": {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        },
    });
    let spec = json!({ "podCIDR": cidr, "podCIDRs": [cidr] });
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": spec,
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {
            nodes
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({ "metadata": { "labels": meta["labels"] }, "spec": spec }),
                    ),
                )
                .await?;
        }
        Err(e) => return Err(anyhow::anyhow!("registering node {name}: {e}")),
    }
    post_status(sh, since, runtime_version).await
}

pub async fn post_status(sh: &Shared, since: &str, runtime_version: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(sh.client.clone());
    nodes
        .patch_status(
            &sh.cfg.node_name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status(sh, since, runtime_version) })),
        )
        .await
        .map_err(|e| anyhow::anyhow!("updating node {} status: {e}", sh.cfg.node_name))?;
    Ok(())
}

/// Renews (creating when missing) the node's Lease.
pub async fn renew_lease(sh: &Shared) -> anyhow::Result<()> {
    let name = &sh.cfg.node_name;
    let leases: Api<Lease> = Api::namespaced(sh.client.clone(), LEASE_NS);
    let duration = (sh.cfg.lease_renew_interval.as_secs() * 4).max(10);
    match leases.get_opt(name).await? {
        Some(_) => {
            leases
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "spec": {
                        "holderIdentity": name,
                        "leaseDurationSeconds": duration,
                        "renewTime": micro_now(),
                    }})),
                )
                .await?;
        }
        None => {
            let nsapi: Api<Namespace> = Api::all(sh.client.clone());
            if nsapi.get_opt(LEASE_NS).await?.is_none() {
                let ns: Namespace = serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": LEASE_NS },
                }))?;
                let _ = nsapi.create(&PostParams::default(), &ns).await;
            }
            let node_uid = Api::<Node>::all(sh.client.clone())
                .get(name)
                .await?
                .metadata
                .uid
                .unwrap_or_default();
            let lease: Lease = serde_json::from_value(json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": name,
                    "namespace": LEASE_NS,
                    "ownerReferences": [{
                        "apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid,
                    }],
                },
                "spec": {
                    "holderIdentity": name,
                    "leaseDurationSeconds": duration,
                    "renewTime": micro_now(),
                },
            }))?;
            leases.create(&PostParams::default(), &lease).await?;
        }
    }
    Ok(())
}

/// Heartbeats until aborted: the Lease every `lease_renew_interval`, the
/// Node status every `node_status_interval`.
pub async fn heartbeat(sh: std::sync::Arc<Shared>, since: String, runtime_version: String) {
    let mut lease = tokio::time::interval(sh.cfg.lease_renew_interval);
    let mut status = tokio::time::interval(sh.cfg.node_status_interval);
    status.tick().await;
    loop {
        tokio::select! {
            _ = lease.tick() => {
                if let Err(e) = renew_lease(&sh).await {
                    eprintln!("kubelet: renewing the node lease: {e:#}");
                }
            }
            _ = status.tick() => {
                if let Err(e) = post_status(&sh, &since, &runtime_version).await {
                    eprintln!("kubelet: {e:#}");
                    // The node object was deleted: put it back.
                    if let Err(e) = register(&sh, &since, &runtime_version).await {
                        eprintln!("kubelet: {e:#}");
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
