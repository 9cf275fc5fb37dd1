//! Inspection of what is attached to interfaces: classic tc (clsact qdisc
//! and filters, via `tc`) and BPF links/programs (via `bpftool`, which the
//! cleanup checks require: `cargo xtask setup` installs it).

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::netns::Netns;
use crate::util::{cmd, have_program};

/// BPF_LINK_TYPE_TCX; older bpftool versions print the number instead of
/// the name.
const BPF_LINK_TYPE_TCX: u64 = 11;

/// Classic tc state of one interface.
#[derive(Debug, Clone)]
pub struct TcState {
    /// Output of `tc qdisc show dev IF`.
    pub qdiscs: String,
    /// Output of `tc filter show dev IF ingress` (empty when none).
    pub ingress_filters: String,
    /// Output of `tc filter show dev IF egress` (empty when none).
    pub egress_filters: String,
}

impl TcState {
    pub fn has_clsact(&self) -> bool {
        self.qdiscs.contains("clsact")
    }

    pub fn has_filters(&self) -> bool {
        !self.ingress_filters.trim().is_empty() || !self.egress_filters.trim().is_empty()
    }
}

/// Reads the tc state of `iface` in `ns`.
pub fn tc_state(ns: &Netns, iface: &str) -> Result<TcState> {
    let qdiscs = cmd("tc", &["-n", ns.name(), "qdisc", "show", "dev", iface])?;
    let filters = |dir: &str| -> Result<String> {
        let out = crate::util::cmd_output(
            "tc",
            &["-n", ns.name(), "filter", "show", "dev", iface, dir],
        )?;
        // Without a clsact qdisc tc may complain instead of listing nothing.
        Ok(if out.status.success() {
            String::from_utf8_lossy(&out.stdout).into_owned()
        } else {
            String::new()
        })
    };
    Ok(TcState {
        ingress_filters: filters("ingress")?,
        egress_filters: filters("egress")?,
        qdiscs,
    })
}

/// Whether `bpftool` is installed.
pub fn bpftool_available() -> bool {
    have_program("bpftool")
}

/// A tcx link as listed by `bpftool link show`.
#[derive(Debug, Clone)]
pub struct TcxLink {
    pub id: u64,
    pub prog_id: Option<u64>,
    /// Processes holding the link (only when bpftool reports pids).
    pub pids: Option<Vec<u64>>,
    pub raw: Value,
}

fn json_array(out: &str) -> Result<Vec<Value>> {
    let v: Value =
        serde_json::from_str(out.trim()).with_context(|| format!("bpftool JSON: {out}"))?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn pids_of(v: &Value) -> Option<Vec<u64>> {
    v.get("pids").and_then(Value::as_array).map(|a| {
        a.iter()
            .filter_map(|p| p.get("pid").and_then(Value::as_u64))
            .collect()
    })
}

/// All tcx links of the machine (BPF links are not per namespace).
pub fn tcx_links() -> Result<Vec<TcxLink>> {
    let out = cmd("bpftool", &["-j", "link", "show"])?;
    let mut links = Vec::new();
    for l in json_array(&out)? {
        let ty = l.get("type");
        let is_tcx = ty.and_then(Value::as_str) == Some("tcx")
            || ty.and_then(Value::as_u64) == Some(BPF_LINK_TYPE_TCX);
        if !is_tcx {
            continue;
        }
        let Some(id) = l.get("id").and_then(Value::as_u64) else {
            continue;
        };
        links.push(TcxLink {
            id,
            prog_id: l.get("prog_id").and_then(Value::as_u64),
            pids: pids_of(&l),
            raw: l,
        });
    }
    Ok(links)
}

/// Ids of all BPF programs of the machine.
pub fn prog_ids() -> Result<BTreeSet<u64>> {
    let out = cmd("bpftool", &["-j", "prog", "show"])?;
    Ok(json_array(&out)?
        .iter()
        .filter_map(|p| p.get("id").and_then(Value::as_u64))
        .collect())
}

/// Ids of the BPF programs held open by process `pid`, when bpftool
/// reports pids (None when it cannot).
pub fn prog_ids_of_pid(pid: u32) -> Result<Option<BTreeSet<u64>>> {
    let out = cmd("bpftool", &["-j", "prog", "show"])?;
    let progs = json_array(&out)?;
    if !progs.iter().any(|p| p.get("pids").is_some()) {
        return Ok(None);
    }
    Ok(Some(
        progs
            .iter()
            .filter(|p| pids_of(p).is_some_and(|pids| pids.contains(&u64::from(pid))))
            .filter_map(|p| p.get("id").and_then(Value::as_u64))
            .collect(),
    ))
}

/// `bpftool net show dev IF` run inside `ns`: the entries of its tc (and
/// tcx, for bpftool versions that list them) sections.
pub fn bpftool_net_entries(ns: &Netns, iface: &str) -> Result<Vec<Value>> {
    let out = ns.exec("bpftool", &["-j", "net", "show", "dev", iface])?;
    let mut entries = Vec::new();
    for section in json_array(&out)? {
        if let Some(obj) = section.as_object() {
            for (key, val) in obj {
                if key == "tc" || key.contains("tcx") {
                    entries.extend(val.as_array().cloned().unwrap_or_default());
                }
            }
        }
    }
    Ok(entries)
}
