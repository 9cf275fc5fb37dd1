//! The conntrack garbage collector: the programs delete an expired entry
//! when a packet meets it, and this sweep deletes the ones no packet meets
//! again (a closed flow's entries, a client gone), so the LRU table holds
//! live flows and its size means something.

use std::time::Instant;

use proxy_common::*;

use std::os::fd::AsFd;

use super::{Dataplane, batch};
use crate::datapath::{ConntrackGc, GcReport};

/// The programs' clock (`bpf_ktime_get_coarse_ns`) as user space reads it:
/// CLOCK_MONOTONIC_COARSE.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether an entry last seen at `v.seen_ns` is past its timeout at `now`
/// (the rule the programs apply in `flow.rs::ct_live`).
pub fn expired(k: &CtKey, v: &CtValue, now: u64, tcp_close_ns: u64) -> bool {
    entry_expired(k, v, now, tcp_close_ns)
}

/// Free entries the kernel's LRU keeps per CPU (`LOCAL_FREE_TARGET` in
/// kernel/bpf/bpf_lru_list.c): a CPU that runs out takes this many from the
/// common list at once, so a table of C entries starts evicting when about
/// C − 128·CPUs are live (measured: 874 of 1,024 on 2 CPUs).
const LRU_LOCAL_FREE: usize = 128;

/// How many entries an LRU table of `capacity` holds before it evicts.
pub fn lru_usable(capacity: usize, nr_cpus: usize) -> usize {
    capacity
        .saturating_sub(nr_cpus * LRU_LOCAL_FREE)
        .max(capacity / 2)
}

/// An entry of either family's conntrack table, as the expiry rule reads
/// it: protocol, `CT_F_*` flags, time of the last packet.
trait CtEntry: aya::Pod {
    type Value: aya::Pod;
    fn fields(&self, v: &Self::Value) -> (u8, u32, u64);
}

impl CtEntry for CtKey {
    type Value = CtValue;
    fn fields(&self, v: &CtValue) -> (u8, u32, u64) {
        (self.proto, v.flags, v.seen_ns)
    }
}

impl CtEntry for CtKey6 {
    type Value = CtValue6;
    fn fields(&self, v: &CtValue6) -> (u8, u32, u64) {
        (self.proto, v.flags, v.seen_ns)
    }
}

fn entry_expired<K: CtEntry>(k: &K, v: &K::Value, now: u64, tcp_close_ns: u64) -> bool {
    let (proto, flags, seen_ns) = k.fields(v);
    now.saturating_sub(seen_ns) > ct_timeout_ns(proto, flags, tcp_close_ns)
}

/// One sweep of a table: reads it in batches, then deletes the entries
/// that were expired and still are (a packet may have refreshed one since
/// the scan). Returns (entries scanned, entries deleted).
fn sweep<K: CtEntry>(
    fd: std::os::fd::BorrowedFd<'_>,
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, K::Value>,
    tcp_close_ns: u64,
    what: &str,
) -> (usize, usize) {
    let now = monotonic_ns();
    let mut doomed = Vec::new();
    let scanned = match batch::for_each(fd, |k: K, v: K::Value| {
        if entry_expired(&k, &v, now, tcp_close_ns) {
            doomed.push(k);
        }
    }) {
        Ok(n) => n,
        Err(e) => {
            log::warn!("conntrack sweep: reading the {what} table: {e}");
            0
        }
    };
    let mut deleted = 0usize;
    for k in &doomed {
        match map.get(k, 0) {
            Ok(v)
                if entry_expired(k, &v, monotonic_ns(), tcp_close_ns) && map.remove(k).is_ok() =>
            {
                deleted += 1;
            }
            _ => {}
        }
    }
    (scanned, deleted)
}

impl ConntrackGc for Dataplane {
    fn collect(&mut self) -> GcReport {
        let started = Instant::now();
        let close = self.ct_tcp_close_ns;
        let (scanned, deleted) = sweep(
            self.conntrack_fd.as_fd(),
            &mut self.conntrack,
            close,
            "IPv4",
        );
        // The IPv6 table is swept the same way; its figures are not in the
        // report's live/capacity (those size the IPv4 table).
        let (_, deleted6) = sweep(
            self.conntrack6_fd.as_fd(),
            &mut self.conntrack6,
            close,
            "IPv6",
        );
        GcReport {
            live: scanned - deleted,
            deleted: deleted + deleted6,
            capacity: self.ct_capacity,
            usable: lru_usable(self.ct_capacity, self.nr_cpus),
            took: started.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(proto: u8) -> CtKey {
        CtKey {
            saddr: 1,
            daddr: 2,
            sport: 3,
            dport: 4,
            proto,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        }
    }

    fn value(seen_ns: u64, flags: u32) -> CtValue {
        CtValue {
            addr: 5,
            port: 6,
            nat_port: 0,
            svc_id: 0,
            nat_addr: 0,
            seen_ns,
            flags,
            _pad: 0,
        }
    }

    #[test]
    fn timeouts_follow_protocol_and_closing() {
        let s = 1_000_000_000u64;
        let close = 10 * s;
        let t0 = 1_000 * s;
        // UDP: 120 s.
        assert!(!expired(
            &key(IPPROTO_UDP),
            &value(t0, 0),
            t0 + 119 * s,
            close
        ));
        assert!(expired(
            &key(IPPROTO_UDP),
            &value(t0, 0),
            t0 + 121 * s,
            close
        ));
        // TCP open: days; closing: the close timeout.
        assert!(!expired(
            &key(IPPROTO_TCP),
            &value(t0, 0),
            t0 + 3600 * s,
            close
        ));
        assert!(expired(
            &key(IPPROTO_TCP),
            &value(t0, CT_F_CLOSING),
            t0 + 11 * s,
            close
        ));
        assert!(!expired(
            &key(IPPROTO_TCP),
            &value(t0, CT_F_CLOSING),
            t0 + 9 * s,
            close
        ));
        // No reply yet: a SYN lives 60 s, a UDP datagram 30 s.
        let unreplied = CT_F_UNREPLIED;
        assert!(!expired(
            &key(IPPROTO_TCP),
            &value(t0, unreplied),
            t0 + 59 * s,
            close
        ));
        assert!(expired(
            &key(IPPROTO_TCP),
            &value(t0, unreplied),
            t0 + 61 * s,
            close
        ));
        assert!(!expired(
            &key(IPPROTO_UDP),
            &value(t0, unreplied),
            t0 + 29 * s,
            close
        ));
        assert!(expired(
            &key(IPPROTO_UDP),
            &value(t0, unreplied),
            t0 + 31 * s,
            close
        ));
        // A clock reading before the entry's (another CPU): not expired.
        assert!(!expired(
            &key(IPPROTO_TCP),
            &value(t0, CT_F_CLOSING),
            t0 - s,
            close
        ));
    }
}
