//! What the pod reports: its status (phase, conditions, container states)
//! patched when it changed, and events.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::{CState, Ctr, Term, Worker, is_busybox, now};

impl Term {
    fn json(&self) -> Value {
        json!({ "terminated": {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
        }})
    }
}

impl Worker {
    fn status(&mut self) -> Value {
        let policy = self.restart_policy();
        let statuses: Vec<Value> = self
            .ctrs
            .iter()
            .map(|c| {
                let state = match &c.state {
                    CState::Waiting { reason, message } => {
                        let mut w = json!({ "reason": reason });
                        if let Some(m) = message {
                            w["message"] = json!(m);
                        }
                        json!({ "waiting": w })
                    }
                    CState::Running { started_at, .. } => {
                        json!({ "running": { "startedAt": started_at } })
                    }
                    CState::Terminated(t) => t.json(),
                };
                let image = c.spec.image.clone().unwrap_or_default();
                let mut s = json!({
                    "name": c.spec.name,
                    "image": image,
                    "imageID": if is_busybox(&image) { "local://busybox" } else { "" },
                    "state": state,
                    "lastState": c.last_term.as_ref().map_or(json!({}), Term::json),
                    "ready": c.ready(),
                    "restartCount": c.restart_count,
                    "started": c.running() && c.started,
                });
                if c.ever_ran {
                    s["containerID"] = json!(format!("crun://{}", c.id));
                }
                s
            })
            .collect();
        let all_done = !self.ctrs.is_empty() && self.ctrs.iter().all(|c| c.done);
        let phase = if all_done {
            let ok = self
                .ctrs
                .iter()
                .all(|c| matches!(&c.state, CState::Terminated(t) if t.exit_code == 0));
            // A pod whose containers always restart ends only by deletion;
            // then it reports what its containers did.
            if ok && (policy != "Always" || self.stopping) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if self.net.is_some() && self.ctrs.iter().any(|c| c.running() || c.ever_ran) {
            "Running"
        } else {
            "Pending"
        };
        let ready = self.ctrs.iter().all(Ctr::ready) && !self.ctrs.is_empty();
        let wanted: [(&'static str, bool); 5] = [
            ("PodReadyToStartContainers", self.net.is_some()),
            ("Initialized", true),
            ("ContainersReady", ready),
            ("Ready", ready),
            ("PodScheduled", true),
        ];
        let mut conditions = Vec::new();
        for (t, ok) in wanted {
            let e = self.conds.entry(t).or_insert((ok, now()));
            if e.0 != ok {
                *e = (ok, now());
            }
            let mut c = json!({
                "type": t,
                "status": if ok { "True" } else { "False" },
                "lastProbeTime": null,
                "lastTransitionTime": e.1,
            });
            if !ok && (t == "Ready" || t == "ContainersReady") {
                let not_ready: Vec<&str> = self
                    .ctrs
                    .iter()
                    .filter(|c| !c.ready())
                    .map(|c| c.spec.name.as_str())
                    .collect();
                c["reason"] = json!("ContainersNotReady");
                c["message"] = json!(format!(
                    "containers with unready status: [{}]",
                    not_ready.join(" ")
                ));
            }
            conditions.push(c);
        }
        let host_ip = self.sh.node_ip.to_string();
        let mut st = json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": host_ip,
            "hostIPs": [{ "ip": host_ip }],
            "startTime": self.start_time,
            "containerStatuses": statuses,
        });
        if let Some(n) = &self.net {
            st["podIP"] = json!(n.ip.to_string());
            st["podIPs"] = json!([{ "ip": n.ip.to_string() }]);
        } else if let Some(prev) = self.posted.as_ref().and_then(|p| p.get("podIP")).cloned() {
            // Keep the address a finished pod had.
            st["podIP"] = prev.clone();
            st["podIPs"] = json!([{ "ip": prev }]);
        }
        st
    }

    pub(super) async fn publish(&mut self) {
        let st = self.status();
        if self.posted.as_ref() == Some(&st) {
            return;
        }
        let patch = json!({ "status": st });
        match self
            .pods()
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.posted = Some(st),
            Err(kube::Error::Api(s)) if s.code == 404 => self.posted = Some(st),
            Err(e) => eprintln!(
                "kubelet: updating the status of {}/{}: {e}",
                self.ns, self.name
            ),
        }
    }
}

/// Posts an event about `pod` (in the background; failures are logged).
pub fn post_event(
    client: kube::Client,
    node: String,
    pod: &Pod,
    kind: &str,
    reason: &str,
    message: String,
    field_path: Option<String>,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let suffix: u64 = {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        u64::from_le_bytes(b)
    };
    let t = now();
    let mut involved = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "name": name,
        "namespace": ns,
        "uid": pod.metadata.uid,
    });
    if let Some(f) = field_path {
        involved["fieldPath"] = json!(f);
    }
    let ev = json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": { "name": format!("{name}.{suffix:016x}"), "namespace": ns },
        "involvedObject": involved,
        "reason": reason,
        "message": message,
        "type": kind,
        "source": { "component": "kubelet", "host": node },
        "reportingComponent": "kubelet",
        "reportingInstance": node,
        "firstTimestamp": t,
        "lastTimestamp": t,
        "count": 1,
    });
    let reason = reason.to_string();
    tokio::spawn(async move {
        let ev: k8s_openapi::api::core::v1::Event = match serde_json::from_value(ev) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("kubelet: building an event: {e}");
                return;
            }
        };
        let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client, &ns);
        if let Err(e) = api.create(&PostParams::default(), &ev).await {
            eprintln!("kubelet: posting event {reason} for {ns}/{name}: {e}");
        }
    });
}
