//! Pod networking over rtnetlink: the node bridge, one network namespace per
//! pod (bind-mounted under /run/netns so crun and `ip netns` see it), and a
//! veth pair whose host side (`kcv<hash>`) is a bridge port and whose pod
//! side becomes `eth0` with an address from the node's podCIDR.

use std::ffi::CString;
use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// Where pod network namespaces are bind-mounted (as `ip netns add` does).
pub const NETNS_DIR: &str = "/run/netns";
pub use kcontrol_names::VETH_PREFIX;
/// The pod side is created under this name before it moves into the pod's
/// namespace and is renamed eth0.
const PEER_PREFIX: &str = "kcp";

/// An IPv4 network in CIDR notation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub net: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| anyhow!("pod CIDR {s:?} is not ADDRESS/PREFIX"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .with_context(|| format!("pod CIDR {s:?}: bad IPv4 address"))?;
        let prefix: u8 = len
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| anyhow!("pod CIDR {s:?}: prefix must be 8..=30"))?;
        let mask = u32::MAX << (32 - prefix);
        Ok(Cidr {
            net: Ipv4Addr::from(u32::from(ip) & mask),
            prefix,
        })
    }

    /// The bridge's address and the pods' default gateway: the first host.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net) + 1)
    }

    /// Addresses pods get: after the gateway, before the broadcast address.
    pub fn pod_addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.net);
        let size = 1u32 << (32 - self.prefix);
        (base + 2..base + size - 1).map(Ipv4Addr::from)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == u32::from(self.net)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// A netlink connection in the calling thread's network namespace, driven
/// by a task on the current runtime.
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    tokio::spawn(conn);
    Ok(handle)
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

/// The index of link `name`, `None` when there is no such link.
pub async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>> {
    let mut s = h.link().get().match_name(name.to_string()).execute();
    match s.try_next().await {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(anyhow!("looking up link {name}: {e}")),
    }
}

/// Every link: (index, name, controller index).
pub async fn links(h: &Handle) -> Result<Vec<(u32, String, Option<u32>)>> {
    let mut out = Vec::new();
    let mut s = h.link().get().execute();
    while let Some(m) = s.try_next().await.context("listing links")? {
        let mut name = String::new();
        let mut ctrl = None;
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => name = n.clone(),
                LinkAttribute::Controller(c) => ctrl = Some(*c),
                _ => {}
            }
        }
        out.push((m.header.index, name, ctrl));
    }
    Ok(out)
}

async fn ipv4_addresses(h: &Handle, index: Option<u32>) -> Result<Vec<(u32, Ipv4Addr, u8)>> {
    let mut req = h.address().get();
    if let Some(i) = index {
        req = req.set_link_index_filter(i);
    }
    let mut s = req.execute();
    let mut out = Vec::new();
    while let Some(m) = s.try_next().await.context("listing addresses")? {
        for a in &m.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                out.push((m.header.index, *ip, m.header.prefix_len));
            }
        }
    }
    Ok(out)
}

/// Creates the bridge if needed, gives it the gateway address and brings it
/// up, and turns on IPv4 forwarding. Returns the bridge's index.
pub async fn ensure_bridge(h: &Handle, name: &str, cidr: Cidr) -> Result<u32> {
    let index = match link_index(h, name).await? {
        Some(i) => i,
        None => {
            h.link()
                .add(LinkBridge::new(name).build())
                .execute()
                .await
                .with_context(|| format!("creating bridge {name}"))?;
            link_index(h, name)
                .await?
                .ok_or_else(|| anyhow!("bridge {name} vanished after creation"))?
        }
    };
    let gw = cidr.gateway();
    let have = ipv4_addresses(h, Some(index)).await?;
    if !have
        .iter()
        .any(|(i, ip, p)| *i == index && *ip == gw && *p == cidr.prefix)
    {
        h.address()
            .add(index, IpAddr::V4(gw), cidr.prefix)
            .execute()
            .await
            .with_context(|| format!("adding {gw}/{} to {name}", cidr.prefix))?;
    }
    // A fixed MAC (derived from the gateway address, like the pods'): a
    // bridge without one takes the lowest MAC of its ports and changes it
    // when that port goes away, and then every pod's neighbour entry for
    // its gateway points at a MAC nobody answers to — ClusterIP traffic
    // (which goes through the gateway) hung for the ~5 s until the entry
    // was re-probed, whenever a pod was deleted.
    h.link()
        .set(
            LinkUnspec::new_with_index(index)
                .address(mac_for(gw).to_vec())
                .up()
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("setting the address of {name} and bringing it up"))?;
    fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling ip_forward")?;
    Ok(index)
}

/// Deletes link `name` if it exists.
pub async fn delete_link(h: &Handle, name: &str) -> Result<()> {
    if let Some(i) = link_index(h, name).await? {
        match h.link().del(i).execute().await {
            Ok(()) => {}
            Err(e) if is_errno(&e, libc::ENODEV) => {}
            Err(e) => return Err(anyhow!("deleting link {name}: {e}")),
        }
    }
    Ok(())
}

/// The address this node is reached at: the first global IPv4 address
/// outside the pod CIDR on a link that is not ours, else 127.0.0.1.
pub async fn node_ip(h: &Handle, cidr: Cidr) -> Result<Ipv4Addr> {
    let names: std::collections::HashMap<u32, String> = links(h)
        .await?
        .into_iter()
        .map(|(i, n, _)| (i, n))
        .collect();
    let found = ipv4_addresses(h, None)
        .await?
        .into_iter()
        .find(|(i, ip, _)| {
            let name = names.get(i).map(String::as_str).unwrap_or("");
            !ip.is_loopback()
                && !ip.is_link_local()
                && !cidr.contains(*ip)
                && !name.starts_with("kc")
        });
    Ok(found.map_or(Ipv4Addr::LOCALHOST, |(_, ip, _)| ip))
}

/// Creates a network namespace bound at /run/netns/NAME (an unshared thread
/// whose namespace stays alive through the bind mount).
pub fn create_netns(name: &str) -> Result<PathBuf> {
    fs::create_dir_all(NETNS_DIR).with_context(|| format!("creating {NETNS_DIR}"))?;
    let path = Path::new(NETNS_DIR).join(name);
    let p = path.clone();
    std::thread::spawn(move || -> Result<()> {
        File::create(&p).with_context(|| format!("creating {}", p.display()))?;
        // SAFETY: unshare only changes this thread's network namespace; the
        // thread ends right after.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        let src = CString::new("/proc/thread-self/ns/net").unwrap();
        let dst = CString::new(p.as_os_str().as_bytes())?;
        // SAFETY: valid NUL-terminated paths; a plain bind mount.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let _ = fs::remove_file(&p);
            bail!("bind-mounting the namespace at {}: {e}", p.display());
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow!("netns thread panicked"))??;
    Ok(path)
}

/// Unmounts and removes /run/netns/NAME; fine when it is already gone.
pub fn delete_netns(name: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    if !path.exists() {
        return Ok(());
    }
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: valid NUL-terminated path.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // EINVAL: not a mount point (a half-made namespace); remove anyway.
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(anyhow!("unmounting {}: {e}", path.display()));
        }
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!("removing {}: {e}", path.display())),
    }
}

/// Runs `f` on a fresh thread that has entered the network namespace at
/// `path` (netlink sockets it opens live there), with its own runtime.
pub fn in_netns<T, F, Fut>(path: &Path, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    let ns = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::spawn(move || -> Result<T> {
        // SAFETY: a valid namespace fd; only this thread moves.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(f())
    })
    .join()
    .map_err(|_| anyhow!("netns thread panicked"))?
}

/// What one pod's network is made of.
#[derive(Clone, Debug)]
pub struct PodNet {
    pub netns: String,
    pub host_veth: String,
    pub ip: Ipv4Addr,
}

impl PodNet {
    /// Names derived from the pod UID's hash.
    pub fn new(hash: &str, ip: Ipv4Addr) -> PodNet {
        PodNet {
            netns: kcontrol_names::netns(hash),
            host_veth: kcontrol_names::veth(hash),
            ip,
        }
    }

    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }
}

/// Builds the pod's namespace and wiring: netns, veth pair with the host
/// side on the bridge, eth0 with the pod address and a default route via
/// the gateway, loopback up. Whatever is left from an earlier try goes first.
pub async fn setup_pod(h: &Handle, bridge: u32, cidr: Cidr, pn: &PodNet) -> Result<()> {
    teardown_pod(h, pn).await?;
    let path = create_netns(&pn.netns)?;
    let peer = pn.host_veth.replacen(VETH_PREFIX, PEER_PREFIX, 1);
    delete_link(h, &peer).await?;
    h.link()
        .add(LinkVeth::new(&pn.host_veth, &peer).build())
        .execute()
        .await
        .with_context(|| format!("creating veth pair {}/{peer}", pn.host_veth))?;
    let peer_index = link_index(h, &peer)
        .await?
        .ok_or_else(|| anyhow!("veth peer {peer} vanished"))?;
    let ns = File::open(&path)?;
    h.link()
        .set(
            LinkUnspec::new_with_index(peer_index)
                .setns_by_fd(ns.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("moving {peer} into {}", pn.netns))?;
    let host_index = link_index(h, &pn.host_veth)
        .await?
        .ok_or_else(|| anyhow!("veth {} vanished", pn.host_veth))?;
    h.link()
        .set(
            LinkUnspec::new_with_index(host_index)
                .controller(bridge)
                .up()
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("attaching {} to the bridge", pn.host_veth))?;
    let ip = pn.ip;
    let gw = cidr.gateway();
    let prefix = cidr.prefix;
    in_netns(&path, move || async move {
        let h = connect()?;
        let lo = link_index(&h, "lo")
            .await?
            .ok_or_else(|| anyhow!("no lo in the pod namespace"))?;
        h.link()
            .set(LinkUnspec::new_with_index(lo).up().build())
            .execute()
            .await
            .context("bringing lo up")?;
        let i = link_index(&h, &peer)
            .await?
            .ok_or_else(|| anyhow!("{peer} missing in the pod namespace"))?;
        h.link()
            .set(
                LinkUnspec::new_with_index(i)
                    .name("eth0".to_string())
                    // The MAC follows the address (0a:58 + the IPv4 octets,
                    // as the bridge CNI plugin does): a pod that gets a
                    // recycled address gets its MAC too, so neighbour
                    // entries other pods and the node still hold for it
                    // stay right instead of black-holing traffic.
                    .address(mac_for(ip).to_vec())
                    .build(),
            )
            .execute()
            .await
            .context("renaming the pod veth to eth0")?;
        h.address()
            .add(i, IpAddr::V4(ip), prefix)
            .execute()
            .await
            .with_context(|| format!("adding {ip}/{prefix} to eth0"))?;
        h.link()
            .set(LinkUnspec::new_with_index(i).up().build())
            .execute()
            .await
            .context("bringing eth0 up")?;
        h.route()
            .add(RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw).build())
            .execute()
            .await
            .with_context(|| format!("adding the default route via {gw}"))?;
        Ok(())
    })
}

/// Locally administered unicast MAC derived from a pod address.
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

/// Removes the pod's veth (its peer goes with it) and namespace.
pub async fn teardown_pod(h: &Handle, pn: &PodNet) -> Result<()> {
    delete_link(h, &pn.host_veth).await?;
    delete_netns(&pn.netns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_and_ranges() {
        let c = Cidr::parse("10.244.0.7/24").unwrap();
        assert_eq!(c.to_string(), "10.244.0.0/24");
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 244, 0, 1));
        let v: Vec<_> = c.pod_addresses().collect();
        assert_eq!(v.first(), Some(&Ipv4Addr::new(10, 244, 0, 2)));
        assert_eq!(v.last(), Some(&Ipv4Addr::new(10, 244, 0, 254)));
        assert!(c.contains(Ipv4Addr::new(10, 244, 0, 99)));
        assert!(!c.contains(Ipv4Addr::new(10, 244, 1, 1)));
        assert!(Cidr::parse("10.0.0.0").is_err());
        assert!(Cidr::parse("10.0.0.0/31").is_err());
        assert!(Cidr::parse("fd00::/64").is_err());
    }
}
