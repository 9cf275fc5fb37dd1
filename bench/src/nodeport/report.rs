//! The nodeport report: targets (met or missed, with the measured reason),
//! the two tables, the plot (SVG, plotters) and the raw figures as JSON.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use serde_json::json;

use super::pps::ModePps;
use super::testrun::Figures;

/// Where and under which names the report goes.
pub struct Out {
    pub dir: PathBuf,
    /// `nodeport-2026-12-07`, or `nodeport-smoke`.
    pub stem: String,
    /// Also written as `latest-…md` (the same text).
    pub latest: String,
}

/// What the report says about the machine and the run.
pub struct Environment {
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub loadavg: String,
    pub invocation: String,
    pub secs: f64,
    pub rounds: u32,
    pub single_runs: u32,
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

pub fn write(out: &Out, env: &Environment, t: &Figures, pps: &[ModePps]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&out.dir)?;
    let svg = format!("{}.svg", out.stem);
    plot(&out.dir.join(&svg), t, pps)?;
    let best = |m: &str| pps.iter().find(|p| p.mode == m).map_or(0.0, ModePps::best);
    let (xdp, tc, ipt) = (best("XDP"), best("TC"), best("iptables"));
    let ratio = if ipt > 0.0 { xdp / ipt } else { 0.0 };
    let first_ratio = t.tc_first_nodeport / t.tc_first_cluster_ip;

    let mut md = String::new();
    let _ = writeln!(md, "# NodePort benchmark, {}\n", env.date);
    let _ = writeln!(
        md,
        "NodePort traffic to an endpoint on another node (DNAT + source NAT + forwarding), through \
         kproxy's XDP fast path, its TC programs alone (`--xdp off`) and kube-proxy's iptables \
         rules (kproxy `--mode iptables`), on one run of one machine.\n"
    );
    let _ = writeln!(
        md,
        "Machine: {} ({} cores), kernel {}, load average at start {}. Command: `{}`.\n",
        env.cpu, env.cores, env.kernel, env.loadavg, env.invocation
    );
    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(md, "| target | measured | verdict |\n|---|---:|---|");
    let _ = writeln!(
        md,
        "| XDP path ≤ 100 ns/packet (test-run, established flow to the remote endpoint) | {:.1} ns | {} |",
        t.xdp_remote,
        verdict(t.xdp_remote <= 100.0)
    );
    let _ = writeln!(
        md,
        "| XDP ≥ 3× iptables forwarded packets/s | {ratio:.2}× ({xdp:.0} vs {ipt:.0} pps) | {} |",
        verdict(ratio >= 3.0)
    );
    let _ = writeln!(
        md,
        "| first packet via NodePort not slower than via ClusterIP (TC, test-run) | {:.1} vs {:.1} ns ({first_ratio:.2}×) | {} |\n",
        t.tc_first_nodeport,
        t.tc_first_cluster_ip,
        verdict(t.tc_first_nodeport <= t.tc_first_cluster_ip)
    );
    let _ = writeln!(md, "Why, from the figures below:\n");
    let _ = writeln!(
        md,
        "- XDP per packet: {:.1} ns against {:.1} ns for TC on the same established flow. On \
         this machine a test run of a packet that is not a service already costs {:.1} ns in \
         XDP ({:.1} in TC), and an established flow XDP only looks up and passes on costs \
         {:.1} ns: the lookups alone use the 100 ns budget here; the rest is the route (a \
         cached FIB result), the rewrite and the redirect. XDP's checksum updates are \
         arithmetic where TC calls `bpf_l4_csum_replace` four times, and TC's \
         `bpf_redirect_neigh` resolves the neighbour again.",
        t.xdp_remote, t.tc_remote, t.xdp_miss, t.tc_miss, t.xdp_local
    );
    let _ = writeln!(
        md,
        "- Forwarded pps: XDP {xdp:.0}, TC {tc:.0}, iptables {ipt:.0}. The generator, the node \
         and the remote node's receive share one core (veth delivers on the sending CPU), so \
         every mode's figure includes the same generator and receive cost: the ratio \
         understates the datapath's own difference{}.",
        if ratio >= 3.0 {
            ""
        } else {
            " — which is why the 3× target is missed on this setup even though the per-packet \
             cost of the node's work differs by more (see the test-run table)"
        }
    );
    let _ = writeln!(
        md,
        "- First packet: a nodePort is found with one `SERVICES` lookup, as a ClusterIP is (the \
         agent writes it under every node address as well as address 0), then takes the same \
         flow-opening path; measured difference nodePort − ClusterIP {:+.1} ns.\n",
        t.tc_first_nodeport - t.tc_first_cluster_ip
    );
    let _ = writeln!(
        md,
        "![forwarded packets per second and ns per packet]({svg})\n"
    );
    let _ = writeln!(
        md,
        "## ns/packet (BPF_PROG_TEST_RUN)\n\nSingle runs ({} each) minus the kernel's per-run \
         timing overhead ({:.1} ns); misses repeated.\n",
        env.single_runs, t.overhead
    );
    let _ = writeln!(md, "| path | XDP | TC |\n|---|---:|---:|");
    let _ = writeln!(
        md,
        "| established nodePort flow, remote endpoint (DNAT + SNAT + redirect) | {:.1} | {:.1} |",
        t.xdp_remote, t.tc_remote
    );
    let _ = writeln!(
        md,
        "| not a service (floor) | {:.1} | {:.1} |",
        t.xdp_miss, t.tc_miss
    );
    let _ = writeln!(
        md,
        "| first packet, ClusterIP, local endpoint | – | {:.1} |",
        t.tc_first_cluster_ip
    );
    let _ = writeln!(
        md,
        "| first packet, nodePort, local endpoint | – | {:.1} |\n",
        t.tc_first_nodeport
    );
    let _ = writeln!(
        md,
        "## Forwarded packets per second\n\n{} rounds of {:.1} s per mode (64 UDP flows, 64-byte \
         frames, AF_PACKET from one pinned thread); the best round counts.\n",
        env.rounds, env.secs
    );
    let _ = writeln!(
        md,
        "| mode | rounds (pps) | best (pps) | ÷ iptables |\n|---|---|---:|---:|"
    );
    for p in pps {
        let rounds: Vec<String> = p.rounds.iter().map(|r| format!("{r:.0}")).collect();
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.2} |",
            p.mode,
            rounds.join(", "),
            p.best(),
            if ipt > 0.0 { p.best() / ipt } else { 0.0 }
        );
    }
    let md_path = out.dir.join(format!("{}.md", out.stem));
    std::fs::write(&md_path, &md)?;
    let latest = out.dir.join(&out.latest);
    std::fs::write(&latest, &md)?;
    let raw = json!({
        "date": env.date, "kernel": env.kernel, "cpu": env.cpu, "cores": env.cores,
        "test_run_ns": {
            "xdp_remote": t.xdp_remote, "xdp_local": t.xdp_local, "tc_remote": t.tc_remote,
            "xdp_miss": t.xdp_miss, "tc_miss": t.tc_miss,
            "tc_first_cluster_ip": t.tc_first_cluster_ip, "tc_first_nodeport": t.tc_first_nodeport,
            "overhead": t.overhead,
        },
        "pps": pps.iter().map(|p| json!({"mode": p.mode, "rounds": p.rounds})).collect::<Vec<_>>(),
    });
    let json_path = out.dir.join(format!("{}.json", out.stem));
    std::fs::write(&json_path, serde_json::to_string_pretty(&raw)?)?;
    Ok(vec![md_path, latest, out.dir.join(svg), json_path])
}

const COLORS: [RGBColor; 3] = [
    RGBColor(0x08, 0x30, 0x6b),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
];

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("plotting: {e}")
}

/// Two bar charts side by side: forwarded pps per mode, and ns/packet of
/// the established remote flow (XDP, TC).
fn plot(path: &Path, t: &Figures, pps: &[ModePps]) -> Result<()> {
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(480);
    let bars = |area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
                title: &str,
                y: &str,
                values: &[(&str, f64, RGBColor)]|
     -> Result<()> {
        let max = values.iter().map(|v| v.1).fold(1.0, f64::max) * 1.15;
        let names: Vec<String> = values.iter().map(|v| v.0.to_owned()).collect();
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..values.len() as f64, 0f64..max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(values.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.01 && i < names.len() {
                    names[i].clone()
                } else {
                    String::new()
                }
            })
            .y_desc(y)
            .draw()
            .map_err(err)?;
        chart
            .draw_series(values.iter().enumerate().map(|(i, (_, v, c))| {
                Rectangle::new([(i as f64 + 0.2, 0.0), (i as f64 + 0.8, *v)], c.filled())
            }))
            .map_err(err)?;
        Ok(())
    };
    let pps_values: Vec<(&str, f64, RGBColor)> = pps
        .iter()
        .enumerate()
        .map(|(i, p)| (p.mode, p.best(), COLORS[i % COLORS.len()]))
        .collect();
    bars(
        &left,
        "NodePort → remote endpoint, one core",
        "forwarded packets/s",
        &pps_values,
    )?;
    bars(
        &right,
        "ns/packet, established flow (test-run)",
        "ns",
        &[
            ("XDP", t.xdp_remote, COLORS[0]),
            ("TC", t.tc_remote, COLORS[1]),
        ],
    )?;
    root.present().map_err(err)?;
    Ok(())
}
