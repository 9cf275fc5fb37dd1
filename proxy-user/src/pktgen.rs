//! Hand-built Ethernet/IPv4/IPv6/TCP/UDP frames for BPF_PROG_TEST_RUN:
//! the packet-class tests and the dataplane micro-benchmark share them.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_HLEN: usize = 14;

#[derive(Clone, Debug)]
pub struct Frame {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    /// 6 = TCP, 17 = UDP, anything else = raw payload after the IP header.
    pub proto: u8,
    /// IP options (padded to a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// Raw value of the IPv4 flags + fragment offset field.
    pub frag: u16,
    pub payload: Vec<u8>,
    /// Leave the UDP checksum at zero ("no checksum").
    pub udp_zero_csum: bool,
}

impl Frame {
    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            proto: 6,
            ip_options: vec![],
            frag: 0,
            payload: b"hello".to_vec(),
            udp_zero_csum: false,
        }
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self {
            proto: 17,
            ..Self::tcp(src, sport, dst, dport)
        }
    }

    /// Serialises the frame with valid checksums.
    pub fn build(&self) -> Vec<u8> {
        let mut opts = self.ip_options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(0);
        }
        let ihl = 20 + opts.len();
        let l4 = self.l4_bytes();
        let tot_len = ihl + l4.len();
        let mut p = Vec::with_capacity(ETH_HLEN + tot_len);
        p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // dst MAC
        p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // src MAC
        p.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[2..4].copy_from_slice(&(tot_len as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = 64;
        ip[9] = self.proto;
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        ip.extend_from_slice(&opts);
        let c = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(&ip);
        p.extend_from_slice(&l4);
        p
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let (src, dst) = (self.src, self.dst);
        l4_segment(
            (self.sport, self.dport, self.proto),
            0x02,
            &self.payload,
            !self.udp_zero_csum,
            |proto, l4| l4_checksum(src, dst, proto, l4),
        )
    }
}

/// A TCP segment (seq 1, ack 0, `tcp_flags`), a UDP datagram (checksum
/// only with `udp_csum`; a computed 0 is sent as 0xffff) or, for any other
/// protocol, the payload alone; `csum` sums the pseudo-header of the
/// family and the segment.
fn l4_segment(
    (sport, dport, proto): (u16, u16, u8),
    tcp_flags: u8,
    payload: &[u8],
    udp_csum: bool,
    csum: impl Fn(u8, &[u8]) -> u16,
) -> Vec<u8> {
    let mut l4 = Vec::new();
    match proto {
        6 => {
            l4.extend_from_slice(&sport.to_be_bytes());
            l4.extend_from_slice(&dport.to_be_bytes());
            l4.extend_from_slice(&1u32.to_be_bytes()); // seq
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.push(5 << 4);
            l4.push(tcp_flags);
            l4.extend_from_slice(&64240u16.to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, 0]); // csum, urg
            l4.extend_from_slice(payload);
            let c = csum(6, &l4);
            l4[16..18].copy_from_slice(&c.to_be_bytes());
        }
        17 => {
            l4.extend_from_slice(&sport.to_be_bytes());
            l4.extend_from_slice(&dport.to_be_bytes());
            l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            l4.extend_from_slice(payload);
            if udp_csum {
                let mut c = csum(17, &l4);
                if c == 0 {
                    c = 0xffff;
                }
                l4[6..8].copy_from_slice(&c.to_be_bytes());
            }
        }
        _ => l4.extend_from_slice(payload),
    }
    l4
}

/// Internet checksum of `data` with an initial partial `sum`.
pub fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// TCP/UDP checksum with the IPv4 pseudo-header.
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.push(0);
    pseudo.push(proto);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    let pre = pseudo
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    checksum(l4, pre)
}

/// The fields of a frame the tests look at, and whether its checksums hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub ip_csum_ok: bool,
    /// `None` for a UDP checksum of zero.
    pub l4_csum_ok: Option<bool>,
    /// ICMP type and code, for ICMP frames.
    pub icmp: Option<(u8, u8)>,
}

/// Parses a frame built by [`Frame::build`] (or rewritten by the datapath).
pub fn parse(p: &[u8]) -> Option<Parsed> {
    let ip = p.get(ETH_HLEN..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let hdr = ip.get(..ihl)?;
    let src = Ipv4Addr::new(hdr[12], hdr[13], hdr[14], hdr[15]);
    let dst = Ipv4Addr::new(hdr[16], hdr[17], hdr[18], hdr[19]);
    let proto = hdr[9];
    let l4 = ip.get(ihl..tot_len)?;
    let (sport, dport) = match proto {
        6 | 17 => (
            u16::from_be_bytes([*l4.first()?, *l4.get(1)?]),
            u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]),
        ),
        _ => (0, 0),
    };
    let l4_csum_ok = match proto {
        6 => Some(l4_checksum(src, dst, 6, l4) == 0),
        17 if l4.get(6..8)? == [0, 0] => None,
        17 => Some(l4_checksum(src, dst, 17, l4) == 0),
        1 => Some(checksum(l4, 0) == 0),
        _ => None,
    };
    Some(Parsed {
        src,
        dst,
        proto,
        sport,
        dport,
        ip_csum_ok: checksum(hdr, 0) == 0,
        l4_csum_ok,
        icmp: (proto == 1).then(|| (l4[0], l4[1])),
    })
}

/// An Ethernet/IPv6 frame carrying TCP (a SYN), UDP or raw bytes.
#[derive(Clone, Debug)]
pub struct Frame6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub sport: u16,
    pub dport: u16,
    /// 6 = TCP, 17 = UDP, anything else = raw payload after the header.
    pub proto: u8,
    /// TCP flags (SYN by default).
    pub tcp_flags: u8,
    /// An 8-byte hop-by-hop options header before the L4 header.
    pub hop_by_hop: bool,
    pub payload: Vec<u8>,
}

impl Frame6 {
    pub fn tcp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            proto: 6,
            tcp_flags: 0x02,
            hop_by_hop: false,
            payload: b"hello".to_vec(),
        }
    }

    pub fn udp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Self {
        Self {
            proto: 17,
            ..Self::tcp(src, sport, dst, dport)
        }
    }

    /// Serialises the frame with valid checksums.
    pub fn build(&self) -> Vec<u8> {
        let (src, dst) = (self.src, self.dst);
        let l4 = l4_segment(
            (self.sport, self.dport, self.proto),
            self.tcp_flags,
            &self.payload,
            true,
            |proto, l4| l4_checksum6(src, dst, proto, l4),
        );
        let mut ext = Vec::new();
        if self.hop_by_hop {
            // Next header, length 0 (8 bytes), PadN filling the rest.
            ext.extend_from_slice(&[self.proto, 0, 1, 4, 0, 0, 0, 0]);
        }
        let mut p = Vec::with_capacity(ETH_HLEN + 40 + ext.len() + l4.len());
        p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        p.extend_from_slice(&0x86ddu16.to_be_bytes());
        p.extend_from_slice(&[0x60, 0, 0, 0]);
        p.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
        p.push(if self.hop_by_hop { 0 } else { self.proto });
        p.push(64);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.extend_from_slice(&ext);
        p.extend_from_slice(&l4);
        p
    }
}

/// TCP/UDP/ICMPv6 checksum with the IPv6 pseudo-header.
pub fn l4_checksum6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    let pre = pseudo
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    checksum(l4, pre)
}

/// The fields of an IPv6 frame the tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// Next header of the fixed header.
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub l4_csum_ok: bool,
    /// TCP flags, sequence and acknowledgement numbers.
    pub tcp: Option<(u8, u32, u32)>,
    /// ICMPv6 type and code.
    pub icmp: Option<(u8, u8)>,
    /// The L4 bytes (the payload length's worth).
    pub l4: Vec<u8>,
}

/// Parses an IPv6 frame without extension headers.
pub fn parse6(p: &[u8]) -> Option<Parsed6> {
    let ip = p.get(ETH_HLEN..ETH_HLEN + 40)?;
    let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let l4 = p.get(ETH_HLEN + 40..ETH_HLEN + 40 + len)?;
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?);
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?);
    let proto = ip[6];
    let port =
        |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*l4.get(i)?, *l4.get(i + 1)?])) };
    let word =
        |i: usize| -> Option<u32> { Some(u32::from_be_bytes(l4.get(i..i + 4)?.try_into().ok()?)) };
    let (sport, dport) = match proto {
        6 | 17 => (port(0)?, port(2)?),
        _ => (0, 0),
    };
    Some(Parsed6 {
        src,
        dst,
        proto,
        sport,
        dport,
        l4_csum_ok: l4_checksum6(src, dst, proto, l4) == 0,
        tcp: if proto == 6 {
            Some((*l4.get(13)?, word(4)?, word(8)?))
        } else {
            None
        },
        icmp: (proto == 58).then(|| (l4[0], l4[1])),
        l4: l4.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_have_valid_checksums() {
        let a = Ipv4Addr::new(10, 0, 1, 2);
        let b = Ipv4Addr::new(10, 96, 0, 10);
        for mut f in [Frame::tcp(a, 40000, b, 80), Frame::udp(a, 40000, b, 53)] {
            f.ip_options = vec![1, 1, 1, 0];
            let p = parse(&f.build()).unwrap();
            assert!(p.ip_csum_ok);
            assert_eq!(p.l4_csum_ok, Some(true));
            assert_eq!((p.src, p.dst, p.sport, p.dport), (a, b, 40000, f.dport));
        }
    }

    #[test]
    fn built_ipv6_frames_have_valid_checksums() {
        let a: Ipv6Addr = "fd00:0:1::2".parse().unwrap();
        let b: Ipv6Addr = "fd00:10:96::10".parse().unwrap();
        for f in [Frame6::tcp(a, 40000, b, 80), Frame6::udp(a, 40000, b, 53)] {
            let p = parse6(&f.build()).unwrap();
            assert!(p.l4_csum_ok);
            assert_eq!((p.src, p.dst, p.sport, p.dport), (a, b, 40000, f.dport));
        }
    }
}
