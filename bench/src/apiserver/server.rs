//! A `kcontrol apiserver` child on a temporary data dir, loopback, port 0.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use kube::config::{KubeConfigOptions, Kubeconfig};

const START_DEADLINE: Duration = Duration::from_secs(60);

pub struct Server {
    child: Child,
    pub url: String,
    pub data_dir: PathBuf,
    pub command: String,
}

impl Server {
    pub async fn start(kcontrol: &Path, extra: &[String]) -> Result<Server> {
        let data_dir = std::env::temp_dir().join(format!(
            "kcontrol-bench-{}-{}",
            std::process::id(),
            rand_tag()
        ));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir)?;
        let mut cmd = Command::new(kcontrol);
        cmd.arg("apiserver")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra);
        let command = format!("{cmd:?}").replace('"', "");
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", kcontrol.display()))?;
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + START_DEADLINE;
        let mut server = Server {
            child,
            url: String::new(),
            data_dir,
            command,
        };
        server.url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        break rest
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_owned();
                    }
                }
                Err(_) => bail!("kcontrol did not report its address within {START_DEADLINE:?}"),
            }
        };
        // Readiness: /readyz answers "ok" (polled with a deadline).
        let client = server.client().await?;
        loop {
            let req = http::Request::get("/readyz").body(Vec::new())?;
            if let Ok(text) = client.request_text(req).await
                && text.trim() == "ok"
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "kcontrol at {} not ready within {START_DEADLINE:?}",
                    server.url
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(server)
    }

    /// A client with the admin token from the kubeconfig the server wrote.
    /// Each client has its own connection pool.
    pub async fn client(&self) -> Result<kube::Client> {
        let kc = Kubeconfig::read_from(self.data_dir.join("kubeconfig.yaml"))
            .map_err(|e| anyhow!("reading the kubeconfig: {e}"))?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| anyhow!("kubeconfig: {e}"))?;
        Ok(kube::Client::try_from(cfg)?)
    }

    /// CPU seconds (user + system) the apiserver used so far, and its peak
    /// resident set in MiB.
    pub fn usage(&self) -> (f64, f64) {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may contain spaces).
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let hwm_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        (ticks / hz.max(1.0), hwm_kib / 1024.0)
    }
}

fn rand_tag() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}
