//! Network namespace guard and helpers to run code inside a namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::util::{cmd, cmd_output, poll_until, require_root};

/// Where `ip netns` keeps its namespace handles.
pub const NETNS_DIR: &str = "/var/run/netns";

/// Prefix of every namespace a [`Netns`] gets (the tests' `kpt-`, which
/// stale-namespace cleanup relies on).
pub const NETNS_PREFIX: &str = "kpt-";

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static STALE_CLEANUP: Once = Once::new();

/// A named network namespace (`ip netns add`), deleted on drop.
///
/// The name is `kpt-<pid>-<counter>-<role>`, unique per test process. On drop
/// (including while unwinding from a panic) every process inside it is killed
/// (`ip netns pids`) and the namespace is deleted (`ip netns del`), which
/// also destroys the veths that live in it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace for `role` (e.g. "client", "node", "backend1")
    /// and brings its loopback up.
    pub fn new(role: &str) -> Result<Netns> {
        require_root();
        STALE_CLEANUP.call_once(cleanup_stale);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{NETNS_PREFIX}{}-{n}-{role}", std::process::id());
        cmd("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs `ip -n <name> args…`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        cmd("ip", &full)
    }

    /// Runs `ip netns exec <name> program args…` and returns stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        cmd("ip", &full)
    }

    /// Like [`Netns::exec`] but returns the output whatever the exit status.
    pub fn exec_output(&self, program: &str, args: &[&str]) -> Result<std::process::Output> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        cmd_output("ip", &full)
    }

    /// Sets a sysctl inside the namespace (e.g. `net.ipv4.ip_forward`, "1").
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Reads a sysctl inside the namespace.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        Ok(self.exec("sysctl", &["-n", key])?.trim().to_owned())
    }

    /// Process ids whose network namespace is this one.
    pub fn pids(&self) -> Vec<i32> {
        pids_of(&self.name)
    }

    /// Runs `f` on a thread that has entered this namespace; see [`run_in`].
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        run_in(&self.name, f)
    }

    /// Like [`Netns::run`] for a closure that returns a `Result`.
    pub fn try_run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        run_in(&self.name, f)?
    }

    /// Whether a namespace with this name is currently registered.
    pub fn exists(name: &str) -> bool {
        Path::new(NETNS_DIR).join(name).exists()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = kill_and_delete(&self.name) {
            eprintln!("testbed: cleanup of netns {} failed: {e:#}", self.name);
        }
    }
}

/// Spawns a thread that enters the namespace `ns` (setns on
/// `/var/run/netns/<ns>` with CLONE_NEWNET), runs `f` and returns its
/// result. Sockets created by `f` belong to that namespace for their whole
/// life and may be used from any thread afterwards. A panic in `f` is
/// propagated to the caller.
pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name(format!("in-{ns}"))
            .spawn_scoped(s, move || -> Result<T> {
                enter(ns)?;
                Ok(f())
            })
            .context("spawn thread")?;
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Moves the calling thread into the network namespace `ns`.
fn enter(ns: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(ns);
    let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: the fd is valid while `file` lives; setns only affects this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns into {}", path.display()));
    }
    Ok(())
}

fn pids_of(name: &str) -> Vec<i32> {
    let own = std::process::id() as i32;
    match cmd("ip", &["netns", "pids", name]) {
        Ok(out) => out
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .filter(|p| *p != own)
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn kill_and_delete(name: &str) -> Result<()> {
    for pid in pids_of(name) {
        // SAFETY: plain kill(2); the pid was listed as living in our namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    poll_until(
        &format!("processes in netns {name} to exit"),
        Duration::from_secs(5),
        || Ok(pids_of(name).is_empty().then_some(())),
    )?;
    let mut last = None;
    for _ in 0..3 {
        let out = cmd_output("ip", &["netns", "del", name])?;
        if out.status.success() || !Netns::exists(name) {
            return Ok(());
        }
        last = Some(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("ip netns del {name}: {}", last.unwrap_or_default())
}

/// Deletes namespaces left behind by earlier runs whose process is gone
/// (e.g. killed by SIGKILL, where no destructor ran). Namespaces of live
/// processes (concurrent test binaries) are left alone.
fn cleanup_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("testbed: removing stale netns {name}");
        if let Err(e) = kill_and_delete(&name) {
            eprintln!("testbed: cannot remove stale netns {name}: {e:#}");
        }
    }
}
