//! Counting what `cargo test` ran: its output (stdout and stderr through one
//! pipe, so cargo's `Running …` lines stay in order with the test binaries'
//! results) is passed through unchanged and tallied per test target, so that
//! `cargo xtask test` can say how many tests ran in each datapath mode.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util;

/// The results of one test target (`Running tests/cleanup.rs (…)`,
/// `Running unittests src/lib.rs (…/deps/kcontrol-…)`, `Doc-tests NAME`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    pub filtered: u64,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
        self.filtered += o.filtered;
    }
}

/// Tallies per target name (the file stem of the binary cargo ran, without
/// its hash, e.g. `cleanup`, `kcontrol`), in the order seen.
#[derive(Debug, Default)]
pub struct Counts {
    pub targets: Vec<(String, Tally)>,
}

impl Counts {
    pub fn total(&self) -> Tally {
        let mut t = Tally::default();
        for (_, x) in &self.targets {
            t.add(*x);
        }
        t
    }

    /// The sum over the targets named in `names`, and how many of them ran.
    pub fn of(&self, names: &[String]) -> (Tally, usize) {
        let mut t = Tally::default();
        let mut n = 0;
        for (name, x) in &self.targets {
            if names.iter().any(|w| w == name) {
                t.add(*x);
                n += 1;
            }
        }
        (t, n)
    }

    /// Feeds one output line.
    pub fn line(&mut self, line: &str, current: &mut Option<String>) {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("Running ") {
            *current = Some(target_name(rest));
        } else if let Some(rest) = l.strip_prefix("Doc-tests ") {
            *current = Some(format!("doc:{}", rest.trim()));
        } else if let Some(rest) = l.strip_prefix("test result: ") {
            let tally = parse_result(rest);
            let name = current.take().unwrap_or_else(|| "?".to_owned());
            self.targets.push((name, tally));
        }
    }
}

/// `tests/cleanup.rs (target/release/deps/cleanup-0123abcd)` → `cleanup`;
/// `unittests src/lib.rs (target/release/deps/kcontrol-0123)` → `kcontrol`.
fn target_name(running: &str) -> String {
    let inner = running
        .rsplit_once('(')
        .map(|(_, p)| p.trim_end_matches(')'))
        .unwrap_or(running);
    let file = inner.rsplit('/').next().unwrap_or(inner);
    match file.rsplit_once('-') {
        Some((stem, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => stem.to_owned(),
        _ => file.to_owned(),
    }
}

/// `ok. 5 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out; finished in 1.0s`.
fn parse_result(rest: &str) -> Tally {
    let mut t = Tally::default();
    for part in rest.split(';') {
        let words: Vec<&str> = part.split_whitespace().collect();
        // "ok. 5 passed" / "FAILED. 3 passed" / "0 failed" / "2 filtered out"
        let Some(pos) = words.iter().position(|w| w.parse::<u64>().is_ok()) else {
            continue;
        };
        let n: u64 = words[pos].parse().unwrap_or(0);
        match words.get(pos + 1).copied() {
            Some("passed") => t.passed = n,
            Some("failed") => t.failed = n,
            Some("ignored") => t.ignored = n,
            Some("filtered") => t.filtered = n,
            _ => {}
        }
    }
    t
}

/// Runs `cmd` (a `cargo test`), streaming its output, and tallies it. Fails
/// like [`util::run`] on a non-zero exit, and also when a test was ignored:
/// in this suite a test runs or is not generated.
pub fn run_counting(cmd: Command) -> Result<Counts> {
    say!("==> running: {}", util::display(&cmd));
    run_counting_into(cmd, &mut std::io::stdout())
}

/// [`run_counting`] passing the output to `out` (the unit tests keep it
/// from the real stdout, where an outer `cargo xtask test` would count it).
fn run_counting_into(mut cmd: Command, out: &mut dyn Write) -> Result<Counts> {
    let shown = util::display(&cmd);
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    cmd.stdout(writer.try_clone()?).stderr(writer);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    // The command holds the write ends: drop it so EOF comes at the exit.
    drop(cmd);
    let mut counts = Counts::default();
    let mut current = None;
    for line in BufReader::new(reader).lines() {
        let line = line.context("reading cargo test output")?;
        let _ = writeln!(out, "{line}");
        counts.line(&line, &mut current);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    let ignored: Vec<&str> = counts
        .targets
        .iter()
        .filter(|(_, t)| t.ignored > 0)
        .map(|(n, _)| n.as_str())
        .collect();
    if !ignored.is_empty() {
        bail!(
            "ignored tests in {}: every test of the suite must run (or not be generated)",
            ignored.join(", ")
        );
    }
    Ok(counts)
}

/// `512 passed in 61 targets` (with failed/filtered when not zero).
pub fn describe(t: Tally, targets: usize) -> String {
    let mut s = format!("{} passed", t.passed);
    if t.failed > 0 {
        s.push_str(&format!(", {} failed", t.failed));
    }
    if t.filtered > 0 {
        s.push_str(&format!(", {} filtered out", t.filtered));
    }
    s.push_str(&format!(" in {targets} test targets"));
    s
}

/// Per target name, for the summary's detail line.
pub fn by_target(counts: &Counts, names: &[String]) -> String {
    let mut m: BTreeMap<&str, u64> = BTreeMap::new();
    for (name, t) in &counts.targets {
        if names.iter().any(|w| w == name) {
            *m.entry(name).or_default() += t.passed;
        }
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_cargo_test_output_per_target() {
        let out = "\
   Compiling kproxy-tests v0.1.0
    Finished `release` profile [optimized] target(s) in 1.00s
     Running unittests src/lib.rs (target/release/deps/kcontrol-0a1b2c3d4e5f6789)

running 2 tests
test a ... ok
test b ... ok

test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s

     Running tests/cleanup.rs (target/release/deps/cleanup-89abcdef01234567)

running 1 test
test result: FAILED. 0 passed; 1 failed; 1 ignored; 0 measured; 3 filtered out; finished in 2.50s

   Doc-tests proxy_common

running 0 tests
test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
";
        let mut c = Counts::default();
        let mut cur = None;
        for l in out.lines() {
            c.line(l, &mut cur);
        }
        let names: Vec<&str> = c.targets.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["kcontrol", "cleanup", "doc:proxy_common"]);
        assert_eq!(
            c.targets[1].1,
            Tally {
                passed: 0,
                failed: 1,
                ignored: 1,
                filtered: 3
            }
        );
        assert_eq!(c.total().passed, 2);
        let (t, n) = c.of(&["cleanup".to_owned()]);
        assert_eq!((t.failed, n), (1, 1));
        assert_eq!(
            describe(c.total(), 3),
            "2 passed, 1 failed, 3 filtered out in 3 test targets"
        );
    }

    #[test]
    fn ignored_tests_fail_the_run() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo '     Running tests/x.rs (target/release/deps/x-0123456789abcdef)'; \
             echo 'test result: ok. 1 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out'",
        ]);
        let err = run_counting_into(cmd, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("ignored tests in x"), "{err}");
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo 'test result: ok. 4 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out' >&2",
        ]);
        assert_eq!(
            run_counting_into(cmd, &mut Vec::new())
                .unwrap()
                .total()
                .passed,
            4
        );
        let mut cmd = Command::new("false");
        cmd.arg("x");
        assert!(run_counting_into(cmd, &mut Vec::new()).is_err());
    }
}
