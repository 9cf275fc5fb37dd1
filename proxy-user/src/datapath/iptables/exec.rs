//! Running iptables, iptables-restore and conntrack, or their IPv6
//! counterparts (ip6tables, ip6tables-restore, `conntrack -f ipv6`): each
//! function takes the family whose tables it works on.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::model::{BackendAddr, Family, Frontend};

/// `iptables` or `ip6tables`.
pub(super) fn iptables_bin(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    }
}

fn restore_bin(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables-restore",
        Family::V6 => "ip6tables-restore",
    }
}

fn save_bin(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables-save",
        Family::V6 => "ip6tables-save",
    }
}

/// Runs a command, with its stderr in the error.
pub(super) fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(out)
}

pub(super) fn ensure_jump(
    family: Family,
    table: &str,
    chain: &str,
    comment: &str,
    target: &str,
    extra: &[&str],
) -> Result<()> {
    let mut rule: Vec<&str> = vec!["-m", "comment", "--comment", comment];
    rule.extend_from_slice(extra);
    rule.extend_from_slice(&["-j", target]);
    let bin = iptables_bin(family);
    let check = run(Command::new(bin)
        .args(["-w", "-t", table, "-C", chain])
        .args(&rule))?;
    if check.status.success() {
        return Ok(());
    }
    let out = run(Command::new(bin)
        .args(["-w", "-t", table, "-I", chain])
        .args(&rule))?;
    if !out.status.success() {
        bail!(
            "{bin} -t {table} -I {chain} … -j {target}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub(super) fn delete_jump(
    family: Family,
    table: &str,
    chain: &str,
    comment: &str,
    target: &str,
    extra: &[&str],
) {
    let mut rule: Vec<&str> = vec!["-m", "comment", "--comment", comment];
    rule.extend_from_slice(extra);
    rule.extend_from_slice(&["-j", target]);
    // Delete every copy; stops when none is left.
    for _ in 0..8 {
        match run(Command::new(iptables_bin(family))
            .args(["-w", "-t", table, "-D", chain])
            .args(&rule))
        {
            Ok(o) if o.status.success() => continue,
            _ => break,
        }
    }
}

/// Feeds `input` to `iptables-restore --noflush` (`ip6tables-restore` for
/// IPv6): one transaction.
pub(super) fn restore(family: Family, input: &str) -> Result<()> {
    let bin = restore_bin(family);
    let mut child = Command::new(bin)
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {bin}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{bin} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// KUBE-SVC-/KUBE-SEP-/KUBE-EXT-/KUBE-FW- chains present in the family's
/// nat table.
pub(super) fn existing_service_chains(family: Family) -> Vec<String> {
    let Ok(out) = Command::new(save_bin(family)).args(["-t", "nat"]).output() else {
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
    cmd.arg("-D");
    // conntrack-tools works on IPv4 entries unless told otherwise.
    if fe.family() == Family::V6 {
        cmd.args(["-f", "ipv6"]);
    }
    cmd.args(["-p", "udp"]);
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
