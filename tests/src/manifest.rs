//! Kubernetes manifests (Service, EndpointSlice) as YAML, and a directory
//! kproxy watches, written atomically.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// `(port_name, port, target_port, protocol)` of a Service port.
pub type ServicePort<'a> = (&'a str, u16, u16, &'a str);
/// `(port_name, port, protocol)` of an EndpointSlice port.
pub type SlicePort<'a> = (&'a str, u16, &'a str);
/// `(ip, ready)` of an EndpointSlice endpoint.
pub type Endpoint<'a> = (&'a str, bool);

fn to_yaml(v: &Value) -> String {
    serde_saphyr::to_string(v).expect("serialising a JSON value as YAML cannot fail")
}

/// A `v1/Service` in namespace `default` with the given ClusterIP and ports
/// and selector `app: <name>`.
pub fn service_yaml(name: &str, cluster_ip: &str, ports: &[ServicePort]) -> String {
    service_yaml_with(name, cluster_ip, ports, json!({}))
}

/// [`service_yaml`] with more `spec` fields (`extra` is an object: session
/// affinity, traffic policies, …), which win over the defaults.
pub fn service_yaml_with(
    name: &str,
    cluster_ip: &str,
    ports: &[ServicePort],
    extra: Value,
) -> String {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(pname, port, target, proto)| {
            json!({ "name": pname, "port": port, "targetPort": target, "protocol": proto })
        })
        .collect();
    let mut spec = json!({
        "type": "ClusterIP",
        "clusterIP": cluster_ip,
        "selector": { "app": name },
        "ports": ports,
    });
    for (k, v) in extra.as_object().expect("extra spec fields are an object") {
        spec[k] = v.clone();
    }
    to_yaml(&json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": "default" },
        "spec": spec,
    }))
}

/// A `discovery.k8s.io/v1/EndpointSlice` named `slice_name` for
/// `service_name` (label `kubernetes.io/service-name`): `addressType`
/// IPv6 when the first endpoint's address is one, else IPv4.
pub fn endpointslice_yaml(
    slice_name: &str,
    service_name: &str,
    endpoints: &[Endpoint],
    ports: &[SlicePort],
) -> String {
    let endpoints: Vec<(&str, Value)> = endpoints
        .iter()
        .map(|(ip, ready)| (*ip, json!({ "ready": ready })))
        .collect();
    endpointslice_yaml_with_conditions(slice_name, service_name, &endpoints, ports)
}

/// [`endpointslice_yaml`] with each endpoint's whole `conditions` object
/// (`ready`, `serving`, `terminating`).
pub fn endpointslice_yaml_with_conditions(
    slice_name: &str,
    service_name: &str,
    endpoints: &[(&str, Value)],
    ports: &[SlicePort],
) -> String {
    let address_type = match endpoints.first() {
        Some((ip, _)) if ip.contains(':') => "IPv6",
        _ => "IPv4",
    };
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, conditions)| json!({ "addresses": [ip], "conditions": conditions }))
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(pname, port, proto)| json!({ "name": pname, "port": port, "protocol": proto }))
        .collect();
    to_yaml(&json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name,
            "namespace": "default",
            "labels": { "kubernetes.io/service-name": service_name },
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports,
    }))
}

/// Joins YAML documents into one multi-document file.
pub fn multi_doc(docs: &[String]) -> String {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(d);
        if !d.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A temporary manifest directory under /tmp, removed on drop.
///
/// Layout: `/tmp/kpt-manifests-<pid>-<n>/manifests/` is the directory given
/// to kproxy; `…/staging/` (same filesystem) receives the temporary files,
/// which are then renamed into `manifests/`. Each write is therefore atomic
/// and kproxy never sees a partial file or a temporary name in its directory.
#[derive(Debug)]
pub struct ManifestDir {
    root: PathBuf,
    dir: PathBuf,
    staging: PathBuf,
}

impl ManifestDir {
    pub fn new() -> Result<ManifestDir> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let root = std::env::temp_dir().join(format!("kpt-manifests-{}-{n}", std::process::id()));
        if root.exists() {
            std::fs::remove_dir_all(&root).with_context(|| format!("remove {}", root.display()))?;
        }
        let dir = root.join("manifests");
        let staging = root.join("staging");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("create {}", staging.display()))?;
        Ok(ManifestDir { root, dir, staging })
    }

    /// The directory to pass to `kproxy --manifests`.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Path of `file` inside the manifest directory.
    pub fn file(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Atomically replaces (or creates) `file` with `content`: the content
    /// is written and synced in the staging directory, then renamed into the
    /// manifest directory. Returns the instant just before the rename, the
    /// moment from which kproxy can see the change.
    pub fn write(&self, file: &str, content: &str) -> Result<Instant> {
        let tmp = self.staging.join(format!("{file}.tmp"));
        {
            use std::io::Write;
            let mut f =
                std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
            f.write_all(content.as_bytes())?;
            f.sync_all()?;
        }
        let dest = self.dir.join(file);
        let t = Instant::now();
        std::fs::rename(&tmp, &dest)
            .with_context(|| format!("rename {} -> {}", tmp.display(), dest.display()))?;
        Ok(t)
    }

    /// Removes `file` from the manifest directory; returns the instant
    /// just before the removal.
    pub fn remove(&self, file: &str) -> Result<Instant> {
        let path = self.dir.join(file);
        let t = Instant::now();
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        Ok(t)
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.root) {
            eprintln!("kproxy-tests: cannot remove {}: {e}", self.root.display());
        }
    }
}
