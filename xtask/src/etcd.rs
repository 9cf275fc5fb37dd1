//! One real etcd member for `cargo xtask bench apiserver --store etcd`:
//! `/usr/bin/etcd` (Debian's etcd-server, installed by `cargo xtask setup`;
//! `$KCONTROL_ETCD` overrides it) on free loopback ports with its data in a
//! fresh temporary directory, started the way kcontrol-store's
//! `etcd_cluster` test fixture starts its members (that fixture lives in a
//! crate with etcd's gRPC client, too heavy for xtask). Dropping it kills
//! the member and removes the directory.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

pub struct Etcd {
    child: Child,
    dir: PathBuf,
    pub client_port: u16,
}

fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KCONTROL_ETCD") {
        return p.into();
    }
    let debian = Path::new("/usr/bin/etcd");
    if debian.exists() {
        debian.into()
    } else {
        "etcd".into()
    }
}

/// `GET /health` answers `"health":"true"` once the member has a leader.
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

impl Etcd {
    /// Starts one member and waits (up to 30 s) until it is healthy.
    pub fn start() -> Result<Etcd> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "kcontrol-bench-etcd-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Two free ports, held until both are picked.
        let (client_port, peer_port) = {
            let a = TcpListener::bind("127.0.0.1:0")?;
            let b = TcpListener::bind("127.0.0.1:0")?;
            (a.local_addr()?.port(), b.local_addr()?.port())
        };
        let log_path = dir.join("etcd.log");
        let log = std::fs::File::create(&log_path)?;
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let bin = binary();
        let child = Command::new(&bin)
            .arg("--name=bench")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=bench={peer}"))
            .arg("--initial-cluster-state=new")
            .args(["--logger=zap", "--log-outputs=stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (Debian package etcd-server; `cargo xtask setup` installs it)",
                    bin.display()
                )
            })?;
        let mut etcd = Etcd {
            child,
            dir,
            client_port,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !healthy(client_port) {
            if let Ok(Some(status)) = etcd.child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("etcd exited ({status}):\n{log}");
            }
            if Instant::now() >= deadline {
                bail!("etcd not healthy within 30 s (log: {})", log_path.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(etcd)
    }

    /// `etcd://127.0.0.1:PORT`, kcontrol's `--store` value.
    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
