//! Real etcd for tests and benchmarks: one member or a cluster of several,
//! each a `/usr/bin/etcd` process (Debian's etcd-server, installed by
//! `cargo xtask setup`) on free loopback ports with its data in a temporary
//! directory. Dropping the [`EtcdCluster`] kills the members and removes
//! the directory. Used by the kproxy tests, kcontrol's tests, the cluster
//! runner and `cargo xtask bench apiserver --store etcd`.
//!
//! ```no_run
//! let cluster = testbed::etcd::EtcdCluster::start(3).unwrap();
//! println!("--store {}", cluster.url()); // etcd://127.0.0.1:P1,…
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long the members may take to elect a leader and answer.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// The etcd binary: `$KCONTROL_ETCD`, else `/usr/bin/etcd`, else `etcd` on
/// the PATH.
pub fn etcd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KCONTROL_ETCD") {
        return p.into();
    }
    let debian = Path::new("/usr/bin/etcd");
    if debian.exists() {
        return debian.into();
    }
    "etcd".into()
}

pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Member {
    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct EtcdCluster {
    pub members: Vec<Member>,
    dir: tempfile::TempDir,
}

/// `n` distinct free loopback ports (held until all are picked).
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// One HTTP/1.0 exchange with a member's client port; the whole answer.
fn http(port: u16, request: &str) -> Option<String> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    Some(answer)
}

/// The string value of `"field":"…"` in a JSON text.
fn json_field<'a>(text: &'a str, field: &str) -> Option<&'a str> {
    let pat = format!("\"{field}\":\"");
    let start = text.find(&pat)? + pat.len();
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

/// `GET /health` on a member: true once it answers `"health":"true"` (it
/// has a leader and serves reads).
fn healthy(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl EtcdCluster {
    /// Starts `members` etcd members (1 or more) and waits until every one
    /// is healthy.
    pub fn start(members: usize) -> anyhow::Result<EtcdCluster> {
        anyhow::ensure!(members >= 1, "an etcd cluster has at least one member");
        // A port picked here can be taken by someone else before etcd binds
        // it: then start again on other ports.
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(members) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried"))
    }

    fn try_start(n: usize) -> anyhow::Result<EtcdCluster> {
        let dir = tempfile::Builder::new()
            .prefix("kcontrol-etcd-")
            .tempdir()
            .context("temporary directory for etcd")?;
        let ports = free_ports(2 * n).context("free loopback ports")?;
        let token = dir
            .path()
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "kcontrol".into());
        let initial: Vec<String> = (0..n)
            .map(|i| format!("m{i}=http://127.0.0.1:{}", ports[2 * i + 1]))
            .collect();
        let initial = initial.join(",");
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            dir,
        };
        let binary = etcd_binary();
        for i in 0..n {
            let (client_port, peer_port) = (ports[2 * i], ports[2 * i + 1]);
            let data_dir = cluster.dir.path().join(format!("m{i}"));
            let log = cluster.dir.path().join(format!("m{i}.log"));
            let out = std::fs::File::create(&log)?;
            let client_url = format!("http://127.0.0.1:{client_port}");
            let peer_url = format!("http://127.0.0.1:{peer_port}");
            let child = Command::new(&binary)
                .arg(format!("--name=m{i}"))
                .arg("--data-dir")
                .arg(&data_dir)
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster={initial}"))
                .arg("--initial-cluster-state=new")
                .arg(format!("--initial-cluster-token={token}"))
                .args(["--logger=zap", "--log-outputs=stderr"])
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .with_context(|| {
                    format!(
                        "starting {} (Debian package etcd-server; `cargo xtask setup` installs it)",
                        binary.display()
                    )
                })?;
            cluster.members.push(Member {
                name: format!("m{i}"),
                client_port,
                peer_port,
                data_dir,
                log,
                child: Some(child),
            });
        }
        cluster.wait_healthy(START_DEADLINE)?;
        Ok(cluster)
    }

    /// Waits until every running member answers healthy.
    pub fn wait_healthy(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        for m in &mut self.members {
            if m.child.is_none() {
                continue;
            }
            loop {
                if let Some(c) = m.child.as_mut()
                    && let Ok(Some(status)) = c.try_wait()
                {
                    m.child = None;
                    bail!(
                        "etcd member {} exited ({status}):\n{}",
                        m.name,
                        log_tail(&m.log)
                    );
                }
                if healthy(m.client_port) {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "etcd member {} not healthy within {within:?}:\n{}",
                        m.name,
                        log_tail(&m.log)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The index of the member that is the raft leader, as the running
    /// members report it (etcd's JSON gateway, `/v3/maintenance/status`).
    pub fn leader(&self) -> Option<usize> {
        for m in self.members.iter().filter(|m| m.is_running()) {
            let body = "{}";
            let req = format!(
                "POST /v3/maintenance/status HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let Some(answer) = http(m.client_port, &req) else {
                continue;
            };
            let (Some(me), Some(leader)) = (
                json_field(&answer, "member_id"),
                json_field(&answer, "leader"),
            ) else {
                continue;
            };
            if me == leader {
                return self.members.iter().position(|x| x.name == m.name);
            }
            // Ask the others: the leader reports itself.
        }
        None
    }

    /// The client endpoints of the members (`http://127.0.0.1:PORT`).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// `etcd://127.0.0.1:P1,127.0.0.1:P2,…`, for `kcontrol apiserver --store`.
    pub fn url(&self) -> String {
        let eps: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect();
        format!("etcd://{}", eps.join(","))
    }

    /// SIGKILLs member `i` (no chance to flush or hand over leadership).
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
    }
}
