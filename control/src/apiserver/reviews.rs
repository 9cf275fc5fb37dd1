//! Self-reviews (`kubectl auth can-i`, `kubectl auth whoami`): there is one
//! user, the admin, who may do everything. Nothing is stored; the review
//! comes back with its status filled in, as upstream.

use serde_json::{Value, json};

use super::status::{ApiError, ApiResult};

/// Groups served only for reviews: (group, version, [(plural, kind)]).
/// (plural, kind) of each review resource.
type Reviews = &'static [(&'static str, &'static str)];

pub const REVIEW_GROUPS: &[(&str, &str, Reviews)] = &[
    (
        "authentication.k8s.io",
        "v1",
        &[("selfsubjectreviews", "SelfSubjectReview")],
    ),
    (
        "authorization.k8s.io",
        "v1",
        &[
            ("selfsubjectaccessreviews", "SelfSubjectAccessReview"),
            ("selfsubjectrulesreviews", "SelfSubjectRulesReview"),
        ],
    ),
];

pub fn is_review(group: &str, version: &str, plural: &str) -> bool {
    REVIEW_GROUPS
        .iter()
        .any(|(g, v, rs)| *g == group && *v == version && rs.iter().any(|(p, _)| *p == plural))
}

/// Answers a POSTed review.
pub fn answer(group: &str, plural: &str, mut body: Value) -> ApiResult<Value> {
    let (_, version, kinds) = REVIEW_GROUPS
        .iter()
        .find(|(g, _, _)| *g == group)
        .ok_or_else(ApiError::no_route)?;
    let kind = kinds
        .iter()
        .find(|(p, _)| *p == plural)
        .map(|(_, k)| *k)
        .ok_or_else(ApiError::no_route)?;
    let Some(m) = body.as_object_mut() else {
        return Err(ApiError::bad_request(format!(
            "the request body must be a {kind}"
        )));
    };
    if m.get("kind")
        .and_then(Value::as_str)
        .is_some_and(|k| k != kind)
    {
        return Err(ApiError::bad_request(format!(
            "the kind in the data does not match {kind}"
        )));
    }
    m.insert("apiVersion".into(), json!(format!("{group}/{version}")));
    m.insert("kind".into(), json!(kind));
    m.entry("metadata").or_insert(json!({}));
    let status = match kind {
        "SelfSubjectReview" => json!({
            "userInfo": { "username": "admin", "groups": ["system:masters", "system:authenticated"] }
        }),
        "SelfSubjectAccessReview" => json!({
            "allowed": true,
            "reason": "kcontrol: the admin user may do everything",
        }),
        _ => json!({
            "resourceRules": [{ "verbs": ["*"], "apiGroups": ["*"], "resources": ["*"] }],
            "nonResourceRules": [{ "verbs": ["*"], "nonResourceURLs": ["*"] }],
            "incomplete": false,
        }),
    };
    m.insert("status".into(), status);
    Ok(body)
}

/// Discovery entries of a review group version.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let (g, v, kinds) = REVIEW_GROUPS
        .iter()
        .find(|(g, v, _)| *g == group && *v == version)?;
    let resources: Vec<Value> = kinds
        .iter()
        .map(|(plural, kind)| {
            json!({ "name": plural, "singularName": "", "namespaced": false, "kind": kind, "verbs": ["create"] })
        })
        .collect();
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{g}/{v}"),
        "resources": resources,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reviews_allow_everything() {
        let r = answer(
            "authorization.k8s.io",
            "selfsubjectaccessreviews",
            json!({"spec": {"resourceAttributes": {"verb": "create", "resource": "pods"}}}),
        )
        .unwrap();
        assert_eq!(r["status"]["allowed"], true);
        assert_eq!(r["kind"], "SelfSubjectAccessReview");
        let w = answer("authentication.k8s.io", "selfsubjectreviews", json!({})).unwrap();
        assert_eq!(w["status"]["userInfo"]["username"], "admin");
        assert!(answer("authorization.k8s.io", "nope", json!({})).is_err());
        assert!(is_review(
            "authorization.k8s.io",
            "v1",
            "selfsubjectrulesreviews"
        ));
        assert!(resource_list("authentication.k8s.io", "v1").is_some());
    }
}
