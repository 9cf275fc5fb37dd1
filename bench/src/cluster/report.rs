//! The cluster benchmark's report: samples (per pod, created → Running,
//! → Ready, → endpoint programmed in kproxy's dataplane) into
//! cluster-DATE[-probe].{md,json,svg} and latest-cluster[-probe].md.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// What one run measured, as the samples file holds it.
#[derive(Serialize, Deserialize)]
pub struct Samples {
    pub date: String,
    pub invocation: String,
    /// Whether the pods had a readinessProbe (`--probe`).
    #[serde(default)]
    pub probe: bool,
    pub verified: String,
    pub samples: Vec<Sample>,
}

/// One pod, in ms from its creation (its ADDED event on the watch).
#[derive(Serialize, Deserialize)]
pub struct Sample {
    pub name: String,
    pub ip: String,
    /// `kubectl create` wall time (process start to exit).
    pub create_call_ms: f64,
    pub running_ms: f64,
    pub ready_ms: f64,
    pub programmed_ms: f64,
}

/// The design target the issue sets: pod created → endpoint programmed.
const TARGET_P99_MS: f64 = 1000.0;

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Stat {
    what: &'static str,
    sorted: Vec<f64>,
}

impl Stat {
    fn new(what: &'static str, s: &Samples, f: fn(&Sample) -> f64) -> Stat {
        let mut sorted: Vec<f64> = s.samples.iter().map(f).collect();
        sorted.sort_by(f64::total_cmp);
        Stat { what, sorted }
    }
    fn p(&self, p: f64) -> f64 {
        percentile(&self.sorted, p)
    }
    fn max(&self) -> f64 {
        self.sorted.last().copied().unwrap_or(0.0)
    }
}

fn first_line(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned(),
        _ => "unknown".to_owned(),
    }
}

fn environment() -> String {
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
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let rev = first_line("git", &["rev-parse", "--short", "HEAD"]);
    format!(
        "- revision {rev}, {}\n- {cpus} × {cpu}, kernel {}\n- load average (1/5/15 min) when \
         the report was written: {} (the machine is shared; the figures include whatever else ran)\n",
        first_line("rustc", &["--version"]),
        kernel.trim(),
        load.join(" ")
    )
}

fn plot(path: &Path, s: &Samples, stats: &[Stat]) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let colors = [
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x1f, 0x77, 0xb4),
    ];
    let ymax = stats.iter().map(Stat::max).fold(TARGET_P99_MS, f64::max) * 1.1;
    let n = s.samples.len() as f64;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{} pods created one at a time, one node", s.samples.len()),
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..n + 1.0, 0.0..ymax)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("pod (creation order)")
        .y_desc("ms since created")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(|e| err(&e))?;
    let fields: [fn(&Sample) -> f64; 3] = [|x| x.running_ms, |x| x.ready_ms, |x| x.programmed_ms];
    for ((stat, c), f) in stats.iter().zip(colors).zip(fields) {
        let pts: Vec<(f64, f64)> = s
            .samples
            .iter()
            .enumerate()
            .map(|(i, x)| ((i + 1) as f64, f(x)))
            .collect();
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.filled())))
            .map_err(|e| err(&e))?
            .label(format!(
                "{} (p50 {:.0} ms, p99 {:.0} ms)",
                stat.what,
                stat.p(50.0),
                stat.p(99.0)
            ))
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, c.filled()));
    }
    chart
        .draw_series(LineSeries::new(
            [(0.0, TARGET_P99_MS), (n + 1.0, TARGET_P99_MS)],
            RED.mix(0.6).stroke_width(1),
        ))
        .map_err(|e| err(&e))?
        .label("target: p99 programmed < 1 s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], RED.mix(0.6)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Writes the report of the samples file `samples` into `out`.
pub fn write(samples: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(samples)
        .with_context(|| format!("reading {}", samples.display()))?;
    let s: Samples =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", samples.display()))?;
    if s.samples.is_empty() {
        anyhow::bail!("{} holds no samples", samples.display());
    }
    let stats = [
        Stat::new("created → Running", &s, |x| x.running_ms),
        Stat::new("created → Ready", &s, |x| x.ready_ms),
        Stat::new("created → endpoint programmed", &s, |x| x.programmed_ms),
        Stat::new("`kubectl create` call", &s, |x| x.create_call_ms),
    ];
    std::fs::create_dir_all(out)?;
    let suffix = if s.probe { "-probe" } else { "" };
    let stem = format!("cluster-{}{suffix}", s.date);
    let svg = out.join(format!("{stem}.svg"));
    plot(&svg, &s, &stats[..3])?;

    let mut md = String::new();
    let _ = writeln!(md, "# Single-node cluster benchmark, {}\n", s.date);
    let _ = writeln!(
        md,
        "A fresh `kcontrol all` (apiserver, scheduler, controller-manager, kubelet running crun \
         containers) plus `kproxy` on this host, as `cargo xtask up` runs them. {} busybox pods \
         (httpd on 8080; {}), all selected by one ClusterIP Service, created with `kubectl create` one at a time: the next pod is created once the \
         previous one is programmed. A warm-up pod is created first and not counted.\n\n\
         - **created**: the pod's ADDED event arrives on a `kubectl get pods -w` watch (the \
         store holds it);\n\
         - **Running** / **Ready**: the first event on that watch with phase Running / \
         condition Ready=True;\n\
         - **endpoint programmed**: kproxy's `kproxy: applied … backends=B` line (printed \
         after its map updates returned) in which the backend count first exceeds the count \
         before the pod was created — pods are created one at a time and only ready endpoints \
         count, so that is this pod's endpoint. Check at the end: {}.\n\n\
         All times come from one monotonic clock in the benchmark (`kcluster-bench`), taken as the lines arrive on pipes.\n",
        s.samples.len(),
        if s.probe {
            "a readinessProbe httpGet every 1 s decides Ready"
        } else {
            "no readinessProbe: Ready once the container runs"
        },
        s.verified
    );
    let _ = writeln!(
        md,
        "| from created to | p50 | p99 | max |\n|---|---:|---:|---:|"
    );
    for st in &stats {
        let _ = writeln!(
            md,
            "| {} | {:.0} ms | {:.0} ms | {:.0} ms |",
            st.what,
            st.p(50.0),
            st.p(99.0),
            st.max()
        );
    }
    let p99 = stats[2].p(99.0);
    let _ = writeln!(
        md,
        "\nTarget: p99 created → endpoint programmed under {TARGET_P99_MS:.0} ms on one node: \
         **{}** ({p99:.0} ms).\n",
        if p99 < TARGET_P99_MS {
            "met"
        } else {
            "not met"
        }
    );
    let _ = writeln!(
        md,
        "![per pod]({})\n",
        svg.file_name().unwrap().to_string_lossy()
    );
    let _ = writeln!(md, "<details><summary>per pod</summary>\n");
    let _ = writeln!(
        md,
        "| pod | IP | Running | Ready | programmed | kubectl create |\n|---|---|---:|---:|---:|---:|"
    );
    for x in &s.samples {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            x.name, x.ip, x.running_ms, x.ready_ms, x.programmed_ms, x.create_call_ms
        );
    }
    let _ = writeln!(md, "\n</details>\n\n## Environment\n");
    let _ = writeln!(md, "- started as: `{}`", s.invocation);
    md.push_str(&environment());

    let md_path = out.join(format!("{stem}.md"));
    std::fs::write(&md_path, &md)?;
    let latest = out.join(format!("latest-cluster{suffix}.md"));
    std::fs::write(&latest, &md)?;
    let json_path = out.join(format!("{stem}.json"));
    std::fs::write(&json_path, &text)?;
    for st in &stats {
        println!(
            "    {:<32} p50 {:>6.0} ms  p99 {:>6.0} ms  max {:>6.0} ms",
            st.what,
            st.p(50.0),
            st.p(99.0),
            st.max()
        );
    }
    for p in [&md_path, &latest, &json_path, &svg] {
        println!("==> wrote {}", p.display());
    }
    Ok(())
}
