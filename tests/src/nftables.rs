//! Inspection of kproxy's nftables mode: the `kube-proxy` tables (`ip` and
//! `ip6`) it programs in the node namespace, read with `nft`.

use anyhow::Result;

use crate::netns::Netns;

/// The name of kproxy's table in each family (kube-proxy's).
pub const TABLE: &str = "kube-proxy";

/// `nft list tables` inside `ns`: one `table FAMILY NAME` line per table.
pub fn tables(ns: &Netns) -> Result<Vec<String>> {
    Ok(ns
        .exec("nft", &["list", "tables"])?
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect())
}

/// The `kube-proxy` tables in `ns` (`table ip kube-proxy`, `table ip6
/// kube-proxy`).
pub fn kube_proxy_tables(ns: &Netns) -> Result<Vec<String>> {
    Ok(kube_proxy_of(&tables(ns)?))
}

/// The `kube-proxy` tables of an `nft list tables` output.
pub fn kube_proxy_of(tables: &[String]) -> Vec<String> {
    tables
        .iter()
        .filter(|l| l.split_whitespace().nth(2) == Some(TABLE))
        .cloned()
        .collect()
}

/// What the `kube-proxy` tables hold, one line per statement, sorted (map
/// elements, listed in the kernel's order, one per line without the
/// separating comma), to compare two moments.
pub fn kube_proxy_lines(ns: &Netns) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for table in kube_proxy_tables(ns)? {
        let args: Vec<&str> = ["list"]
            .into_iter()
            .chain(table.split_whitespace())
            .collect();
        let listing = ns.exec("nft", &args)?;
        let family = table.split_whitespace().nth(1).unwrap_or("").to_owned();
        out.extend(
            listing
                .lines()
                .map(element_line)
                .filter(|l| !l.is_empty())
                .map(|l| format!("{family}: {l}")),
        );
    }
    out.sort();
    Ok(out)
}

/// One listing line with a map's `elements = { … }` framing taken off, so
/// an element reads the same wherever the kernel lists it.
fn element_line(line: &str) -> &str {
    let l = line.trim().trim_end_matches(',').trim();
    let l = l.strip_prefix("elements = { ").unwrap_or(l);
    match l.strip_suffix(" }") {
        Some(e) if e.contains(" : ") && !e.contains('{') => e,
        _ => l,
    }
}

#[cfg(test)]
mod tests {
    use super::{element_line, kube_proxy_of};

    #[test]
    fn elements_read_the_same_wherever_listed() {
        for line in [
            "elements = { 10.96.0.10 . tcp . 80 : goto service-X,",
            "\t\t\t     10.96.0.10 . tcp . 80 : goto service-X }",
            "10.96.0.10 . tcp . 80 : goto service-X,",
        ] {
            assert_eq!(element_line(line), "10.96.0.10 . tcp . 80 : goto service-X");
        }
        assert_eq!(
            element_line("numgen random mod 2 vmap { 0 : goto a, 1 : goto b }"),
            "numgen random mod 2 vmap { 0 : goto a, 1 : goto b }"
        );
    }

    #[test]
    fn picks_the_kube_proxy_tables_of_every_family() {
        let tables: Vec<String> = [
            "table ip filter",
            "table ip kube-proxy",
            "table ip6 kube-proxy",
            "table inet kube-proxy-other",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            kube_proxy_of(&tables),
            ["table ip kube-proxy", "table ip6 kube-proxy"]
        );
        assert!(kube_proxy_of(&["table ip nat".to_owned()]).is_empty());
    }
}
