//! Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`).
//!
//! kubectl 1.32+ sends the objects of its typed commands as protobuf and
//! does not fall back to JSON when refused, so the server decodes them into
//! the same JSON the rest of it handles. Responses stay JSON: every client
//! that sends protobuf also accepts JSON.
//!
//! Which bodies arrive as protobuf (checked with kubectl 1.32 and 1.33):
//! `create namespace|configmap|deployment|service <type>|serviceaccount`,
//! `auth can-i` (SelfSubjectAccessReview, and SelfSubjectRulesReview for
//! `--list`), `auth whoami` (SelfSubjectReview), `debug node/…` and
//! `debug --copy-to` (Pod), and `drain`'s pod deletions (DeleteOptions).
//! `run`, `expose`, `create -f`, `replace`, `delete`, `scale` and the patch
//! commands send JSON.
//!
//! Wire form: `k8s\0` + `runtime.Unknown{typeMeta{apiVersion, kind}, raw}`,
//! `raw` being the object's message. The messages and the wire format are
//! those of the `k8s-pb` crate (prost bindings of the upstream `.proto`
//! files). What the `.proto` files do not say is how Go writes each field as
//! JSON; that is ours: [`ToJson`], implemented per message by the listings
//! in [`objects`] and [`pod`]. They cover the kinds above (for Pods the
//! fields `debug` sets and those a copied pod commonly has); a field they do
//! not list is not converted, like an unknown JSON field.
//!
//! Zeros: the Go types behind the messages are written by gogo-protobuf,
//! which always writes value fields and writes pointer fields only when set.
//! A value field that Go's JSON encoding leaves out when zero (`omitempty`)
//! is therefore dropped when zero (`omit` in the listings); any other field
//! (a pointer, or a value without `omitempty`) is kept as sent (`keep`).
//! Embedded Go structs (`json:",inline"`) are their own message on the wire
//! and have their fields merged into the parent (`inline`). A zero Time is
//! unset. The result is the JSON kubectl 1.30 sends for the same command
//! (`creationTimestamp: null` aside).

use std::collections::BTreeMap;

use base64::Engine;
use k8s_pb::apimachinery::pkg::api::resource::Quantity;
use k8s_pb::apimachinery::pkg::apis::meta::v1::Time;
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use k8s_pb::apimachinery::pkg::util::intstr::IntOrString;
use prost::Message;
use serde_json::{Value, json};

/// The k8s-pb modules the listings name their messages by.
mod pb {
    pub use k8s_pb::api::apps::v1 as apps;
    pub use k8s_pb::api::authentication::v1 as authn;
    pub use k8s_pb::api::authorization::v1 as authz;
    pub use k8s_pb::api::core::v1 as core;
    pub use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
}

/// The same modules of k8s-openapi, whose field names the tests check the
/// listings' JSON names against.
#[cfg(test)]
mod openapi {
    pub use k8s_openapi::api::apps::v1 as apps;
    pub use k8s_openapi::api::authentication::v1 as authn;
    pub use k8s_openapi::api::authorization::v1 as authz;
    pub use k8s_openapi::api::core::v1 as core;
    pub use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
}

/// The JSON form of a decoded protobuf value.
trait ToJson {
    /// `None` when the value is unset (left out of its object).
    fn to_json(&self) -> Result<Option<Value>, String>;

    /// The JSON names a message's object may have (tests).
    #[cfg(test)]
    fn json_names() -> Vec<String>
    where
        Self: Sized,
    {
        Vec::new()
    }
}

impl ToJson for String {
    fn to_json(&self) -> Result<Option<Value>, String> {
        Ok(Some(json!(self)))
    }
}

impl ToJson for bool {
    fn to_json(&self) -> Result<Option<Value>, String> {
        Ok(Some(json!(self)))
    }
}

impl ToJson for i32 {
    fn to_json(&self) -> Result<Option<Value>, String> {
        Ok(Some(json!(self)))
    }
}

impl ToJson for i64 {
    fn to_json(&self) -> Result<Option<Value>, String> {
        Ok(Some(json!(self)))
    }
}

/// `bytes`: base64 in JSON.
impl ToJson for Vec<u8> {
    fn to_json(&self) -> Result<Option<Value>, String> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(self);
        Ok(Some(json!(b64)))
    }
}

/// A field the message may lack (every non-repeated field: the `.proto`
/// files are proto2).
impl<T: ToJson> ToJson for Option<T> {
    fn to_json(&self) -> Result<Option<Value>, String> {
        match self {
            Some(v) => v.to_json(),
            None => Ok(None),
        }
    }
}

/// A repeated field: gogo-protobuf writes no empty list, so empty is unset.
impl<T: ToJson> ToJson for Vec<T> {
    fn to_json(&self) -> Result<Option<Value>, String> {
        if self.is_empty() {
            return Ok(None);
        }
        let items = self.iter().map(|v| Ok(v.to_json()?.unwrap_or(Value::Null)));
        Ok(Some(Value::Array(items.collect::<Result<_, String>>()?)))
    }
}

/// A map field; empty is unset, as for lists.
impl<T: ToJson> ToJson for BTreeMap<String, T> {
    fn to_json(&self) -> Result<Option<Value>, String> {
        if self.is_empty() {
            return Ok(None);
        }
        let entries = self
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_json()?.unwrap_or(Value::Null))));
        Ok(Some(Value::Object(entries.collect::<Result<_, String>>()?)))
    }
}

/// RFC 3339 (seconds); the zero time is unset.
impl ToJson for Time {
    fn to_json(&self) -> Result<Option<Value>, String> {
        let (secs, nanos) = (self.seconds.unwrap_or(0), self.nanos.unwrap_or(0));
        if secs == 0 && nanos == 0 {
            return Ok(None);
        }
        let ts = jiff::Timestamp::new(secs, 0).map_err(|e| e.to_string())?;
        Ok(Some(json!(ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())))
    }
}

/// The quantity's string.
impl ToJson for Quantity {
    fn to_json(&self) -> Result<Option<Value>, String> {
        Ok(Some(json!(self.string.as_deref().unwrap_or("0"))))
    }
}

/// A number, or a string for type 1.
impl ToJson for IntOrString {
    fn to_json(&self) -> Result<Option<Value>, String> {
        Ok(Some(if self.r#type == Some(1) {
            json!(self.str_val.as_deref().unwrap_or(""))
        } else {
            json!(self.int_val.unwrap_or(0))
        }))
    }
}

/// Go's zero of a JSON scalar.
fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_i64() == Some(0),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

/// `generate_name` → `generateName` (the rule behind most JSON names).
fn camel_case(rust: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in rust.trim_start_matches("r#").chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
fn inlined_names<T: ToJson>(_: &Option<T>) -> Vec<String> {
    T::json_names()
}

/// The JSON name of a listed field: the camelCase of its Rust name unless
/// the listing gives one.
macro_rules! json_name {
    ($field:ident) => {
        super::camel_case(stringify!($field))
    };
    ($field:ident $json:literal) => {
        String::from($json)
    };
}

/// One listed field into the object `$out`.
macro_rules! put_field {
    ($out:ident keep $value:expr, $name:expr) => {
        if let Some(v) = ToJson::to_json(&$value)? {
            $out.insert($name, v);
        }
    };
    ($out:ident omit $value:expr, $name:expr) => {
        if let Some(v) = ToJson::to_json(&$value)?
            && !super::is_zero(&v)
        {
            $out.insert($name, v);
        }
    };
    ($out:ident inline $value:expr, $name:expr) => {
        if let Some(Value::Object(m)) = ToJson::to_json(&$value)? {
            $out.extend(m);
        }
    };
}

/// The JSON names a listed field gives its object.
#[cfg(test)]
macro_rules! field_names {
    (inline $value:expr, $name:expr) => {
        super::inlined_names(&$value)
    };
    ($rule:ident $value:expr, $name:expr) => {{
        let _ = &$value;
        vec![$name]
    }};
}

/// The k8s-openapi field names of a listed message (none for the messages
/// only ever inlined, which k8s-openapi does not have).
#[cfg(test)]
macro_rules! openapi_fields {
    ($m:ident $name:ident) => {
        Some(super::tests::openapi_fields::<openapi::$m::$name>())
    };
    ($m:ident $name:ident as $openapi:ident) => {
        Some(super::tests::openapi_fields::<openapi::$m::$openapi>())
    };
    ($m:ident $name:ident inline) => {
        None
    };
}

/// [`ToJson`] for the listed messages: `module::Message (as GoName)?
/// ([inline])? { rule field (= "jsonName")?, … }`, `rule` being `keep`,
/// `omit` or `inline` (see the module's documentation); `as` gives the
/// upstream name where k8s-pb's differs, `[inline]` marks a message that is
/// only ever inlined. Also `checks()`, the listings for the tests.
macro_rules! messages {
    ($(
        $m:ident :: $name:ident $(as $openapi:ident)? $([$part:ident])? {
            $($rule:ident $field:ident $(= $json:literal)?),* $(,)?
        }
    )*) => {
        $(
            impl ToJson for pb::$m::$name {
                fn to_json(&self) -> Result<Option<Value>, String> {
                    let mut out = Map::new();
                    $(put_field!(out $rule self.$field, json_name!($field $($json)?));)*
                    Ok(Some(Value::Object(out)))
                }

                #[cfg(test)]
                fn json_names() -> Vec<String> {
                    let message = Self::default();
                    let mut names = Vec::new();
                    $(names.extend(field_names!(
                        $rule message.$field, json_name!($field $($json)?)
                    ));)*
                    names
                }
            }
        )*

        #[cfg(test)]
        pub(super) fn checks() -> Vec<super::tests::Check> {
            vec![$(super::tests::Check {
                message: stringify!($m::$name),
                names: <pb::$m::$name as ToJson>::json_names(),
                openapi: openapi_fields!($m $name $(as $openapi)? $($part)?),
            }),*]
        }
    };
}

mod objects;
mod pod;

type Decoder = fn(&[u8]) -> Result<Value, String>;

/// Decodes `raw` as a `T` and converts it.
fn object<T: Message + Default + ToJson>(raw: &[u8]) -> Result<Value, String> {
    let message = T::decode(raw).map_err(|e| e.to_string())?;
    Ok(message.to_json()?.unwrap_or_else(|| json!({})))
}

/// The message of each (apiVersion, kind) that may arrive as protobuf.
/// DeleteOptions is accepted under any apiVersion.
const KINDS: &[(&str, &str, Decoder)] = &[
    ("v1", "Namespace", object::<pb::core::Namespace>),
    ("v1", "ConfigMap", object::<pb::core::ConfigMap>),
    ("v1", "ServiceAccount", object::<pb::core::ServiceAccount>),
    ("v1", "Service", object::<pb::core::Service>),
    ("v1", "Pod", object::<pb::core::Pod>),
    ("apps/v1", "Deployment", object::<pb::apps::Deployment>),
    (
        "authorization.k8s.io/v1",
        "SelfSubjectAccessReview",
        object::<pb::authz::SelfSubjectAccessReview>,
    ),
    (
        "authorization.k8s.io/v1",
        "SelfSubjectRulesReview",
        object::<pb::authz::SelfSubjectRulesReview>,
    ),
    (
        "authentication.k8s.io/v1",
        "SelfSubjectReview",
        object::<pb::authn::SelfSubjectReview>,
    ),
];

const DELETE_OPTIONS: Decoder = object::<pb::meta::DeleteOptions>;

/// Decodes a `k8s\0`-framed protobuf body into the object's JSON form.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let rest = body
        .strip_prefix(b"k8s\0")
        .ok_or("not a Kubernetes protobuf body (missing the k8s\\0 prefix)")?;
    let envelope = Unknown::decode(rest).map_err(|e| e.to_string())?;
    if let Some(encoding) = envelope.content_encoding.filter(|e| !e.is_empty()) {
        return Err(format!("unsupported content encoding {encoding:?}"));
    }
    let type_meta = envelope.type_meta.unwrap_or_default();
    let api_version = type_meta.api_version.unwrap_or_default();
    let kind = type_meta.kind.unwrap_or_default();
    if kind.is_empty() {
        return Err("the protobuf envelope names no kind".into());
    }
    let decoder = if kind == "DeleteOptions" {
        DELETE_OPTIONS
    } else {
        KINDS
            .iter()
            .find(|(v, k, _)| *v == api_version && *k == kind)
            .map(|(_, _, d)| *d)
            .ok_or_else(|| {
                format!("{api_version} {kind} is not accepted as protobuf; send it as JSON")
            })?
    };
    let mut obj = decoder(envelope.raw.as_deref().unwrap_or_default())?;
    if let Value::Object(m) = &mut obj {
        m.insert("apiVersion".into(), json!(api_version));
        m.insert("kind".into(), json!(kind));
    }
    Ok(obj)
}

#[cfg(test)]
mod tests;
