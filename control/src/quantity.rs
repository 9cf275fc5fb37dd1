//! Resource quantities (`100m`, `1.5`, `128Mi`, `1e3`) as numbers: CPU in
//! millicores, everything else in base units.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The value of a quantity in base units (`100m` → 0.1, `1Ki` → 1024).
pub fn parse(q: &str) -> Option<f64> {
    let q = q.trim();
    if q.is_empty() {
        return None;
    }
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Pi", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Ei", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    for (s, mult) in SUFFIXES {
        if let Some(num) = q.strip_suffix(s) {
            return number(num).map(|n| n * mult);
        }
    }
    // Plain numbers, with an optional decimal exponent (`1e3`, `2E-3`).
    number(q)
}

fn number(s: &str) -> Option<f64> {
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '+' | '-' | 'e' | 'E'))
    {
        return None;
    }
    s.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0)
}

/// Amount of resource `name` in the unit the scheduler counts in:
/// millicores for `cpu`, base units otherwise.
pub fn amount(name: &str, q: &Quantity) -> f64 {
    let v = parse(&q.0).unwrap_or(0.0);
    if name == "cpu" {
        (v * 1000.0).ceil()
    } else {
        v.ceil()
    }
}

/// A set of resource amounts (see [`amount`]).
pub type Resources = BTreeMap<String, f64>;

pub fn from_map(m: Option<&BTreeMap<String, Quantity>>) -> Resources {
    m.into_iter()
        .flatten()
        .map(|(k, q)| (k.clone(), amount(k, q)))
        .collect()
}

pub fn add(into: &mut Resources, other: &Resources) {
    for (k, v) in other {
        *into.entry(k.clone()).or_insert(0.0) += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(parse("100m"), Some(0.1));
        assert_eq!(parse("2"), Some(2.0));
        assert_eq!(parse("1.5"), Some(1.5));
        assert_eq!(parse("128Mi"), Some(134217728.0));
        assert_eq!(parse("1G"), Some(1e9));
        assert_eq!(parse("1e3"), Some(1000.0));
        assert_eq!(parse("12Mx"), None);
        assert_eq!(parse(""), None);
        assert_eq!(amount("cpu", &Quantity("250m".into())), 250.0);
        assert_eq!(amount("cpu", &Quantity("2".into())), 2000.0);
        assert_eq!(amount("memory", &Quantity("1Ki".into())), 1024.0);
    }
}
