//! The service IP ranges of `--service-cidr`: one per IP family, the
//! first the cluster's primary family.
//!
//! Sizes, as kube-apiserver allows them: an IPv4 range has a prefix of 8
//! to 30 bits and loses its network and broadcast addresses; an IPv6
//! range has 2 to 20 host bits (a prefix of /108 to /126, like
//! kube-apiserver's 20-bit limit on a service range) and loses only its
//! network address (IPv6 has no broadcast).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, bail};

/// An IP family, named as `spec.ipFamilies` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// `IPv4` or `IPv6`.
    pub fn parse(s: &str) -> Option<Family> {
        match s {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    pub fn other(self) -> Family {
        match self {
            Family::V4 => Family::V6,
            Family::V6 => Family::V4,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// The host bits a service range of this family may have.
    fn host_bits(self) -> std::ops::RangeInclusive<u8> {
        match self {
            Family::V4 => 2..=24,
            Family::V6 => 2..=20,
        }
    }
}

/// `a.b.c.d/n` (or an IPv6 CIDR) → (address, prefix length).
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

/// One family's range of ClusterIPs.
#[derive(Clone, Debug)]
pub struct ServiceRange {
    pub family: Family,
    /// The network address, as a number.
    base: u128,
    /// Addresses in the CIDR (usable or not).
    size: u128,
    /// The CIDR, network address first (`10.96.0.0/12`), for messages.
    pub cidr: String,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => a.into(),
    }
}

impl ServiceRange {
    pub fn parse(cidr: &str) -> anyhow::Result<ServiceRange> {
        let Some((ip, len)) = parse_cidr(cidr) else {
            bail!("{cidr:?} is not a CIDR (like 10.96.0.0/12 or fd00:10:96::/108)");
        };
        let family = Family::of(ip);
        let host_bits = family.bits() - len;
        let allowed = family.host_bits();
        if !allowed.contains(&host_bits) {
            bail!(
                "{cidr:?}: an {} service range needs a prefix length between {} and {}",
                family.name(),
                family.bits() - allowed.end(),
                family.bits() - allowed.start(),
            );
        }
        let size = 1u128 << host_bits;
        let base = to_u128(ip) & !(size - 1);
        let mut range = ServiceRange {
            family,
            base,
            size,
            cidr: String::new(),
        };
        range.cidr = format!("{}/{len}", range.addr(base));
        Ok(range)
    }

    fn addr(&self, v: u128) -> IpAddr {
        match self.family {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
        }
    }

    /// How many addresses can be handed out: all but the network address
    /// (and, for IPv4, the broadcast address).
    pub fn usable(&self) -> u128 {
        match self.family {
            Family::V4 => self.size - 2,
            Family::V6 => self.size - 1,
        }
    }

    /// Whether `ip` is one of the usable addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let v = to_u128(ip);
        Family::of(ip) == self.family && v > self.base && v <= self.base + self.usable()
    }

    /// A free address (`taken` says which are not), the search starting
    /// at the `start`-th usable one (modulo their number) and wrapping.
    pub fn pick(&self, start: u64, taken: impl Fn(IpAddr) -> bool) -> Option<IpAddr> {
        let usable = self.usable();
        let start = u128::from(start) % usable;
        (0..usable).find_map(|i| {
            let a = self.addr(self.base + 1 + (start + i) % usable);
            (!taken(a)).then_some(a)
        })
    }
}

/// `--service-cidr`: one CIDR, or two of different families separated by
/// a comma; the first is the primary family.
pub fn parse_service_cidrs(flag: &str) -> anyhow::Result<Vec<ServiceRange>> {
    let parts: Vec<&str> = flag.split(',').map(str::trim).collect();
    if parts.len() > 2 {
        bail!(
            "--service-cidr {flag:?}: at most two CIDRs (one IPv4, one IPv6), like 10.96.0.0/12,fd00:10:96::/108"
        );
    }
    let mut ranges = Vec::with_capacity(parts.len());
    for part in parts {
        let range =
            ServiceRange::parse(part).with_context(|| format!("--service-cidr {flag:?}"))?;
        if ranges
            .iter()
            .any(|r: &ServiceRange| r.family == range.family)
        {
            bail!(
                "--service-cidr {flag:?}: two {} CIDRs; a dual-stack cluster has one of each family",
                range.family.name()
            );
        }
        ranges.push(range);
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(flag: &str) -> String {
        format!("{:#}", parse_service_cidrs(flag).unwrap_err())
    }

    #[test]
    fn service_cidr_flag_takes_one_range_per_family_primary_first() {
        let r = parse_service_cidrs("fd00:10:96::5/108, 10.96.0.0/12").unwrap();
        assert_eq!(
            r.iter()
                .map(|r| (r.family, r.cidr.as_str()))
                .collect::<Vec<_>>(),
            [
                (Family::V6, "fd00:10:96::/108"),
                (Family::V4, "10.96.0.0/12")
            ]
        );
        assert!(err("10.96.0.0/12,10.100.0.0/16").contains("two IPv4 CIDRs"));
        assert!(err("fd00::/108,fd01::/108").contains("two IPv6 CIDRs"));
        assert!(err("10.96.0.0/12,fd00::/108,10.1.0.0/16").contains("at most two"));
        assert!(err("10.96.0.0").contains("is not a CIDR"));
        assert!(err("10.96.0.0/12,").contains("is not a CIDR"));
        assert!(
            err("fd00::/64").contains("between 108 and 126"),
            "{}",
            err("fd00::/64")
        );
        assert!(err("fd00::/127").contains("between 108 and 126"));
        assert!(err("10.0.0.0/31").contains("between 8 and 30"));
    }

    #[test]
    fn usable_addresses_skip_network_and_ipv4_broadcast() {
        let v4 = ServiceRange::parse("10.96.0.0/30").unwrap();
        let v6 = ServiceRange::parse("fd00::/126").unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(v4.usable(), 2);
        assert_eq!(v6.usable(), 3);
        assert!(!v4.contains(ip("10.96.0.0")) && !v4.contains(ip("10.96.0.3")));
        assert!(v4.contains(ip("10.96.0.1")) && v4.contains(ip("10.96.0.2")));
        assert!(!v6.contains(ip("fd00::")) && !v6.contains(ip("fd00::4")));
        assert!(v6.contains(ip("fd00::1")) && v6.contains(ip("fd00::3")));
        assert!(!v6.contains(ip("10.96.0.1")) && !v4.contains(ip("::a60:1")));
        // Every start finds the one free address; none when all are taken.
        for start in 0..5 {
            let free = v6.pick(start, |a| a != ip("fd00::3"));
            assert_eq!(free, Some(ip("fd00::3")));
        }
        assert_eq!(v6.pick(7, |_| true), None);
    }
}
