//! What the two sides of `cargo xtask vm-test` agree on: the plan the host
//! writes into the image and the guest's init reads, and the marker lines
//! the init prints and the host reads from the console.
//!
//! This one file is compiled into both: the guest's init (this crate) and
//! xtask (`#[path]` module of xtask/src/vmtest/mod.rs), so the host writes
//! exactly what the guest parses, without xtask linking the guest's code.
// Each side uses its half: the host renders the plan, the guest parses it.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Where the host puts the guest's files, as a path below `/`.
pub const GUEST_DIR: &str = "kproxy-vm";
/// The plan, inside [`GUEST_DIR`].
pub const GUEST_PLAN: &str = "/kproxy-vm/plan";

/// Marker lines on the console; the host decides from these alone.
pub const TEST_MARK: &str = "KPROXY-VM-TEST: ";
pub const VERDICT_MARK: &str = "KPROXY-VM-VERDICT: ";
pub const INFO_MARK: &str = "KPROXY-VM: ";

/// A test that runs longer than this inside the guest is killed and
/// counted as failed (the suite's own deadlines are ≤ 30 s; the slowest
/// test takes ~15 s under TCG).
pub const GUEST_TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// What the host put into /kproxy-vm/plan.
#[derive(Default)]
pub struct GuestPlan {
    pub label: String,
    pub test_timeout: Duration,
    pub env: Vec<(String, String)>,
    /// (module name, its .ko in the guest), in load order.
    pub modules: Vec<(String, PathBuf)>,
    /// (test target name, its binary in the guest).
    pub tests: Vec<(String, PathBuf)>,
}

impl GuestPlan {
    pub fn parse(text: &str) -> Result<GuestPlan> {
        let mut plan = GuestPlan {
            test_timeout: GUEST_TEST_TIMEOUT,
            ..GuestPlan::default()
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
            let pair = || -> Result<(String, String)> {
                let (a, b) = rest
                    .split_once([' ', '='])
                    .with_context(|| format!("plan line {line:?}"))?;
                Ok((a.to_string(), b.to_string()))
            };
            match key {
                "label" => plan.label = rest.to_string(),
                "test-timeout" => {
                    plan.test_timeout = Duration::from_secs(rest.parse().context("test-timeout")?)
                }
                "env" => plan.env.push(pair()?),
                "module" => {
                    let (n, p) = pair()?;
                    plan.modules.push((n, p.into()));
                }
                "test" => {
                    let (n, p) = pair()?;
                    plan.tests.push((n, p.into()));
                }
                other => bail!("unknown plan line {other:?}"),
            }
        }
        Ok(plan)
    }

    /// The text [`GuestPlan::parse`] reads back.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "label {}", self.label);
        let _ = writeln!(out, "test-timeout {}", self.test_timeout.as_secs());
        for (key, value) in &self.env {
            let _ = writeln!(out, "env {key}={value}");
        }
        for (name, path) in &self.modules {
            let _ = writeln!(out, "module {name} {}", path.display());
        }
        for (name, path) in &self.tests {
            let _ = writeln!(out, "test {name} {}", path.display());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_plan_round_trip() {
        let plan = GuestPlan::parse(
            "label 6.1\ntest-timeout 9\nenv PATH=/bin:/sbin\nmodule veth /m/00-veth.ko\ntest cleanup /t/cleanup\n",
        )
        .unwrap();
        assert_eq!(plan.label, "6.1");
        assert_eq!(plan.test_timeout, Duration::from_secs(9));
        assert_eq!(
            plan.env,
            vec![("PATH".to_string(), "/bin:/sbin".to_string())]
        );
        assert_eq!(plan.modules[0].0, "veth");
        assert_eq!(plan.tests[0].1, PathBuf::from("/t/cleanup"));
    }

    #[test]
    fn guest_plan_renders_what_it_parses() {
        let text = "label 6.12\ntest-timeout 120\nenv PATH=/bin\nenv KPROXY_MODE=ebpf\n\
                    module veth /kproxy-vm/modules/00-veth.ko\ntest reject /kproxy-vm/tests/reject\n";
        assert_eq!(GuestPlan::parse(text).unwrap().render(), text);
    }
}
