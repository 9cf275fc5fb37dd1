//! Interfaces that appear and vanish: an rtnetlink socket subscribed to link
//! events (RTMGRP_LINK), so the agent attaches to each pod's host-side veth
//! the moment the kubelet creates it (`--iface-prefix`), and forgets it when
//! the pod is gone.
//!
//! The messages are parsed here by hand — a netlink header, an `ifinfomsg`
//! and the `IFLA_IFNAME` attribute is all the agent needs.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// What happened to a network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// New or changed (RTM_NEWLINK is also sent for flag changes, renames
    /// and enslavement): attach if not attached yet.
    Present(String),
    /// Deleted (RTM_DELLINK), or moved to another namespace.
    Gone(String),
    /// The kernel dropped messages (ENOBUFS): compare with a fresh listing.
    Rescan,
}

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const RTA_HDRLEN: usize = 4;
const IFLA_IFNAME: u16 = 3;

/// A non-blocking rtnetlink socket that receives link events.
pub struct LinkWatcher {
    fd: OwnedFd,
}

impl AsRawFd for LinkWatcher {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl LinkWatcher {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscalls; the fd is owned right away.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Everything queued on the socket; `WouldBlock` when nothing is.
    pub fn read(&self) -> io::Result<Vec<LinkEvent>> {
        let mut events = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is valid for buf.len() bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::ENOBUFS) => events.push(LinkEvent::Rescan),
                    Some(libc::EINTR) => {}
                    _ if e.kind() == io::ErrorKind::WouldBlock && !events.is_empty() => {
                        return Ok(events);
                    }
                    _ => return Err(e),
                }
                continue;
            }
            events.extend(parse(&buf[..n as usize]));
        }
    }
}

/// Link events in one datagram of netlink messages. Malformed messages end
/// the parse (the rest of a datagram cannot be framed without them).
pub fn parse(mut data: &[u8]) -> Vec<LinkEvent> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HDRLEN || len > data.len() {
            break;
        }
        let payload = &data[NLMSG_HDRLEN..len];
        let name = || ifname(payload);
        match kind {
            libc::RTM_NEWLINK => out.extend(name().map(LinkEvent::Present)),
            libc::RTM_DELLINK => out.extend(name().map(LinkEvent::Gone)),
            _ => {}
        }
        data = &data[align4(len).min(data.len())..];
    }
    out
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// IFLA_IFNAME of an `ifinfomsg` payload.
fn ifname(payload: &[u8]) -> Option<String> {
    let mut attrs = payload.get(IFINFOMSG_LEN..)?;
    while attrs.len() >= RTA_HDRLEN {
        let len = u16::from_ne_bytes(attrs[0..2].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(attrs[2..4].try_into().ok()?);
        if len < RTA_HDRLEN || len > attrs.len() {
            return None;
        }
        if kind == IFLA_IFNAME {
            let value = &attrs[RTA_HDRLEN..len];
            let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
            return std::str::from_utf8(&value[..end]).ok().map(str::to_owned);
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    None
}

/// Interfaces of this network namespace, by name.
pub fn current_links() -> io::Result<BTreeSet<String>> {
    std::fs::read_dir("/sys/class/net")?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect()
}

/// Whether `name` is one the agent follows.
pub fn matches(prefixes: &[String], name: &str) -> bool {
    prefixes
        .iter()
        .any(|p| !p.is_empty() && name.starts_with(p.as_str()))
}

/// An interface's index and its IPv4 addresses (in the order the kernel
/// lists them), from `getifaddrs(3)`.
pub fn ipv4_addrs(iface: &str) -> io::Result<(u32, Vec<std::net::Ipv4Addr>)> {
    let cname = std::ffi::CString::new(iface)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    let addrs = all_ipv4_addrs()?
        .into_iter()
        .filter(|(name, _)| name == iface)
        .map(|(_, ip)| ip)
        .collect();
    Ok((index, addrs))
}

/// Every IPv4 address of the network namespace with its interface's name,
/// from `getifaddrs(3)`.
pub fn all_ipv4_addrs() -> io::Result<Vec<(String, std::net::Ipv4Addr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null; family says which sockaddr it is.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: NUL-terminated name owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        // SAFETY: AF_INET, so a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        out.push((
            name.to_string_lossy().into_owned(),
            std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        ));
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u16, name: Option<&str>) -> Vec<u8> {
        let mut payload = vec![0u8; IFINFOMSG_LEN];
        // An attribute before the name, as the kernel sends (IFLA_MTU).
        payload.extend_from_slice(&8u16.to_ne_bytes());
        payload.extend_from_slice(&4u16.to_ne_bytes());
        payload.extend_from_slice(&1500u32.to_ne_bytes());
        if let Some(n) = name {
            let len = RTA_HDRLEN + n.len() + 1;
            payload.extend_from_slice(&(len as u16).to_ne_bytes());
            payload.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
            payload.extend_from_slice(n.as_bytes());
            payload.push(0);
            payload.resize(align4(payload.len()), 0);
        }
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.extend_from_slice(&payload);
        m
    }

    #[test]
    fn parses_new_and_deleted_links() {
        let mut d = msg(libc::RTM_NEWLINK, Some("kcv1a2b"));
        d.extend(msg(libc::RTM_DELLINK, Some("kcv9")));
        d.extend(msg(libc::RTM_NEWADDR, Some("ignored")));
        assert_eq!(
            parse(&d),
            vec![
                LinkEvent::Present("kcv1a2b".into()),
                LinkEvent::Gone("kcv9".into())
            ]
        );
    }

    #[test]
    fn malformed_messages_end_the_parse() {
        let mut d = msg(libc::RTM_NEWLINK, Some("a"));
        d[0..4].copy_from_slice(&9999u32.to_ne_bytes());
        assert!(parse(&d).is_empty());
        assert!(parse(&[1, 2, 3]).is_empty());
        // No name attribute: nothing to report.
        assert!(parse(&msg(libc::RTM_NEWLINK, None)).is_empty());
    }

    #[test]
    fn prefix_matching() {
        let p = vec!["kcv".to_string(), String::new()];
        assert!(matches(&p, "kcv0"));
        assert!(!matches(&p, "eth0"));
    }
}
