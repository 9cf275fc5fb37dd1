//! Small helpers: running commands, polling a condition with a deadline,
//! the suite-wide lock and environment checks.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Interval between two checks of a polled condition. Polling always has a
/// deadline; this is never used as a stand-in for readiness.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Panics with a clear message unless the process runs as root: network
/// namespaces, veths, BPF programs and the kubelet's containers need it.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        panic!(
            "this must run as root (it creates network namespaces and veths, \
             and kproxy attaches BPF programs); current euid is {euid}"
        );
    }
}

/// Runs `program args…`, returns its stdout; fails with stderr on non-zero exit.
pub fn cmd<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String> {
    let out = cmd_output(program, args)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            render(program, args),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args…` and returns its full output whatever the exit status.
pub fn cmd_output<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Output> {
    Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run `{}`", render(program, args)))
}

fn render<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut s = program.to_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}

/// Whether `program` can be found in PATH (or is an existing path).
pub fn have_program(program: &str) -> bool {
    if program.contains('/') {
        return std::path::Path::new(program).exists();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
        .unwrap_or(false)
}

/// Polls `check` until it yields `Some`, or fails once `timeout` has passed.
/// `what` describes the awaited condition for the error message.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Reads a duration in seconds from the environment variable `var`.
pub fn env_secs(var: &str, default: Duration) -> Duration {
    match std::env::var(var) {
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s > 0.0 => Duration::from_secs_f64(s),
            _ => panic!("{var}={v:?} is not a positive number of seconds"),
        },
        Err(_) => default,
    }
}

/// Path of the lock file that serialises the suite's tests.
pub const SUITE_LOCK_PATH: &str = "/tmp/kproxy-tests.lock";

/// Exclusive lock held by a test for its whole duration, so that tests run
/// one at a time even when the test harness (or nextest) runs them in
/// parallel: timing assertions (1 s, 100 ms) must not compete with another
/// kproxy's BPF verifier run on a 2-core machine.
pub struct SuiteLock {
    _file: File,
}

impl SuiteLock {
    pub fn acquire() -> Result<SuiteLock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(SUITE_LOCK_PATH)
            .with_context(|| format!("open {SUITE_LOCK_PATH}"))?;
        loop {
            // SAFETY: the fd is valid for the lifetime of `file`.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err).context("flock suite lock");
            }
        }
        // The lock is released when the file (its open file description) is closed.
        Ok(SuiteLock { _file: file })
    }
}
