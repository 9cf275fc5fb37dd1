//! The measurements themselves: new-connection latency from the client
//! namespace, iperf3 throughput, and what the kproxy process cost.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kproxy_tests::Netns;
use kproxy_tests::client::REQUEST;
use serde::Serialize;

/// Percentiles of a sample (nearest rank), in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    /// None for an empty sample.
    pub fn of(sample: &[Duration]) -> Option<Percentiles> {
        if sample.is_empty() {
            return None;
        }
        let mut us: Vec<f64> = sample.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        Some(Percentiles {
            count: us.len(),
            p50_us: nearest_rank(&us, 50.0),
            p90_us: nearest_rank(&us, 90.0),
            p99_us: nearest_rank(&us, 99.0),
            max_us: us[us.len() - 1],
        })
    }
}

/// Nearest-rank percentile of a sorted, non-empty sample.
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sets SO_LINGER {on, 0}: close() then sends an RST and the socket never
/// enters TIME_WAIT, so thousands of connections do not exhaust ports.
fn linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Timings of one [`ask_new_connection`].
#[derive(Debug, Clone, Copy)]
pub struct Asked {
    /// Start of connect() → reply line received.
    pub total: Duration,
    /// Start of connect() → connected (SYN → SYN-ACK: the first packet's
    /// translation plus one round trip, without the server's work).
    pub connect: Duration,
}

/// One new TCP connection to `target`: connect, send `who\n`, read the
/// reply line. Returns the reply and its timings. Must run on a thread
/// inside the client namespace.
pub fn ask_new_connection(
    target: SocketAddr,
    timeout: Duration,
) -> std::io::Result<(String, Asked)> {
    let t0 = Instant::now();
    let s = TcpStream::connect_timeout(&target, timeout)?;
    let connect = t0.elapsed();
    ask_on(s, t0, connect, timeout)
}

/// [`ask_new_connection`] from a fixed local `port` (bound before
/// connecting). The client's ephemeral range (10000-65000, set per scale)
/// is left to the ClusterIP connections, so a direct connection never
/// reuses the 4-tuple of an earlier translated one: kproxy's conntrack
/// entries have no expiry, and a stale reverse entry (backend:8080 →
/// client:port) would rewrite the direct reply's source.
pub fn ask_from_port(
    target: std::net::SocketAddrV4,
    port: u16,
    timeout: Duration,
) -> std::io::Result<(String, Asked)> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let t0 = Instant::now();
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    let local = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    let remote = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: target.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*target.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid fd, correctly sized option values and addresses.
    // SO_SNDTIMEO bounds the blocking connect().
    unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        if libc::bind(raw, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::connect(raw, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let connect = t0.elapsed();
    // SAFETY: the fd is a connected TCP socket we own.
    let s = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    ask_on(s, t0, connect, timeout)
}

fn ask_on(
    mut s: TcpStream,
    t0: Instant,
    connect: Duration,
    timeout: Duration,
) -> std::io::Result<(String, Asked)> {
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("{REQUEST}\n").as_bytes())?;
    let mut got = Vec::with_capacity(32);
    let mut chunk = [0u8; 64];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "closed before a reply line",
            ));
        }
        got.extend_from_slice(&chunk[..n]);
        if got.contains(&b'\n') {
            break;
        }
    }
    let total = t0.elapsed();
    linger_zero(&s);
    let line = String::from_utf8_lossy(&got);
    Ok((
        line.lines().next().unwrap_or("").trim().to_owned(),
        Asked { total, connect },
    ))
}

/// One probe connection of [`probe_until`]: a non-blocking socket going
/// through connect → send → reply.
struct Probe {
    fd: std::os::fd::OwnedFd,
    started: Instant,
    sent: bool,
    got: Vec<u8>,
}

impl Probe {
    fn start(target: std::net::SocketAddrV4) -> std::io::Result<Probe> {
        use std::os::fd::FromRawFd;
        // SAFETY: socket(2) with constant arguments; the fd is owned below.
        let raw = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let l = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: target.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*target.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: valid fd, correctly sized option and address structs.
        let rc = unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&l as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
            libc::connect(
                raw,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        Ok(Probe {
            fd,
            started: Instant::now(),
            sent: false,
            got: Vec::new(),
        })
    }

    fn events(&self) -> libc::c_short {
        if self.sent {
            libc::POLLIN
        } else {
            libc::POLLOUT
        }
    }

    /// Advances on readiness: Ok(Some(reply)) when the reply line is in,
    /// Ok(None) to keep waiting, Err when the probe failed.
    fn advance(&mut self) -> std::io::Result<Option<String>> {
        use std::os::fd::AsRawFd;
        let raw = self.fd.as_raw_fd();
        if !self.sent {
            let mut err: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: valid fd and out-parameters of the right size.
            unsafe {
                libc::getsockopt(
                    raw,
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    (&mut err as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            if err != 0 {
                return Err(std::io::Error::from_raw_os_error(err));
            }
            let req = format!("{REQUEST}\n");
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::send(raw, req.as_ptr().cast(), req.len(), libc::MSG_NOSIGNAL) };
            if n != req.len() as isize {
                return Err(std::io::Error::last_os_error());
            }
            self.sent = true;
            return Ok(None);
        }
        let mut buf = [0u8; 64];
        // SAFETY: valid fd and buffer.
        let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "closed before a reply line",
            ));
        }
        self.got.extend_from_slice(&buf[..n as usize]);
        if self.got.contains(&b'\n') {
            let line = String::from_utf8_lossy(&self.got);
            return Ok(Some(line.lines().next().unwrap_or("").trim().to_owned()));
        }
        Ok(None)
    }
}

/// How [`probe_until`] paces its probes.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProbePacing {
    /// Smallest interval between two probe starts.
    pub min_gap_us: u64,
    /// The interval grows to this fraction of the time elapsed (relative
    /// resolution), so slow changes are not flooded with connections.
    pub relative_gap: f64,
    /// A probe not answered within this is abandoned (its handshake may have
    /// raced with the change and wait for a SYN retransmission).
    pub probe_timeout_ms: u64,
    /// Most probes in flight at once.
    pub max_in_flight: usize,
}

/// Starts new TCP connections to `target` from the calling thread's
/// namespace, overlapping (one every `gap`, several in flight), until one
/// is answered with `want`; returns the instant that reply arrived, or None
/// at `until`. Overlapping probes keep one stuck handshake from hiding a
/// change that is already in effect. Also returns how many probes started.
pub fn probe_until(
    target: std::net::SocketAddrV4,
    want: &str,
    since: Instant,
    until: Instant,
    pacing: ProbePacing,
) -> (Option<Instant>, usize) {
    let min_gap = Duration::from_micros(pacing.min_gap_us);
    let probe_timeout = Duration::from_millis(pacing.probe_timeout_ms);
    let mut probes: Vec<Probe> = Vec::new();
    let mut next_start = Instant::now();
    let mut started = 0usize;
    loop {
        let now = Instant::now();
        if now >= until {
            return (None, started);
        }
        probes.retain(|p| now.duration_since(p.started) < probe_timeout);
        if now >= next_start && probes.len() < pacing.max_in_flight {
            if let Ok(p) = Probe::start(target) {
                probes.push(p);
                started += 1;
            }
            let gap = min_gap.max(now.duration_since(since).mul_f64(pacing.relative_gap));
            next_start = now + gap;
        }
        let mut pfds: Vec<libc::pollfd> = probes
            .iter()
            .map(|p| libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&p.fd),
                events: p.events(),
                revents: 0,
            })
            .collect();
        let wait = next_start
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(5));
        // poll(2) has millisecond resolution: below 1 ms, spin with a 0 timeout.
        let ms = if wait >= Duration::from_millis(1) {
            wait.as_millis() as libc::c_int
        } else {
            0
        };
        if !pfds.is_empty() {
            // SAFETY: a valid array of pollfds.
            unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        } else if ms > 0 {
            std::thread::sleep(wait);
        }
        if ms == 0 && pfds.iter().all(|p| p.revents == 0) {
            std::thread::sleep(wait.min(Duration::from_micros(50)));
        }
        let mut i = 0;
        let mut done = Vec::new();
        for (k, pfd) in pfds.iter().enumerate() {
            if pfd.revents == 0 {
                continue;
            }
            match probes[k].advance() {
                Ok(Some(reply)) => {
                    if reply == want {
                        return (Some(Instant::now()), started);
                    }
                    done.push(k);
                }
                Ok(None) => {}
                Err(_) => done.push(k),
            }
        }
        probes.retain(|_| {
            let keep = !done.contains(&i);
            i += 1;
            keep
        });
    }
}

/// CPU and memory of one process, from /proc.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProcCost {
    /// utime + stime + cutime + cstime (waited-for children included:
    /// iptables-restore, conntrack), seconds.
    pub cpu_s: f64,
    /// VmHWM: peak resident set size, MiB.
    pub peak_rss_mib: f64,
}

/// Reads [`ProcCost`] of `pid`, after checking that it is kproxy itself
/// (`ip netns exec` execs the program in place, so the child's pid is
/// kproxy's; if some `ip` ever forked instead, its only child is used).
pub fn proc_cost(pid: u32) -> Result<ProcCost> {
    let pid = kproxy_pid(pid)?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, a)| a)
        .context("malformed stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14..=17 of proc(5) (utime stime cutime cstime); `after` starts at field 3.
    let ticks: u64 = f
        .get(11..15)
        .context("short stat")?
        .iter()
        .map(|v| v.parse::<u64>().unwrap_or(0))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmHWM in status")?;
    Ok(ProcCost {
        cpu_s: ticks as f64 / hz,
        peak_rss_mib: hwm_kb / 1024.0,
    })
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn kproxy_pid(pid: u32) -> Result<u32> {
    if comm(pid) == "kproxy" {
        return Ok(pid);
    }
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .find(|c| comm(*c) == "kproxy")
        .with_context(|| {
            format!(
                "pid {pid} ({}) is not kproxy and has no kproxy child",
                comm(pid)
            )
        })
}

/// Real-time priority of the benchmark's own threads and of kproxy.
pub const RT_PRIORITY: libc::c_int = 20;

/// Puts the calling thread under SCHED_FIFO [`RT_PRIORITY`]; threads and
/// processes it creates afterwards inherit it. Unrelated load on the machine
/// (other builds) then cannot add scheduling delays to the measurements.
pub fn go_realtime() -> std::io::Result<()> {
    let p = libc::sched_param {
        sched_priority: RT_PRIORITY,
    };
    // SAFETY: plain syscall on the calling thread with a valid param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `cmd` start under SCHED_OTHER with nice -20 (for iperf3: a
/// CPU-bound sender under SCHED_FIFO would run into real-time throttling;
/// nice -20 still keeps ordinary load from taking much of its CPU).
/// (iperf3 is not pinned to CPUs: on 2 CPUs shared with other load, a
/// pinned client and server each lose to that load and runs get noisier.)
pub fn normal_priority(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: sched_setscheduler and setpriority are async-signal-safe
    // syscalls; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let p = libc::sched_param { sched_priority: 0 };
            if libc::sched_setscheduler(0, libc::SCHED_OTHER, &p) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Best effort: without CAP_SYS_NICE this fails and nice stays 0.
            libc::setpriority(libc::PRIO_PROCESS, 0, -20);
            Ok(())
        });
    }
}

/// A child process killed (and reaped) on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `iperf3 -s -p PORT` in `ns` and waits until it listens.
pub fn start_iperf_server(ns: &Netns, port: u16) -> Result<ChildGuard> {
    let mut cmd = Command::new("ip");
    normal_priority(&mut cmd);
    let child = cmd
        .args([
            "netns",
            "exec",
            ns.name(),
            "iperf3",
            "-s",
            "-p",
            &port.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn iperf3 -s")?;
    let guard = ChildGuard(child);
    kproxy_tests::poll_until(
        &format!("iperf3 -s listening on {port} in {}", ns.name()),
        Duration::from_secs(10),
        || {
            let out = ns.exec("ss", &["-Hltn", &format!("sport = :{port}")])?;
            Ok((!out.trim().is_empty()).then_some(()))
        },
    )?;
    Ok(guard)
}

/// Runs `iperf3 -c IP -p PORT -t SECS -J` in `ns` (killed after SECS + 20 s)
/// and returns end.sum_received.bits_per_second.
pub fn iperf_client(ns: &Netns, ip: Ipv4Addr, port: u16, secs: u32) -> Result<f64> {
    let mut last_err = None;
    // One retry: iperf3's server may still be tearing down the previous test.
    for attempt in 0..2 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
        match iperf_once(ns, ip, port, secs) {
            Ok(bps) => return Ok(bps),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.expect("at least one attempt"))
}

fn iperf_once(ns: &Netns, ip: Ipv4Addr, port: u16, secs: u32) -> Result<f64> {
    let out_path =
        std::env::temp_dir().join(format!("kproxy-compare-iperf-{}.json", std::process::id()));
    let out_file = std::fs::File::create(&out_path)?;
    let mut cmd = Command::new("ip");
    normal_priority(&mut cmd);
    let child = cmd
        .args([
            "netns",
            "exec",
            ns.name(),
            "iperf3",
            "-c",
            &ip.to_string(),
            "-p",
            &port.to_string(),
        ])
        .args(["-t", &secs.to_string(), "-J"])
        .stdin(Stdio::null())
        .stdout(out_file)
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn iperf3 -c")?;
    let mut guard = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(u64::from(secs) + 20);
    let status = loop {
        if let Some(st) = guard.0.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            bail!("iperf3 -c {ip}:{port} still running after {secs} + 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("iperf3 -J output ({status}): {text:.300}"))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3 -c {ip}:{port}: {err}");
    }
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .with_context(|| format!("no end.sum_received.bits_per_second in iperf3 output ({status})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let sample: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let p = Percentiles::of(&sample).unwrap();
        assert_eq!(
            (p.p50_us, p.p90_us, p.p99_us, p.max_us),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(
            Percentiles::of(&[Duration::from_micros(7)]).unwrap().p99_us,
            7.0
        );
        assert!(Percentiles::of(&[]).is_none());
    }

    #[test]
    fn reads_own_cost() {
        // Not kproxy: the comm check refuses it.
        assert!(proc_cost(std::process::id()).is_err());
    }
}
