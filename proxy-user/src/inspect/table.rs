//! The aligned tables `kproxy inspect` prints by default.

use std::fmt::Write as _;

use super::{AffinityRow, BackendsRow, ConntrackRow, ServiceRow};

/// Left-aligned columns, two spaces apart, the header first.
fn aligned(out: &mut String, header: &[&str], rows: &[Vec<String>], indent: &str) {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: Vec<&str>| {
        let mut l = String::from(indent);
        for (i, (cell, w)) in cells.iter().zip(&width).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// Drops the `optional` columns that are `-` in every row (a datapath's
/// own columns: ids and node addresses for eBPF, rule names for iptables).
fn prune(
    header: &[&'static str],
    rows: &mut [Vec<String>],
    optional: &[&str],
) -> Vec<&'static str> {
    let keep: Vec<bool> = header
        .iter()
        .enumerate()
        .map(|(i, h)| !optional.contains(h) || rows.iter().any(|r| r[i] != "-"))
        .collect();
    for r in rows.iter_mut() {
        let mut i = 0;
        r.retain(|_| {
            i += 1;
            keep[i - 1]
        });
    }
    header
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|(h, _)| *h)
        .collect()
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_owned(), T::to_string)
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".to_owned()
    } else {
        v.join(",")
    }
}

/// `1.5s`, `3m04s`, `2h03m`, `1d02h`.
pub(super) fn age(ms: Option<u64>) -> String {
    let Some(ms) = ms else {
        return "-".to_owned();
    };
    let s = ms / 1000;
    match s {
        0..60 => format!("{}.{}s", s, ms % 1000 / 100),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

pub(super) fn services(out: &mut String, rows: &[ServiceRow]) {
    let mut cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.frontend.clone(),
                opt(&r.service_id),
                opt(&r.name),
                r.backends.to_string(),
                if r.flags.is_empty() {
                    "-".to_owned()
                } else {
                    r.flags.join(",")
                },
                match r.affinity_seconds {
                    0 => "-".to_owned(),
                    s => format!("{s}s"),
                },
                list(&r.source_ranges),
                list(&r.node_addresses),
            ]
        })
        .collect();
    let header = prune(
        &[
            "FRONTEND",
            "ID",
            "NAME",
            "BACKENDS",
            "FLAGS",
            "AFFINITY",
            "SOURCE-RANGES",
            "ALSO-UNDER",
        ],
        &mut cells,
        &["ID", "NAME", "ALSO-UNDER"],
    );
    aligned(out, &header, &cells, "");
}

pub(super) fn backends(out: &mut String, rows: &[BackendsRow]) {
    if rows.is_empty() {
        out.push_str("(no frontends)\n");
    }
    for r in rows {
        let mut head = r.id.frontend.clone();
        if let Some(id) = r.service_id {
            let _ = write!(head, "  id {id}");
        }
        if let Some(name) = &r.name {
            let _ = write!(head, "  {name}");
        }
        let _ = write!(head, "  {} backends", r.backends.len());
        if let Some(c) = r.rr_cursor {
            let _ = write!(head, "  rr-cursor {c}");
        }
        out.push_str(&head);
        out.push('\n');
        if r.backends.is_empty() {
            continue;
        }
        let mut cells: Vec<Vec<String>> = r
            .backends
            .iter()
            .map(|b| {
                vec![
                    b.slot.to_string(),
                    b.endpoint.clone(),
                    b.snat
                        .map_or("-", |s| if s { "yes" } else { "no" })
                        .to_owned(),
                    b.probability
                        .map_or_else(|| "-".to_owned(), |p| format!("{p:.4}")),
                    opt(&b.chain),
                ]
            })
            .collect();
        let header = prune(
            &["SLOT", "BACKEND", "SNAT", "PROBABILITY", "CHAIN"],
            &mut cells,
            &["SNAT", "PROBABILITY", "CHAIN"],
        );
        aligned(out, &header, &cells, "  ");
    }
}

pub(super) fn conntrack(out: &mut String, rows: &[ConntrackRow]) {
    let mut cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.direction.to_owned(),
                r.protocol.clone(),
                r.source.clone(),
                r.destination.clone(),
                r.translated.clone(),
                opt(&r.frontend),
                opt(&r.nat),
                age(r.age_ms),
                match (r.closing, &r.state) {
                    (Some(true), _) => "closing".to_owned(),
                    (_, s) => opt(s),
                },
                opt(&r.timeout_seconds.map(|s| format!("{s}s"))),
            ]
        })
        .collect();
    let header = prune(
        &[
            "DIR",
            "PROTO",
            "SOURCE",
            "DESTINATION",
            "TRANSLATED",
            "FRONTEND",
            "NAT",
            "AGE",
            "STATE",
            "EXPIRES-IN",
        ],
        &mut cells,
        &["AGE", "EXPIRES-IN"],
    );
    aligned(out, &header, &cells, "");
}

pub(super) fn affinity(out: &mut String, rows: &[AffinityRow]) {
    let mut cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.client.clone(),
                opt(&r.frontend),
                opt(&r.service_id),
                r.backend.clone(),
                age(r.age_ms),
                opt(&r.timeout_seconds.map(|s| format!("{s}s"))),
                r.expired
                    .map_or("-", |e| if e { "yes" } else { "no" })
                    .to_owned(),
                opt(&r.chain),
            ]
        })
        .collect();
    let header = prune(
        &[
            "CLIENT", "FRONTEND", "ID", "BACKEND", "AGE", "TIMEOUT", "EXPIRED", "LIST",
        ],
        &mut cells,
        &["ID", "LIST"],
    );
    aligned(out, &header, &cells, "");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_ages_read_well() {
        let mut out = String::new();
        aligned(
            &mut out,
            &["A", "BB"],
            &[vec!["xyz".into(), "1".into()], vec!["q".into(), "".into()]],
            "",
        );
        assert_eq!(out, "A    BB\nxyz  1\nq\n");
        assert_eq!(age(Some(1_540)), "1.5s");
        assert_eq!(age(Some(184_000)), "3m04s");
        assert_eq!(age(Some(7_380_000)), "2h03m");
        assert_eq!(age(Some(93_600_000)), "1d02h");
        assert_eq!(age(None), "-");
    }
}
