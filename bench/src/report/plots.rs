//! The SVG plots of a run.

use super::*;

fn series(
    run: &Run,
    mode: &str,
    label: &str,
    color: plotters::style::RGBColor,
    marker: Marker,
    f: impl Fn(&ModeRun) -> Option<f64>,
) -> Series {
    Series {
        label: format!("{} {label}", mode_label(mode)),
        color,
        marker,
        points: run
            .results
            .iter()
            .filter(|r| r.mode == mode)
            .filter_map(|r| f(r).map(|v| (f64::from(r.services), v)))
            .collect(),
    }
}

/// Returns (file name, title) of each plot written.
pub(super) fn write_plots(
    run: &Run,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Vec<(String, String)> {
    use plot::{EBPF, EBPF_DARK, EBPF_LIGHT, IPTABLES, IPTABLES_DARK, IPTABLES_LIGHT};
    let mut out = Vec::new();
    let mut one = |suffix: &str, title: &str, y: &str, s: Vec<Series>| {
        let file = format!("{}-{suffix}.svg", run.stem);
        let path = dir.join(&file);
        match plot::log_log(&path, title, y, &s) {
            Ok(()) => {
                written.push(path);
                out.push((file, title.to_owned()));
            }
            Err(e) => eprintln!("kproxy-compare: {e:#}"),
        }
    };
    one(
        "first-packet",
        "First-packet latency (connect → reply) vs services",
        "latency (µs, log scale)",
        vec![
            series(run, "ebpf", "p50", EBPF_LIGHT, Marker::Circle, |r| {
                r.first_packet.map(|p| p.p50_us)
            }),
            series(run, "ebpf", "p90", EBPF, Marker::Triangle, |r| {
                r.first_packet.map(|p| p.p90_us)
            }),
            series(run, "ebpf", "p99", EBPF_DARK, Marker::Cross, |r| {
                r.first_packet.map(|p| p.p99_us)
            }),
            series(
                run,
                "iptables",
                "p50",
                IPTABLES_LIGHT,
                Marker::Circle,
                |r| r.first_packet.map(|p| p.p50_us),
            ),
            series(run, "iptables", "p90", IPTABLES, Marker::Triangle, |r| {
                r.first_packet.map(|p| p.p90_us)
            }),
            series(run, "iptables", "p99", IPTABLES_DARK, Marker::Cross, |r| {
                r.first_packet.map(|p| p.p99_us)
            }),
        ],
    );
    one(
        "change-latency",
        "Change latency (rename → traffic on the new backend) vs services",
        "latency (ms, log scale)",
        vec![
            series(run, "ebpf", "p50", EBPF_LIGHT, Marker::Circle, |r| {
                r.change.map(|p| p.p50_us / 1e3)
            }),
            series(run, "ebpf", "p99", EBPF_DARK, Marker::Cross, |r| {
                r.change.map(|p| p.p99_us / 1e3)
            }),
            series(
                run,
                "iptables",
                "p50",
                IPTABLES_LIGHT,
                Marker::Circle,
                |r| r.change.map(|p| p.p50_us / 1e3),
            ),
            series(run, "iptables", "p99", IPTABLES_DARK, Marker::Cross, |r| {
                r.change.map(|p| p.p99_us / 1e3)
            }),
        ],
    );
    one(
        "programming",
        "Programming time (datapath sync and start → ready) vs services",
        "time (ms, log scale)",
        vec![
            series(run, "ebpf", "sync", EBPF_LIGHT, Marker::Circle, |r| {
                r.programmed.map(|p| p.sync_ms)
            }),
            series(
                run,
                "ebpf",
                "start → ready",
                EBPF_DARK,
                Marker::Cross,
                |r| r.programmed.map(|p| p.wall_ms),
            ),
            series(
                run,
                "iptables",
                "sync",
                IPTABLES_LIGHT,
                Marker::Circle,
                |r| r.programmed.map(|p| p.sync_ms),
            ),
            series(
                run,
                "iptables",
                "start → ready",
                IPTABLES_DARK,
                Marker::Cross,
                |r| r.programmed.map(|p| p.wall_ms),
            ),
        ],
    );
    out
}
