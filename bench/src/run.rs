//! One scale (service count): topology, servers and manifests once, then a
//! fresh kproxy per mode going through the phases.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kproxy_tests::kproxy::{Event, field_u64};
use kproxy_tests::{Kproxy, ManifestDir, Mode, Netns, Topology, backend_ip, backend_name, run_in};
use serde::Serialize;

use crate::measure::{self, Percentiles, ProcCost, ask_new_connection};
use crate::progress::Progress;
use crate::scenario::{self, FLIP_IP, IPERF_IP, IPERF_PORT, SERVICE_PORT, SplitMix64};
use crate::{Plan, check_interrupted, deadline, interrupted};

/// Client ports of the direct reference connections: below the ephemeral
/// range (`EPHEMERAL`) that the ClusterIP connections use.
const DIRECT_PORTS: std::ops::Range<u16> = 1_024..10_000;
/// The client's ephemeral port range.
const EPHEMERAL: &str = "10000 65000";

/// Timeout of one connection of the first-packet phase and of one probe.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// kproxy start → `ready`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Programming {
    /// Reading and parsing the manifests (kproxy's `load_us`).
    pub load_ms: f64,
    /// Programming the datapath (kproxy's `sync_us`): map writes, or
    /// iptables-restore.
    pub sync_ms: f64,
    /// Process start → `ready` line read (loading BPF programs / creating
    /// chains included).
    pub wall_ms: f64,
}

/// iperf3 through the ClusterIP against straight to backend 1.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ThroughputPair {
    pub direct_bps: f64,
    pub via_bps: f64,
}

/// Everything measured for one (scale, mode).
#[derive(Debug, Clone, Serialize)]
pub struct ModeRun {
    pub services: u32,
    pub mode: String,
    pub programmed: Option<Programming>,
    /// Why there is no programming figure (e.g. not within the bound).
    pub not_programmed: Option<String>,
    pub first_packet: Option<Percentiles>,
    /// The connect() part of the same connections (SYN → SYN-ACK).
    pub first_packet_connect: Option<Percentiles>,
    /// The same exchange straight to a backend (no ClusterIP), interleaved
    /// with the ClusterIP connections: what the path costs at those moments.
    pub first_packet_direct: Option<Percentiles>,
    pub first_packet_errors: usize,
    pub first_packet_note: Option<String>,
    pub throughput: Vec<ThroughputPair>,
    /// Rename of the flip slice → first answer from the new backend.
    pub change: Option<Percentiles>,
    /// kproxy's own `took_us` of those changes.
    pub change_took: Option<Percentiles>,
    /// Rename → `applied` line read from kproxy's stdout.
    pub change_applied_line: Option<Percentiles>,
    pub changes_timed_out: usize,
    pub change_note: Option<String>,
    /// Probe connections started during the change phase.
    pub change_probes: usize,
    /// eBPF: conntrack entries when kproxy stopped (its `counters` line);
    /// kproxy's flush of a removed backend walks all of them.
    pub conntrack_entries_at_stop: Option<u64>,
    pub cost_at_ready: Option<ProcCost>,
    pub cost: Option<ProcCost>,
    pub errors: Vec<String>,
}

impl ModeRun {
    fn new(services: u32, mode: Mode) -> ModeRun {
        ModeRun {
            services,
            mode: mode.as_str().to_owned(),
            programmed: None,
            not_programmed: None,
            first_packet: None,
            first_packet_connect: None,
            first_packet_direct: None,
            first_packet_errors: 0,
            first_packet_note: None,
            throughput: Vec::new(),
            change: None,
            change_took: None,
            change_applied_line: None,
            changes_timed_out: 0,
            change_note: None,
            change_probes: 0,
            conntrack_entries_at_stop: None,
            cost_at_ready: None,
            cost: None,
            errors: Vec::new(),
        }
    }

    /// Best via ÷ best direct: other load on the machine only ever lowers
    /// a run, so the best of each is the datapath's own figure.
    pub fn throughput_ratio(&self) -> Option<f64> {
        let best =
            |f: fn(&ThroughputPair) -> f64| self.throughput.iter().map(f).fold(0.0f64, f64::max);
        let direct = best(|p| p.direct_bps);
        (direct > 0.0).then(|| best(|p| p.via_bps) / direct)
    }
}

/// What one scale shares between the modes.
struct Scale<'a> {
    plan: &'a Plan,
    n: u32,
    topo: Topology,
    manifests: ManifestDir,
    /// First-packet targets (same for both modes).
    targets: Vec<Ipv4Addr>,
    warmup: Vec<Ipv4Addr>,
}

pub fn run_scale(plan: &Plan, n: u32, progress: &Progress) -> Result<Vec<ModeRun>> {
    let label = services_label(n);
    progress.step(&format!("{label} · setup"));
    progress.phase("topology, servers, manifests", u64::from(n));
    // The iptables-mode topology (with the service CIDR route) for both
    // modes: eBPF translates before routing and ignores the route.
    let topo = Topology::new_for(scenario::BACKENDS, Mode::Iptables).context("build topology")?;
    let client = &topo.client().ns;
    // Thousands of short connections: no TIME_WAIT buildup (the client
    // also closes with an RST), a wide port range.
    client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    client.sysctl("net.ipv4.ip_local_port_range", EPHEMERAL)?;
    let _servers = topo.start_servers(scenario::TARGET_PORT)?;
    let _iperf = measure::start_iperf_server(&topo.backend(1).ns, IPERF_PORT)?;
    let manifests = ManifestDir::new()?;
    let bar = progress.bar();
    let bytes = scenario::write_manifests(&manifests, n, |done| bar.set_position(u64::from(done)))?;
    progress.println(&format!(
        "{label}: manifests {:.1} MiB in {}",
        bytes as f64 / 1048576.0,
        manifests.path().display()
    ));
    // Per scale and seed, the same targets in both modes.
    let mut rng = SplitMix64::new(plan.seed ^ u64::from(n));
    let warmup = (0..plan.warmup_connections)
        .map(|_| scenario::cluster_ip(rng.below(n)))
        .collect();
    let targets = (0..plan.connections)
        .map(|_| scenario::cluster_ip(rng.below(n)))
        .collect();
    let scale = Scale {
        plan,
        n,
        topo,
        manifests,
        targets,
        warmup,
    };
    let mut runs = Vec::new();
    for mode in plan.modes() {
        check_interrupted()?;
        progress.step(&format!("{label} · {mode}"));
        let mut r = ModeRun::new(n, mode);
        if let Err(e) = run_mode(&scale, mode, progress, &mut r) {
            progress.println(&format!("{label} · {mode}: {e:#}"));
            r.errors.push(format!("{e:#}"));
        }
        progress.step_done();
        runs.push(r);
    }
    Ok(runs)
}

fn run_mode(s: &Scale, mode: Mode, progress: &Progress, r: &mut ModeRun) -> Result<()> {
    let plan = s.plan;
    let node = &s.topo.node;
    s.manifests
        .write(scenario::FLIP_SLICE_FILE, &scenario::flip_slice(1))?;
    progress.phase("programming (start → ready)", 1);
    let t0 = Instant::now();
    let ifaces = [s.topo.client_iface_on_node()];
    let mut kp = Kproxy::start_with_mode(node, s.manifests.path(), &ifaces, &[], mode)?;
    let bound = Duration::from_secs(plan.program_bound_s);
    let ready = match kp.wait_event("ready", |e| matches!(e, Event::Ready { .. }), bound) {
        Ok(line) => line,
        Err(e) => {
            if kp.is_running() {
                r.not_programmed = Some(format!(
                    "not programmed within {} s (bound)",
                    plan.program_bound_s
                ));
                progress.println(&format!(
                    "{} · {mode}: not programmed within {} s, stopping it",
                    services_label(s.n),
                    plan.program_bound_s
                ));
                kill_hard(&mut kp, node);
                return Ok(());
            }
            return Err(e.context("kproxy exited before ready"));
        }
    };
    let wall = ready.at.duration_since(t0);
    r.programmed = Some(Programming {
        load_ms: field_u64(&ready.text, "load_us")? as f64 / 1e3,
        sync_ms: field_u64(&ready.text, "sync_us")? as f64 / 1e3,
        wall_ms: wall.as_secs_f64() * 1e3,
    });
    r.cost_at_ready = measure::proc_cost(kp.pid()).ok();
    progress.bar().inc(1);
    let services = field_u64(&ready.text, "services")?;
    let expected = u64::from(s.n) + scenario::EXTRA_SERVICES as u64;
    if services != expected {
        bail!(
            "kproxy programmed {services} services, expected {expected}: {}",
            ready.text
        );
    }

    // Each phase records its own failure and the next one still runs.
    let record = |what: &str, res: Result<()>, r: &mut ModeRun| {
        if let Err(e) = res {
            progress.println(&format!("{} · {mode} · {what}: {e:#}", services_label(s.n)));
            r.errors.push(format!("{what}: {e:#}"));
        }
    };
    let res = first_packet(s, progress, r);
    record("first-packet latency", res, r);
    check_interrupted()?;
    let res = change_latency(s, &mut kp, progress, r);
    record("change latency", res, r);
    check_interrupted()?;
    if plan.iperf_scales.contains(&s.n) {
        let res = throughput(s, progress, r);
        record("throughput", res, r);
    }
    r.cost = measure::proc_cost(kp.pid()).ok();
    if r.cost.is_none() {
        r.errors
            .push("could not read kproxy's /proc entries".into());
    }

    progress.phase("stopping kproxy", 1);
    match kp.stop(Duration::from_secs(plan.stop_bound_s)) {
        Ok(st) if st.success() => {}
        Ok(st) => r
            .errors
            .push(format!("kproxy exited with {st} after SIGTERM")),
        Err(e) => {
            r.errors.push(format!("{e:#}"));
            kill_hard(&mut kp, node);
        }
    }
    if mode == Mode::Ebpf
        && let Ok(line) = kp.wait_line("kproxy: counters", Duration::from_secs(2))
    {
        r.conntrack_entries_at_stop = field_u64(&line, "conntrack_entries").ok();
    }
    if mode == Mode::Iptables {
        let left = kproxy_tests::iptables::kube_rules(node)?;
        if !left.is_empty() {
            r.errors.push(format!(
                "{} KUBE- rules left after kproxy stopped",
                left.len()
            ));
        }
    }
    progress.bar().inc(1);
    Ok(())
}

/// SIGKILL kproxy and whatever it left running in the node (an
/// iptables-restore in the middle of a transaction, which then commits
/// nothing).
fn kill_hard(kp: &mut Kproxy, node: &Netns) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(kp.pid() as libc::pid_t, libc::SIGKILL) };
    let _ = kp.stop(Duration::from_secs(10));
    for pid in node.pids() {
        // SAFETY: plain kill(2) on a process inside our own namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn first_packet(s: &Scale, progress: &Progress, r: &mut ModeRun) -> Result<()> {
    let plan = s.plan;
    progress.phase("first-packet latency (warm-up)", s.warmup.len() as u64);
    let bar = progress.bar();
    let client = s.topo.client_ns();
    // Warm-up (not recorded): neighbour entries, server paths, caches. It
    // also checks that ClusterIPs answer from the bulk backends.
    let warm: Result<()> = run_in(client, || {
        for ip in &s.warmup {
            let (name, _) =
                ask_new_connection(SocketAddr::from((*ip, SERVICE_PORT)), CONNECT_TIMEOUT)
                    .with_context(|| format!("warm-up connection to {ip}:{SERVICE_PORT}"))?;
            if !scenario::BULK_BACKENDS
                .iter()
                .any(|b| backend_name(*b) == name)
            {
                bail!("{ip}:{SERVICE_PORT} answered {name:?}, not one of backends 1-3");
            }
            bar.inc(1);
        }
        Ok(())
    })?;
    warm?;
    progress.phase("first-packet latency", s.targets.len() as u64);
    let until = deadline(Duration::from_secs(plan.latency_bound_s));
    let (sample, direct, errors, first_error) = run_in(client, || {
        let mut sample = Vec::with_capacity(s.targets.len());
        let mut errors = 0usize;
        let mut first_error = None;
        let mut direct = Vec::with_capacity(s.targets.len());
        for (k, ip) in s.targets.iter().enumerate() {
            if interrupted() || Instant::now() >= until {
                break;
            }
            match ask_new_connection(SocketAddr::from((*ip, SERVICE_PORT)), CONNECT_TIMEOUT) {
                Ok((name, d)) if name.starts_with("backend-") => sample.push(d),
                Ok((name, _)) => {
                    errors += 1;
                    first_error.get_or_insert(format!("{ip}: reply {name:?}"));
                }
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert(format!("{ip}: {e}"));
                }
            }
            // Interleaved reference: the same exchange straight to a
            // backend, at the same moments (no translation).
            let b = scenario::BULK_BACKENDS[k % scenario::BULK_BACKENDS.len()];
            let to = std::net::SocketAddrV4::new(backend_ip(b), scenario::TARGET_PORT);
            let port = DIRECT_PORTS.start + (k % DIRECT_PORTS.len()) as u16;
            match measure::ask_from_port(to, port, CONNECT_TIMEOUT) {
                Ok((name, d)) if name == backend_name(b) => direct.push(d.total),
                Ok((name, _)) => {
                    errors += 1;
                    first_error.get_or_insert(format!("{to} (direct): reply {name:?}"));
                }
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert(format!("{to} (direct): {e}"));
                }
            }
            bar.inc(1);
        }
        (sample, direct, errors, first_error)
    })?;
    let total: Vec<Duration> = sample.iter().map(|a| a.total).collect();
    let connect: Vec<Duration> = sample.iter().map(|a| a.connect).collect();
    r.first_packet = Percentiles::of(&total);
    r.first_packet_connect = Percentiles::of(&connect);
    r.first_packet_direct = Percentiles::of(&direct);
    r.first_packet_errors = errors;
    if total.len() < s.targets.len() {
        r.first_packet_note = Some(format!(
            "{} of {} connections within the {} s bound",
            total.len() + errors,
            s.targets.len(),
            plan.latency_bound_s
        ));
    }
    if errors > 0 {
        bail!(
            "{errors} of {} connections failed; first: {}",
            total.len() + errors,
            first_error.unwrap_or_default()
        );
    }
    Ok(())
}

/// What the change loop collected.
struct ChangeSamples {
    /// Rename → first answer from the new backend.
    lat: Vec<Duration>,
    /// kproxy's took_us.
    took: Vec<Duration>,
    /// Rename → `applied` line read.
    line: Vec<Duration>,
    timed_out: usize,
    attempted: usize,
}

fn change_latency(s: &Scale, kp: &mut Kproxy, progress: &Progress, r: &mut ModeRun) -> Result<()> {
    let plan = s.plan;
    progress.phase("change latency", plan.changes as u64);
    let bar = progress.bar();
    let flip = SocketAddr::from((FLIP_IP, SERVICE_PORT));
    let until = deadline(Duration::from_secs(plan.change_bound_s));
    let per_change = Duration::from_secs(plan.change_timeout_s);
    let pacing = plan.probe_pacing;
    let flip4 = std::net::SocketAddrV4::new(FLIP_IP, SERVICE_PORT);
    let mut probes_total = 0usize;
    let manifests = &s.manifests;
    let res: Result<ChangeSamples> = run_in(s.topo.client_ns(), || {
        // The flip service answers from backend 1 before the first change.
        let (name, _) = ask_new_connection(flip, CONNECT_TIMEOUT)
            .context("flip service before the first change")?;
        if name != backend_name(1) {
            bail!("flip service answered {name:?} before the first change, expected backend-1");
        }
        let (mut lat, mut took, mut line) = (Vec::new(), Vec::new(), Vec::new());
        let (mut timed_out, mut attempted) = (0usize, 0usize);
        let mut current = 1usize;
        for _ in 0..plan.changes {
            if interrupted() || Instant::now() >= until {
                break;
            }
            attempted += 1;
            let want = if current == 1 {
                scenario::FLIP_OTHER
            } else {
                1
            };
            let want_name = backend_name(want);
            let renamed =
                manifests.write(scenario::FLIP_SLICE_FILE, &scenario::flip_slice(want))?;
            let (answered, probes) =
                measure::probe_until(flip4, &want_name, renamed, renamed + per_change, pacing);
            probes_total += probes;
            let seen = answered.map(|t| t.duration_since(renamed));
            let applied = kp.wait_applied(per_change)?;
            current = want;
            match seen {
                Some(d) => lat.push(d),
                None => timed_out += 1,
            }
            took.push(Duration::from_micros(field_u64(&applied.text, "took_us")?));
            line.push(applied.at.duration_since(renamed));
            bar.inc(1);
        }
        Ok(ChangeSamples {
            lat,
            took,
            line,
            timed_out,
            attempted,
        })
    })?;
    let ChangeSamples {
        lat,
        took,
        line,
        timed_out,
        attempted,
    } = res?;
    r.change = Percentiles::of(&lat);
    r.change_took = Percentiles::of(&took);
    r.change_applied_line = Percentiles::of(&line);
    r.changes_timed_out = timed_out;
    r.change_probes = probes_total;
    if attempted < plan.changes {
        r.change_note = Some(format!(
            "{attempted} of {} changes within the {} s bound",
            plan.changes, plan.change_bound_s
        ));
    }
    if timed_out > 0 {
        bail!(
            "{timed_out} changes not seen by traffic within {} s",
            plan.change_timeout_s
        );
    }
    Ok(())
}

fn throughput(s: &Scale, progress: &Progress, r: &mut ModeRun) -> Result<()> {
    let plan = s.plan;
    progress.phase(
        &format!(
            "throughput (iperf3 -t {}, direct then ClusterIP)",
            plan.iperf_secs
        ),
        2 * plan.iperf_pairs as u64,
    );
    let bar = progress.bar();
    let client = &s.topo.client().ns;
    let direct_ip = s.topo.backend(1).ip;
    for _ in 0..plan.iperf_pairs {
        check_interrupted()?;
        let direct_bps = measure::iperf_client(client, direct_ip, IPERF_PORT, plan.iperf_secs)
            .context("direct")?;
        bar.inc(1);
        check_interrupted()?;
        let via_bps = measure::iperf_client(client, IPERF_IP, IPERF_PORT, plan.iperf_secs)
            .context("via ClusterIP")?;
        bar.inc(1);
        r.throughput.push(ThroughputPair {
            direct_bps,
            via_bps,
        });
    }
    Ok(())
}

/// Runs `kproxy-bench dataplane --services 1,LARGEST [PRESET...]` (e.g.
/// `--quick`) and returns its stdout (a Markdown table and ratio lines).
pub fn dataplane_table(bin: &Path, largest: u32, preset: &[&str]) -> Result<String> {
    if !bin.is_file() {
        bail!(
            "{} does not exist (built by `cargo xtask build`)",
            bin.display()
        );
    }
    let out_path = std::env::temp_dir().join(format!(
        "kproxy-compare-dataplane-{}.txt",
        std::process::id()
    ));
    let mut cmd = Command::new(bin);
    cmd.args(["dataplane", "--services", &format!("1,{largest}")])
        .args(preset);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let mut guard = measure::ChildGuard(child);
    let until = deadline(Duration::from_secs(600));
    let status = loop {
        if let Some(st) = guard.0.try_wait()? {
            break st;
        }
        if Instant::now() >= until || interrupted() {
            bail!("kproxy-bench dataplane did not finish within 600 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    if !status.success() {
        bail!("kproxy-bench dataplane failed ({status}): {text}");
    }
    Ok(text)
}

/// "1 service", "30,000 services".
pub fn services_label(n: u32) -> String {
    if n == 1 {
        "1 service".to_owned()
    } else {
        format!("{} services", thousands(u64::from(n)))
    }
}

/// 30000 → "30,000".
pub fn thousands(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
