//! What a container runs with: the image check (this node has only
//! busybox), its environment (service links, `env`, `envFrom`, `$(VAR)`
//! expansion) and resources, written as an OCI bundle and started by crun.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Secret, Service};
use kube::api::{Api, ListParams};

use super::super::probe;
use super::super::runtime::Bundle;
use super::{CState, Kind, Msg, ProbeState, Worker, now};

/// Whether `image` names the busybox image this node has: `busybox`,
/// `busybox:TAG`, `library/busybox`, `docker.io/library/busybox[:TAG]`
/// (digests too).
pub fn is_busybox(image: &str) -> bool {
    let name = image.split('@').next().unwrap_or("");
    // A ':' after the last '/' starts the tag.
    let name = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => &name[..i],
        _ => name,
    };
    matches!(
        name,
        "busybox"
            | "library/busybox"
            | "docker.io/busybox"
            | "docker.io/library/busybox"
            | "index.docker.io/library/busybox"
            | "registry-1.docker.io/library/busybox"
    )
}

/// Expands `$(VAR)` from `env` (`$$` is a literal `$`; unknown variables
/// stay as written), as the kubelet does for command, args and env.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('(')
            && let Some(end) = r.find(')')
        {
            let name = &r[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The `{SVC}_SERVICE_HOST`-style variables for the given services.
pub fn service_env(services: &[Service]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in services {
        let Some(spec) = &s.spec else { continue };
        let Some(ip) = spec.cluster_ip.as_deref() else {
            continue;
        };
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let ports = spec.ports.as_deref().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        let name = s
            .metadata
            .name
            .as_deref()
            .unwrap_or("")
            .to_uppercase()
            .replace('-', "_");
        out.push((format!("{name}_SERVICE_HOST"), ip.to_string()));
        out.push((format!("{name}_SERVICE_PORT"), first.port.to_string()));
        for p in ports {
            if let Some(pn) = p.name.as_deref().filter(|n| !n.is_empty()) {
                out.push((
                    format!(
                        "{name}_SERVICE_PORT_{}",
                        pn.to_uppercase().replace('-', "_")
                    ),
                    p.port.to_string(),
                ));
            }
        }
        let proto = |p: &k8s_openapi::api::core::v1::ServicePort| {
            p.protocol.clone().unwrap_or_else(|| "TCP".into())
        };
        out.push((
            format!("{name}_PORT"),
            format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port),
        ));
        for p in ports {
            let pr = proto(p);
            let base = format!("{name}_PORT_{}_{}", p.port, pr.to_uppercase());
            out.push((
                base.clone(),
                format!("{}://{ip}:{}", pr.to_lowercase(), p.port),
            ));
            out.push((format!("{base}_PROTO"), pr.to_lowercase()));
            out.push((format!("{base}_PORT"), p.port.to_string()));
            out.push((format!("{base}_ADDR"), ip.to_string()));
        }
    }
    out
}

/// A resource quantity in base units (bytes, or cores for cpu); `milli`
/// gives thousandths, rounded up.
fn quantity(q: &str, milli: bool) -> Option<i64> {
    let v = crate::quantity::parse(q)?;
    Some((v * if milli { 1000.0 } else { 1.0 }).ceil() as i64)
}

impl Worker {
    async fn env(&self, c: &Container) -> anyhow::Result<Vec<(String, String)>> {
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("HOSTNAME".into(), self.name.clone()),
            ("HOME".into(), "/root".into()),
        ];
        let spec = self.pod.spec.clone().unwrap_or_default();
        if spec.enable_service_links != Some(false) {
            let mut services = Api::<Service>::namespaced(self.sh.client.clone(), &self.ns)
                .list(&ListParams::default())
                .await?
                .items;
            if self.ns != "default"
                && let Ok(Some(k)) = Api::<Service>::namespaced(self.sh.client.clone(), "default")
                    .get_opt("kubernetes")
                    .await
            {
                services.push(k);
            }
            env.extend(service_env(&services));
        }
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
            env.retain(|(n, _)| *n != k);
            env.push((k, v));
        };
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            if let Some(r) = &from.config_map_ref {
                let api = Api::<ConfigMap>::namespaced(self.sh.client.clone(), &self.ns);
                match api.get_opt(&r.name).await? {
                    Some(cm) => {
                        for (k, v) in cm.data.unwrap_or_default() {
                            set(&mut env, format!("{prefix}{k}"), v);
                        }
                    }
                    None if r.optional == Some(true) => {}
                    None => anyhow::bail!("configmap \"{}\" not found", r.name),
                }
            }
            if let Some(r) = &from.secret_ref {
                let api = Api::<Secret>::namespaced(self.sh.client.clone(), &self.ns);
                match api.get_opt(&r.name).await? {
                    Some(s) => {
                        for (k, v) in s.data.unwrap_or_default() {
                            set(
                                &mut env,
                                format!("{prefix}{k}"),
                                String::from_utf8_lossy(&v.0).into_owned(),
                            );
                        }
                    }
                    None if r.optional == Some(true) => {}
                    None => anyhow::bail!("secret \"{}\" not found", r.name),
                }
            }
        }
        let pod_ip = self
            .net
            .as_ref()
            .map(|n| n.ip.to_string())
            .unwrap_or_default();
        for e in c.env.iter().flatten() {
            let value = if let Some(v) = &e.value {
                expand(v, &env)
            } else if let Some(from) = &e.value_from {
                if let Some(f) = &from.field_ref {
                    let m = &self.pod.metadata;
                    match f.field_path.as_str() {
                        "metadata.name" => self.name.clone(),
                        "metadata.namespace" => self.ns.clone(),
                        "metadata.uid" => self.uid.clone(),
                        "spec.nodeName" => self.sh.cfg.node_name.clone(),
                        "spec.serviceAccountName" => {
                            spec.service_account_name.clone().unwrap_or_default()
                        }
                        "status.podIP" => pod_ip.clone(),
                        "status.hostIP" => self.sh.node_ip.to_string(),
                        p => {
                            let label = |pre: &str, map: &Option<BTreeMap<String, String>>| {
                                p.strip_prefix(pre)
                                    .and_then(|r| r.strip_suffix("']"))
                                    .and_then(|k| map.as_ref()?.get(k).cloned())
                            };
                            label("metadata.labels['", &m.labels)
                                .or_else(|| label("metadata.annotations['", &m.annotations))
                                .unwrap_or_default()
                        }
                    }
                } else if let Some(r) = &from.config_map_key_ref {
                    let api = Api::<ConfigMap>::namespaced(self.sh.client.clone(), &self.ns);
                    let v = api
                        .get_opt(&r.name)
                        .await?
                        .and_then(|cm| cm.data?.get(&r.key).cloned());
                    match v {
                        Some(v) => v,
                        None if r.optional == Some(true) => continue,
                        None => anyhow::bail!("configmap \"{}\" has no key {:?}", r.name, r.key),
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    let api = Api::<Secret>::namespaced(self.sh.client.clone(), &self.ns);
                    let v = api.get_opt(&r.name).await?.and_then(|s| {
                        s.data?
                            .get(&r.key)
                            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    });
                    match v {
                        Some(v) => v,
                        None if r.optional == Some(true) => continue,
                        None => anyhow::bail!("secret \"{}\" has no key {:?}", r.name, r.key),
                    }
                } else {
                    String::new()
                }
            } else {
                String::new()
            };
            set(&mut env, e.name.clone(), value);
        }
        Ok(env)
    }

    pub(super) async fn launch(&mut self, i: usize) -> anyhow::Result<()> {
        let spec = self.ctrs[i].spec.clone();
        let env = self.env(&spec).await?;
        let command: Vec<String> = spec
            .command
            .iter()
            .flatten()
            .map(|s| expand(s, &env))
            .collect();
        let args: Vec<String> = spec
            .args
            .iter()
            .flatten()
            .map(|s| expand(s, &env))
            .collect();
        // busybox's image has no ENTRYPOINT and CMD ["sh"].
        let process = if !command.is_empty() {
            [command, args].concat()
        } else if !args.is_empty() {
            args
        } else {
            vec!["sh".to_string()]
        };
        let res = spec.resources.clone().unwrap_or_default();
        let get = |m: &Option<
            BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
        >,
                   k: &str,
                   milli: bool| {
            m.as_ref()
                .and_then(|m| m.get(k))
                .and_then(|q| quantity(&q.0, milli))
        };
        let net = self
            .net
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no pod network"))?;
        let netns = net.netns_path();
        let hosts = self.dir.join("hosts");
        let hostname_file = self.dir.join("hostname");
        let bundle = Bundle {
            args: process,
            env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cwd: spec
                .working_dir
                .clone()
                .filter(|w| !w.is_empty())
                .unwrap_or_else(|| "/".into()),
            hostname: self.name.chars().take(63).collect(),
            rootfs: &self.sh.cfg.busybox_rootfs,
            netns: &netns,
            cgroup: format!(
                "/kcontrol/{}/{}/{}",
                self.sh.cfg.node_name, self.hash, spec.name
            ),
            hosts: &hosts,
            hostname_file: &hostname_file,
            memory_limit: get(&res.limits, "memory", false),
            cpu_shares: get(&res.requests, "cpu", true).map(|m| (m as u64 * 1024 / 1000).max(2)),
            cpu_quota: get(&res.limits, "cpu", true).map(|m| (m * 100).max(1000)),
        };
        let bdir = self.dir.join(&spec.name);
        bundle.write(&bdir)?;
        let id = self.ctrs[i].id.clone();
        self.sh.rt.delete(&id).await?;
        let mut child = self
            .sh
            .rt
            .run(&id, &bdir, &self.dir.join(format!("{}.log", spec.name)))?;
        let c = &mut self.ctrs[i];
        if let CState::Terminated(t) = &c.state {
            c.last_term = Some(t.clone());
        }
        if c.ever_ran {
            c.restart_count += 1;
        }
        c.ever_ran = true;
        c.epoch += 1;
        c.alive.store(c.epoch, Ordering::SeqCst);
        c.killing = false;
        c.started = spec.startup_probe.is_none();
        let started = Instant::now();
        c.state = CState::Running {
            started_at: now(),
            since: started,
        };
        for k in [Kind::Startup, Kind::Liveness, Kind::Readiness] {
            c.probes[k as usize] = ProbeState {
                next_at: k
                    .spec(&spec)
                    .map(|p| started + probe::timing(p).initial_delay),
                ..Default::default()
            };
        }
        let (tx, epoch) = (self.tx.clone(), c.epoch);
        tokio::spawn(async move {
            use std::os::unix::process::ExitStatusExt;
            let code = match child.wait().await {
                Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9)),
                Err(_) => 255,
            };
            let _ = tx.send(Msg::Exited {
                ctr: i,
                epoch,
                code,
            });
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn busybox_names() {
        for ok in [
            "busybox",
            "busybox:1.36",
            "busybox:latest",
            "docker.io/library/busybox",
            "docker.io/library/busybox:1.35",
            "library/busybox",
            "busybox@sha256:abc",
        ] {
            assert!(is_busybox(ok), "{ok}");
        }
        for bad in [
            "nginx",
            "quay.io/busybox",
            "busybox2",
            "myreg:5000/busybox",
            "",
        ] {
            assert!(!is_busybox(bad), "{bad}");
        }
    }

    #[test]
    fn expansion() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("x$(A)y", &env), "x1y");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("a$b", &env), "a$b");
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity("64Mi", false), Some(64 << 20));
        assert_eq!(quantity("500m", true), Some(500));
        assert_eq!(quantity("2", true), Some(2000));
        assert_eq!(quantity("1G", false), Some(1_000_000_000));
        assert_eq!(quantity("x", false), None);
    }

    #[test]
    fn service_variables() {
        let s: Service = serde_json::from_value(json!({
            "metadata": { "name": "my-svc" },
            "spec": { "clusterIP": "10.96.0.5", "ports": [
                { "name": "http", "port": 80, "protocol": "TCP" },
                { "port": 53, "protocol": "UDP" },
            ]},
        }))
        .unwrap();
        let env: BTreeMap<_, _> = service_env(&[s]).into_iter().collect();
        assert_eq!(env["MY_SVC_SERVICE_HOST"], "10.96.0.5");
        assert_eq!(env["MY_SVC_SERVICE_PORT"], "80");
        assert_eq!(env["MY_SVC_SERVICE_PORT_HTTP"], "80");
        assert_eq!(env["MY_SVC_PORT"], "tcp://10.96.0.5:80");
        assert_eq!(env["MY_SVC_PORT_53_UDP_ADDR"], "10.96.0.5");
        assert_eq!(env["MY_SVC_PORT_53_UDP_PROTO"], "udp");
    }
}
