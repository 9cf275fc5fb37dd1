//! Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4): every backend
//! walks its own permutation of the `M` table entries, and the backends take
//! turns claiming the next free entry of their permutation until the table
//! is full. Each backend ends up with `M/N` entries (±1), and a change of the
//! backend set moves few entries: a flow hashed to an entry keeps its
//! backend unless that entry changed hands.
//!
//! A backend's permutation depends only on its own `ip:port` (SHA-256, so
//! every node and every agent version computes the same table for the same
//! backends), and the backends take turns in sorted order.

use proxy_common::MAGLEV_M;
use sha2::{Digest, Sha256};

use crate::model::BackendAddr;

/// The table for `backends`: entry `i` is the index (into `backends`
/// sorted) of the backend that owns entry `i`. Empty for no backends.
pub fn table(backends: &[BackendAddr]) -> (Vec<BackendAddr>, Vec<u32>) {
    let mut sorted = backends.to_vec();
    sorted.sort();
    sorted.dedup();
    let m = MAGLEV_M as u64;
    let n = sorted.len();
    if n == 0 {
        return (sorted, Vec::new());
    }
    // (offset, skip) of each backend's permutation: entry j of it is
    // (offset + j·skip) mod M; M prime and 0 < skip < M make it a
    // permutation of every entry.
    let perm: Vec<(u64, u64)> = sorted
        .iter()
        .map(|b| {
            let d = Sha256::digest(b.to_string().as_bytes());
            let h1 = u64::from_be_bytes(d[0..8].try_into().expect("8 bytes"));
            let h2 = u64::from_be_bytes(d[8..16].try_into().expect("8 bytes"));
            (h1 % m, h2 % (m - 1) + 1)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut entry = vec![u32::MAX; MAGLEV_M as usize];
    let mut filled = 0usize;
    'fill: loop {
        for (i, &(offset, skip)) in perm.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m;
            while entry[c as usize] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            entry[c as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == MAGLEV_M as usize {
                break 'fill;
            }
        }
    }
    (sorted, entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn backends(n: u8) -> Vec<BackendAddr> {
        (1..=n)
            .map(|i| BackendAddr::new(Ipv4Addr::new(10, 0, 10 + i, 2), 8080))
            .collect()
    }

    /// The backend of every entry.
    fn owners(bs: &[BackendAddr]) -> Vec<BackendAddr> {
        let (sorted, t) = table(bs);
        t.iter().map(|i| sorted[*i as usize]).collect()
    }

    #[test]
    fn every_backend_gets_an_even_share() {
        for n in [1u8, 3, 10, 100] {
            let (sorted, t) = table(&backends(n));
            assert_eq!(t.len(), MAGLEV_M as usize);
            let mut count = vec![0usize; sorted.len()];
            for i in &t {
                count[*i as usize] += 1;
            }
            let each = MAGLEV_M as usize / n as usize;
            assert!(
                count.iter().all(|c| c.abs_diff(each) <= 1),
                "{n} backends: {count:?}"
            );
        }
    }

    #[test]
    fn the_order_backends_come_in_does_not_matter() {
        let mut bs = backends(7);
        let a = owners(&bs);
        bs.reverse();
        assert_eq!(owners(&bs), a);
    }

    #[test]
    fn removing_one_of_n_moves_little_more_than_its_share() {
        for n in [3u8, 10, 50] {
            let all = backends(n);
            let before = owners(&all);
            let gone = all[1];
            let rest: Vec<BackendAddr> = all.iter().copied().filter(|b| *b != gone).collect();
            let after = owners(&rest);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let share = 1.0 / f64::from(n);
            let frac = moved as f64 / f64::from(MAGLEV_M);
            assert!(
                frac <= share + 0.03,
                "{n} backends: {frac:.4} of entries moved, share {share:.4}"
            );
            // Entries of the removed backend all moved, to the others.
            assert!(
                before
                    .iter()
                    .zip(&after)
                    .all(|(a, b)| *a != gone || *b != gone)
            );
        }
    }
}
