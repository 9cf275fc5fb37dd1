//! Running iptables, iptables-restore and conntrack.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::model::{BackendAddr, Frontend};

/// Runs a command, with its stderr in the error.
pub(super) fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(out)
}

pub(super) fn ensure_jump(
    table: &str,
    chain: &str,
    comment: &str,
    target: &str,
    extra: &[&str],
) -> Result<()> {
    let mut rule: Vec<&str> = vec!["-m", "comment", "--comment", comment];
    rule.extend_from_slice(extra);
    rule.extend_from_slice(&["-j", target]);
    let check = run(Command::new("iptables")
        .args(["-w", "-t", table, "-C", chain])
        .args(&rule))?;
    if check.status.success() {
        return Ok(());
    }
    let out = run(Command::new("iptables")
        .args(["-w", "-t", table, "-I", chain])
        .args(&rule))?;
    if !out.status.success() {
        bail!(
            "iptables -t {table} -I {chain} … -j {target}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub(super) fn delete_jump(table: &str, chain: &str, comment: &str, target: &str, extra: &[&str]) {
    let mut rule: Vec<&str> = vec!["-m", "comment", "--comment", comment];
    rule.extend_from_slice(extra);
    rule.extend_from_slice(&["-j", target]);
    // Delete every copy; stops when none is left.
    for _ in 0..8 {
        match run(Command::new("iptables")
            .args(["-w", "-t", table, "-D", chain])
            .args(&rule))
        {
            Ok(o) if o.status.success() => continue,
            _ => break,
        }
    }
}

/// Feeds `input` to `iptables-restore --noflush`: one transaction.
pub(super) fn restore(input: &str) -> Result<()> {
    let mut child = Command::new("iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running iptables-restore")?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// KUBE-SVC-/KUBE-SEP-/KUBE-EXT-/KUBE-FW- chains present in the nat table.
pub(super) fn existing_service_chains() -> Vec<String> {
    let Ok(out) = Command::new("iptables-save").args(["-t", "nat"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| {
            ["KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-FW-"]
                .iter()
                .any(|p| c.starts_with(p))
        })
        .map(String::from)
        .collect()
}

/// `conntrack -D` for UDP flows DNATed to `backend` (or to any backend of
/// the frontend). Returns how many entries were deleted.
pub(super) fn delete_udp_flows(fe: &Frontend, backend: Option<&BackendAddr>) -> usize {
    let mut cmd = Command::new("conntrack");
    cmd.args(["-D", "-p", "udp"]);
    // A NodePort's flows are to any node address on its port.
    if !fe.is_nodeport() {
        cmd.args(["--orig-dst", &fe.ip.to_string()]);
    }
    cmd.args(["--orig-port-dst", &fe.port.to_string()]);
    if let Some(b) = backend {
        cmd.args([
            "--reply-src",
            &b.ip.to_string(),
            "--reply-port-src",
            &b.port.to_string(),
        ]);
    }
    match cmd.output() {
        // Exit 1 when none.
        Ok(out) => deleted_count(&String::from_utf8_lossy(&out.stderr)),
        Err(e) => {
            log::warn!("conntrack not available, stale UDP flows stay: {e}");
            0
        }
    }
}

/// The N of conntrack's "conntrack v1.4.7 (conntrack-tools): N flow entries
/// have been deleted." (stderr).
fn deleted_count(stderr: &str) -> usize {
    let words: Vec<&str> = stderr.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[1] == "flow")
        .and_then(|w| w[0].parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_deletion_count_is_parsed() {
        assert_eq!(
            deleted_count(
                "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been deleted.\n"
            ),
            2
        );
        assert_eq!(
            deleted_count(
                "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n"
            ),
            0
        );
        assert_eq!(deleted_count(""), 0);
    }
}
