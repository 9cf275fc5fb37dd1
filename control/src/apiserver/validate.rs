//! Decoding, defaulting and validation of incoming objects: what every
//! kind shares (the per-kind rules are in `registry/<kind>.rs`).
//!
//! Every object a client writes goes through [`normalize`]: it is decoded
//! into its `k8s-openapi` type (so a wrong type anywhere is a 400 naming the
//! field, and unknown fields fall away as in the real apiserver), defaulted
//! like the upstream `SetDefaults_*` functions for the fields clients rely
//! on, validated (422 listing every bad field) and encoded back to JSON —
//! the form that is stored.

use std::net::IpAddr;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::resources::ResourceType;
use super::status::{ApiError, ApiResult, FieldError};

/// An object ready to store, and the warnings to send back.
pub struct Normalized {
    pub object: Value,
    /// Paths of fields the type does not have (dropped).
    pub unknown_fields: Vec<String>,
}

pub const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];

/// Decodes, defaults and validates `input` (a full object, metadata already
/// filled in by the handler). `old` is the stored object on updates.
pub fn normalize(rt: &ResourceType, input: &Value, old: Option<&Value>) -> ApiResult<Normalized> {
    let mut input = input.clone();
    stringify_quantities(&mut input, false);
    let name = input
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut errs = validate_meta(rt, &input);
    let (object, kind_errs) = rt.strategy.normalize(rt, &input, old)?;
    errs.extend(kind_errs);
    if !errs.is_empty() {
        return Err(ApiError::invalid(rt.group, rt.kind, &name, &errs));
    }
    let mut unknown_fields = Vec::new();
    unknown(&input, &object, "", &mut unknown_fields);
    Ok(Normalized {
        object,
        unknown_fields,
    })
}

/// Decodes into `T`, naming the field on error: a missing required field
/// is a 422 `Required value`, anything else (wrong type, bad enum…) a 400.
pub fn decode<T: DeserializeOwned>(rt: &ResourceType, input: &Value) -> ApiResult<T> {
    serde_path_to_error::deserialize::<_, T>(input).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        if let Some(field) = inner
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            let full = if path == "." || path.is_empty() {
                field.to_string()
            } else {
                format!("{path}.{field}")
            };
            let name = input
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            return ApiError::invalid(rt.group, rt.kind, name, &[FieldError::required(full, "")]);
        }
        let path = if path == "." {
            String::new()
        } else {
            format!("{path}: ")
        };
        ApiError::bad_request(format!("{} in body is invalid: {path}{inner}", rt.kind))
    })
}

pub fn typed<T: DeserializeOwned + Serialize>(
    rt: &ResourceType,
    input: &Value,
    old: Option<&Value>,
    default: fn(&mut T),
    validate: fn(&T, Option<&T>) -> Vec<FieldError>,
) -> ApiResult<(Value, Vec<FieldError>)> {
    let mut t: T = decode(rt, input)?;
    default(&mut t);
    let old_t: Option<T> = old.and_then(|o| serde_json::from_value(o.clone()).ok());
    let errs = validate(&t, old_t.as_ref());
    let v = serde_json::to_value(&t).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((v, errs))
}

/// YAML/JSON writers often give quantities as numbers (`cpu: 1`); the API
/// accepts that, `k8s-openapi`'s `Quantity` wants a string.
pub fn stringify_quantities(v: &mut Value, in_quantity_map: bool) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if in_quantity_map && x.is_number() {
                    *x = Value::String(x.to_string());
                } else {
                    let q = matches!(
                        k.as_str(),
                        "limits"
                            | "requests"
                            | "capacity"
                            | "allocatable"
                            | "overhead"
                            | "hard"
                            | "used"
                    );
                    stringify_quantities(x, q);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| stringify_quantities(x, false)),
        _ => {}
    }
}

/// Paths present (and not null) in `input` but absent from the decoded form.
pub fn unknown(input: &Value, out: &Value, path: &str, acc: &mut Vec<String>) {
    match (input, out) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, v) in i {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match o.get(k) {
                    Some(ov) => unknown(v, ov, &p, acc),
                    None if v.is_null() => {}
                    None => acc.push(p),
                }
            }
        }
        (Value::Array(i), Value::Array(o)) if i.len() == o.len() => {
            for (n, (a, b)) in i.iter().zip(o).enumerate() {
                unknown(a, b, &format!("{path}[{n}]"), acc);
            }
        }
        _ => {}
    }
}

pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

pub fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters.
pub fn is_label_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// A label or annotation key: `[prefix/]name`.
pub fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_label_name_part(name),
        None => is_label_name_part(s),
    }
}

pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name_part(s)
}

/// IANA service name (named ports).
pub fn is_iana_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && s.bytes().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

pub fn is_env_var_name(s: &str) -> bool {
    !s.is_empty() && !s.contains('=') && s.bytes().all(|c| (0x20..0x7f).contains(&c))
}

pub fn is_config_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1035_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";
const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

/// Object names most kinds accept (`Strategy::check_name`'s default).
pub fn subdomain_name(name: &str) -> Result<(), &'static str> {
    if is_dns1123_subdomain(name) {
        Ok(())
    } else {
        Err(SUBDOMAIN_MSG)
    }
}

pub fn label_name(name: &str) -> Result<(), &'static str> {
    if is_dns1123_label(name) {
        Ok(())
    } else {
        Err(LABEL_MSG)
    }
}

pub fn dns1035_name(name: &str) -> Result<(), &'static str> {
    if is_dns1035_label(name) {
        Ok(())
    } else {
        Err(DNS1035_MSG)
    }
}

pub fn check_labels(
    map: Option<&serde_json::Map<String, Value>>,
    path: &str,
    errs: &mut Vec<FieldError>,
) {
    let Some(map) = map else { return };
    for (k, v) in map {
        if !is_qualified_name(k) {
            errs.push(FieldError::invalid(
                path,
                k.as_str(),
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            ));
        }
        match v.as_str() {
            Some(s) if is_label_value(s) => {}
            _ => errs.push(FieldError::invalid(
                path,
                v.clone(),
                "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            )),
        }
    }
}

/// The metadata rules shared by every kind.
pub fn validate_meta(rt: &ResourceType, obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let meta = obj.get("metadata").cloned().unwrap_or(json!({}));
    match meta.get("name").and_then(Value::as_str) {
        None | Some("") => errs.push(FieldError::required(
            "metadata.name",
            "name or generateName is required",
        )),
        Some(name) => {
            if let Err(why) = rt.strategy.check_name(name) {
                errs.push(FieldError::invalid("metadata.name", name, why));
            }
        }
    }
    if rt.namespaced {
        if meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .is_empty()
        {
            errs.push(FieldError::required("metadata.namespace", ""));
        }
    } else if meta
        .get("namespace")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
    {
        errs.push(FieldError::forbidden(
            "metadata.namespace",
            "not allowed on this type",
        ));
    }
    check_labels(
        meta.get("labels").and_then(Value::as_object),
        "metadata.labels",
        &mut errs,
    );
    if let Some(ann) = meta.get("annotations").and_then(Value::as_object) {
        let mut total = 0;
        for (k, v) in ann {
            total += k.len() + v.as_str().map_or(0, str::len);
            if !is_qualified_name(&k.to_ascii_lowercase()) {
                errs.push(FieldError::invalid(
                    "metadata.annotations",
                    k.as_str(),
                    "name part must consist of alphanumeric characters, '-', '_' or '.'",
                ));
            }
        }
        if total > 256 * 1024 {
            errs.push(FieldError::invalid(
                "metadata.annotations",
                "",
                "Too long: must have at most 262144 bytes",
            ));
        }
    }
    errs
}

pub fn check_enum(v: Option<&str>, path: &str, allowed: &[&str], errs: &mut Vec<FieldError>) {
    if let Some(v) = v
        && !allowed.contains(&v)
    {
        errs.push(FieldError::not_supported(path, v, allowed));
    }
}

pub fn check_protocol(p: Option<&str>, path: &str, errs: &mut Vec<FieldError>) {
    check_enum(p, path, PROTOCOLS, errs);
}

pub fn check_ip(ip: &str, path: &str, errs: &mut Vec<FieldError>) -> Option<IpAddr> {
    match ip.parse::<IpAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errs.push(FieldError::invalid(
                path,
                ip,
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            ));
            None
        }
    }
}

/// Endpoint addresses may not be loopback, link-local or multicast.
pub fn check_endpoint_ip(ip: &str, path: &str, errs: &mut Vec<FieldError>) {
    if let Some(a) = check_ip(ip, path, errs) {
        let special = match a {
            IpAddr::V4(v4) => {
                v4.is_loopback() || v4.is_link_local() || v4.is_multicast() || v4.is_unspecified()
            }
            IpAddr::V6(v6) => {
                v6.is_loopback()
                    || v6.is_multicast()
                    || v6.is_unspecified()
                    || (v6.segments()[0] & 0xffc0) == 0xfe80
            }
        };
        if special {
            errs.push(FieldError::invalid(
                path,
                ip,
                "may not be unspecified, loopback, link-local or multicast",
            ));
        }
    }
}

/// For tests: normalizes a new `plural` object of API group `group` (v1).
#[cfg(test)]
pub(crate) fn norm(plural: &str, group: &str, v: Value) -> ApiResult<Normalized> {
    normalize(
        super::resources::lookup(group, "v1", plural).unwrap(),
        &v,
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_syntax() {
        assert!(is_dns1123_label("a-1"));
        assert!(!is_dns1123_label("A"));
        assert!(!is_dns1123_label("-a"));
        assert!(is_dns1123_subdomain("a.b-c"));
        assert!(!is_dns1035_label("1a"));
        assert!(is_qualified_name("app.kubernetes.io/name"));
        assert!(!is_qualified_name("a/b/c"));
        assert!(is_label_value(""));
        assert!(!is_label_value("-x"));
        assert!(is_iana_svc_name("http"));
        assert!(!is_iana_svc_name("80"));
    }
}
