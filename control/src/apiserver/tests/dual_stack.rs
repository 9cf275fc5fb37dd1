//! IPv6 and dual-stack ClusterIPs through the real router, on every store:
//! each behaviour runs on the embedded store and on etcd (where addresses
//! are also claimed in the store, as apiservers sharing it need).

use ::http::Method;
use serde_json::{Value, json};

use super::{Backend, SERVICES, Server, server_on};

const DUAL: &str = "10.96.0.0/24,fd00:10:96::/112";
const V6_ONLY: &str = "fd00:10:96::/112";
const V4_ONLY: &str = "10.96.0.0/24";

/// A Service with these extra `spec` fields.
fn svc(name: &str, spec: Value) -> Value {
    let mut s = super::service(name, None);
    for (k, v) in spec.as_object().expect("spec fields") {
        s["spec"][k] = v.clone();
    }
    s
}

fn path(name: &str) -> String {
    format!("{SERVICES}/{name}")
}

impl Server {
    /// Creates a Service; its stored object, or the 422's Status.
    async fn create(&self, s: Value) -> (u16, Value) {
        self.call(Method::POST, SERVICES, Some(s)).await
    }

    async fn merge_patch(&self, name: &str, patch: Value) -> (u16, Value) {
        self.call_as(
            Method::PATCH,
            &path(name),
            "application/merge-patch+json",
            Some(patch),
        )
        .await
    }
}

/// The fields and messages of a 422 Status.
fn causes(status: &Value) -> Vec<(String, String)> {
    status["details"]["causes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["field"].as_str().unwrap_or_default().to_string(),
                c["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Asserts a 422 with a cause for `field` whose message holds `says`.
fn assert_invalid(code: u16, status: &Value, field: &str, says: &str) {
    assert_eq!(code, 422, "{status}");
    assert_eq!(status["reason"], "Invalid", "{status}");
    let causes = causes(status);
    assert!(
        causes.iter().any(|(f, m)| f == field && m.contains(says)),
        "no cause {field}: …{says}… in {causes:?}"
    );
}

fn ips(s: &Value) -> Vec<String> {
    s["spec"]["clusterIPs"]
        .as_array()
        .unwrap_or_else(|| panic!("no clusterIPs: {s}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn parse(ip: &str) -> std::net::IpAddr {
    ip.parse().unwrap_or_else(|e| panic!("{ip:?}: {e}"))
}

/// A single-stack IPv6 cluster gives IPv6 addresses from its range, and
/// cannot give a second family.
async fn ipv6_cluster_allocates_ipv6(backend: Backend) {
    let s = server_on(backend, V6_ONLY).await;
    let (code, a) = s.create(svc("a", json!({}))).await;
    assert_eq!(code, 201, "{a}");
    let ip = a["spec"]["clusterIP"].as_str().unwrap();
    assert!(parse(ip).is_ipv6() && ip.starts_with("fd00:10:96::"), "{a}");
    assert_eq!(ips(&a), [ip]);
    assert_eq!(a["spec"]["ipFamilies"], json!(["IPv6"]));
    assert_eq!(a["spec"]["ipFamilyPolicy"], "SingleStack");
    // PreferDualStack settles for the one family there is.
    let (code, b) = s
        .create(svc("b", json!({"ipFamilyPolicy": "PreferDualStack"})))
        .await;
    assert_eq!(code, 201, "{b}");
    assert_eq!(b["spec"]["ipFamilies"], json!(["IPv6"]));
    assert_eq!(ips(&b).len(), 1);
    let (code, st) = s.create(svc("c", json!({"ipFamilies": ["IPv4"]}))).await;
    assert_invalid(code, &st, "spec.ipFamilies[0]", "IPv4 is not configured");
}

/// RequireDualStack on a single-stack cluster is refused as upstream does.
async fn require_dual_stack_on_single_stack_cluster_is_invalid(backend: Backend) {
    let s = server_on(backend, V4_ONLY).await;
    let (code, st) = s
        .create(svc("a", json!({"ipFamilyPolicy": "RequireDualStack"})))
        .await;
    assert_invalid(
        code,
        &st,
        "spec.ipFamilyPolicy",
        "this cluster is not configured for dual-stack services",
    );
    assert!(
        st["message"].as_str().unwrap().starts_with(
            "Service \"a\" is invalid: spec.ipFamilyPolicy: Invalid value: \"RequireDualStack\""
        ),
        "{st}"
    );
    // Nothing was stored.
    let (code, _) = s.call(Method::GET, &path("a"), None).await;
    assert_eq!(code, 404);
}

/// On a dual-stack cluster a dual-stack policy gets one address per
/// family, the given or primary family first; SingleStack gets one.
async fn prefer_dual_stack_gets_both_families_primary_first(backend: Backend) {
    let s = server_on(backend, DUAL).await;
    let (code, a) = s
        .create(svc("a", json!({"ipFamilyPolicy": "PreferDualStack"})))
        .await;
    assert_eq!(code, 201, "{a}");
    let a_ips = ips(&a);
    assert_eq!(a_ips.len(), 2, "{a}");
    assert!(
        parse(&a_ips[0]).is_ipv4() && parse(&a_ips[1]).is_ipv6(),
        "{a}"
    );
    assert_eq!(a["spec"]["clusterIP"], json!(a_ips[0]));
    assert_eq!(a["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));

    let (code, b) = s
        .create(svc(
            "b",
            json!({"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv6"]}),
        ))
        .await;
    assert_eq!(code, 201, "{b}");
    assert_eq!(b["spec"]["ipFamilies"], json!(["IPv6", "IPv4"]));
    assert!(parse(&ips(&b)[0]).is_ipv6() && parse(&ips(&b)[1]).is_ipv4());

    let (code, c) = s.create(svc("c", json!({}))).await;
    assert_eq!(code, 201, "{c}");
    assert_eq!(c["spec"]["ipFamilies"], json!(["IPv4"]));
    assert_eq!(c["spec"]["ipFamilyPolicy"], "SingleStack");
    assert_eq!(ips(&c).len(), 1);

    // Headless: no address, families still defaulted by the policy.
    let (code, h) = s
        .create(svc(
            "h",
            json!({"clusterIP": "None", "ipFamilyPolicy": "PreferDualStack"}),
        ))
        .await;
    assert_eq!(code, 201, "{h}");
    assert_eq!(h["spec"]["clusterIPs"], json!(["None"]));
    assert_eq!(h["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
    // ExternalName: none of it.
    let (code, e) = s
        .create(svc(
            "e",
            json!({"type": "ExternalName", "externalName": "example.com",
                   "ipFamilyPolicy": "PreferDualStack"}),
        ))
        .await;
    assert_eq!(code, 201, "{e}");
    for f in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
        assert!(e["spec"].get(f).is_none(), "{f}: {e}");
    }
}

/// A requested IPv6 address is given once; the same address written
/// another way is the same address.
async fn requested_ipv6_address_is_honoured_once(backend: Backend) {
    let s = server_on(backend, DUAL).await;
    let (code, a) = s
        .create(svc(
            "a",
            json!({"ipFamilyPolicy": "RequireDualStack",
                   "clusterIPs": ["10.96.0.10", "fd00:10:96::10"]}),
        ))
        .await;
    assert_eq!(code, 201, "{a}");
    assert_eq!(ips(&a), ["10.96.0.10", "fd00:10:96::10"]);
    for (name, ip) in [("b", "fd00:10:96::10"), ("c", "FD00:10:96:0:0::10")] {
        let (code, st) = s.create(svc(name, json!({"clusterIP": ip}))).await;
        assert_invalid(
            code,
            &st,
            "spec.clusterIPs",
            "provided IP is already allocated",
        );
    }
    let (code, st) = s.create(svc("d", json!({"clusterIP": "fd00:99::1"}))).await;
    assert_invalid(
        code,
        &st,
        "spec.clusterIPs",
        "The range of valid IPs is fd00:10:96::/112",
    );
    let (code, e) = s
        .create(svc("e", json!({"clusterIP": "fd00:10:96::11"})))
        .await;
    assert_eq!(code, 201, "{e}");
    assert_eq!(e["spec"]["ipFamilies"], json!(["IPv6"]));
}

/// Families and addresses that contradict each other are refused, naming
/// the field.
async fn mismatched_families_and_cluster_ips_are_invalid(backend: Backend) {
    let s = server_on(backend, DUAL).await;
    let cases = [
        (
            json!({"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"],
                   "clusterIPs": ["fd00:10:96::5", "10.96.0.5"]}),
            "spec.clusterIPs[0]",
            "expected an IPv4 value as indicated by `ipFamilies[0]`",
        ),
        (
            json!({"ipFamilyPolicy": "RequireDualStack",
                   "clusterIPs": ["10.96.0.5", "10.96.0.6"]}),
            "spec.clusterIPs[1]",
            "no more than one IP for each IP family",
        ),
        (
            json!({"ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv6", "IPv6"]}),
            "spec.ipFamilies[1]",
            "Duplicate value",
        ),
        (
            json!({"ipFamilies": ["IPv4", "IPv6"]}),
            "spec.ipFamilyPolicy",
            "must be RequireDualStack or PreferDualStack when multiple IP families are specified",
        ),
        (
            json!({"ipFamilyPolicy": "DualStack"}),
            "spec.ipFamilyPolicy",
            "Unsupported value",
        ),
    ];
    for (i, (spec, field, says)) in cases.into_iter().enumerate() {
        let (code, st) = s.create(svc(&format!("s{i}"), spec)).await;
        assert_invalid(code, &st, field, says);
    }
    // None of them took an address.
    let (code, ok) = s
        .create(svc(
            "ok",
            json!({"ipFamilyPolicy": "RequireDualStack",
                   "clusterIPs": ["10.96.0.5", "fd00:10:96::5"]}),
        ))
        .await;
    assert_eq!(code, 201, "{ok}");
}

/// A dual-stack policy on an update adds the second address; SingleStack
/// releases it (another Service can have it then); the primary stays.
async fn upgrade_adds_and_downgrade_releases_the_secondary(backend: Backend) {
    let s = server_on(backend, DUAL).await;
    let (code, a) = s.create(svc("a", json!({}))).await;
    assert_eq!(code, 201, "{a}");
    let primary = ips(&a)[0].clone();

    let (code, up) = s
        .merge_patch("a", json!({"spec": {"ipFamilyPolicy": "PreferDualStack"}}))
        .await;
    assert_eq!(code, 200, "{up}");
    let up_ips = ips(&up);
    assert_eq!(up_ips.len(), 2, "{up}");
    assert_eq!(up_ips[0], primary);
    assert!(parse(&up_ips[1]).is_ipv6(), "{up}");
    assert_eq!(up["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
    let secondary = up_ips[1].clone();
    let (code, st) = s.create(svc("b", json!({"clusterIP": secondary}))).await;
    assert_invalid(code, &st, "spec.clusterIPs", "already allocated");

    // An old client's PUT with the singular field only keeps both.
    let mut put = up.clone();
    put["spec"].as_object_mut().unwrap().remove("clusterIPs");
    put["metadata"]["labels"] = json!({"touched": "yes"});
    let (code, kept) = s.call(Method::PUT, &path("a"), Some(put)).await;
    assert_eq!(code, 200, "{kept}");
    assert_eq!(ips(&kept), up_ips);

    // Neither address moves.
    let other = if primary == "10.96.0.200" {
        "10.96.0.201"
    } else {
        "10.96.0.200"
    };
    let (code, st) = s
        .merge_patch(
            "a",
            json!({"spec": {"clusterIP": other, "clusterIPs": [other, secondary]}}),
        )
        .await;
    assert_invalid(code, &st, "spec.clusterIPs[0]", "may not change once set");
    let (code, st) = s
        .merge_patch(
            "a",
            json!({"spec": {"clusterIPs": [primary, "fd00:10:96::fffe"]}}),
        )
        .await;
    assert_invalid(code, &st, "spec.clusterIPs[1]", "may not change once set");
    // Dropping the second address needs SingleStack.
    let (code, st) = s
        .merge_patch("a", json!({"spec": {"clusterIPs": [primary]}}))
        .await;
    assert_invalid(code, &st, "spec.ipFamilyPolicy", "must be 'SingleStack'");

    let (code, down) = s
        .merge_patch("a", json!({"spec": {"ipFamilyPolicy": "SingleStack"}}))
        .await;
    assert_eq!(code, 200, "{down}");
    assert_eq!(ips(&down), [primary.as_str()]);
    assert_eq!(down["spec"]["ipFamilies"], json!(["IPv4"]));
    let (code, b) = s.create(svc("b", json!({"clusterIP": secondary}))).await;
    assert_eq!(code, 201, "the released address is free: {b}");
}

/// Deleting a dual-stack Service frees both addresses: a new Service can
/// ask for the same two.
async fn delete_frees_both_addresses(backend: Backend) {
    let s = server_on(backend, DUAL).await;
    let dual = json!({"ipFamilyPolicy": "RequireDualStack"});
    let (code, a) = s.create(svc("a", dual.clone())).await;
    assert_eq!(code, 201, "{a}");
    let both = ips(&a);
    let again = || {
        svc(
            "b",
            json!({"ipFamilyPolicy": "RequireDualStack", "clusterIPs": both}),
        )
    };
    let (code, st) = s.create(again()).await;
    assert_invalid(code, &st, "spec.clusterIPs", "already allocated");
    let (code, _) = s.call(Method::DELETE, &path("a"), None).await;
    assert_eq!(code, 200);
    let (code, b) = s.create(again()).await;
    assert_eq!(code, 201, "{b}");
    assert_eq!(ips(&b), both);
}

/// What the stored Services hold is taken after a restart, IPv6 too.
async fn ipv6_allocations_survive_a_restart(backend: Backend) {
    let s = server_on(backend, DUAL).await;
    let (code, a) = s
        .create(svc("a", json!({"ipFamilyPolicy": "PreferDualStack"})))
        .await;
    assert_eq!(code, 201, "{a}");
    let v6 = ips(&a)[1].clone();
    let s = s.restart().await;
    let (code, st) = s.create(svc("b", json!({"clusterIP": v6}))).await;
    assert_invalid(code, &st, "spec.clusterIPs", "already allocated");
    let (code, _) = s.call(Method::DELETE, &path("a"), None).await;
    assert_eq!(code, 200);
    let (code, b) = s.create(svc("b", json!({"clusterIP": v6}))).await;
    assert_eq!(code, 201, "{b}");
}

/// One `#[tokio::test]` per behaviour and store.
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Etcd).await;
                }
            )*
        }
    };
}

on_every_store!(
    ipv6_cluster_allocates_ipv6,
    require_dual_stack_on_single_stack_cluster_is_invalid,
    prefer_dual_stack_gets_both_families_primary_first,
    requested_ipv6_address_is_honoured_once,
    mismatched_families_and_cluster_ips_are_invalid,
    upgrade_adds_and_downgrade_releases_the_secondary,
    delete_frees_both_addresses,
    ipv6_allocations_survive_a_restart,
);
