//! Forwarded packets per second through the node: UDP from the outside
//! client to nodeIP:nodePort, whose only endpoint is on the remote node, so
//! every packet is translated (DNAT + source NAT) and forwarded by the node
//! — by XDP, by TC (`--xdp off`) or by kube-proxy's iptables rules.
//!
//! The generator writes prebuilt frames (64 flows, full checksums) to the
//! client's `eth0` through an AF_PACKET socket from one thread pinned to one
//! CPU. veth delivers on the sending CPU, so the node's work (and the remote
//! node's receive) runs on that same core: the figure is what one core
//! forwards including the generator's share, the same for every mode. The
//! count is the remote node's `eth0` receive counter over the interval; the
//! remote node has a UDP socket bound (never read) so nothing answers.

use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kproxy_tests::{Kproxy, ManifestDir, Mode, Netns, Topology, poll_until};
use proxy_user::pktgen::Frame;
use serde_json::json;

/// The datapaths compared, in report order.
pub const MODES: [&str; 3] = ["XDP", "TC", "iptables"];

const NODE_PORT: u16 = 30080;
const FLOWS: u16 = 64;
const BATCH: usize = 64;

/// Best and all rounds' packets per second of one mode.
#[derive(Debug, Clone)]
pub struct ModePps {
    pub mode: &'static str,
    pub rounds: Vec<f64>,
}

impl ModePps {
    pub fn best(&self) -> f64 {
        self.rounds.iter().copied().fold(0.0, f64::max)
    }
}

fn manifests(dir: &ManifestDir, remote: Ipv4Addr) -> Result<()> {
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "np", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.1.50",
                 "ports": [{"name": "u", "port": 53, "targetPort": 8080, "protocol": "UDP", "nodePort": NODE_PORT}]},
    });
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "np-abc", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "np"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [remote.to_string()], "conditions": {"ready": true}, "nodeName": "node2"}],
        "ports": [{"name": "u", "port": 8080, "protocol": "UDP"}],
    });
    dir.write("np.yaml", &serde_json::to_string(&svc)?)?;
    dir.write("np-slice.yaml", &serde_json::to_string(&slice)?)?;
    Ok(())
}

fn mac(ns: &Netns, iface: &str) -> Result<[u8; 6]> {
    let out = ns.ip(&["-j", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let text = v[0]["address"].as_str().context("no MAC address")?;
    let mut m = [0u8; 6];
    for (i, b) in text.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(b, 16)?;
    }
    Ok(m)
}

fn rx_packets(ns: &Netns, iface: &str) -> Result<u64> {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no rx packet counter")
}

/// Sends the frames round-robin through `iface` for `secs`, from a thread
/// pinned to CPU 0 inside `ns`. Returns the frames sent.
fn blast(ns: &Netns, iface: &str, frames: &[Vec<u8>], secs: f64) -> Result<u64> {
    let iface = iface.to_owned();
    let frames = frames.to_vec();
    ns.try_run(move || {
        // SAFETY: plain libc calls on a socket this closure owns.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            let name = std::ffi::CString::new(iface.clone())?;
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            if libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) != 0
            {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                bail!("binding to {iface}: {e}");
            }
            let mut iovs: Vec<libc::iovec> = frames
                .iter()
                .map(|f| libc::iovec {
                    iov_base: f.as_ptr() as *mut _,
                    iov_len: f.len(),
                })
                .collect();
            let n = iovs.len();
            let base = iovs.as_mut_ptr();
            let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
                .map(|i| {
                    let mut m: libc::mmsghdr = std::mem::zeroed();
                    m.msg_hdr.msg_iov = base.add(i % n);
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
            let mut sent = 0u64;
            while Instant::now() < deadline {
                let n = libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0);
                if n > 0 {
                    sent += n as u64;
                }
            }
            libc::close(fd);
            Ok(sent)
        }
    })
}

/// Runs every mode on one topology; `rounds` measurements of `secs` each.
pub fn measure(secs: f64, rounds: u32) -> Result<Vec<ModePps>> {
    let mut topo = Topology::new_for(0, Mode::Iptables)?;
    topo.add_remote_node()?;
    topo.nic_like_offloads()?;
    let node2 = topo.remote_node();
    // Bound, never read: datagrams are counted and dropped, not answered.
    let sink: UdpSocket = node2.ns.try_run(|| Ok(UdpSocket::bind("0.0.0.0:8080")?))?;
    let dir = ManifestDir::new()?;
    manifests(&dir, node2.ip)?;
    let client = topo.client();
    let (src_mac, dst_mac) = (
        mac(&client.ns, "eth0")?,
        mac(&topo.node, &client.node_iface)?,
    );
    let frames: Vec<Vec<u8>> = (0..FLOWS)
        .map(|i| {
            let mut f = Frame::udp(client.ip, 10_000 + i, client.gateway, NODE_PORT);
            f.payload = vec![0u8; 18];
            let mut b = f.build();
            b[0..6].copy_from_slice(&dst_mac);
            b[6..12].copy_from_slice(&src_mac);
            b
        })
        .collect();
    let externals = format!("{},{}", client.node_iface, node2.node_iface);
    let mut out = Vec::new();
    for mode in MODES {
        let mut extra = vec!["--node-name", "node1"];
        let m = match mode {
            "iptables" => Mode::Iptables,
            xdp => {
                let xdp = if xdp == "XDP" { "native" } else { "off" };
                extra.extend(["--external-iface", &externals, "--xdp", xdp, "--no-pin"]);
                Mode::Ebpf
            }
        };
        eprintln!("[nodeport] {mode}: starting kproxy");
        let mut kp = Kproxy::start_with_mode(&topo.node, dir.path(), &[], &extra, m)?;
        kp.wait_ready()?;
        // Warm up: neighbours resolved and conntrack entries made, the path
        // proven before it is timed.
        let before = rx_packets(&node2.ns, "eth0")?;
        blast(&client.ns, "eth0", &frames, 0.2)?;
        poll_until(
            &format!("{mode}: packets reaching the remote node"),
            Duration::from_secs(5),
            || Ok((rx_packets(&node2.ns, "eth0")? > before + u64::from(FLOWS)).then_some(())),
        )?;
        let mut rounds_pps = Vec::new();
        for _ in 0..rounds {
            let before = rx_packets(&node2.ns, "eth0")?;
            let t = Instant::now();
            let sent = blast(&client.ns, "eth0", &frames, secs)?;
            let elapsed = t.elapsed().as_secs_f64();
            // Wait for the last packets in flight.
            let mut last = rx_packets(&node2.ns, "eth0")?;
            poll_until(
                "the remote node's counter to settle",
                Duration::from_secs(5),
                || {
                    std::thread::sleep(Duration::from_millis(20));
                    let now = rx_packets(&node2.ns, "eth0")?;
                    let settled = now == last;
                    last = now;
                    Ok(settled.then_some(()))
                },
            )?;
            let got = last - before;
            let pps = got as f64 / elapsed;
            eprintln!(
                "[nodeport] {mode}: sent {sent}, forwarded {got} in {elapsed:.2} s: {pps:.0} pps"
            );
            rounds_pps.push(pps);
        }
        drop(kp);
        out.push(ModePps {
            mode,
            rounds: rounds_pps,
        });
    }
    drop(sink);
    Ok(out)
}
