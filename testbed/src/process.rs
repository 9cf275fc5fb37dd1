//! The cluster's child processes: how they are started (their own process
//! group, a parent-death signal), stopped (SIGTERM, grace, SIGKILL) and
//! found again after a crash (by an argument of their command line).

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

/// Makes `cmd` a child the cluster controls alone: its own process group,
/// so the terminal's Ctrl-C reaches only the supervisor, which stops it in
/// order; and a parent-death signal, so an orphan shuts down (and cleans
/// up) on its own.
///
/// The death signal fires when the *thread* that spawned the child exits:
/// spawn from a thread that outlives the cluster (xtask's main thread).
pub fn own_group(cmd: &mut Command, death_signal: libc::c_int) {
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and only calls prctl,
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// How a child ended under [`stop_child`].
pub enum Stopped {
    /// It exited on its own before the SIGTERM.
    AlreadyExited(std::process::ExitStatus),
    /// It exited after the SIGTERM.
    Exited(std::process::ExitStatus),
    /// It was still running at the end of the grace time and got SIGKILL.
    Killed,
}

/// SIGCONT (a paused process would never see the SIGTERM), SIGTERM, then
/// wait up to `grace`, then SIGKILL. `note` gets progress lines.
pub fn stop_child(name: &str, mut child: Child, grace: Duration, note: &dyn Fn(&str)) -> Stopped {
    if let Ok(Some(status)) = child.try_wait() {
        note(&format!("==> {name} had already exited ({status})"));
        return Stopped::AlreadyExited(status);
    }
    note(&format!(
        "==> sending SIGTERM to {name} (pid {})",
        child.id()
    ));
    // SAFETY: kill(2) on the pid of our own unreaped child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGCONT);
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                note(&format!(
                    "==> {name} exited ({status}) after {} ms",
                    started.elapsed().as_millis()
                ));
                return Stopped::Exited(status);
            }
            Ok(None) if started.elapsed() < grace => thread::sleep(Duration::from_millis(50)),
            _ => {
                note(&format!(
                    "==> {name} did not exit within {} s, killing it",
                    grace.as_secs()
                ));
                let _ = child.kill();
                let _ = child.wait();
                return Stopped::Killed;
            }
        }
    }
}

/// Pids of processes with `needle` as one argument (ours excluded).
pub fn pids_with_arg(needle: &str) -> Vec<libc::pid_t> {
    let me = std::process::id() as libc::pid_t;
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|b| *b == 0).any(|a| a == needle.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// Children of this process still alive, with their names.
pub fn our_children() -> Vec<(libc::pid_t, String)> {
    let me = std::process::id();
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(status) = fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|p| p.trim().parse::<u32>().ok());
        if ppid == Some(me) {
            let name = status
                .lines()
                .find_map(|l| l.strip_prefix("Name:"))
                .unwrap_or("")
                .trim()
                .to_string();
            v.push((pid, name));
        }
    }
    v
}

/// Terminates `pids` (SIGTERM, then SIGKILL after `grace`).
pub fn terminate(pids: &[libc::pid_t], grace: Duration) {
    for &p in pids {
        // SAFETY: kill(2) on pids just found running our kcontrol/kproxy.
        unsafe { libc::kill(p, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline
        && pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        thread::sleep(Duration::from_millis(100));
    }
    for &p in pids {
        if Path::new(&format!("/proc/{p}")).exists() {
            // SAFETY: as above.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
}

/// `KEY=value program args` for progress lines and error messages.
pub fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            parts.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn display_quotes_what_a_shell_would_split() {
        let mut cmd = std::process::Command::new("crun");
        cmd.env("A", "1")
            .args(["exec", "kc-0123456789ab-c", "sh", "-c"])
            .arg("printf 'x' | nc 10.96.0.1 80");
        assert_eq!(
            super::display(&cmd),
            r"A=1 crun exec kc-0123456789ab-c sh -c 'printf '\''x'\'' | nc 10.96.0.1 80'"
        );
    }
}
