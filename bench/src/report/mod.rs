//! The Markdown report, the JSON dump and the plots.

mod markdown;
mod plots;
mod targets;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::measure::Percentiles;
use crate::plot::{self, Marker, Series};
use crate::run::{ModeRun, services_label, thousands};
use crate::scenario::{self, SplitMix64};
use crate::{Args, Plan};

pub use markdown::markdown;
use plots::write_plots;
pub use targets::targets_section;

/// Where and with what the run happened.
#[derive(Debug, Clone, Serialize)]
pub struct Environment {
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory: String,
    pub kproxy_rev: String,
    pub iptables: String,
    pub rustc: String,
    pub iperf3: String,
    /// How the run was started (`cargo xtask bench …`), when known.
    pub invocation: Option<String>,
    /// This binary's own command line.
    pub command: String,
    pub kproxy_bin: String,
    /// SCHED_FIFO priority of the benchmark and kproxy (None: normal).
    pub realtime_priority: Option<i32>,
    /// /proc/loadavg (1, 5, 15 min) when the run started and ended.
    pub load_at_start: String,
    pub load_at_end: String,
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn first_line(program: &str, args: &[&str], dir: Option<&Path>) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    match cmd.output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned(),
        _ => "unknown".to_owned(),
    }
}

impl Environment {
    pub fn collect(root: &Path, kproxy: &Path, _args: &Args) -> Environment {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            })
            .map(|kb| format!("{:.1} GiB", kb / 1048576.0))
            .unwrap_or_else(|| "unknown".into());
        let mut rev = first_line("git", &["rev-parse", "--short", "HEAD"], Some(root));
        let dirty = Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=no"])
            .current_dir(root)
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        if dirty {
            rev.push_str(" (with uncommitted changes)");
        }
        Environment {
            date: utc_date(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpu,
            cpus,
            memory,
            kproxy_rev: rev,
            iptables: first_line("iptables", &["--version"], None),
            rustc: first_line("rustc", &["--version"], None),
            iperf3: first_line("iperf3", &["--version"], None),
            invocation: std::env::var("KPROXY_COMPARE_INVOCATION")
                .ok()
                .filter(|s| !s.is_empty()),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            kproxy_bin: kproxy.display().to_string(),
            realtime_priority: None,
            load_at_start: loadavg(),
            load_at_end: String::new(),
        }
    }
}

/// Everything a report is made of.
#[derive(Debug, Serialize)]
pub struct Run {
    pub plan: Plan,
    pub env: Environment,
    pub stem: String,
    pub results: Vec<ModeRun>,
    pub dataplane: Option<String>,
    pub failures: Vec<String>,
    pub wall_s: f64,
    pub log: PathBuf,
}

impl Run {
    fn get(&self, n: u32, mode: &str) -> Option<&ModeRun> {
        self.results
            .iter()
            .find(|r| r.services == n && r.mode == mode)
    }

    fn scales(&self) -> Vec<u32> {
        let mut s: Vec<u32> = self.results.iter().map(|r| r.services).collect();
        s.sort_unstable();
        s.dedup();
        s
    }
}

/// Today (UTC) as YYYY-MM-DD.
pub fn utc_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 → (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

fn us(v: f64) -> String {
    if v >= 1_000_000.0 {
        format!("{:.2} s", v / 1e6)
    } else if v >= 10_000.0 {
        format!("{:.1} ms", v / 1e3)
    } else if v >= 1_000.0 {
        format!("{:.2} ms", v / 1e3)
    } else {
        format!("{v:.0} µs")
    }
}

fn ms(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} s", v / 1e3)
    } else if v >= 1_000.0 {
        format!("{:.2} s", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0} ms")
    } else if v >= 1.0 {
        format!("{v:.1} ms")
    } else {
        format!("{:.0} µs", v * 1e3)
    }
}

fn ratio(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}×")
    } else if v >= 10.0 {
        format!("{v:.1}×")
    } else {
        format!("{v:.2}×")
    }
}

fn gbps(bps: f64) -> String {
    format!("{:.2}", bps / 1e9)
}

const NA: &str = "–";

/// A cell "eBPF / iptables" from an accessor; "n/p" where a mode was not
/// programmed within the bound, "–" where the figure is missing.
fn pair(run: &Run, n: u32, f: impl Fn(&ModeRun) -> Option<String>) -> String {
    let cell = |mode: &str| match run.get(n, mode) {
        None => NA.to_owned(),
        Some(r) if r.not_programmed.is_some() => "n/p".to_owned(),
        Some(r) => f(r).unwrap_or_else(|| NA.to_owned()),
    };
    format!("{} / {}", cell("ebpf"), cell("iptables"))
}

/// iptables ÷ eBPF of a figure, when both exist.
fn ipt_over_ebpf(run: &Run, n: u32, f: impl Fn(&ModeRun) -> Option<f64>) -> Option<f64> {
    let e = f(run.get(n, "ebpf")?)?;
    let i = f(run.get(n, "iptables")?)?;
    (e > 0.0).then(|| i / e)
}

fn opt_ratio(v: Option<f64>) -> String {
    v.map(ratio).unwrap_or_else(|| NA.to_owned())
}

/// The headline table: one row per service count, eBPF / iptables per cell.
pub fn headline_table(run: &Run) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| services | first-packet p50 | first-packet p99 | p99 iptables÷eBPF | programming (datapath sync) | sync iptables÷eBPF | change latency p99 | throughput via ClusterIP÷direct | agent CPU (s) | agent peak RSS (MiB) |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in run.scales() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            thousands(u64::from(n)),
            pair(run, n, |r| r.first_packet.map(|p| us(p.p50_us))),
            pair(run, n, |r| r.first_packet.map(|p| us(p.p99_us))),
            opt_ratio(ipt_over_ebpf(run, n, |r| r.first_packet.map(|p| p.p99_us))),
            pair(run, n, |r| r.programmed.map(|p| ms(p.sync_ms))),
            sync_ratio_cell(run, n),
            pair(run, n, |r| r.change.map(|p| us(p.p99_us))),
            pair(run, n, |r| r.throughput_ratio().map(|v| format!("{v:.3}"))),
            pair(run, n, |r| r.cost.map(|c| format!("{:.2}", c.cpu_s))),
            pair(run, n, |r| r.cost.map(|c| format!("{:.0}", c.peak_rss_mib))),
        );
    }
    let _ = write!(
        s,
        "\nEach cell is eBPF / iptables, measured in the same run on the same topology. n/p: not programmed within the {} s bound.",
        run.plan.program_bound_s
    );
    s
}

fn sync_ratio_cell(run: &Run, n: u32) -> String {
    if let Some(v) = ipt_over_ebpf(run, n, |r| r.programmed.map(|p| p.sync_ms)) {
        return ratio(v);
    }
    match (
        run.get(n, "ebpf").and_then(|r| r.programmed),
        run.get(n, "iptables"),
    ) {
        (Some(e), Some(i)) if i.not_programmed.is_some() => {
            format!(
                "> {}",
                ratio(run.plan.program_bound_s as f64 * 1e3 / e.sync_ms)
            )
        }
        _ => NA.to_owned(),
    }
}

fn mode_label(m: &str) -> &'static str {
    if m == "ebpf" { "eBPF" } else { "iptables" }
}

/// Writes `<stem>.md`, `<stem>.json`, the plots and a copy of the report
/// into `dir`: `latest.md` for the full preset (the one README links to),
/// `latest-<preset>.md` for the others, so a quick check never replaces the
/// full figures.
pub fn write_all(run: &Run, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let plots = write_plots(run, dir, &mut written);
    let md = markdown(run, &plots);
    let md_path = dir.join(format!("{}.md", run.stem));
    std::fs::write(&md_path, &md).with_context(|| format!("write {}", md_path.display()))?;
    written.push(md_path);
    let latest = dir.join(if run.plan.preset == "full" {
        "latest.md".to_owned()
    } else {
        format!("latest-{}.md", run.plan.preset)
    });
    std::fs::write(&latest, &md)?;
    written.push(latest);
    let json_path = dir.join(format!("{}.json", run.stem));
    std::fs::write(&json_path, serde_json::to_string_pretty(run)?)?;
    written.push(json_path);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
    }
}
