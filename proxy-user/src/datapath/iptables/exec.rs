//! Running iptables and iptables-restore, or their IPv6 counterparts
//! (ip6tables, ip6tables-restore): each function takes the family whose
//! tables it works on. `conntrack -D` is shared with the nftables mode
//! ([`super::super::netfilter`]).

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::super::netfilter::run;
use crate::model::Family;

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
