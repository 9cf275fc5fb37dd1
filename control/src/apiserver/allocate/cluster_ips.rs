//! A Service's cluster IPs across IP families, as kube-apiserver gives
//! them: `spec.ipFamilyPolicy`, `spec.ipFamilies` and `spec.clusterIPs`
//! are first defaulted against the families this cluster serves (the
//! ranges of `--service-cidr`, primary first), then each family without
//! an address gets one from its range.
//!
//! - Policy: `SingleStack` unless given. `PreferDualStack` gets both
//!   families on a dual-stack cluster and the primary otherwise;
//!   `RequireDualStack` gets both or is refused.
//! - Families: given ones stay; given cluster IPs fix the family of their
//!   index; a Service that names none gets the primary family first.
//! - Updates keep what the request leaves out (a PUT without
//!   `clusterIPs`, or with only the old `clusterIP`, keeps all of them).
//!   The primary address and family never change. A policy other than
//!   `SingleStack` on a one-family Service adds the second family (an
//!   upgrade); `SingleStack` with the old two addresses drops the second
//!   (a downgrade: the Service no longer holds it, so it is free).
//!
//! Structural checks that need no cluster (known values, at most two,
//! distinct families) are the Service strategy's validation.

use std::net::IpAddr;

use serde_json::{Map, Value, json};

use super::Taken;
use super::range::{Family, ServiceRange};
use crate::apiserver::status::FieldError;

const SINGLE_STACK: &str = "SingleStack";
const REQUIRE_DUAL_STACK: &str = "RequireDualStack";
const HEADLESS: &str = "None";

/// The cluster-IP fields of one Service.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Fields {
    policy: Option<String>,
    families: Vec<Family>,
    /// `spec.clusterIPs`, or `["None"]` for a headless Service.
    ips: Vec<String>,
}

fn strings(spec: &Value, field: &str) -> Vec<String> {
    spec.get(field)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(String::from)
        .collect()
}

fn cluster_ip(spec: &Value) -> &str {
    spec.get("clusterIP")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

impl Fields {
    fn read(spec: &Value) -> Fields {
        let mut ips = strings(spec, "clusterIPs");
        if ips.is_empty() && !cluster_ip(spec).is_empty() {
            ips.push(cluster_ip(spec).to_string());
        }
        Fields {
            policy: spec
                .get("ipFamilyPolicy")
                .and_then(Value::as_str)
                .map(String::from),
            families: strings(spec, "ipFamilies")
                .iter()
                .filter_map(|f| Family::parse(f))
                .collect(),
            ips,
        }
    }

    /// The fields a stored Service holds (`None`: it holds no cluster IP,
    /// as an ExternalName Service).
    fn stored(spec: &Value) -> Option<Fields> {
        Some(Fields::read(spec)).filter(|f| !f.ips.is_empty())
    }

    /// The fields a request asks for, what it left out taken from `old`.
    fn requested(spec: &Value, old: Option<&Fields>) -> Fields {
        let ip = cluster_ip(spec);
        let mut new = Fields::read(spec);
        let Some(old) = old else {
            return new;
        };
        // Left out, or only the singular field as an old client sends it:
        // the request means the addresses the Service has.
        let only_singular = strings(spec, "clusterIPs").is_empty();
        if ip.is_empty() || (only_singular && old.ips.first().map(String::as_str) == Some(ip)) {
            new.ips = old.ips.clone();
        }
        if new.families.is_empty() {
            new.families = old.families.clone();
        }
        if new.policy.is_none() {
            new.policy = old.policy.clone();
        }
        new
    }

    fn headless(&self) -> bool {
        self.ips.first().map(String::as_str) == Some(HEADLESS)
    }

    fn write(&self, spec: &mut Map<String, Value>) {
        let families: Vec<&str> = self.families.iter().map(|f| f.name()).collect();
        spec.insert("clusterIP".into(), json!(self.ips[0]));
        spec.insert("clusterIPs".into(), json!(self.ips));
        spec.insert("ipFamilies".into(), json!(families));
        spec.insert("ipFamilyPolicy".into(), json!(self.policy));
    }
}

/// Policy `SingleStack` with the old two addresses (or families) lets the
/// second go; any other policy may not drop it.
fn downgrade(new: &mut Fields, old: &Fields, errs: &mut Vec<FieldError>) {
    if new.policy.as_deref() == Some(SINGLE_STACK) {
        if new.ips == old.ips && new.ips.len() > 1 {
            new.ips.truncate(1);
        }
        if new.families == old.families && new.families.len() > 1 {
            new.families.truncate(1);
        }
        return;
    }
    let policy = json!(new.policy);
    if !new.ips.is_empty() && new.ips.len() < old.ips.len() {
        errs.push(FieldError::invalid(
            "spec.ipFamilyPolicy",
            policy.clone(),
            "must be 'SingleStack' to release the secondary cluster IP",
        ));
    }
    if !new.families.is_empty() && new.families.len() < old.families.len() {
        errs.push(FieldError::invalid(
            "spec.ipFamilyPolicy",
            policy,
            "must be 'SingleStack' to release the secondary IP family",
        ));
    }
}

/// The primary family and the secondary address, once set, stay (the
/// primary address is `spec.clusterIP`, checked by validation).
fn check_immutable(new: &Fields, old: &Fields, errs: &mut Vec<FieldError>) {
    if let (Some(n), Some(o)) = (new.families.first(), old.families.first())
        && n != o
    {
        errs.push(FieldError::invalid(
            "spec.ipFamilies[0]",
            n.name(),
            "may not change once set",
        ));
    }
    if let (Some(n), Some(o)) = (new.ips.get(1), old.ips.get(1))
        && !same_ip(n, o)
    {
        errs.push(FieldError::invalid(
            "spec.clusterIPs[1]",
            n.as_str(),
            "may not change once set",
        ));
    }
}

fn same_ip(a: &str, b: &str) -> bool {
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Each given cluster IP fixes the family of its index.
fn infer_families(f: &mut Fields, errs: &mut Vec<FieldError>) {
    if f.headless() {
        return;
    }
    for (i, ip) in f.ips.iter().enumerate() {
        // A malformed address was reported by validation.
        let Ok(ip) = ip.parse::<IpAddr>() else {
            continue;
        };
        let family = Family::of(ip);
        match f.families.get(i) {
            None => f.families.push(family),
            Some(want) if *want != family => errs.push(FieldError::invalid(
                format!("spec.clusterIPs[{i}]"),
                ip.to_string(),
                format!(
                    "expected an {} value as indicated by `ipFamilies[{i}]`",
                    want.name()
                ),
            )),
            Some(_) => {}
        }
    }
}

/// The policy allows the families and addresses asked for, and the
/// cluster serves them.
fn check_policy(f: &Fields, cluster: &[Family], errs: &mut Vec<FieldError>) {
    let policy = f.policy.as_deref().unwrap_or(SINGLE_STACK);
    if policy == SINGLE_STACK {
        let what = if f.families.len() > 1 {
            Some("IP families")
        } else if f.ips.len() > 1 {
            Some("'clusterIPs'")
        } else {
            None
        };
        if let Some(what) = what {
            errs.push(FieldError::invalid(
                "spec.ipFamilyPolicy",
                policy,
                format!(
                    "must be RequireDualStack or PreferDualStack when multiple {what} are specified"
                ),
            ));
        }
    }
    if policy == REQUIRE_DUAL_STACK && cluster.len() < 2 {
        errs.push(FieldError::invalid(
            "spec.ipFamilyPolicy",
            policy,
            "this cluster is not configured for dual-stack services",
        ));
    }
    for (i, family) in f.families.iter().enumerate() {
        if !cluster.contains(family) {
            errs.push(FieldError::invalid(
                format!("spec.ipFamilies[{i}]"),
                family.name(),
                format!(
                    "ipfamily {} is not configured on this cluster (--service-cidr has no {0} range)",
                    family.name()
                ),
            ));
        }
    }
}

/// Families the request did not name: the primary, and for a dual-stack
/// policy on a dual-stack cluster the other one too.
fn default_families(f: &mut Fields, cluster: &[Family]) {
    if f.families.is_empty() {
        f.families.push(cluster[0]);
    }
    let dual = f.policy.as_deref() != Some(SINGLE_STACK);
    if dual && f.families.len() == 1 && cluster.len() > 1 {
        f.families.push(f.families[0].other());
    }
}

/// Defaults and checks the fields (see the module doc); `old` is what the
/// stored Service holds.
pub(super) fn resolve(
    cluster: &[Family],
    new: &mut Fields,
    old: Option<&Fields>,
) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(old) = old {
        downgrade(new, old, &mut errs);
        check_immutable(new, old, &mut errs);
    }
    infer_families(new, &mut errs);
    new.policy.get_or_insert_with(|| SINGLE_STACK.into());
    check_policy(new, cluster, &mut errs);
    if errs.is_empty() {
        default_families(new, cluster);
    }
    errs
}

/// Gives every family of `f` an address: a requested one is checked
/// against its family's range and `taken` (unless the Service had it
/// already), a missing one picked.
fn allocate(
    f: &mut Fields,
    old: Option<&Fields>,
    ranges: &[ServiceRange],
    taken: &dyn Taken,
    errs: &mut Vec<FieldError>,
) {
    if f.headless() {
        return;
    }
    for (i, family) in f.families.clone().into_iter().enumerate() {
        let range = ranges
            .iter()
            .find(|r| r.family == family)
            .expect("resolve refuses families the cluster does not serve");
        let had = |ip: &str| {
            old.and_then(|o| o.ips.get(i))
                .is_some_and(|o| same_ip(o, ip))
        };
        match f.ips.get(i) {
            None => match pick(range, taken) {
                Some(a) => f.ips.push(a.to_string()),
                None => {
                    errs.push(FieldError::invalid(
                        "spec.clusterIPs",
                        json!(f.ips),
                        format!(
                            "failed to allocate a serviceIP: range {} is full",
                            range.cidr
                        ),
                    ));
                    return;
                }
            },
            Some(ip) if !had(ip) => errs.extend(check_requested(range, ip, &f.ips, taken)),
            Some(_) => {}
        }
    }
}

/// A free address of `range`, searched from a random one so that picks
/// spread over the range.
fn pick(range: &ServiceRange, taken: &dyn Taken) -> Option<IpAddr> {
    range.pick(super::random_u64(), |a| taken.ip(&a.to_string()))
}

/// A requested address must be a usable one of its family's range and
/// not held by another Service.
fn check_requested(
    range: &ServiceRange,
    ip: &str,
    all: &[String],
    taken: &dyn Taken,
) -> Option<FieldError> {
    // A malformed address was reported by validation.
    let addr = ip.parse::<IpAddr>().ok()?;
    let detail = if !range.contains(addr) {
        format!(
            "failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. The range of valid IPs is {}",
            range.cidr
        )
    } else if taken.ip(&addr.to_string()) {
        format!("failed to allocate IP {ip}: provided IP is already allocated")
    } else {
        return None;
    };
    Some(FieldError::invalid("spec.clusterIPs", json!(all), detail))
}

/// Fills in `spec.ipFamilyPolicy`, `spec.ipFamilies`, `spec.clusterIP`
/// and `spec.clusterIPs` of a Service that has a cluster IP (not
/// ExternalName), keeping what `old_spec` had.
pub(super) fn assign(
    ranges: &[ServiceRange],
    spec: &mut Map<String, Value>,
    old_spec: Option<&Value>,
    taken: &dyn Taken,
    errs: &mut Vec<FieldError>,
) {
    let old = old_spec.and_then(Fields::stored);
    let mut f = Fields::requested(&Value::Object(spec.clone()), old.as_ref());
    let cluster: Vec<Family> = ranges.iter().map(|r| r.family).collect();
    let found = resolve(&cluster, &mut f, old.as_ref());
    if !found.is_empty() {
        errs.extend(found);
        return;
    }
    allocate(&mut f, old.as_ref(), ranges, taken, errs);
    if !f.ips.is_empty() {
        f.write(spec);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: Family = Family::V4;
    const V6: Family = Family::V6;

    fn fields(policy: Option<&str>, families: &[Family], ips: &[&str]) -> Fields {
        Fields {
            policy: policy.map(String::from),
            families: families.to_vec(),
            ips: ips.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The resolved (policy, families) or the fields of the errors.
    fn resolved(
        cluster: &[Family],
        mut f: Fields,
        old: Option<&Fields>,
    ) -> Result<(String, Vec<Family>, Vec<String>), Vec<String>> {
        let errs = resolve(cluster, &mut f, old);
        if errs.is_empty() {
            Ok((f.policy.unwrap(), f.families, f.ips))
        } else {
            Err(errs.iter().map(|e| e.to_string()).collect())
        }
    }

    #[test]
    fn families_default_from_the_policy_and_the_cluster() {
        let both = [V4, V6];
        let ok = |cluster: &[Family], policy, fams: &[Family]| {
            let (p, f, _) = resolved(cluster, fields(policy, fams, &[]), None).unwrap();
            (p, f)
        };
        assert_eq!(ok(&both, None, &[]), ("SingleStack".into(), vec![V4]));
        assert_eq!(ok(&[V6, V4], None, &[]).1, [V6]);
        assert_eq!(ok(&both, Some("PreferDualStack"), &[]).1, [V4, V6]);
        assert_eq!(ok(&[V6, V4], Some("PreferDualStack"), &[]).1, [V6, V4]);
        assert_eq!(ok(&[V4], Some("PreferDualStack"), &[]).1, [V4]);
        assert_eq!(ok(&both, Some("RequireDualStack"), &[V6]).1, [V6, V4]);
        // A given address fixes its family.
        let (_, f, _) = resolved(&both, fields(None, &[], &["fd00::5"]), None).unwrap();
        assert_eq!(f, [V6]);
    }

    #[test]
    fn policy_and_families_the_cluster_cannot_serve_are_refused() {
        let e = resolved(&[V4], fields(Some("RequireDualStack"), &[], &[]), None).unwrap_err();
        assert!(
            e[0].contains("spec.ipFamilyPolicy") && e[0].contains("not configured for dual-stack"),
            "{e:?}"
        );
        let e = resolved(&[V4], fields(None, &[V6], &[]), None).unwrap_err();
        assert!(
            e[0].starts_with("spec.ipFamilies[0]") && e[0].contains("IPv6 is not configured"),
            "{e:?}"
        );
        let e = resolved(&[V4, V6], fields(None, &[V4, V6], &[]), None).unwrap_err();
        assert!(
            e[0].contains("must be RequireDualStack or PreferDualStack"),
            "{e:?}"
        );
        let e = resolved(
            &[V4, V6],
            fields(None, &[V4, V6], &["10.96.0.1", "10.96.0.2"]),
            None,
        )
        .unwrap_err();
        assert!(
            e[0].starts_with("spec.clusterIPs[1]")
                && e[0].contains("expected an IPv6 value as indicated by `ipFamilies[1]`"),
            "{e:?}"
        );
    }

    #[test]
    fn updates_upgrade_and_downgrade_but_keep_the_primary() {
        let both = [V4, V6];
        let single = fields(Some("SingleStack"), &[V4], &["10.96.0.1"]);
        let dual = fields(
            Some("PreferDualStack"),
            &[V4, V6],
            &["10.96.0.1", "fd00::1"],
        );
        // Upgrade: the second family comes (its address is allocated later).
        let up = fields(Some("RequireDualStack"), &[V4], &["10.96.0.1"]);
        let (_, f, ips) = resolved(&both, up, Some(&single)).unwrap();
        assert_eq!((f, ips), (vec![V4, V6], vec!["10.96.0.1".to_string()]));
        // Downgrade: the old two addresses with SingleStack keep the first.
        let down = fields(Some("SingleStack"), &[V4, V6], &["10.96.0.1", "fd00::1"]);
        let (_, f, ips) = resolved(&both, down, Some(&dual)).unwrap();
        assert_eq!((f, ips), (vec![V4], vec!["10.96.0.1".to_string()]));
        // Dropping the second address needs SingleStack.
        let drop = fields(Some("PreferDualStack"), &[V4, V6], &["10.96.0.1"]);
        let e = resolved(&both, drop, Some(&dual)).unwrap_err();
        assert!(e[0].contains("must be 'SingleStack' to release"), "{e:?}");
        // The primary family and the secondary address stay.
        let flip = fields(
            Some("PreferDualStack"),
            &[V6, V4],
            &["10.96.0.1", "fd00::1"],
        );
        let e = resolved(&both, flip, Some(&dual)).unwrap_err();
        assert!(
            e.iter().any(|e| e.starts_with("spec.ipFamilies[0]")),
            "{e:?}"
        );
        let moved = fields(
            Some("PreferDualStack"),
            &[V4, V6],
            &["10.96.0.1", "fd00::2"],
        );
        let e = resolved(&both, moved, Some(&dual)).unwrap_err();
        assert!(e[0].starts_with("spec.clusterIPs[1]"), "{e:?}");
    }

    #[test]
    fn a_request_without_cluster_ips_keeps_the_services() {
        let old = Fields::stored(&json!({
            "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1", "fd00::1"],
            "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack",
        }));
        for spec in [json!({}), json!({"clusterIP": "10.96.0.1"})] {
            let f = Fields::requested(&spec, old.as_ref());
            assert_eq!(Some(f), old, "{spec}");
        }
    }
}
