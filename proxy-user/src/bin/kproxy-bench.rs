//! `kproxy-bench dataplane`: per-packet cost of the datapath through
//! BPF_PROG_TEST_RUN, with 1 service and with 100,000 services loaded.
//!
//! The kernel reuses one skb across the repeats of a test run, so a packet
//! the program rewrites would leave the measured path after the first run.
//! Hit paths are therefore timed on two "mirror" frontends, M:80 whose only
//! backend is M:8080 and M:8080 whose only backend is M:80: each translated
//! packet is a packet for the other mirror, so every repeat takes the full
//! path (frontend lookup, conntrack hit, rewrite with a port change, checksum
//! helpers, counters). New flows cannot repeat that way (the first run
//! creates the flow); they are timed one run each over distinct packets, and
//! the kernel's per-run timing overhead, measured the same way on the miss
//! path, is subtracted.
//!
//! Then IPv6 against IPv4 in one datapath (the same paths, mirror
//! frontends of each family, timed interleaved), the cost of choosing a
//! backend for a new flow, by selector (exact
//! round-robin, a session-affinity hit, Maglev), and of one conntrack sweep
//! over `--gc-entries` entries (default 1,000,000), all live and with half
//! of them expired.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use proxy_user::datapath::ebpf::{Dataplane, EGRESS_PROG, INGRESS_PROG, LoadOptions};
use proxy_user::model::{
    BackendAddr, DesiredService, DesiredState, Frontend, LbAlgorithm, Policy, Proto,
};
use proxy_user::pktgen::{Frame, Frame6};
use proxy_user::reconcile::diff;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const MIRROR: Ipv4Addr = Ipv4Addr::new(10, 95, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 1, 0, 0, 0, 0, 2);
const MIRROR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x95, 0, 0, 0, 0, 1);

struct Opts {
    scales: Vec<u32>,
    repeat: u32,
    single_runs: u32,
    gc_entries: u32,
    /// Also write every figure here, as JSON (for the report).
    json: Option<std::path::PathBuf>,
}

/// Parses the arguments after the program name.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Opts> {
    let mut args = args.into_iter();
    let mut opts = Opts {
        scales: vec![1, 100_000],
        repeat: 200_000,
        single_runs: 3_000,
        gc_entries: 1_000_000,
        json: None,
    };
    let mut scales_given = false;
    match args.next().as_deref() {
        Some("dataplane") | None => {}
        Some(other) => bail!("unknown benchmark {other:?}: available: dataplane"),
    }
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--services" => {
                opts.scales = val()?
                    .split(',')
                    .map(|s| s.trim().parse::<u32>())
                    .collect::<Result<_, _>>()
                    .map_err(|e| anyhow::anyhow!("--services: {e}"))?;
                scales_given = true;
            }
            "--repeat" => opts.repeat = val()?.parse()?,
            "--single-runs" => opts.single_runs = val()?.parse()?,
            "--gc-entries" => opts.gc_entries = val()?.parse()?,
            "--json" => opts.json = Some(val()?.into()),
            "--quick" => {
                opts.repeat = 50_000;
                opts.single_runs = 1_000;
                opts.gc_entries = 200_000;
            }
            // Seconds: the whole path (load, program, every measured
            // packet class, the table), figures too noisy to mean much.
            "--smoke" => {
                opts.repeat = 1_000;
                opts.single_runs = 100;
                opts.gc_entries = 10_000;
                if !scales_given {
                    opts.scales = vec![1, 1_000];
                }
            }
            "-h" | "--help" => {
                println!(
                    "usage: kproxy-bench dataplane [--services 1,100000] [--repeat N] \
                     [--single-runs N] [--gc-entries N] [--json FILE] [--quick | --smoke]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown flag {other:?} (see --help)"),
        }
    }
    if opts.scales.is_empty() || opts.scales.contains(&0) {
        bail!("--services needs positive counts");
    }
    if opts.repeat == 0 || opts.single_runs == 0 || opts.gc_entries == 0 {
        bail!("--repeat, --single-runs and --gc-entries need positive counts");
    }
    Ok(opts)
}

/// Synthetic services: 10.96.x.y:80/TCP, three backends each, plus the
/// mirror frontends used to time hit paths.
fn state(n: u32) -> DesiredState {
    let mut st = DesiredState::default();
    for i in 0..n {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i);
        let backends = (0..3)
            .map(|b| {
                BackendAddr::new(
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 3 + b),
                    8080,
                )
            })
            .collect();
        st.services.insert(
            Frontend {
                ip: ip.into(),
                port: 80,
                proto: Proto::Tcp,
            },
            DesiredService::new(format!("svc-{i}"), backends),
        );
    }
    // MIRROR:80 → MIRROR:8080 and MIRROR:8080 → MIRROR:80: a translated
    // packet is again a packet for the other mirror, with a real port change.
    for (port, target) in [(80, 8080), (8080, 80)] {
        st.services.insert(
            Frontend {
                ip: MIRROR.into(),
                port,
                proto: Proto::Tcp,
            },
            DesiredService::new(
                format!("mirror-{port}"),
                [BackendAddr::new(MIRROR, target)].into(),
            ),
        );
    }
    st
}

struct Row {
    services: u32,
    program_ms: f64,
    non_ipv4: f64,
    miss: f64,
    new_flow: f64,
    established: f64,
    reverse: f64,
}

fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// Fastest of five rounds of `repeat / 5` runs: the other core's work and
/// interrupts only ever add time, so the minimum is the datapath's own cost.
fn best_of(dp: &Dataplane, prog: &str, pkt: &[u8], repeat: u32) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..5 {
        best = best.min(ns(dp.test_run(prog, pkt, (repeat / 5).max(1))?.duration));
    }
    Ok(best)
}

fn measure(n: u32, opts: &Opts) -> Result<Row> {
    let load = LoadOptions {
        max_services: (n + 16).max(1024),
        max_slots: ((n + 16) * 3).max(4096),
        conntrack_size: 2 * opts.single_runs + 1024,
        bpf_log_level: 0,
        pin_dir: None,
        ..LoadOptions::default()
    };
    let mut dp = Dataplane::load(&load)?;
    let desired = state(n);
    let t = Instant::now();
    dp.apply(&diff(&DesiredState::default(), &desired))?;
    let program_ms = t.elapsed().as_secs_f64() * 1e3;

    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 2, 0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let non_ipv4 = best_of(&dp, INGRESS_PROG, &arp, opts.repeat)?;
    let miss_pkt = Frame::tcp(CLIENT, 40000, Ipv4Addr::new(10, 200, 0, 1), 80).build();
    let miss = best_of(&dp, INGRESS_PROG, &miss_pkt, opts.repeat)?;

    // Established: both mirror flows exist after two runs.
    let est_pkt = Frame::tcp(CLIENT, 40000, MIRROR, 80).build();
    let r = dp.test_run(INGRESS_PROG, &est_pkt, 2)?;
    if r.verdict != 0 || dp.conntrack_entries() != 4 {
        bail!("mirror frontends not translated (verdict {})", r.verdict);
    }
    let established = best_of(&dp, INGRESS_PROG, &est_pkt, opts.repeat)?;
    // Reverse NAT: replies of the two mirror flows map onto each other.
    let reply = Frame::tcp(MIRROR, 8080, CLIENT, 40000).build();
    let r = dp.test_run(EGRESS_PROG, &reply, 1)?;
    if r.verdict != 0 {
        bail!("mirror reply not translated (verdict {})", r.verdict);
    }
    let reverse = best_of(&dp, EGRESS_PROG, &reply, opts.repeat)?;

    // New flows: one run per distinct flow, on a real service (the last
    // one, so the lookup sees a full table), minus the single-run overhead.
    let target = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + n - 1);
    let mut new_total = 0.0;
    let mut miss_single = 0.0;
    for i in 0..opts.single_runs {
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + i);
        let pkt = Frame::tcp(src, 30000, target, 80).build();
        let r = dp.test_run(INGRESS_PROG, &pkt, 1)?;
        if r.verdict != 0 {
            bail!("new flow {i} not translated (verdict {})", r.verdict);
        }
        new_total += ns(r.duration);
        miss_single += ns(dp.test_run(INGRESS_PROG, &miss_pkt, 1)?.duration);
    }
    let runs = f64::from(opts.single_runs);
    let overhead = (miss_single / runs - miss).max(0.0);
    let new_flow = new_total / runs - overhead;
    Ok(Row {
        services: n,
        program_ms,
        non_ipv4,
        miss,
        new_flow,
        established,
        reverse,
    })
}

/// New-flow cost by selector, ns.
struct Selection {
    round_robin: f64,
    affinity_hit: f64,
    maglev: f64,
}

/// Times new flows to three frontends over three backends that differ only
/// in how they choose: round-robin, ClientIP affinity (one client, distinct
/// ports: every flow after the first finds its binding), Maglev.
fn measure_selection(opts: &Opts) -> Result<Selection> {
    let mut dp = Dataplane::load(&LoadOptions {
        max_services: 64,
        max_slots: 256,
        conntrack_size: 8 * opts.single_runs + 1024,
        bpf_log_level: 0,
        pin_dir: None,
        ..LoadOptions::default()
    })?;
    let vip = |k: u8| Ipv4Addr::new(10, 96, 1, k);
    let mut st = DesiredState::default();
    let policies = [
        Policy::default(),
        Policy {
            affinity: Some(10_800),
            ..Policy::default()
        },
        Policy {
            lb: LbAlgorithm::Maglev,
            ..Policy::default()
        },
    ];
    for (k, policy) in policies.into_iter().enumerate() {
        let backends = (0..3)
            .map(|b| BackendAddr::new(Ipv4Addr::new(10, 128, 1, 10 * k as u8 + b), 8080))
            .collect();
        st.services.insert(
            Frontend {
                ip: vip(k as u8 + 1).into(),
                port: 80,
                proto: Proto::Tcp,
            },
            DesiredService {
                policy,
                ..DesiredService::new(format!("sel-{k}"), backends)
            },
        );
    }
    dp.apply(&diff(&DesiredState::default(), &st))?;
    let miss_pkt = Frame::tcp(CLIENT, 40000, Ipv4Addr::new(10, 200, 0, 1), 80).build();
    let miss = best_of(&dp, INGRESS_PROG, &miss_pkt, opts.repeat)?;
    // The affinity frontend's first flow makes the binding; the rest find
    // it. The three selectors and the single-run overhead are timed
    // interleaved, flow by flow, and compared by their medians, so drift
    // and interrupts do not land on one selector.
    dp.test_run(INGRESS_PROG, &Frame::tcp(CLIENT, 1, vip(2), 80).build(), 1)?;
    let mut runs: [Vec<f64>; 4] = Default::default();
    for i in 0..opts.single_runs {
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + i);
        let pkts = [
            Frame::tcp(src, 30000, vip(1), 80),
            Frame::tcp(CLIENT, 2 + i as u16, vip(2), 80),
            Frame::tcp(src, 30000, vip(3), 80),
        ];
        for (k, pkt) in pkts.iter().enumerate() {
            let r = dp.test_run(INGRESS_PROG, &pkt.build(), 1)?;
            if r.verdict != 0 {
                bail!(
                    "selector {k}: new flow {i} not translated (verdict {})",
                    r.verdict
                );
            }
            runs[k].push(ns(r.duration));
        }
        runs[3].push(ns(dp.test_run(INGRESS_PROG, &miss_pkt, 1)?.duration));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let overhead = (median(&mut runs[3]) - miss).max(0.0);
    let cost: Vec<f64> = runs[..3].iter_mut().map(|v| median(v) - overhead).collect();
    Ok(Selection {
        round_robin: cost[0],
        affinity_hit: cost[1],
        maglev: cost[2],
    })
}

/// Per-packet cost of one family's paths, ns.
#[derive(Clone, Copy, Default)]
struct Paths {
    miss: f64,
    new_flow: f64,
    established: f64,
    reverse: f64,
}

/// IPv4 and IPv6 through the same loaded datapath: mirror frontends and a
/// three-backend service in each family. Hit paths alternate family round
/// by round (fastest round each); new flows alternate flow by flow
/// (medians, the single-run overhead of each family's miss subtracted).
fn measure_families(opts: &Opts) -> Result<(Paths, Paths)> {
    let mut dp = Dataplane::load(&LoadOptions {
        max_services: 64,
        max_slots: 256,
        conntrack_size: 4 * opts.single_runs + 1024,
        bpf_log_level: 0,
        pin_dir: None,
        ..LoadOptions::default()
    })?;
    let svc4 = Ipv4Addr::new(10, 96, 2, 1);
    let svc6 = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 2, 1);
    let mut st = DesiredState::default();
    let mut add = |ip: IpAddr, port: u16, backends: Vec<BackendAddr>| {
        st.services.insert(
            Frontend {
                ip,
                port,
                proto: Proto::Tcp,
            },
            DesiredService::new(format!("{ip}:{port}"), backends.into_iter().collect()),
        );
    };
    for ip in [IpAddr::V4(MIRROR), IpAddr::V6(MIRROR6)] {
        add(ip, 80, vec![BackendAddr::new(ip, 8080)]);
        add(ip, 8080, vec![BackendAddr::new(ip, 80)]);
    }
    add(
        svc4.into(),
        80,
        (1..=3)
            .map(|b| BackendAddr::new(Ipv4Addr::new(10, 128, 2, b), 8080))
            .collect(),
    );
    add(
        svc6.into(),
        80,
        (1..=3)
            .map(|b| BackendAddr::new(Ipv6Addr::new(0xfd00, 0x128, 2, 0, 0, 0, 0, b), 8080))
            .collect(),
    );
    dp.apply(&diff(&DesiredState::default(), &st))?;
    let miss = [
        Frame::tcp(CLIENT, 40000, Ipv4Addr::new(10, 200, 0, 1), 80).build(),
        Frame6::tcp(
            CLIENT6,
            40000,
            Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1),
            80,
        )
        .build(),
    ];
    let est = [
        Frame::tcp(CLIENT, 40000, MIRROR, 80).build(),
        Frame6::tcp(CLIENT6, 40000, MIRROR6, 80).build(),
    ];
    let reply = [
        Frame::tcp(MIRROR, 8080, CLIENT, 40000).build(),
        Frame6::tcp(MIRROR6, 8080, CLIENT6, 40000).build(),
    ];
    for (f, pkt) in est.iter().enumerate() {
        let r = dp.test_run(INGRESS_PROG, pkt, 2)?;
        if r.verdict != 0 {
            bail!(
                "family {f}: mirror frontends not translated (verdict {})",
                r.verdict
            );
        }
        let r = dp.test_run(EGRESS_PROG, &reply[f], 1)?;
        if r.verdict != 0 {
            bail!(
                "family {f}: mirror reply not translated (verdict {})",
                r.verdict
            );
        }
    }
    let mut out = [Paths::default(); 2];
    for o in &mut out {
        o.miss = f64::MAX;
        o.established = f64::MAX;
        o.reverse = f64::MAX;
    }
    let per = (opts.repeat / 5).max(1);
    for _ in 0..5 {
        for f in 0..2 {
            let run =
                |prog, pkt: &[u8]| -> Result<f64> { Ok(ns(dp.test_run(prog, pkt, per)?.duration)) };
            out[f].miss = out[f].miss.min(run(INGRESS_PROG, &miss[f])?);
            out[f].established = out[f].established.min(run(INGRESS_PROG, &est[f])?);
            out[f].reverse = out[f].reverse.min(run(EGRESS_PROG, &reply[f])?);
        }
    }
    let mut runs: [Vec<f64>; 4] = Default::default();
    for i in 0..opts.single_runs {
        let src4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + i);
        let mut src6 = CLIENT6.segments();
        src6[6] = (i >> 16) as u16;
        src6[7] = i as u16;
        let pkts = [
            Frame::tcp(src4, 30000, svc4, 80).build(),
            Frame6::tcp(Ipv6Addr::from(src6), 30000, svc6, 80).build(),
        ];
        for (f, pkt) in pkts.iter().enumerate() {
            let r = dp.test_run(INGRESS_PROG, pkt, 1)?;
            if r.verdict != 0 {
                bail!(
                    "family {f}: new flow {i} not translated (verdict {})",
                    r.verdict
                );
            }
            runs[f].push(ns(r.duration));
            runs[2 + f].push(ns(dp.test_run(INGRESS_PROG, &miss[f], 1)?.duration));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for f in 0..2 {
        let overhead = (median(&mut runs[2 + f]) - out[f].miss).max(0.0);
        out[f].new_flow = median(&mut runs[f]) - overhead;
    }
    Ok((out[0], out[1]))
}

/// One sweep's wall time over `n` conntrack entries, all live, and with
/// every second one expired (which it then deletes).
fn measure_gc(n: u32) -> Result<(Duration, Duration)> {
    use proxy_common::{CT_DIR_FORWARD, CT_F_CLOSING, CtKey, CtValue, IPPROTO_TCP};
    use proxy_user::datapath::ConntrackGc;
    let mut dp = Dataplane::load(&LoadOptions {
        max_services: 64,
        max_slots: 256,
        // Room beyond n, so the LRU never evicts while filling.
        conntrack_size: n + n / 4 + 4096,
        bpf_log_level: 0,
        pin_dir: None,
        ..LoadOptions::default()
    })?;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    let now_ns = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    let fill = |dp: &mut Dataplane, expired_every: u32| -> Result<()> {
        for i in 0..n {
            let key = CtKey {
                saddr: (0x0a01_0000u32 + (i >> 16)).to_be(),
                daddr: 0x0a60_000au32.to_be(),
                sport: (i as u16).to_be(),
                dport: 80u16.to_be(),
                proto: IPPROTO_TCP,
                dir: CT_DIR_FORWARD,
                _pad: 0,
            };
            let expired = expired_every > 0 && i % expired_every == 0;
            let value = CtValue {
                addr: 0x0a80_0001u32.to_be(),
                port: 8080u16.to_be(),
                nat_port: 0,
                svc_id: 0,
                nat_addr: 0,
                // Closed a minute ago: past the close timeout.
                seen_ns: if expired {
                    now_ns.saturating_sub(60 * 1_000_000_000)
                } else {
                    now_ns
                },
                flags: if expired { CT_F_CLOSING } else { 0 },
                _pad: 0,
            };
            dp.conntrack_insert(key, value)?;
        }
        Ok(())
    };
    eprintln!("[bench] filling {n} conntrack entries…");
    fill(&mut dp, 0)?;
    let live = dp.collect();
    if live.live != n as usize || live.deleted != 0 {
        bail!("sweep of {n} live entries: {live:?}");
    }
    fill(&mut dp, 2)?;
    let half = dp.collect();
    if half.deleted != n.div_ceil(2) as usize {
        bail!("sweep of {n} entries, half expired: {half:?}");
    }
    Ok((live.took, half.took))
}

fn main() -> Result<()> {
    let opts = parse_args(std::env::args().skip(1))?;
    println!(
        "BPF_PROG_TEST_RUN, ns/packet (repeat {}, new flows over {} single runs), kernel {}",
        opts.repeat,
        opts.single_runs,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let mut rows = Vec::new();
    for &n in &opts.scales {
        eprintln!("[bench] loading {n} services and measuring…");
        rows.push(measure(n, &opts)?);
    }
    println!();
    println!(
        "| services | programming (ms) | non-IPv4 | IPv4 miss | new flow | established | reverse NAT |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.services, r.program_ms, r.non_ipv4, r.miss, r.new_flow, r.established, r.reverse
        );
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last())
        && rows.len() > 1
    {
        println!();
        println!(
            "ratio {}÷{} services: miss {:.2}, new flow {:.2}, established {:.2}, reverse NAT {:.2}",
            last.services,
            first.services,
            last.miss / first.miss,
            last.new_flow / first.new_flow,
            last.established / first.established,
            last.reverse / first.reverse
        );
        let est = last.established;
        let miss = last.miss;
        println!(
            "targets: established ≤ 120 ns: {} ({est:.1}); miss ≤ 50 ns: {} ({miss:.1}); \
             {}÷{} established ≤ 1.1: {} ({:.2})",
            if est <= 120.0 { "met" } else { "MISSED" },
            if miss <= 50.0 { "met" } else { "MISSED" },
            last.services,
            first.services,
            if last.established / first.established <= 1.1 {
                "met"
            } else {
                "MISSED"
            },
            last.established / first.established
        );
    }

    eprintln!("[bench] IPv6 against IPv4…");
    let (v4, v6) = measure_families(&opts)?;
    println!();
    println!("| family | miss | new flow | established | reverse NAT |");
    println!("|---|---:|---:|---:|---:|");
    for (name, p) in [("IPv4", v4), ("IPv6", v6)] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
            p.miss, p.new_flow, p.established, p.reverse
        );
    }
    let ratio = v6.established / v4.established;
    println!();
    println!(
        "targets: IPv6 established ≤ 1.2× IPv4: {} ({ratio:.2}); reverse NAT {:.2}, new flow {:.2}",
        if ratio <= 1.2 { "met" } else { "MISSED" },
        v6.reverse / v4.reverse,
        v6.new_flow / v4.new_flow
    );

    eprintln!("[bench] new-flow cost by selector…");
    let sel = measure_selection(&opts)?;
    println!();
    println!("| new flow, by selector | ns |");
    println!("|---|---:|");
    println!("| round-robin | {:.1} |", sel.round_robin);
    println!(
        "| session affinity (binding found) | {:.1} |",
        sel.affinity_hit
    );
    println!("| Maglev | {:.1} |", sel.maglev);
    let added = sel.affinity_hit - sel.round_robin;
    println!();
    println!(
        "targets: affinity adds ≤ 20 ns: {} ({added:+.1}); Maglev vs round-robin {:+.1} ns",
        if added <= 20.0 { "met" } else { "MISSED" },
        sel.maglev - sel.round_robin
    );

    let (live, half) = measure_gc(opts.gc_entries)?;
    println!();
    println!(
        "conntrack sweep over {} entries: {:.0} ms all live, {:.0} ms with half expired \
         ({:.0} ns per entry scanned)",
        opts.gc_entries,
        live.as_secs_f64() * 1e3,
        half.as_secs_f64() * 1e3,
        live.as_secs_f64() * 1e9 / f64::from(opts.gc_entries)
    );
    if let Some(path) = &opts.json {
        let families: Vec<serde_json::Value> = [("IPv4", v4), ("IPv6", v6)]
            .iter()
            .map(|(name, p)| {
                serde_json::json!({
                    "family": name,
                    "miss": p.miss,
                    "new_flow": p.new_flow,
                    "established": p.established,
                    "reverse": p.reverse,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim(),
            "repeat": opts.repeat,
            "single_runs": opts.single_runs,
            "rows": rows.iter().map(|r| serde_json::json!({
                "services": r.services,
                "program_ms": r.program_ms,
                "non_ipv4": r.non_ipv4,
                "miss": r.miss,
                "new_flow": r.new_flow,
                "established": r.established,
                "reverse": r.reverse,
            })).collect::<Vec<_>>(),
            "families": families,
            "selection": {
                "round_robin": sel.round_robin,
                "affinity_hit": sel.affinity_hit,
                "maglev": sel.maglev,
            },
            "gc": {
                "entries": opts.gc_entries,
                "live_ms": live.as_secs_f64() * 1e3,
                "half_expired_ms": half.as_secs_f64() * 1e3,
            },
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_args;

    fn parse(args: &[&str]) -> anyhow::Result<(Vec<u32>, u32, u32)> {
        let o = parse_args(args.iter().map(|a| a.to_string()))?;
        Ok((o.scales, o.repeat, o.single_runs))
    }

    #[test]
    fn presets_and_overrides() {
        assert_eq!(parse(&[]).unwrap(), (vec![1, 100_000], 200_000, 3_000));
        assert_eq!(
            parse(&["dataplane", "--quick"]).unwrap(),
            (vec![1, 100_000], 50_000, 1_000)
        );
        assert_eq!(
            parse(&["dataplane", "--smoke"]).unwrap(),
            (vec![1, 1_000], 1_000, 100)
        );
        // --smoke keeps explicit service counts, whichever comes first.
        for args in [
            ["dataplane", "--services", "1,30000", "--smoke"],
            ["dataplane", "--smoke", "--services", "1,30000"],
        ] {
            assert_eq!(parse(&args).unwrap(), (vec![1, 30_000], 1_000, 100));
        }
        assert!(parse(&["dataplane", "--services", "0,5"]).is_err());
        assert!(parse(&["dataplane", "--repeat", "0"]).is_err());
        assert!(parse(&["dataplane", "--repeat"]).is_err());
        assert!(parse(&["dataplane", "--nope"]).is_err());
        assert!(parse(&["nope"]).is_err());
    }
}
