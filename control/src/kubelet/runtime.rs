//! Containers through the `crun` binary: one OCI bundle per container
//! (config.json generated here), `crun run` in the foreground as a child of
//! the kubelet (its exit status is the container's), `crun kill`/`exec`/
//! `delete`, all under a crun state root of the kubelet's own. Cgroups are
//! crun's cgroupfs ones under `/kcontrol/<node>/<pod hash>/<container>`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// The crun binary and its state directory.
#[derive(Clone, Debug)]
pub struct Runtime {
    pub crun: PathBuf,
    pub root: PathBuf,
}

/// What goes into one container's config.json.
pub struct Bundle<'a> {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub hostname: String,
    pub rootfs: &'a Path,
    pub netns: &'a Path,
    pub cgroup: String,
    /// Per-pod files bind-mounted over /etc/hosts, /etc/hostname.
    pub hosts: &'a Path,
    pub hostname_file: &'a Path,
    /// memory limit in bytes, CPU shares and quota (µs per 100 ms).
    pub memory_limit: Option<i64>,
    pub cpu_shares: Option<u64>,
    pub cpu_quota: Option<i64>,
}

/// Docker's default capability set.
const CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

impl Bundle<'_> {
    pub fn config(&self) -> Value {
        let mut resources = json!({ "devices": [{ "allow": false, "access": "rwm" }] });
        if let Some(m) = self.memory_limit {
            resources["memory"] = json!({ "limit": m });
        }
        let mut cpu = serde_json::Map::new();
        if let Some(s) = self.cpu_shares {
            cpu.insert("shares".into(), json!(s));
        }
        if let Some(q) = self.cpu_quota {
            cpu.insert("quota".into(), json!(q));
            cpu.insert("period".into(), json!(100_000));
        }
        if !cpu.is_empty() {
            resources["cpu"] = Value::Object(cpu);
        }
        let bind = |src: &Path, dst: &str, ro: bool| {
            let mut opts = vec!["rbind", "rprivate"];
            if ro {
                opts.push("ro");
            }
            json!({ "destination": dst, "type": "bind", "source": src, "options": opts })
        };
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": { "uid": 0, "gid": 0 },
                "args": self.args,
                "env": self.env,
                "cwd": self.cwd,
                "capabilities": {
                    "bounding": CAPS, "effective": CAPS, "permitted": CAPS,
                },
                "noNewPrivileges": false,
            },
            "root": { "path": self.rootfs, "readonly": true },
            "hostname": self.hostname,
            "mounts": [
                { "destination": "/proc", "type": "proc", "source": "proc" },
                { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                  "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
                { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
                  "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
                { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                  "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
                { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                  "options": ["nosuid", "noexec", "nodev"] },
                { "destination": "/sys", "type": "sysfs", "source": "sysfs",
                  "options": ["nosuid", "noexec", "nodev", "ro"] },
                { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                  "options": ["nosuid", "nodev", "mode=1777"] },
                { "destination": "/run", "type": "tmpfs", "source": "tmpfs",
                  "options": ["nosuid", "nodev", "mode=755"] },
                bind(self.hosts, "/etc/hosts", true),
                bind(self.hostname_file, "/etc/hostname", true),
            ],
            "linux": {
                "namespaces": [
                    { "type": "pid" },
                    { "type": "network", "path": self.netns },
                    { "type": "ipc" },
                    { "type": "uts" },
                    { "type": "mount" },
                ],
                "cgroupsPath": self.cgroup,
                "resources": resources,
                "maskedPaths": [
                    "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
                    "/sys/firmware", "/proc/scsi",
                ],
                "readonlyPaths": [
                    "/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq",
                    "/proc/sys", "/proc/sysrq-trigger",
                ],
            },
        })
    }

    /// Writes DIR/config.json.
    pub fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let text = serde_json::to_vec_pretty(&self.config())?;
        fs::write(dir.join("config.json"), text)
            .with_context(|| format!("writing {}/config.json", dir.display()))
    }
}

impl Runtime {
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.crun);
        c.arg("--root").arg(&self.root);
        c.stdin(Stdio::null());
        c
    }

    /// Checks that crun runs; returns its version line.
    pub async fn version(&self) -> Result<String> {
        let out = Command::new(&self.crun)
            .arg("--version")
            .output()
            .await
            .with_context(|| {
                format!(
                    "running {} (install the Debian package crun, e.g. with `cargo xtask setup`)",
                    self.crun.display()
                )
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or("unknown")
            .to_string())
    }

    /// Starts `crun run` for the bundle; the child exits when the container
    /// does, with its exit status. Output goes to `log`.
    pub fn run(&self, id: &str, bundle: &Path, log: &Path) -> Result<Child> {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let mut c = self.cmd();
        c.arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg(id)
            .stdout(out)
            .stderr(err)
            // Its own process group: a Ctrl-C meant for the kubelet reaches
            // the containers only through the kubelet's shutdown.
            .process_group(0)
            .kill_on_drop(false);
        c.spawn()
            .with_context(|| format!("starting {}", self.crun.display()))
    }

    /// Sends `signal` (e.g. "TERM", "KILL") to the container's init process.
    pub async fn kill(&self, id: &str, signal: &str) -> Result<()> {
        let out = self.cmd().args(["kill", id, signal]).output().await?;
        if !out.status.success() {
            bail!(
                "crun kill {id} {signal}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Removes the container whatever its state; fine when it is unknown.
    pub async fn delete(&self, id: &str) -> Result<()> {
        let out = self.cmd().args(["delete", "--force", id]).output().await?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !err.contains("does not exist") && !err.contains("not exist") {
            bail!("crun delete {id}: {}", err.trim());
        }
        Ok(())
    }

    /// Runs `cmd` in the container; its exit code and combined output, or
    /// an error when it did not finish within `timeout`.
    pub async fn exec(&self, id: &str, cmd: &[String], timeout: Duration) -> Result<(i32, String)> {
        let mut c = self.cmd();
        c.arg("exec").arg(id).args(cmd).kill_on_drop(true);
        let out = tokio::time::timeout(timeout, c.output())
            .await
            .map_err(|_| anyhow!("command timed out after {timeout:?}"))??;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status.code().unwrap_or(-1), text))
    }

    /// The IDs of all containers under this state root.
    pub async fn list(&self) -> Result<Vec<String>> {
        if !self.root.exists() {
            return Ok(Vec::new());
        }
        let out = self
            .cmd()
            .args(["list", "--format", "json"])
            .output()
            .await?;
        if !out.status.success() {
            bail!("crun list: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["id"].as_str().map(String::from))
            .collect())
    }
}

/// The roots of the mounted cgroup hierarchies: /sys/fs/cgroup itself on a
/// unified (v2) system, else each mounted controller directory (v1/hybrid).
fn cgroup_roots() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_path_buf()];
    }
    fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !p.is_symlink())
        .collect()
}

/// Removes the cgroup `rel` (e.g. "kcontrol/node/abc") and everything below
/// it in every hierarchy; cgroups still holding processes stay (and are
/// reported).
pub fn remove_cgroups(rel: &str) -> Result<()> {
    let rel = rel.trim_start_matches('/');
    let mut left = Vec::new();
    for root in cgroup_roots() {
        let p = root.join(rel);
        if p.exists() {
            rmdir_tree(&p, &mut left);
        }
    }
    if left.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("cgroups still busy: {}", left.join(", ")))
    }
}

fn rmdir_tree(p: &Path, left: &mut Vec<String>) {
    for e in fs::read_dir(p).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            rmdir_tree(&e.path(), left);
        }
    }
    if let Err(e) = fs::remove_dir(p)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        left.push(format!("{} ({e})", p.display()));
    }
}

/// Removes cgroup `rel` in every hierarchy where it has no children left.
pub fn remove_empty_cgroup(rel: &str) -> Result<()> {
    for root in cgroup_roots() {
        let p = root.join(rel);
        let has_children = fs::read_dir(&p)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_type().is_ok_and(|t| t.is_dir()));
        if p.exists() && !has_children {
            let _ = fs::remove_dir(&p);
        }
    }
    Ok(())
}
