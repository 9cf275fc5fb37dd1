//! Console figures, and the Markdown report, JSON dump and SVG plots in
//! bench/results/ (`apiserver-DATE[-quick|-smoke].*`,
//! `latest-apiserver[-quick|-smoke].md`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use serde::Serialize;

use crate::Args;
use crate::measure::{Run, Sample};

#[derive(Debug, Clone, Serialize)]
pub struct Environment {
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub rev: String,
    pub rustc: String,
    /// How the run was started (`cargo xtask bench apiserver …`), when known.
    pub invocation: Option<String>,
    pub command: String,
    pub kcontrol_bin: String,
    pub load_at_start: String,
    pub load_at_end: String,
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

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Environment {
    pub fn collect(kcontrol: &Path) -> Environment {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut rev = Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(root)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
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
            date: first_line("date", &["-u", "+%F"]),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpu,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            rev,
            rustc: first_line("rustc", &["--version"]),
            invocation: std::env::var("KCONTROL_BENCH_INVOCATION")
                .ok()
                .filter(|s| !s.is_empty()),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            kcontrol_bin: kcontrol.display().to_string(),
            load_at_start: loadavg(),
            load_at_end: String::new(),
        }
    }

    pub fn finish(mut self) -> Environment {
        self.load_at_end = loadavg();
        self
    }
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else if v >= 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.2} ms")
    }
}

fn p50_p99(s: &Sample) -> String {
    format!("{} / {}", ms(s.p50_ms), ms(s.p99_ms))
}

pub fn print(r: &Run) {
    println!(
        "{}: {} services by {} writers in {:.2} s = {:.0} creates/s; create latency p50/p99 {}; \
         watch delivery (ack → event) p50/p99 paced {} (max {}), under load {}; \
         paced create sent → event {}; apiserver CPU {:.1} s, peak RSS {:.0} MiB",
        r.backend.label,
        r.services,
        r.writers,
        r.bulk_wall_s,
        r.creates_per_s,
        p50_p99(&r.create_latency),
        p50_p99(&r.watch_paced),
        ms(r.watch_paced.max_ms),
        p50_p99(&r.watch_under_load),
        p50_p99(&r.watch_paced_from_send),
        r.apiserver_cpu_s,
        r.apiserver_peak_rss_mib,
    );
}

const COLORS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

/// The table rows, one column per backend.
pub fn table(runs: &[Run]) -> String {
    let mut t = String::from("| |");
    for r in runs {
        let _ = write!(t, " {} |", r.backend.label);
    }
    t.push_str("\n|---|");
    for _ in runs {
        t.push_str("---:|");
    }
    t.push('\n');
    let mut row = |name: &str, f: &dyn Fn(&Run) -> String| {
        let _ = write!(t, "| {name} |");
        for r in runs {
            let _ = write!(t, " {} |", f(r));
        }
        t.push('\n');
    };
    row("services created", &|r| format!("{}", r.services));
    row("concurrent writers", &|r| format!("{}", r.writers));
    row("wall time (target < 10 s for 10,000)", &|r| {
        format!("{:.2} s", r.bulk_wall_s)
    });
    row("creates/s", &|r| format!("{:.0}", r.creates_per_s));
    row("create latency p50 / p99", &|r| p50_p99(&r.create_latency));
    row(
        "watch delivery p50 / p99, paced writes (target p99 < 50 ms)",
        &|r| p50_p99(&r.watch_paced),
    );
    row("watch delivery max, paced", &|r| ms(r.watch_paced.max_ms));
    row("paced: create sent → event received p50 / p99", &|r| {
        p50_p99(&r.watch_paced_from_send)
    });
    row("paced: create latency p50 / p99 (one at a time)", &|r| {
        p50_p99(&r.paced_create_latency)
    });
    row("paced writes measured", &|r| {
        format!("{}", r.watch_paced.count)
    });
    row("watch delivery p50 / p99, during the bulk creates", &|r| {
        p50_p99(&r.watch_under_load)
    });
    row("apiserver CPU (user+sys)", &|r| {
        format!("{:.1} s", r.apiserver_cpu_s)
    });
    row("apiserver peak RSS", &|r| {
        format!("{:.0} MiB", r.apiserver_peak_rss_mib)
    });
    t
}

pub fn write(args: &Args, env: &Environment, runs: &[Run]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&args.out)?;
    let stem = format!("apiserver-{}{}", env.date, args.preset_suffix());
    let throughput = args.out.join(format!("{stem}-throughput.svg"));
    let latency = args.out.join(format!("{stem}-latency.svg"));
    plot_throughput(&throughput, runs)?;
    plot_cdf(&latency, runs)?;

    let mut md = String::new();
    let _ = writeln!(md, "# kcontrol apiserver benchmark, {}\n", env.date);
    let _ = writeln!(
        md,
        "Each backend: a fresh `kcontrol apiserver` on a temporary data dir (loopback, HTTPS, \
         admin token), driven through the API by kube-rs clients in one process. **Bulk**: \
         {} Services created in namespace `bench` by {} concurrent writers (one HTTP/1.1 \
         connection each); wall time is first create sent → last create acknowledged. A \
         watcher on its own connection stamps every ADDED event; **watch delivery** = event \
         received − create acknowledged, on one monotonic clock ({} paced creates, one at a \
         time with {} ms between them; events that arrive before the create's response count \
         as 0 ms: the server publishes a write to watchers when it commits, before it answers). \
         Also shown: create sent → event received, which includes the commit.\n",
        args.services, args.writers, args.watch_writes, args.pace_ms
    );
    md.push_str(&table(runs));
    md.push('\n');
    for r in runs {
        if r.paced_events_before_ack > 0 {
            let _ = writeln!(
                md,
                "- {}: {} of {} paced events arrived before the create's response.",
                r.backend.label, r.paced_events_before_ack, r.watch_paced.count
            );
        }
    }
    let name = |p: &Path| {
        p.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let _ = writeln!(
        md,
        "\n![creates acknowledged over time]({})\n\n![latency CDFs]({})\n",
        name(&throughput),
        name(&latency)
    );
    let _ = writeln!(md, "## Environment\n");
    let _ = writeln!(md, "- command: `{}`", env.command);
    if let Some(i) = &env.invocation {
        let _ = writeln!(md, "- started as: `{i}`");
    }
    for r in runs {
        let _ = writeln!(md, "- {}: `{}`", r.backend.label, r.command);
    }
    let _ = writeln!(
        md,
        "- revision {}, {}\n- {} × {}, kernel {}\n- load average (1/5/15 min) at start {}, at end {} \
         (the machine is shared; the figures include whatever else ran)",
        env.rev, env.rustc, env.cpus, env.cpu, env.kernel, env.load_at_start, env.load_at_end
    );
    let md_path = args.out.join(format!("{stem}.md"));
    std::fs::write(&md_path, &md)?;
    let latest = args
        .out
        .join(format!("latest-apiserver{}.md", args.preset_suffix()));
    std::fs::write(&latest, &md)?;
    let json_path = args.out.join(format!("{stem}.json"));
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&serde_json::json!({ "env": env, "runs": runs }))?,
    )?;
    Ok(vec![md_path, latest, json_path, throughput, latency])
}

fn plot_err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> anyhow::Error + '_ {
    move |e| anyhow!("plotting {}: {e}", path.display())
}

/// Creates acknowledged against time, one line per backend.
fn plot_throughput(path: &Path, runs: &[Run]) -> Result<()> {
    let err = plot_err(path);
    let xmax = runs.iter().map(|r| r.bulk_wall_s).fold(1.0f64, f64::max) * 1.05;
    let ymax = runs.iter().map(|r| r.services).max().unwrap_or(1) as f64 * 1.05;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Services created through the API", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first create")
        .y_desc("creates acknowledged")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, r) in runs.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                r.timeline.iter().map(|&(t, n)| (t, n as f64)),
                c.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(format!(
                "{} ({:.0} creates/s, {} writers)",
                r.backend.label, r.creates_per_s, r.writers
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(2)));
    }
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

/// CDFs (log-scale latency) of create latency and watch delivery.
fn plot_cdf(path: &Path, runs: &[Run]) -> Result<()> {
    let err = plot_err(path);
    let mut lines: Vec<(String, RGBColor, bool, &Sample)> = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        lines.push((
            format!("{}: create latency (bulk)", r.backend.label),
            c,
            false,
            &r.create_latency,
        ));
        lines.push((
            format!("{}: watch delivery, ack → event (paced)", r.backend.label),
            c,
            true,
            &r.watch_paced,
        ));
        lines.push((
            format!("{}: create sent → event (paced)", r.backend.label),
            COLORS[(i + 2) % COLORS.len()],
            false,
            &r.watch_paced_from_send,
        ));
    }
    // Zero delays (event before the response) are drawn at the floor.
    let floor = 0.01f64;
    let xmax = lines
        .iter()
        .filter_map(|l| l.3.sorted_ms.last().copied())
        .fold(1.0f64, f64::max)
        * 1.5;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Latency distributions", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d((floor..xmax).log_scale(), 0.0..1.0)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("milliseconds (log scale)")
        .y_desc("fraction of requests / events")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(|e| err(&e))?;
    for (label, c, dashed, s) in lines {
        let n = s.sorted_ms.len().max(1) as f64;
        let pts: Vec<(f64, f64)> = s
            .sorted_ms
            .iter()
            .enumerate()
            .map(|(i, &v)| (v.max(floor), (i + 1) as f64 / n))
            .collect();
        let style = if dashed {
            c.mix(0.6).stroke_width(2)
        } else {
            c.stroke_width(2)
        };
        chart
            .draw_series(LineSeries::new(pts, style))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::MiddleLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
