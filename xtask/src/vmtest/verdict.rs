//! What a console shows: the verdict line, the attach path kproxy chose,
//! the failed tests; and the summary over all kernels.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proxy_common::lifecycle::{self, Event};

use super::Options;
use super::kernels::Kernel;
use super::protocol::VERDICT_MARK;
use crate::util;

/// What one kernel's run showed.
pub(super) struct KernelRun {
    pub(super) label: String,
    pub(super) release: String,
    pub(super) verdict: Option<Verdict>,
    /// Why the run failed before (or without) a verdict.
    pub(super) problem: Option<String>,
    pub(super) attach: AttachLog,
    pub(super) failed_tests: Vec<String>,
    pub(super) wall: Duration,
}

impl KernelRun {
    pub(super) fn failed(kernel: &Kernel, problem: String) -> KernelRun {
        KernelRun {
            label: kernel.label.clone(),
            release: kernel.release.clone(),
            verdict: None,
            problem: Some(problem),
            attach: AttachLog::default(),
            failed_tests: Vec::new(),
            wall: Duration::ZERO,
        }
    }

    pub(super) fn passed(&self) -> bool {
        self.problem.is_none() && self.verdict.as_ref().is_some_and(|v| v.pass)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct Verdict {
    pass: bool,
    passed: usize,
    failed: usize,
    ignored: usize,
}

/// `KPROXY-VM-VERDICT: PASS passed=3 failed=0 ignored=1`.
pub(super) fn parse_verdict(line: &str) -> Option<Verdict> {
    let rest = &line[line.find(VERDICT_MARK)? + VERDICT_MARK.len()..];
    let mut words = rest.split_whitespace();
    let pass = match words.next()? {
        "PASS" => true,
        "FAIL" => false,
        _ => return None,
    };
    let mut v = Verdict {
        pass,
        passed: 0,
        failed: 0,
        ignored: 0,
    };
    for word in words {
        if let Some((k, n)) = word.split_once('=') {
            let n = n.parse().unwrap_or(0);
            match k {
                "passed" => v.passed = n,
                "failed" => v.failed = n,
                "ignored" => v.ignored = n,
                _ => {}
            }
        }
    }
    Some(v)
}

/// A console line without its CRLF and without the terminal control
/// sequences the firmware prints (`ESC c`, `ESC [2J`, …).
pub(super) fn printable(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.trim_end_matches(['\r', '\n']).chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.next_if_eq(&'[').is_some() {
                    // CSI: parameters, then one final byte in @..~.
                    for p in chars.by_ref() {
                        if ('@'..='~').contains(&p) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Which attach path kproxy took, per kproxy process. The tests print
/// `kproxy[PID@NS]: started … ARGS` and then echo its stdout as
/// `kproxy[PID@NS] | kproxy: attached c0 mode=tcx`; a start with an explicit
/// `--attach` is a test of that mode, not the kernel's `auto` choice.
#[derive(Default)]
pub(super) struct AttachLog {
    explicit: BTreeSet<String>,
    /// "auto" or "--attach" → mode → count.
    seen: BTreeMap<(&'static str, String), usize>,
}

impl AttachLog {
    pub(super) fn line(&mut self, line: &str) {
        let Some(start) = line.find("kproxy[") else {
            return;
        };
        let rest = &line[start..];
        let Some(end) = rest.find(']') else {
            return;
        };
        let who = rest[..=end].to_string();
        let after = &rest[end + 1..];
        if after.starts_with(": started") {
            if after.contains("\"--attach\"") || after.contains(" --attach ") {
                self.explicit.insert(who);
            }
        } else if let Some(mode) = attach_mode(after) {
            let how = if self.explicit.contains(&who) {
                "--attach"
            } else {
                "auto"
            };
            *self.seen.entry((how, mode)).or_default() += 1;
        }
    }

    /// `auto: tcx x7; --attach: netlink x1`.
    fn summary(&self) -> String {
        if self.seen.is_empty() {
            return "-".into();
        }
        let mut parts = Vec::new();
        for how in ["auto", "--attach"] {
            let modes: Vec<String> = self
                .seen
                .iter()
                .filter(|((h, _), _)| *h == how)
                .map(|((_, m), n)| format!("{m} x{n}"))
                .collect();
            if !modes.is_empty() {
                parts.push(format!("{how}: {}", modes.join(", ")));
            }
        }
        parts.join("; ")
    }
}

/// `… | kproxy: attached c0 mode=tcx` → `tcx`: the lifecycle line kproxy
/// printed, read with its own parser, wherever it starts in the console
/// line.
fn attach_mode(line: &str) -> Option<String> {
    match Event::parse(&line[line.find(lifecycle::PREFIX)?..])? {
        Event::Attached { mode, .. } => Some(mode),
        _ => None,
    }
}

pub(super) fn print_summary(runs: &[KernelRun], opts: &Options, total: Duration) {
    let mut what = Vec::new();
    if opts.quick {
        what.push("--quick");
    }
    if opts.break_program {
        what.push("--break-program");
    }
    if opts.dynamic {
        what.push("--dynamic");
    }
    say!(
        "==> vm-test summary{} (total {}):",
        if what.is_empty() {
            String::new()
        } else {
            format!(" [{}]", what.join(" "))
        },
        util::secs(total)
    );
    let header = [
        "kernel", "release", "attach", "passed", "failed", "ignored", "wall", "result",
    ];
    let mut rows: Vec<[String; 8]> = Vec::new();
    for r in runs {
        let attach = r.attach.summary();
        let (p, f, i) = match &r.verdict {
            Some(v) => (
                v.passed.to_string(),
                v.failed.to_string(),
                v.ignored.to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let result = match (&r.problem, r.passed()) {
            (Some(problem), _) => format!("FAIL ({problem})"),
            (None, true) => "PASS".into(),
            (None, false) => "FAIL".into(),
        };
        rows.push([
            r.label.clone(),
            r.release.clone(),
            attach,
            p,
            f,
            i,
            util::secs(r.wall),
            result,
        ]);
    }
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::from("    ");
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s
    };
    say!("{}", line(&header.map(String::from)));
    for row in &rows {
        say!("{}", line(row));
    }
    for r in runs {
        for t in &r.failed_tests {
            say!("    [{}] failed: {t}", r.label);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_console_markers() {
        assert_eq!(
            parse_verdict("KPROXY-VM-VERDICT: PASS passed=12 failed=0 ignored=1"),
            Some(Verdict {
                pass: true,
                passed: 12,
                failed: 0,
                ignored: 1
            })
        );
        assert!(
            !parse_verdict("x KPROXY-VM-VERDICT: FAIL passed=1 failed=2")
                .unwrap()
                .pass
        );
        assert_eq!(parse_verdict("KPROXY-VM: loaded"), None);
        assert_eq!(
            attach_mode("kproxy[7@kpt-1-0-node] | kproxy: attached c0 mode=netlink"),
            Some("netlink".to_string())
        );
        assert_eq!(attach_mode("kproxy: ready services=1 backends=3"), None);

        let mut log = AttachLog::default();
        for line in [
            r#"test a ... kproxy[7@kpt-1-0-node]: started "ip" "netns" "exec" "kpt-1-0-node" "/k""#,
            "kproxy[7@kpt-1-0-node] | kproxy: attached c0 mode=tcx",
            r#"test b ... kproxy[9@kpt-2-0-node]: started "ip" "/k" "--attach" "netlink""#,
            "kproxy[9@kpt-2-0-node] | kproxy: attached c0 mode=netlink",
            "kproxy[11@kpt-3-0-node] | kproxy: attached c0 mode=tcx",
        ] {
            log.line(line);
        }
        assert_eq!(log.summary(), "auto: tcx x2; --attach: netlink x1");
        assert_eq!(
            printable("\u{1b}c\u{1b}[?7l\u{1b}[2JKPROXY-VM: x\r\n"),
            "KPROXY-VM: x"
        );
    }
}
