//! The real kubectl against `kcontrol apiserver`, with the generated admin
//! kubeconfig: get, apply (create and three-way patch), tables, patch types,
//! scale, delete; and the same core workflow (apply, get columns, get -w,
//! describe, delete) with the oldest and the newest versioned kubectl on the
//! machine and the default one.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use common::{Server, TempDir};

/// The test bed's kubectl runner with this file's assertions: `bin`
/// against `server`, with a cache dir of its own.
struct Kubectl(testbed::Kubectl);

impl Kubectl {
    fn new(server: &Server, cache: &Path, bin: &Path) -> Kubectl {
        Kubectl(
            testbed::Kubectl::new(&server.kubeconfig)
                .bin(bin)
                .cache_dir(cache),
        )
    }

    /// Runs kubectl; returns stdout, panics with stderr on failure.
    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "kubectl {args:?} failed:\n{err}\n{out}");
        out
    }

    /// Runs kubectl expecting failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(!ok, "kubectl {args:?} should have failed:\n{out}");
        err
    }

    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = self
            .0
            .output(args, None)
            .unwrap_or_else(|e| panic!("{e:#}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Bound on every wait for kubectl's output: generous, since the suite runs
/// kubectl, apiservers and compilers side by side on two cores.
const WAIT: Duration = Duration::from_secs(60);

/// A running `kubectl get … -w`; killed on drop.
struct Watching {
    child: Child,
    /// Its stdout, line by line.
    lines: Receiver<String>,
    /// What it printed so far (for failure messages).
    seen: Vec<String>,
}

impl Kubectl {
    /// Starts `kubectl ARGS` (a `get -w`) and returns once kubectl has the
    /// 200 of its watch request, which it logs at `-v=6`. The apiserver
    /// fixes a watch's starting point before it answers (watch.rs), so
    /// every write after this returns is printed as a change. Before it, a
    /// write can be part of the watch's initial state, and `get NAME -w`
    /// does not print that: it takes the watch's first event for the
    /// object it printed already (issue 22).
    fn watch(&self, args: &[&str]) -> Watching {
        let mut child = self
            .0
            .command()
            .args(args)
            .arg("-v=6")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running kubectl {args:?} failed: {e}"));
        let lines = forward_lines(child.stdout.take().unwrap());
        let log = forward_lines(child.stderr.take().unwrap());
        let watching = Watching {
            child,
            lines,
            seen: Vec::new(),
        };
        let deadline = Instant::now() + WAIT;
        let mut logged = Vec::new();
        // 1.27: `GET https://…&watch=true 200 OK in 2 milliseconds`;
        // 1.30+: `"Response" verb="GET" url="https://…&watch=true" status="200 OK" …`.
        while !logged
            .iter()
            .any(|l: &String| l.contains("watch=true") && l.contains("200 OK"))
        {
            match log.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => logged.push(l),
                Err(_) => panic!(
                    "kubectl {args:?} did not log the 200 of a watch request within {WAIT:?}; it logged:\n{}\nand printed {:?}",
                    logged.join("\n"),
                    watching.lines.try_iter().collect::<Vec<_>>()
                ),
            }
        }
        // Keep draining its log so that kubectl never blocks on it.
        std::thread::spawn(move || log.iter().for_each(drop));
        watching
    }
}

impl Watching {
    /// Waits (up to [`WAIT`]) for a printed line that satisfies `want`.
    fn until(&mut self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) if want(&l) => return l,
                Ok(l) => self.seen.push(l),
                Err(_) => panic!(
                    "kubectl get -w did not print {what} within {WAIT:?}; it printed {:?}",
                    self.seen
                ),
            }
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines of `from`, read on a thread of their own.
fn forward_lines(from: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(from).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

const APP: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  labels: {app: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: https, port: 443, targetPort: 8443}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx:1.27
        ports: [{containerPort: 8080}]
        env: [{name: A, value: "1"}]
        resources:
          limits: {cpu: 500m, memory: 128Mi}
"#;

/// The second column of the row named `name` in `kubectl get` output.
fn column(table: &str, header: &str, row: &str) -> String {
    let mut lines = table.lines();
    let head = lines.next().expect("header line");
    let start = head
        .find(header)
        .unwrap_or_else(|| panic!("no column {header} in {head}"));
    let line = lines
        .find(|l| l.split_whitespace().next() == Some(row))
        .unwrap_or_else(|| panic!("no row {row} in\n{table}"));
    line[start..]
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn kubectl_end_to_end() {
    let dir = TempDir::new("kubectl");
    let server = Server::start(&dir.0, &[]);
    let k = Kubectl::new(&server, &dir.0.join("kube-cache"), Path::new("kubectl"));

    // Namespaces that exist from the start, as a server-side table.
    let ns = k.ok(&["get", "ns"]);
    assert!(ns.starts_with("NAME"), "{ns}");
    for want in ["default", "kube-system"] {
        assert_eq!(column(&ns, "STATUS", want), "Active", "{ns}");
    }

    assert_eq!(k.ok(&["auth", "can-i", "create", "pods"]).trim(), "yes");

    // Typed `kubectl create …` commands send protobuf bodies.
    k.ok(&["create", "namespace", "team"]);
    k.ok(&[
        "create",
        "configmap",
        "cfg",
        "-n",
        "team",
        "--from-literal=a=b",
    ]);
    k.ok(&[
        "create",
        "deployment",
        "api",
        "-n",
        "team",
        "--image=nginx:1.27",
        "--replicas=0",
    ]);
    k.ok(&[
        "expose",
        "deployment",
        "api",
        "-n",
        "team",
        "--port=80",
        "--target-port=8080",
    ]);
    assert_eq!(
        k.ok(&["get", "cm", "cfg", "-n", "team", "-o", "jsonpath={.data.a}"]),
        "b"
    );
    assert_eq!(
        k.ok(&[
            "get",
            "deploy",
            "api",
            "-n",
            "team",
            "-o",
            "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].image}"
        ]),
        "0 nginx:1.27"
    );
    assert_eq!(
        k.ok(&[
            "get",
            "svc",
            "api",
            "-n",
            "team",
            "-o",
            "jsonpath={.spec.selector.app} {.spec.ports[0].targetPort}"
        ]),
        "api 8080"
    );
    k.ok(&["delete", "namespace", "team"]);
    assert!(
        k.ok(&["get", "cm", "-n", "team", "-o", "name"])
            .trim()
            .is_empty()
    );

    // `kubectl get -w` streams changes (a watch with Table events): a
    // ConfigMap created once the watch is established is printed.
    let mut watch = k.watch(&["get", "configmaps", "--watch-only", "-o", "name"]);
    k.ok(&["create", "configmap", "watched"]);
    watch.until("configmap/watched", |l| l == "configmap/watched");
    drop(watch);

    // First apply creates, the second changes nothing, an edited one patches.
    let app = dir.0.join("app.yaml");
    std::fs::write(&app, APP).unwrap();
    let out = k.ok(&["apply", "-f", app.to_str().unwrap()]);
    assert!(
        out.contains("service/web created") && out.contains("deployment.apps/web created"),
        "{out}"
    );
    let out = k.ok(&["apply", "-f", app.to_str().unwrap()]);
    assert!(
        out.contains("service/web unchanged") && out.contains("deployment.apps/web unchanged"),
        "{out}"
    );
    std::fs::write(
        &app,
        APP.replace("replicas: 2", "replicas: 3")
            .replace("nginx:1.27", "nginx:1.28"),
    )
    .unwrap();
    let out = k.ok(&["apply", "-f", app.to_str().unwrap()]);
    assert!(out.contains("deployment.apps/web configured"), "{out}");
    let dep = k.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].image} {.metadata.generation} {.spec.template.spec.containers[0].env[0].name}"]);
    assert_eq!(dep, "3 nginx:1.28 2 A");

    // The Service got a ClusterIP from 10.96.0.0/12, shown in the table.
    let svc = k.ok(&["get", "svc", "web"]);
    let ip: std::net::Ipv4Addr = column(&svc, "CLUSTER-IP", "web")
        .parse()
        .expect("cluster IP");
    assert_eq!(
        u32::from(ip) & 0xfff0_0000,
        u32::from(std::net::Ipv4Addr::new(10, 96, 0, 0)),
        "{svc}"
    );
    assert_eq!(column(&svc, "TYPE", "web"), "ClusterIP");
    assert_eq!(column(&svc, "PORT(S)", "web"), "80/TCP,443/TCP");
    let wide = k.ok(&["get", "deploy", "-o", "wide"]);
    assert_eq!(column(&wide, "IMAGES", "web"), "nginx:1.28", "{wide}");
    assert_eq!(column(&wide, "SELECTOR", "web"), "app=web", "{wide}");

    // Patch types: strategic (default), merge, JSON.
    k.ok(&[
        "patch",
        "svc",
        "web",
        "-p",
        r#"{"spec":{"type":"NodePort"}}"#,
    ]);
    let svc = k.ok(&["get", "svc", "web"]);
    let ports = column(&svc, "PORT(S)", "web");
    assert!(
        ports.starts_with("80:3") && ports.contains(",443:3"),
        "{svc}"
    );
    k.ok(&[
        "patch",
        "svc",
        "web",
        "--type=merge",
        "-p",
        r#"{"metadata":{"labels":{"x":"y"}}}"#,
    ]);
    k.ok(&[
        "patch",
        "svc",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/ports/0/port","value":8081}]"#,
    ]);
    let svc = k.ok(&[
        "get",
        "svc",
        "web",
        "-o",
        "jsonpath={.metadata.labels.x} {.spec.ports[0].port} {.spec.clusterIP}",
    ]);
    assert_eq!(svc, format!("y 8081 {ip}"));

    k.ok(&["scale", "deploy", "web", "--replicas=5"]);
    assert_eq!(
        k.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"]),
        "5"
    );

    // Pods: -o wide shows the priority-1 columns.
    k.ok(&[
        "run",
        "p1",
        "--image=busybox:1.36",
        "--labels=app=p",
        "--",
        "sleep",
        "1000",
    ]);
    let pods = k.ok(&["get", "pods", "-o", "wide"]);
    for col in [
        "NAME",
        "READY",
        "STATUS",
        "RESTARTS",
        "AGE",
        "IP",
        "NODE",
        "NOMINATED NODE",
    ] {
        assert!(pods.lines().next().unwrap().contains(col), "{pods}");
    }
    assert_eq!(column(&pods, "STATUS", "p1"), "Pending");
    assert_eq!(column(&pods, "NODE", "p1"), "<none>");
    assert!(
        k.ok(&["get", "pods", "-l", "app=p", "-o", "name"])
            .contains("pod/p1")
    );
    assert!(
        k.ok(&["get", "pods", "-l", "app=nope", "-o", "name"])
            .trim()
            .is_empty()
    );

    // Server-side validation errors come back field by field.
    let bad = dir.0.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec:\n  ports: [{port: 0, protocol: ICMP}]\n",
    )
    .unwrap();
    let err = k.fails(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(
        err.contains("spec.ports[0].port") && err.contains("spec.ports[0].protocol"),
        "{err}"
    );

    // Server-side apply, then the same file client-side: both converge.
    let ssa = dir.0.join("ssa.yaml");
    std::fs::write(
        &ssa,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ssa}\ndata: {a: \"1\", b: \"2\"}\n",
    )
    .unwrap();
    let out = k.ok(&["apply", "--server-side", "-f", ssa.to_str().unwrap()]);
    assert!(out.contains("configmap/ssa serverside-applied"), "{out}");
    std::fs::write(
        &ssa,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ssa}\ndata: {a: \"1\"}\n",
    )
    .unwrap();
    k.ok(&["apply", "--server-side", "-f", ssa.to_str().unwrap()]);
    assert_eq!(
        k.ok(&["get", "cm", "ssa", "-o", "jsonpath={.data}"]),
        r#"{"a":"1"}"#
    );

    // Delete what was applied; it is gone.
    let out = k.ok(&["delete", "-f", app.to_str().unwrap()]);
    assert!(out.contains("service \"web\" deleted"), "{out}");
    k.ok(&["delete", "pod", "p1"]);
    let err = k.fails(&["get", "svc", "web"]);
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
    assert!(k.ok(&["get", "deploy", "-o", "name"]).trim().is_empty());
}

/// The folder the machine's `kubectl` dispatcher lives in (it holds the
/// versioned binaries `kubectl.1.27` … `kubectl.1.33`).
fn kubectl_dir() -> PathBuf {
    let path = std::env::var_os("PATH").expect("PATH is set");
    let found = std::env::split_paths(&path)
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())
        .expect("no kubectl on PATH (cargo xtask setup installs it)");
    std::fs::canonicalize(&found)
        .unwrap_or_else(|e| panic!("resolving {}: {e}", found.display()))
        .parent()
        .expect("kubectl has a folder")
        .to_path_buf()
}

/// `kubectl.VERSION` next to the dispatcher; a missing one fails the test.
fn versioned(version: &str) -> PathBuf {
    let dir = kubectl_dir();
    let bin = dir.join(format!("kubectl.{version}"));
    assert!(
        bin.is_file(),
        "kubectl {version} is required for this test but {} does not exist \
         (the versioned kubectl binaries ship next to the kubectl dispatcher in {})",
        bin.display(),
        dir.display()
    );
    bin
}

/// The header line of a `kubectl get` table, split into its columns
/// (multi-word headers such as `NOMINATED NODE` are not used here).
fn header(table: &str) -> Vec<String> {
    table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The line in `description` that starts with `field:`, with the value
/// after it (describe's `Name:   value` layout).
fn described<'a>(description: &'a str, field: &str) -> &'a str {
    description
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(&format!("{field}:")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {field}: in\n{description}"))
}

/// apply -f (Deployment + Service), get with the upstream columns, get -w
/// printing a change another client made, describe, delete — with `bin`.
fn core_workflow(bin: &Path, tag: &str) {
    let dir = TempDir::new(tag);
    let server = Server::start(&dir.0, &[]);
    let k = Kubectl::new(&server, &dir.0.join("kube-cache"), bin);
    let client_version = k.ok(&["version", "--client", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&client_version).unwrap();
    eprintln!(
        "{}: client {}",
        bin.display(),
        v["clientVersion"]["gitVersion"]
    );

    // apply -f creates both (plain apply: client-side validation against
    // /openapi/v2, three-way merge patch on later applies).
    let app = dir.0.join("app.yaml");
    std::fs::write(&app, APP).unwrap();
    let out = k.ok(&["apply", "-f", app.to_str().unwrap()]);
    assert!(
        out.contains("service/web created") && out.contains("deployment.apps/web created"),
        "{out}"
    );
    std::fs::write(&app, APP.replace("replicas: 2", "replicas: 3")).unwrap();
    let out = k.ok(&["apply", "-f", app.to_str().unwrap()]);
    assert!(
        out.contains("service/web unchanged") && out.contains("deployment.apps/web configured"),
        "{out}"
    );

    // get: the columns real kubectl shows.
    let svc = k.ok(&["get", "svc"]);
    assert_eq!(
        header(&svc),
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ],
        "{svc}"
    );
    assert_eq!(column(&svc, "TYPE", "web"), "ClusterIP");
    assert_eq!(column(&svc, "EXTERNAL-IP", "web"), "<none>");
    assert_eq!(column(&svc, "PORT(S)", "web"), "80/TCP,443/TCP");
    let cluster_ip = column(&svc, "CLUSTER-IP", "web");
    cluster_ip
        .parse::<std::net::Ipv4Addr>()
        .unwrap_or_else(|_| panic!("CLUSTER-IP {cluster_ip:?}"));
    let dep = k.ok(&["get", "deployments"]);
    assert_eq!(
        header(&dep),
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
        "{dep}"
    );
    assert_eq!(column(&dep, "READY", "web"), "0/3");
    let wide = k.ok(&["get", "deploy", "-o", "wide"]);
    assert_eq!(
        header(&wide),
        [
            "NAME",
            "READY",
            "UP-TO-DATE",
            "AVAILABLE",
            "AGE",
            "CONTAINERS",
            "IMAGES",
            "SELECTOR"
        ],
        "{wide}"
    );
    assert_eq!(column(&wide, "SELECTOR", "web"), "app=web");
    k.ok(&[
        "run",
        "p1",
        "--image=busybox:1.36",
        "--labels=app=p",
        "--",
        "sleep",
        "1000",
    ]);
    let pods = k.ok(&["get", "pods"]);
    assert_eq!(
        header(&pods),
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        "{pods}"
    );
    assert_eq!(column(&pods, "READY", "p1"), "0/1");
    assert_eq!(column(&pods, "STATUS", "p1"), "Pending");

    // get -w: after the initial row, a change made by another client
    // (kube-rs, scaling the deployment to 7) once kubectl watches is printed.
    let mut watch = k.watch(&["get", "deploy", "web", "-w"]);
    // The header and the current row, from the GET before the watch.
    watch.until("the row of web", |l| {
        l.split_whitespace().next() == Some("web")
    });
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let c = server.client().await;
            let r = common::patch(
                &c,
                "/apis/apps/v1/namespaces/default/deployments/web",
                "application/merge-patch+json",
                &serde_json::json!({"spec": {"replicas": 7}}),
            )
            .await;
            assert_eq!(r.code, 200, "{}", String::from_utf8_lossy(&r.body));
        });
    let changed = watch.until("the scaled deployment (READY 0/7)", |l| {
        l.split_whitespace().nth(1) == Some("0/7")
    });
    drop(watch);
    assert!(changed.starts_with("web"), "{changed}");

    // describe: deployment, service, pod.
    let d = k.ok(&["describe", "deployment", "web"]);
    assert_eq!(described(&d, "Name"), "web");
    assert_eq!(described(&d, "Selector"), "app=web");
    assert!(described(&d, "Replicas").starts_with("7 desired"), "{d}");
    assert_eq!(described(&d, "StrategyType"), "RollingUpdate");
    assert_eq!(described(&d, "Image"), "nginx:1.27");
    let d = k.ok(&["describe", "service", "web"]);
    assert_eq!(described(&d, "Type"), "ClusterIP");
    assert_eq!(described(&d, "IP"), cluster_ip);
    assert_eq!(described(&d, "Selector"), "app=web");
    let ports: Vec<&str> = d
        .lines()
        .filter_map(|l| l.strip_prefix("Port:"))
        .map(str::trim)
        .collect();
    assert_eq!(ports, ["http  80/TCP", "https  443/TCP"], "{d}");
    let d = k.ok(&["describe", "pod", "p1"]);
    assert_eq!(described(&d, "Status"), "Pending");
    assert_eq!(described(&d, "Node"), "<none>");
    assert_eq!(described(&d, "Image"), "busybox:1.36");
    assert_eq!(described(&d, "Labels"), "app=p");

    // delete: by file and by name; gone afterwards.
    let out = k.ok(&["delete", "-f", app.to_str().unwrap()]);
    assert!(
        out.contains("service \"web\" deleted") && out.contains("deployment.apps \"web\" deleted"),
        "{out}"
    );
    let out = k.ok(&["delete", "pod", "p1"]);
    assert!(out.contains("pod \"p1\" deleted"), "{out}");
    for what in ["svc/web", "deploy/web", "pod/p1"] {
        let err = k.fails(&["get", what]);
        assert!(
            err.contains("NotFound") || err.contains("not found"),
            "{err}"
        );
    }
}

#[test]
fn kubectl_1_27_oldest() {
    core_workflow(&versioned("1.27"), "kubectl127");
}

#[test]
fn kubectl_1_33_newest() {
    core_workflow(&versioned("1.33"), "kubectl133");
}

#[test]
fn kubectl_default() {
    core_workflow(Path::new("kubectl"), "kubectldefault");
}

/// kubectl against a dual-stack apiserver: `apply` of a PreferDualStack
/// Service gets an IPv4 and an IPv6 ClusterIP (the table shows the
/// primary), `patch` to SingleStack drops the IPv6 one, and a Service
/// asking for an address another holds is refused with the field named.
#[test]
fn kubectl_dual_stack_service() {
    let dir = TempDir::new("kubectl-dualstack");
    let server = Server::start(&dir.0, &["--service-cidr", "10.96.0.0/24,fd00:10:96::/112"]);
    let k = Kubectl::new(&server, &dir.0.join("kube-cache"), Path::new("kubectl"));
    let web = "apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  ipFamilyPolicy: PreferDualStack
  selector:
    app: web
  ports:
  - port: 80
";
    let out =
        k.0.run_stdin(&["apply", "-f", "-"], Some(web))
            .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(out.contains("service/web created"), "{out}");
    let get = |path: &str| k.ok(&["get", "svc", "web", "-o", &format!("jsonpath={path}")]);
    let ips: Vec<String> = serde_json::from_str(&get("{.spec.clusterIPs}")).unwrap();
    assert_eq!(ips.len(), 2, "{ips:?}");
    let v4: std::net::Ipv4Addr = ips[0].parse().expect("primary is IPv4");
    let v6: std::net::Ipv6Addr = ips[1].parse().expect("secondary is IPv6");
    assert!(v4.octets()[..3] == [10, 96, 0], "{v4}");
    assert_eq!(v6.segments()[..3], [0xfd00, 0x10, 0x96], "{v6}");
    assert_eq!(get("{.spec.ipFamilies}"), r#"["IPv4","IPv6"]"#);
    let table = k.ok(&["get", "svc", "web"]);
    assert_eq!(column(&table, "CLUSTER-IP", "web"), ips[0], "{table}");

    let taken = web.replace("name: web", "name: copy").replace(
        "ipFamilyPolicy: PreferDualStack",
        &format!("clusterIP: {}", ips[1]),
    );
    let refused =
        k.0.output(&["apply", "-f", "-"], Some(&taken))
            .unwrap_or_else(|e| panic!("{e:#}"));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(
        err.contains("spec.clusterIPs") && err.contains("provided IP is already allocated"),
        "{err}"
    );

    k.ok(&[
        "patch",
        "svc",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"ipFamilyPolicy":"SingleStack"}}"#,
    ]);
    assert_eq!(get("{.spec.clusterIPs}"), format!(r#"["{}"]"#, ips[0]));
    let out =
        k.0.run_stdin(&["apply", "-f", "-"], Some(&taken))
            .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        out.contains("service/copy created"),
        "the released IPv6 address is free: {out}"
    );
}
