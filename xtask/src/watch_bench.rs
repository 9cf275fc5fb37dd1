//! `cargo xtask bench watch [--secs N] [--store sqlite,etcd]`: the long run
//! of kcontrol's watch stress test (control/tests/watch_stress.rs): writers
//! and list-then-watch clients (raw HTTP and kubectl, JSON and Table) under
//! CPU load made by the test, for N seconds of writes per store (default
//! 120). Every client checks that it got every change after its list's
//! resourceVersion exactly once, in order, within the test's bound; the test
//! appends its figures as one JSON line per store, and this turns them into
//! bench/results/watch-DATE.md with the targets met or missed and why.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::util::{self, Toolchain, output};

/// Target for the worst delivery latency under load (the test itself fails
/// only past its much larger bound, which stands for a lost event).
const WORST_LATENCY_TARGET_MS: f64 = 1000.0;

pub fn run_watch_bench(args: &[String]) -> Result<()> {
    let mut secs: u64 = 120;
    let mut stores: Vec<String> = Vec::new();
    let mut smoke = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            // The workflow end to end at its smallest: 3 s of writes per
            // store, the report under target/bench-smoke/watch/.
            "--smoke" => {
                smoke = true;
                secs = 3;
            }
            "--secs" => {
                let v = it.next().context("--secs needs a number of seconds")?;
                secs = v.parse().with_context(|| format!("--secs {v:?}"))?;
            }
            "--store" => {
                let v = it.next().context("--store needs a value: sqlite, etcd")?;
                stores.extend(v.split(',').map(str::to_owned));
            }
            other => bail!(
                "cargo xtask bench watch: unknown argument {other:?} (--secs N, --store sqlite,etcd, --smoke)"
            ),
        }
    }
    if stores.is_empty() {
        stores = vec!["sqlite".into(), "etcd".into()];
    }
    let root = util::workspace_root();
    let figures = util::target_dir().join("watch-bench.jsonl");
    let _ = std::fs::remove_file(&figures);
    let mut rows = Vec::new();
    for store in &stores {
        if store != "sqlite" && store != "etcd" {
            bail!("--store {store:?}: expected sqlite or etcd");
        }
        let mut cmd = util::cargo(Toolchain::Active);
        cmd.current_dir(&root)
            .env("KCONTROL_WATCH_STRESS_SECS", secs.to_string())
            .env("KCONTROL_WATCH_STRESS_REPORT", &figures)
            .args([
                "test",
                "--release",
                "-p",
                "kcontrol",
                "--test",
                "watch_stress",
            ])
            .arg("--target-dir")
            .arg(util::target_dir())
            .args([
                "--",
                "--exact",
                &format!("watch_stress_{store}"),
                "--nocapture",
            ]);
        say!("==> running: {}", util::display(&cmd));
        // Shown as it comes; the test's own lines are kept for the report.
        let mut child = cmd
            .stderr(Stdio::piped())
            .spawn()
            .context("could not start cargo test")?;
        let mut kept = Vec::new();
        for line in BufReader::new(child.stderr.take().unwrap())
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("{line}");
            if !line.starts_with("[kcontrol]") {
                kept.push(line);
            }
        }
        let passed = child.wait()?.success();
        let line = std::fs::read_to_string(&figures)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains(&format!("\"store\":\"{store}\"")))
            .map(str::to_owned);
        rows.push(Row {
            store: store.clone(),
            passed,
            figures: line,
            failure: (!passed).then(|| failure_summary(&kept)),
        });
    }
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d"]))?;
    let (dir, name) = if smoke {
        let dir = crate::smoke::out_dir("watch");
        crate::smoke::fresh_dir(&dir)?;
        (dir, "watch-smoke".to_owned())
    } else {
        (root.join("bench/results"), format!("watch-{date}"))
    };
    let plot = format!("{name}.svg");
    let report = report(&date, secs, &rows, &plot);
    let path = dir.join(format!("{name}.md"));
    std::fs::write(dir.join(&plot), latency_plot(&rows))
        .with_context(|| format!("writing {}", dir.join(&plot).display()))?;
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    say!("{report}");
    say!("==> report: {}", path.display());
    if rows.iter().any(|r| !r.passed) {
        bail!("the watch stress run failed (see {})", path.display());
    }
    if smoke {
        crate::smoke::check_report(&path, 1)?;
    }
    Ok(())
}

/// Bars of p99 and worst delivery latency per store, on one linear scale
/// with the target drawn as a line (an SVG written by hand: two numbers a
/// store do not need a plotting library).
fn latency_plot(rows: &[Row]) -> String {
    const W: f64 = 560.0;
    const H: f64 = 300.0;
    const LEFT: f64 = 70.0;
    const BOTTOM: f64 = 40.0;
    const TOP: f64 = 30.0;
    let figures: Vec<(&str, f64, f64)> = rows
        .iter()
        .map(|r| {
            let f = |k| {
                r.figures
                    .as_deref()
                    .and_then(|l| number(l, k))
                    .unwrap_or(0.0)
            };
            (r.store.as_str(), f("p99_latency_ms"), f("worst_latency_ms"))
        })
        .collect();
    let max = figures
        .iter()
        .map(|(_, p, w)| p.max(*w))
        .fold(WORST_LATENCY_TARGET_MS, f64::max)
        * 1.1;
    let y = |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - v / max);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="18">watch delivery latency under load (ms): p99 (light), worst (dark)</text>"#
    );
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" y1="{t:.1}" x2="{W}" y2="{t:.1}" stroke="#c00" stroke-dasharray="4 3"/><text x="{x:.1}" y="{ty:.1}" fill="#c00">target {WORST_LATENCY_TARGET_MS:.0} ms</text>"##,
        t = y(WORST_LATENCY_TARGET_MS),
        x = W - 110.0,
        ty = y(WORST_LATENCY_TARGET_MS) - 4.0
    );
    let slot = (W - LEFT) / figures.len().max(1) as f64;
    for (i, (store, p99, worst)) in figures.iter().enumerate() {
        let x0 = LEFT + slot * i as f64 + slot * 0.2;
        let bw = slot * 0.25;
        for (k, (v, colour)) in [(*p99, "#9cc3e6"), (*worst, "#2a6fb0")].iter().enumerate() {
            let x = x0 + bw * k as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{yv:.1}" width="{bw:.1}" height="{h:.1}" fill="{colour}"/><text x="{x:.1}" y="{ty:.1}">{v:.0}</text>"#,
                yv = y(*v),
                h = y(0.0) - y(*v),
                ty = y(*v) - 3.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{x0:.1}" y="{yl:.1}">{store}</text>"#,
            yl = H - BOTTOM + 16.0
        );
    }
    let _ = writeln!(
        s,
        r#"<line x1="{LEFT}" y1="{b:.1}" x2="{W}" y2="{b:.1}" stroke="black"/></svg>"#,
        b = y(0.0)
    );
    s
}

struct Row {
    store: String,
    passed: bool,
    /// The test's JSON line of figures (written when it passed).
    figures: Option<String>,
    failure: Option<String>,
}

/// A number in the test's one-line JSON (flat, so no parser is needed).
fn number(line: &str, key: &str) -> Option<f64> {
    let rest = line.split(&format!("\"{key}\":")).nth(1)?;
    rest.split([',', '}']).next()?.trim().parse().ok()
}

/// The panic message of a failed run: its first lines.
fn failure_summary(lines: &[String]) -> String {
    let start = lines
        .iter()
        .position(|l| l.contains("panicked at"))
        .unwrap_or(lines.len().saturating_sub(10));
    lines[start..]
        .iter()
        .take(12)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n")
}

fn report(date: &str, secs: u64, rows: &[Row], plot: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Watch stress, {date}\n");
    let _ = writeln!(
        s,
        "`cargo xtask bench watch --secs {secs}`: control/tests/watch_stress.rs with \
         {secs} s of writes per store. 6 writers over 18 ConfigMaps (create, update, \
         delete); 8 raw HTTP clients (JSON and Table events, label selector, paged lists, \
         bookmarks, one that stops reading for 3 s every 4 s; most reconnect every \
         0.15–1.1 s, each time list then watch from the list's resourceVersion) and 3 `kubectl get -w` (Table and JSON); one busy \
         thread per core in the test process all along. Every client checks that it got \
         every change after its list's resourceVersion exactly once, in order; latency \
         is from the write's acknowledgement (or the watch's start, for the backlog) to \
         the event's arrival at the client.\n"
    );
    let _ = writeln!(
        s,
        "Targets: no violation; worst delivery latency ≤ {WORST_LATENCY_TARGET_MS:.0} ms \
         (the test fails only past its 10 s bound, which stands for a lost event).\n"
    );
    let _ = writeln!(
        s,
        "| store | writes | sessions | events checked | p99 latency | worst latency | every change once, in order | worst ≤ {WORST_LATENCY_TARGET_MS:.0} ms |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---|---|");
    for r in rows {
        let f = |k| r.figures.as_deref().and_then(|l| number(l, k));
        let worst = f("worst_latency_ms");
        let cell = |v: Option<f64>, unit: &str| v.map_or("–".into(), |v| format!("{v:.0}{unit}"));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.store,
            cell(f("writes"), ""),
            cell(f("sessions"), ""),
            cell(f("events_checked"), ""),
            f("p99_latency_ms").map_or("–".into(), |v| format!("{v:.1} ms")),
            worst.map_or("–".into(), |v| format!("{v:.1} ms")),
            if r.passed { "met" } else { "**missed**" },
            match worst {
                Some(w) if w <= WORST_LATENCY_TARGET_MS => "met".to_string(),
                Some(w) => format!("**missed** ({w:.0} ms)"),
                None => "– (no figures)".to_string(),
            }
        );
    }
    let _ = writeln!(s, "\n![watch delivery latency per store]({plot})");
    for r in rows.iter().filter(|r| r.failure.is_some()) {
        let _ = writeln!(
            s,
            "\n## {}: failed\n\n```\n{}\n```",
            r.store,
            r.failure.as_deref().unwrap_or_default()
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::number;

    #[test]
    fn numbers_from_the_figures_line() {
        let l =
            r#"{"elapsed_s":12.5,"events_checked":66059,"store":"sqlite","worst_latency_ms":46.4}"#;
        assert_eq!(number(l, "events_checked"), Some(66059.0));
        assert_eq!(number(l, "worst_latency_ms"), Some(46.4));
        assert_eq!(number(l, "elapsed_s"), Some(12.5));
        assert_eq!(number(l, "store"), None);
        assert_eq!(number(l, "missing"), None);
    }
}
