//! Guard around a running `kproxy` process in the node namespace.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
pub use proxy_common::lifecycle::Event;

use crate::mode::{Mode, mode};
use crate::netns::Netns;
use crate::util::{POLL_INTERVAL, env_secs};

/// Environment variable naming the kproxy binary (set by the xtask).
pub const KPROXY_BIN_ENV: &str = "KPROXY_BIN";
/// Optional: passed as `--log-level` when set.
pub const KPROXY_LOG_LEVEL_ENV: &str = "KPROXY_LOG_LEVEL";
/// Optional: seconds to wait for `kproxy: ready` (default 30).
pub const READY_TIMEOUT_ENV: &str = "KPT_READY_TIMEOUT_SECS";

/// How long to wait for `kproxy: ready`: the BPF verifier runs first, and
/// the machine may have two busy cores.
pub fn ready_timeout() -> Duration {
    env_secs(READY_TIMEOUT_ENV, Duration::from_secs(30))
}

/// The kproxy binary from `$KPROXY_BIN`; panics with a clear message when
/// it is unset or does not exist.
pub fn kproxy_bin() -> PathBuf {
    let Some(bin) = std::env::var_os(KPROXY_BIN_ENV) else {
        panic!(
            "{KPROXY_BIN_ENV} is not set: point it at the kproxy binary \
             (e.g. KPROXY_BIN=target/release/kproxy; `cargo xtask` sets it)"
        );
    };
    let bin = PathBuf::from(bin);
    let bin = if bin.is_relative() {
        std::env::current_dir().map(|d| d.join(&bin)).unwrap_or(bin)
    } else {
        bin
    };
    if !bin.is_file() {
        panic!(
            "{KPROXY_BIN_ENV}={} does not name an existing file",
            bin.display()
        );
    }
    bin
}

/// One stdout line of kproxy and when the reader thread received it.
#[derive(Debug, Clone)]
pub struct Line {
    pub text: String,
    pub at: Instant,
}

/// A running `ip netns exec <node> kproxy --manifests DIR --iface IFS …`
/// (eBPF mode) or `… kproxy --mode iptables --manifests DIR …` (iptables
/// mode, see [`crate::mode()`]).
///
/// stdout is read by a thread that forwards each line to this guard (see
/// [`Kproxy::wait_line`]) and echoes it to stderr, prefixed; stderr is
/// inherited. Drop sends SIGTERM, then SIGKILL if it has not exited after
/// a deadline.
pub struct Kproxy {
    child: Child,
    lines: Receiver<Line>,
    seen: Vec<String>,
    label: String,
    exit: Option<ExitStatus>,
}

impl Kproxy {
    /// Starts kproxy in `node` watching `manifests`, with `extra` arguments
    /// appended, in the datapath mode of the suite ([`crate::mode()`]):
    /// eBPF attached to `ifaces`, or `--mode iptables` (whose rules cover the
    /// whole namespace, so `ifaces` is not passed). Does not wait for
    /// readiness.
    pub fn start(
        node: &Netns,
        manifests: &Path,
        ifaces: &[&str],
        extra: &[&str],
    ) -> Result<Kproxy> {
        Kproxy::start_with_mode(node, manifests, ifaces, extra, mode())
    }

    /// [`Kproxy::start`] in an explicit datapath `mode` instead of the
    /// suite's (for programs that run both modes, e.g. the benchmark).
    pub fn start_with_mode(
        node: &Netns,
        manifests: &Path,
        ifaces: &[&str],
        extra: &[&str],
        mode: Mode,
    ) -> Result<Kproxy> {
        Kproxy::start_with(node, manifests, ifaces, extra, mode, Launch::IpNetnsExec)
    }

    /// [`Kproxy::start_with_mode`] with an explicit way into the namespace.
    pub fn start_with(
        node: &Netns,
        manifests: &Path,
        ifaces: &[&str],
        extra: &[&str],
        mode: Mode,
        launch: Launch,
    ) -> Result<Kproxy> {
        Kproxy::start_from(
            node,
            Source::Manifests(manifests),
            ifaces,
            extra,
            mode,
            launch,
        )
    }

    /// Starts kproxy with any [`Source`] of Services and EndpointSlices.
    pub fn start_from(
        node: &Netns,
        source: Source<'_>,
        ifaces: &[&str],
        extra: &[&str],
        mode: Mode,
        launch: Launch,
    ) -> Result<Kproxy> {
        let bin = kproxy_bin();
        let mut cmd = match launch {
            Launch::IpNetnsExec => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", node.name()]);
                c
            }
            Launch::NsenterNet => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", node.path().display()));
                c
            }
        };
        cmd.arg(&bin);
        match source {
            Source::Manifests(p) => cmd.arg("--manifests").arg(p),
            Source::Kubeconfig(p) => cmd.arg("--kubeconfig").arg(p),
        };
        match mode {
            // kproxy's default mode: no `--mode`.
            // No interfaces: the caller follows them by `--iface-prefix`.
            Mode::Ebpf if ifaces.is_empty() => &mut cmd,
            Mode::Ebpf => cmd.arg("--iface").arg(ifaces.join(",")),
            Mode::Iptables | Mode::Nftables => cmd.args(["--mode", mode.as_str()]),
        };
        if let Ok(level) = std::env::var(KPROXY_LOG_LEVEL_ENV) {
            cmd.args(["--log-level", &level]);
        }
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {} in {}", bin.display(), node.name()))?;
        let label = format!("kproxy[{}@{}]", child.id(), node.name());
        eprintln!("{label}: started {cmd:?}");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = channel();
        let prefix = label.clone();
        std::thread::Builder::new()
            .name(format!("stdout-{}", child.id()))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(text) = line else { break };
                    eprintln!("{prefix} | {text}");
                    // The receiver may be gone (guard dropped): keep draining.
                    let _ = tx.send(Line {
                        text,
                        at: Instant::now(),
                    });
                }
            })
            .context("spawn stdout reader")?;
        Ok(Kproxy {
            child,
            lines: rx,
            seen: Vec::new(),
            label,
            exit: None,
        })
    }

    /// Pid of the kproxy process (`ip netns exec` execs it in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stdout line consumed so far by the wait functions.
    pub fn lines_seen(&self) -> &[String] {
        &self.seen
    }

    /// Waits for the next lifecycle line whose [`Event`] satisfies `want`
    /// (`what` names it in the error). Lines in between are consumed.
    pub fn wait_event(
        &mut self,
        what: &str,
        mut want: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Line> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(remaining) {
                Ok(line) => {
                    self.seen.push(line.text.clone());
                    if Event::parse(&line.text).is_some_and(|e| want(&e)) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!(
                    "{}: no {what} line within {timeout:?}; lines so far: {:#?}",
                    self.label,
                    self.seen
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.reap(Duration::from_secs(2));
                    bail!(
                        "{}: stdout closed (exit status {status:?}) before a {what} line; \
                         lines so far: {:#?}",
                        self.label,
                        self.seen
                    )
                }
            }
        }
    }

    /// Waits for the next stdout line starting with `prefix` and returns it.
    /// Lines in between are consumed (and kept in [`Kproxy::lines_seen`]).
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        Ok(self.wait_any(&[prefix], timeout)?.text)
    }

    /// Like [`Kproxy::wait_line`], also returning when the line was read.
    pub fn wait_line_timed(&mut self, prefix: &str, timeout: Duration) -> Result<Line> {
        self.wait_any(&[prefix], timeout)
    }

    /// Waits for the next line starting with any of `prefixes`.
    pub fn wait_any(&mut self, prefixes: &[&str], timeout: Duration) -> Result<Line> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(remaining) {
                Ok(line) => {
                    self.seen.push(line.text.clone());
                    if prefixes.iter().any(|p| line.text.starts_with(p)) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!(
                    "{}: no line starting with {prefixes:?} within {timeout:?}; lines so far: {:#?}",
                    self.label,
                    self.seen
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.reap(Duration::from_secs(2));
                    bail!(
                        "{}: stdout closed (exit status {status:?}) before a line starting with \
                         {prefixes:?}; lines so far: {:#?}",
                        self.label,
                        self.seen
                    )
                }
            }
        }
    }

    /// Waits for `kproxy: ready` (timeout from [`ready_timeout`]).
    pub fn wait_ready(&mut self) -> Result<String> {
        let ready = |e: &Event| matches!(e, Event::Ready { .. });
        Ok(self.wait_event("ready", ready, ready_timeout())?.text)
    }

    /// Waits for `kproxy: detached` (the clean stop).
    pub fn wait_detached(&mut self, timeout: Duration) -> Result<Line> {
        self.wait_event("detached", |e| matches!(e, Event::Detached), timeout)
    }

    /// Waits for the next `applied` or `rejected` line.
    fn wait_verdict(&mut self, timeout: Duration) -> Result<(Line, bool)> {
        let verdict = |e: &Event| matches!(e, Event::Applied { .. } | Event::Rejected { .. });
        let line = self.wait_event("applied or rejected", verdict, timeout)?;
        let applied = matches!(Event::parse(&line.text), Some(Event::Applied { .. }));
        Ok((line, applied))
    }

    /// Waits for the next `kproxy: applied` line; fails at once on a
    /// `kproxy: rejected` line instead.
    pub fn wait_applied(&mut self, timeout: Duration) -> Result<Line> {
        let (line, applied) = self.wait_verdict(timeout)?;
        if !applied {
            bail!(
                "{}: expected an applied change, got {:?}",
                self.label,
                line.text
            );
        }
        Ok(line)
    }

    /// Waits for the next `kproxy: rejected` line; fails at once on a
    /// `kproxy: applied` line instead.
    pub fn wait_rejected(&mut self, timeout: Duration) -> Result<Line> {
        let (line, applied) = self.wait_verdict(timeout)?;
        if applied {
            bail!("{}: expected a rejection, got {:?}", self.label, line.text);
        }
        Ok(line)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.exit.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit.
    pub fn stop(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        self.signal(libc::SIGTERM);
        match self.reap(timeout) {
            Some(status) => Ok(status),
            None => bail!("{}: still running {timeout:?} after SIGTERM", self.label),
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain kill(2) on our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// Polls for exit until `timeout`; records and returns the status.
    fn reap(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_some() {
            return self.exit;
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    eprintln!("{}: exited with {status}", self.label);
                    self.exit = Some(status);
                    return self.exit;
                }
                Ok(None) => {}
                Err(e) => {
                    eprintln!("{}: try_wait: {e}", self.label);
                    return None;
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Kproxy {
    /// SIGKILL, as a crash would: no cleanup runs. Waits for the exit.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        self.child.kill().context("SIGKILL kproxy")?;
        let status = self.child.wait().context("wait for killed kproxy")?;
        self.exit = Some(status);
        Ok(status)
    }
}

/// Where kproxy reads Services and EndpointSlices from.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    /// `--manifests DIR`
    Manifests(&'a Path),
    /// `--kubeconfig FILE`: a Kubernetes API (kcontrol apiserver).
    Kubeconfig(&'a Path),
}

/// How kproxy enters the node's network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// `ip netns exec`: also a private mount namespace with /sys remounted,
    /// so anything kproxy pins lives and dies with that process.
    IpNetnsExec,
    /// `nsenter --net`: only the network namespace changes; the host's
    /// /sys/fs/bpf is visible, so pins outlive the process (restart tests).
    NsenterNet,
}

impl Drop for Kproxy {
    fn drop(&mut self) {
        if self.exit.is_some() || !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        self.signal(libc::SIGTERM);
        if self.reap(Duration::from_secs(5)).is_none() {
            eprintln!("{}: no exit 5 s after SIGTERM, sending SIGKILL", self.label);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Parses `key=value` fields of a kproxy status line, e.g.
/// `kproxy: ready services=1 backends=3` → {services: "1", backends: "3"}.
pub fn fields(line: &str) -> std::collections::BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Numeric field `key` of a status line.
pub fn field_u64(line: &str, key: &str) -> Result<u64> {
    let f = fields(line);
    let v = f
        .get(key)
        .with_context(|| format!("no field {key}= in {line:?}"))?;
    v.parse()
        .with_context(|| format!("field {key}={v:?} in {line:?} is not a number"))
}

/// Where kproxy serves /metrics, /healthz and /readyz inside its namespace
/// (its default `--metrics-addr`).
pub const METRICS_ADDR: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 10249),
);

/// `GET path` from kproxy's metrics server in `node`: status and body.
pub fn metrics_get(node: &crate::Netns, path: &str) -> Result<(u16, String)> {
    crate::http_get(node, METRICS_ADDR, path, Duration::from_secs(3))
}

/// The value of the first sample line of `text` (/metrics) starting with
/// `prefix` (a metric name and a space, or a name and its first labels).
pub fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
