//! The stdout lines of a cluster's processes, with arrival times, in one
//! place that waits can search, plus an interrupt flag (Ctrl-C). Waiting is
//! on a condition variable, never on a sleep.

use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use proxy_common::lifecycle::Event;

/// Whose line it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    Kcontrol,
    Kproxy,
    /// A `kubectl get -w` started with [`crate::cluster::Cluster::watch`].
    Watch,
}

impl Src {
    pub fn tag(self) -> &'static str {
        match self {
            Src::Kcontrol => "kcontrol",
            Src::Kproxy => "kproxy",
            Src::Watch => "watch",
        }
    }
}

pub struct Line {
    pub src: Src,
    pub at: Instant,
    pub text: String,
}

impl Line {
    /// The kproxy lifecycle event this line reports, if it is one.
    pub fn kproxy_event(&self) -> Option<Event> {
        (self.src == Src::Kproxy)
            .then(|| Event::parse(&self.text))
            .flatten()
    }
}

/// Where lines and progress notes are echoed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Echo {
    /// `[kcontrol] line` on stdout, without kproxy's per-change lines unless
    /// [`Log::echo_changes`] is set, nor `kubectl get -w` lines: a person
    /// watches this (`cargo xtask up`).
    #[default]
    Stdout,
    /// `kcontrol | line` on stderr, every line: test output, shown when a
    /// test fails.
    Stderr,
}

#[derive(Default)]
struct LogState {
    lines: Vec<Line>,
    exited: Vec<Src>,
}

#[derive(Default)]
pub struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
    interrupted: AtomicBool,
    pub echo: Echo,
    /// Echo kproxy's per-change lines (`applied`, `attached`) to stdout.
    pub echo_changes: AtomicBool,
}

impl Log {
    pub fn new(echo: Echo) -> Log {
        Log {
            echo,
            ..Log::default()
        }
    }

    /// A progress note (`==> …`) where lines are echoed. Ignores a closed
    /// stdout: when `cargo xtask up | tee log` gets Ctrl-C, tee dies first,
    /// and a panic here would skip the cleanup.
    pub fn note(&self, text: &str) {
        use std::io::Write as _;
        match self.echo {
            Echo::Stdout => {
                let _ = writeln!(std::io::stdout(), "{text}");
            }
            Echo::Stderr => {
                let _ = writeln!(std::io::stderr(), "{text}");
            }
        }
    }

    pub fn interrupt(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
        let _guard = self.state.lock().unwrap();
        self.changed.notify_all();
    }

    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }

    fn push(&self, line: Line) {
        let mut st = self.state.lock().unwrap();
        st.lines.push(line);
        self.changed.notify_all();
    }

    fn exited(&self, src: Src) {
        let mut st = self.state.lock().unwrap();
        st.exited.push(src);
        self.changed.notify_all();
    }

    /// Number of lines so far: a cursor for [`Log::wait_for`].
    pub fn len(&self) -> usize {
        self.state.lock().unwrap().lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Arrival time of line `i` (an index [`Log::wait_for`] returned).
    pub fn line_at(&self, i: usize) -> Instant {
        self.state.lock().unwrap().lines[i].at
    }

    /// What `pred` makes of the newest line it accepts.
    pub fn last<T>(&self, mut pred: impl FnMut(&Line) -> Option<T>) -> Option<T> {
        let st = self.state.lock().unwrap();
        st.lines.iter().rev().find_map(&mut pred)
    }

    /// Waits until a line at index ≥ `from` satisfies `pred`; returns what
    /// `pred` made of it and the line's index. Fails on Ctrl-C, on the exit
    /// of kcontrol or kproxy, or at the deadline (`what` names the wait).
    pub fn wait_for<T>(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&Line) -> Option<T>,
    ) -> Result<(T, usize)> {
        let deadline = Instant::now() + timeout;
        let mut next = from;
        let mut st = self.state.lock().unwrap();
        loop {
            while next < st.lines.len() {
                if let Some(v) = pred(&st.lines[next]) {
                    return Ok((v, next));
                }
                next += 1;
            }
            if self.interrupted() {
                bail!("interrupted while waiting for {what}");
            }
            if let Some(src) = st
                .exited
                .iter()
                .find(|s| matches!(s, Src::Kcontrol | Src::Kproxy))
            {
                bail!("{} exited while waiting for {what}", src.tag());
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "timed out after {:.1} s waiting for {what}",
                    timeout.as_secs_f64()
                );
            }
            st = self.changed.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// Sleeps up to `d`, returning early (with an error) on Ctrl-C or a
    /// process exit. Used between polls of the API.
    pub fn pause(&self, d: Duration) -> Result<()> {
        let st = self.state.lock().unwrap();
        let st = self.changed.wait_timeout(st, d).unwrap().0;
        if self.interrupted() {
            bail!("interrupted");
        }
        if let Some(src) = st.exited.first() {
            bail!("{} exited", src.tag());
        }
        Ok(())
    }

    /// Reads `r` line by line into the log (echoing it), then records the
    /// exit of `src`. `label` names the process in the echo.
    pub fn pump(self: &Arc<Log>, src: Src, label: &str, r: impl Read + Send + 'static) {
        let log = self.clone();
        let label = label.to_string();
        thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(text) = line else { break };
                let at = Instant::now();
                log.echo_line(src, &label, &text);
                log.push(Line { src, at, text });
            }
            log.exited(src);
        });
    }

    fn echo_line(&self, src: Src, label: &str, text: &str) {
        match self.echo {
            Echo::Stdout => {
                let change = matches!(
                    Event::parse(text),
                    Some(Event::Applied { .. } | Event::Attached { .. })
                );
                if src != Src::Watch && (!change || self.echo_changes.load(Ordering::Relaxed)) {
                    self.note(&format!("[{}] {text}", src.tag()));
                }
            }
            Echo::Stderr => eprintln!("{label} | {text}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(lines: &[(Src, &str)]) -> Log {
        let log = Log::new(Echo::Stderr);
        for (src, text) in lines {
            log.push(Line {
                src: *src,
                at: Instant::now(),
                text: text.to_string(),
            });
        }
        log
    }

    fn backends(l: &Line) -> Option<u64> {
        match l.kproxy_event() {
            Some(Event::Ready { backends, .. } | Event::Applied { backends, .. }) => Some(backends),
            _ => None,
        }
    }

    #[test]
    fn events_come_only_from_kproxy_lines() {
        let log = log_with(&[
            (
                Src::Kproxy,
                "kproxy: ready services=1 backends=2 load_us=3 sync_us=4",
            ),
            // The same words from another process are not kproxy's.
            (
                Src::Watch,
                "kproxy: applied generation=1 services=1 backends=9 changes=1 took_us=1",
            ),
            (
                Src::Kproxy,
                "kproxy: applied generation=1 services=1 backends=5 changes=1 took_us=1",
            ),
            (Src::Kproxy, "kproxy: counters packets=3"),
        ]);
        assert_eq!(log.last(backends), Some(5));
        let (first, i) = log.wait_for(0, Duration::ZERO, "ready", backends).unwrap();
        assert_eq!((first, i), (2, 0));
        let (next, i) = log
            .wait_for(i + 1, Duration::ZERO, "applied", backends)
            .unwrap();
        assert_eq!((next, i), (5, 2));
    }

    #[test]
    fn a_wait_fails_when_kproxy_exits_or_on_interrupt() {
        let log = log_with(&[(Src::Kcontrol, "kcontrol: all: apiserver ready")]);
        log.exited(Src::Kproxy);
        let err = log
            .wait_for(0, Duration::from_secs(5), "ready", backends)
            .unwrap_err();
        assert!(err.to_string().contains("kproxy exited"), "{err}");

        let log = log_with(&[]);
        log.interrupt();
        let err = log.pause(Duration::from_millis(10)).unwrap_err();
        assert!(err.to_string().contains("interrupted"), "{err}");
    }
}
