//! End to end on a single-node cluster (`kcontrol all` + kproxy, see
//! `kproxy_tests::cluster`), with the machine's kubectl as the client: a
//! Deployment behind a Service, answered 3/3/3 by round-robin in the
//! kernel from a client pod; scaling; a deleted pod leaving the rotation
//! before it stops answering; a rolling update without a failed request;
//! a liveness restart; an unschedulable pod. eBPF mode only.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use kproxy_tests::cluster::{self, Cluster, Container};
use kproxy_tests::kproxy::Event;
use kproxy_tests::poll_until;

/// The issue's bound for a Deployment of 3 to be Running, Ready and
/// behind its Service.
const UP: Duration = Duration::from_secs(10);
const CHANGE: Duration = Duration::from_secs(30);

/// Each replica serves its own pod name over HTTP on 8080; on SIGTERM it
/// keeps serving for 2 s (the time for its endpoint to leave every
/// dataplane), then stops — the pattern a preStop sleep gives in Kubernetes.
fn web_yaml(replicas: u32, version: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: web}}
  strategy:
    type: RollingUpdate
    rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      terminationGracePeriodSeconds: 10
      containers:
      - name: web
        image: busybox
        env:
        - {{name: VERSION, value: "{version}"}}
        command:
        - sh
        - -c
        - |
          mkdir -p /tmp/www && hostname > /tmp/www/index.html
          httpd -f -p 8080 -h /tmp/www &
          pid=$!
          trap 'sleep 2; kill $pid; exit 0' TERM
          wait
        ports:
        - {{name: http, containerPort: 8080}}
        readinessProbe:
          httpGet: {{path: /, port: 8080}}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: http}}
"#
    )
}

const CLIENT_YAML: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: client
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox
    command: [sleep, "3600"]
"#;

fn cluster_ip(c: &Cluster) -> Result<String> {
    let v = c.get_json(&["service", "web"])?;
    Ok(v["spec"]["clusterIP"]
        .as_str()
        .context("service without clusterIP")?
        .to_string())
}

/// One HTTP request from the client pod to the ClusterIP (a new TCP
/// connection each time): the answering pod's name.
fn ask(client: &Container, vip: &str) -> Result<String> {
    // busybox-static's `wget -T` crashes (SIGSEGV): bound it with timeout.
    let out = client.exec(&["timeout", "5", "wget", "-qO-", &format!("http://{vip}/")])?;
    Ok(out.trim().to_string())
}

fn tally(c: &Container, vip: &str, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut t = BTreeMap::new();
    for _ in 0..n {
        *t.entry(ask(c, vip)?).or_insert(0) += 1;
    }
    Ok(t)
}

/// Waits until `n` pods of the Deployment are Running+Ready, the Service
/// has exactly those as ready endpoints, kproxy programmed them and — with
/// a client — the client pod reaches each of them directly (the kubelet's
/// readiness probe comes from the node, not from another pod; direct
/// traffic does not touch the round-robin cursors).
fn wait_serving(
    c: &mut Cluster,
    n: usize,
    timeout: Duration,
    client: Option<&Container>,
) -> Result<Vec<String>> {
    let pods = poll_until(
        &format!("{n} ready pods behind Service web"),
        timeout,
        || {
            let pods = c.ready_pods("app=web")?;
            let eps = c.ready_endpoints("web")?;
            Ok((pods.len() == n && eps.len() == n).then_some(pods))
        },
    )?;
    // kproxy reports the backend slots it holds: n more than at its start
    // (web has one port).
    let want = c.base_backends + n as u64;
    poll_until("kproxy to program the endpoints", timeout, || {
        let last = c.log.last(|l| match l.kproxy_event() {
            Some(Event::Applied { backends, .. } | Event::Ready { backends, .. }) => Some(backends),
            _ => None,
        });
        Ok((last == Some(want)).then_some(()))
    })?;
    if let Some(client) = client {
        for ip in c.ready_endpoints("web")? {
            poll_until(
                &format!("the client pod to reach {ip}:8080"),
                timeout,
                || {
                    let url = format!("http://{ip}:8080/");
                    client.exec(&["timeout", "3", "wget", "-qO-", &url])?;
                    Ok(Some(()))
                },
            )?;
        }
    }
    Ok(pods)
}

#[test]
fn deployment_behind_a_service_is_balanced_scaled_updated_and_healed() -> Result<()> {
    let mut c = cluster::start(&[])?;
    c.kubectl_in(&["apply", "-f", "-"], Some(CLIENT_YAML))?;
    let applied = std::time::Instant::now();
    c.kubectl_in(&["apply", "-f", "-"], Some(&web_yaml(3, "1")))?;

    // 3 pods Running and Ready with 3 ready endpoints within 10 s.
    let pods = wait_serving(&mut c, 3, UP, None)?;
    eprintln!("3 pods serving {:?} after apply", applied.elapsed());
    poll_until("the client pod to run", UP, || {
        Ok(c.get_json(&["pod", "client"])?["status"]["phase"]
            .eq("Running")
            .then_some(()))
    })?;
    let vip = cluster_ip(&c)?;
    let client = c.container("client", "c")?;
    wait_serving(&mut c, 3, UP, Some(&client))?;

    // 9 requests from a client pod: exact round-robin, 3/3/3.
    let t = tally(&client, &vip, 9)?;
    let want: BTreeMap<String, usize> = pods.iter().map(|p| (p.clone(), 3)).collect();
    assert_eq!(t, want, "9 requests to {vip} from the client pod");

    // Hairpin: a replica asks its own Service; one of 3 answers is itself.
    let replica = c.container(&pods[0], "web")?;
    let t = tally(&replica, &vip, 3)?;
    let want: BTreeMap<String, usize> = pods.iter().map(|p| (p.clone(), 1)).collect();
    assert_eq!(t, want, "3 requests from {} to its own Service", pods[0]);

    // Scale to 5: the new pods join the rotation.
    c.kubectl(&["scale", "deployment", "web", "--replicas=5"])?;
    let pods5 = wait_serving(&mut c, 5, CHANGE, Some(&client))?;
    let t = tally(&client, &vip, 10)?;
    let want: BTreeMap<String, usize> = pods5.iter().map(|p| (p.clone(), 2)).collect();
    assert_eq!(t, want, "10 requests over 5 replicas");

    // Scale to 1: the others leave it.
    c.kubectl(&["scale", "deployment", "web", "--replicas=1"])?;
    let pods1 = wait_serving(&mut c, 1, CHANGE, Some(&client))?;
    let t = tally(&client, &vip, 3)?;
    assert_eq!(t, BTreeMap::from([(pods1[0].clone(), 3)]), "scaled to 1");

    // Back to 3, then delete one pod while a client keeps asking: no
    // request fails (it leaves the rotation before it stops answering) and
    // a replacement joins.
    c.kubectl(&["scale", "deployment", "web", "--replicas=3"])?;
    let pods3 = wait_serving(&mut c, 3, CHANGE, Some(&client))?;
    let victim = pods3[0].clone();
    let (answers, failures) = while_asking(&c, &client, &vip, |c| {
        c.kubectl(&["delete", "pod", &victim, "--wait=true"])?;
        wait_serving_quiet(c, 3)
    })?;
    ensure!(
        failures.is_empty(),
        "requests failed while {victim} was deleted: {failures:?}"
    );
    let after = c.ready_pods("app=web")?;
    ensure!(!after.contains(&victim), "{victim} still listed: {after:?}");
    eprintln!("{} answers during the deletion", answers.len());

    // Rolling update (an env change): zero failed requests throughout.
    let (answers, failures) = while_asking(&c, &client, &vip, |c| {
        c.kubectl(&["set", "env", "deployment/web", "VERSION=2"])?;
        c.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"])?;
        Ok(())
    })?;
    ensure!(
        failures.is_empty(),
        "requests failed during the rollout: {failures:?}"
    );
    let new_pods = wait_serving(&mut c, 3, CHANGE, Some(&client))?;
    ensure!(
        new_pods.iter().all(|p| !pods3.contains(p)),
        "old pods remain after the rollout: {new_pods:?} vs {pods3:?}"
    );
    eprintln!("{} answers during the rollout", answers.len());

    let left = c.stop()?;
    assert!(left.is_empty(), "left behind after stop: {left:?}");
    Ok(())
}

/// The same node with its objects in etcd (`kcontrol all --store
/// etcd://…`, one member in the node namespace): a Deployment of 3 behind a
/// Service is balanced 3/3/3, and nothing was written to the embedded store.
#[test]
fn a_cluster_on_etcd_balances_a_deployment() -> Result<()> {
    let mut c = cluster::start_on_etcd()?;
    c.kubectl_in(&["apply", "-f", "-"], Some(CLIENT_YAML))?;
    c.kubectl_in(&["apply", "-f", "-"], Some(&web_yaml(3, "1")))?;
    wait_serving(&mut c, 3, UP, None)?;
    poll_until("the client pod to run", UP, || {
        Ok(c.get_json(&["pod", "client"])?["status"]["phase"]
            .eq("Running")
            .then_some(()))
    })?;
    let vip = cluster_ip(&c)?;
    let client = c.container("client", "c")?;
    let pods = wait_serving(&mut c, 3, UP, Some(&client))?;
    let t = tally(&client, &vip, 9)?;
    let want: BTreeMap<String, usize> = pods.iter().map(|p| (p.clone(), 3)).collect();
    assert_eq!(
        t, want,
        "9 requests to {vip} from the client pod, objects in etcd"
    );
    let embedded: Vec<_> = std::fs::read_dir(&c.dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".db"))
        .collect();
    assert!(
        embedded.is_empty(),
        "embedded store files written: {embedded:?}"
    );
    let left = c.stop()?;
    assert!(left.is_empty(), "left behind after stop: {left:?}");
    Ok(())
}

/// Runs `during` while a thread asks the ClusterIP in a loop; returns the
/// answers and the failures.
fn while_asking(
    c: &Cluster,
    client: &Container,
    vip: &str,
    during: impl FnOnce(&Cluster) -> Result<()>,
) -> Result<(Vec<String>, Vec<String>)> {
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let asker = s.spawn(|| {
            let mut answers = Vec::new();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match ask(client, vip) {
                    Ok(a) => answers.push(a),
                    Err(e) => failures.push(format!("{e:#}")),
                }
            }
            (answers, failures)
        });
        let r = during(c);
        stop.store(true, Ordering::Relaxed);
        let out = asker.join().expect("asker thread");
        r.map(|()| out)
    })
}

/// [`wait_serving`] without kproxy's lines (used from a shared borrow).
fn wait_serving_quiet(c: &Cluster, n: usize) -> Result<()> {
    poll_until(&format!("{n} ready pods and endpoints"), CHANGE, || {
        let pods = c.ready_pods("app=web")?;
        let eps = c.ready_endpoints("web")?;
        Ok((pods.len() == n && eps.len() == n).then_some(()))
    })
}

#[test]
fn liveness_failures_restart_and_oversized_pods_stay_pending() -> Result<()> {
    let c = cluster::start(&[])?;
    c.kubectl_in(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: sick
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: busybox
    command: [sleep, "3600"]
    livenessProbe:
      exec: {command: ["false"]}
      periodSeconds: 1
      failureThreshold: 1
---
apiVersion: v1
kind: Pod
metadata:
  name: huge
spec:
  containers:
  - name: app
    image: busybox
    command: [sleep, "3600"]
    resources:
      requests: {cpu: "1000"}
"#,
        ),
    )?;
    poll_until(
        "sick's restartCount to rise",
        Duration::from_secs(60),
        || {
            let v = c.get_json(&["pod", "sick"])?;
            let restarts = v["status"]["containerStatuses"][0]["restartCount"]
                .as_u64()
                .unwrap_or(0);
            Ok((restarts >= 1).then_some(()))
        },
    )?;
    let huge = poll_until("huge to be reported unschedulable", UP, || {
        let v = c.get_json(&["pod", "huge"])?;
        let cond = v["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")
            .cloned();
        Ok(cond.map(|cond| (v, cond)))
    })?;
    let (v, cond) = huge;
    ensure!(v["status"]["phase"] == "Pending", "{v}");
    ensure!(v["spec"]["nodeName"].is_null(), "bound anyway: {v}");
    let msg = cond["message"].as_str().unwrap_or_default();
    if !msg.contains("Insufficient cpu") {
        bail!("unschedulable reason does not name the CPU: {cond}");
    }
    let shown = c.kubectl(&["get", "pod", "huge"])?;
    ensure!(shown.contains("Pending"), "{shown}");
    Ok(())
}

#[test]
fn a_node_whose_heartbeat_stops_turns_not_ready_and_leaves_the_rotation() -> Result<()> {
    // Separate processes, so the kubelet alone can be paused; the node
    // monitor's grace period is 3 s instead of 40 s.
    let mut c = cluster::start_split("3s")?;
    c.kubectl_in(&["apply", "-f", "-"], Some(&web_yaml(2, "1")))?;
    wait_serving(&mut c, 2, UP, None)?;

    // The kubelet stops: no more Lease renewals (nor probes, nor status).
    c.signal("kubelet", libc::SIGSTOP)?;
    let paused = std::time::Instant::now();
    poll_until("the node to turn NotReady", CHANGE, || {
        let shown = c.kubectl(&["get", "node", kproxy_tests::cluster::NODE])?;
        Ok(shown.contains("NotReady").then_some(()))
    })?;
    poll_until("the endpoints to turn not ready", CHANGE, || {
        Ok(c.ready_endpoints("web")?.is_empty().then_some(()))
    })?;
    // …and kproxy dropped them from the dataplane.
    let want = c.base_backends;
    poll_until("kproxy to remove the endpoints", CHANGE, || {
        let last = c.log.last(|l| match l.kproxy_event() {
            Some(Event::Applied { backends, .. }) => Some(backends),
            _ => None,
        });
        Ok((last == Some(want)).then_some(()))
    })?;
    eprintln!(
        "node NotReady and endpoints out of the dataplane {:?} after the kubelet stopped",
        paused.elapsed()
    );
    c.signal("kubelet", libc::SIGCONT)?;
    let left = c.stop()?;
    assert!(left.is_empty(), "left behind after stop: {left:?}");
    Ok(())
}
