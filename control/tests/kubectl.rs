//! The real kubectl against `kcontrol apiserver`, with the generated admin
//! kubeconfig: get, apply (create and three-way patch), tables, patch types,
//! scale, delete.

mod common;

use std::process::Command;

use common::{Server, TempDir};

struct Kubectl<'a> {
    server: &'a Server,
    cache: std::path::PathBuf,
}

impl Kubectl<'_> {
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
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.server.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args)
            .output()
            .expect("running kubectl (is it installed?)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
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
    let k = Kubectl {
        server: &server,
        cache: dir.0.join("kube-cache"),
    };

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

    // `kubectl get -w` streams changes (a watch with Table events).
    let mut watch = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&server.kubeconfig)
        .arg("--cache-dir")
        .arg(&k.cache)
        .args(["get", "configmaps", "--watch-only", "-o", "name"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut seen = Vec::new();
    let mut n = 0;
    while !seen
        .iter()
        .any(|l: &String| l.starts_with("configmap/watched"))
    {
        // Created until the watch (started asynchronously) reports one.
        n += 1;
        k.ok(&["create", "configmap", &format!("watched{n}")]);
        if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(500)) {
            seen.push(line);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "kubectl get -w printed {seen:?}"
        );
    }
    let _ = watch.kill();
    let _ = watch.wait();

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
