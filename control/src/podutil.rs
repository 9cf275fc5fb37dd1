//! Facts about pods that the scheduler and several controllers need.

use k8s_openapi::api::core::v1::{Pod, PodCondition};

use crate::quantity::{self, Resources};

pub fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Succeeded or Failed: the pod holds no resources any more.
pub fn is_terminal(p: &Pod) -> bool {
    matches!(phase(p), "Succeeded" | "Failed")
}

pub fn is_deleting(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_some()
}

pub fn condition<'a>(p: &'a Pod, type_: &str) -> Option<&'a PodCondition> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

pub fn is_ready(p: &Pod) -> bool {
    condition(p, "Ready").is_some_and(|c| c.status == "True")
}

/// Ready for at least `min_ready_seconds` at `now` (what Deployments and
/// ReplicaSets call available). Returns also how long until it will be,
/// if it is ready but not yet for long enough.
pub fn availability(
    p: &Pod,
    min_ready_seconds: i32,
    now: jiff::Timestamp,
) -> (bool, Option<std::time::Duration>) {
    let Some(c) = condition(p, "Ready").filter(|c| c.status == "True") else {
        return (false, None);
    };
    if min_ready_seconds <= 0 {
        return (true, None);
    }
    let since = c.last_transition_time.as_ref().map(|t| t.0).unwrap_or(now);
    let ready_for = now.duration_since(since).as_secs_f64().max(0.0);
    let need = f64::from(min_ready_seconds);
    if ready_for >= need {
        (true, None)
    } else {
        (
            false,
            Some(std::time::Duration::from_secs_f64(need - ready_for + 0.05)),
        )
    }
}

/// What the pod asks of a node: per resource, the larger of the sum over
/// its containers and the largest init container, plus the pod overhead.
/// A limit without a request counts as the request, as the apiserver
/// defaults upstream.
pub fn requests(p: &Pod) -> Resources {
    let Some(spec) = &p.spec else {
        return Resources::new();
    };
    let of = |c: &k8s_openapi::api::core::v1::Container| -> Resources {
        let r = c.resources.as_ref();
        let mut m = quantity::from_map(r.and_then(|r| r.limits.as_ref()));
        m.extend(quantity::from_map(r.and_then(|r| r.requests.as_ref())));
        m
    };
    let mut sum = Resources::new();
    for c in &spec.containers {
        quantity::add(&mut sum, &of(c));
    }
    for c in spec.init_containers.iter().flatten() {
        for (k, v) in of(c) {
            let e = sum.entry(k).or_insert(0.0);
            if v > *e {
                *e = v;
            }
        }
    }
    quantity::add(&mut sum, &quantity::from_map(spec.overhead.as_ref()));
    sum
}

pub fn node_name(p: &Pod) -> Option<&str> {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}
