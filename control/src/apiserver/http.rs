//! HTTP plumbing shared by the handlers: body types, query parameters,
//! content negotiation (JSON, YAML, Table, PartialObjectMetadata) and
//! request-body decoding with a size limit.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use super::status::{ApiError, ApiResult};
use super::table::IncludeObject;

pub type Body = BoxBody<Bytes, Infallible>;

/// Largest accepted request body (the real apiserver's limit for writes).
pub const MAX_BODY: usize = 3 * 1024 * 1024;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// A streaming body fed by a channel (watch responses): each item is sent
/// as its own chunk as soon as it is produced.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

pub fn text(code: u16, s: &str) -> Response<Body> {
    let mut r = Response::new(full(s.to_string()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// How to encode a response body.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Output {
    Json,
    Yaml,
    Protobuf,
    /// `as=Table` with the meta.k8s.io version asked for.
    Table(&'static str),
    /// `as=PartialObjectMetadata` / `PartialObjectMetadataList`.
    PartialMeta(&'static str),
}

/// Picks the first media range of `Accept` this server can produce.
pub fn negotiate(accept: Option<&str>, allow_protobuf: bool) -> ApiResult<Output> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Ok(Output::Json);
    };
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let mime = parts.next().unwrap_or_default().to_ascii_lowercase();
        let params: HashMap<String, String> = parts
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| {
                (
                    k.trim().to_ascii_lowercase(),
                    v.trim().trim_matches('"').to_string(),
                )
            })
            .collect();
        let json_like = matches!(mime.as_str(), "application/json" | "*/*" | "application/*");
        if let Some(as_) = params.get("as") {
            if mime != "application/json"
                || params.get("g").map(String::as_str) != Some("meta.k8s.io")
            {
                continue;
            }
            let version = match params.get("v").map(String::as_str) {
                Some("v1") => "v1",
                Some("v1beta1") => "v1beta1",
                _ => continue,
            };
            match as_.as_str() {
                "Table" => return Ok(Output::Table(version)),
                "PartialObjectMetadata" | "PartialObjectMetadataList" => {
                    return Ok(Output::PartialMeta(version));
                }
                _ => continue,
            }
        }
        if json_like {
            return Ok(Output::Json);
        }
        if mime == "application/yaml" {
            return Ok(Output::Yaml);
        }
        if allow_protobuf && mime.starts_with("application/com.github.proto-openapi.spec.v2") {
            // The OpenAPI v2 document (the only protobuf this server speaks).
            return Ok(Output::Protobuf);
        }
    }
    Err(ApiError::not_acceptable(
        "only the following media types are accepted: application/json, application/yaml, application/json;as=Table;v=v1;g=meta.k8s.io",
    ))
}

pub fn encode(code: u16, v: &Value, out: Output, warnings: &[String]) -> Response<Body> {
    let (bytes, ctype) = match out {
        Output::Yaml => (
            serde_saphyr::to_string(v).unwrap_or_default().into_bytes(),
            "application/yaml",
        ),
        _ => (
            serde_json::to_vec(v).unwrap_or_default(),
            "application/json",
        ),
    };
    let mut r = Response::new(full(bytes));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    for w in warnings {
        // RFC 7234 warning, as the real apiserver sends them.
        let msg = format!("299 - {}", serde_json::to_string(w).unwrap_or_default());
        if let Ok(h) = HeaderValue::from_str(&msg) {
            r.headers_mut().append(header::WARNING, h);
        }
    }
    r
}

pub fn error(e: &ApiError) -> Response<Body> {
    encode(e.code, &e.to_status(), Output::Json, &[])
}

/// Query parameters (last value wins).
#[derive(Clone, Debug, Default)]
pub struct Query(HashMap<String, String>);

impl Query {
    pub fn parse(q: Option<&str>) -> Self {
        Query(
            form_urlencoded::parse(q.unwrap_or_default().as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    /// A boolean query parameter as Kubernetes reads one: absent, `0` or
    /// `false` (any case) is false, any other value — `true`, `True` (what
    /// the Python client sends), `1`, even empty — is true.
    pub fn flag(&self, k: &str) -> bool {
        self.bool(k).unwrap_or(false)
    }

    /// [`Query::flag`] for a parameter whose absence means something of its
    /// own (`sendInitialEvents`): None when absent.
    pub fn bool(&self, k: &str) -> Option<bool> {
        self.get(k)
            .map(|v| !(v == "0" || v.eq_ignore_ascii_case("false")))
    }

    pub fn set(&mut self, k: &str, v: &str) {
        self.0.insert(k.to_string(), v.to_string());
    }

    pub fn int(&self, k: &str) -> ApiResult<Option<i64>> {
        match self.get(k) {
            None | Some("") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ApiError::bad_request(format!("invalid value for {k}: {v:?} is not an integer"))
            }),
        }
    }

    pub fn include_object(&self) -> ApiResult<IncludeObject> {
        match self.get("includeObject") {
            None | Some("") | Some("Metadata") => Ok(IncludeObject::Metadata),
            Some("None") => Ok(IncludeObject::None),
            Some("Object") => Ok(IncludeObject::Object),
            Some(other) => Err(ApiError::bad_request(format!(
                "includeObject: unsupported value {other:?}: supported values: \"None\", \"Metadata\", \"Object\""
            ))),
        }
    }

    pub fn dry_run(&self) -> ApiResult<bool> {
        match self.get("dryRun") {
            None | Some("") => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "dryRun: unsupported value {other:?}: supported values: \"All\""
            ))),
        }
    }

    /// `fieldValidation=Strict` turns unknown fields into errors.
    pub fn strict_fields(&self) -> ApiResult<bool> {
        match self.get("fieldValidation") {
            None | Some("") | Some("Warn") | Some("Ignore") => Ok(false),
            Some("Strict") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation: unsupported value {other:?}: supported values: \"Ignore\", \"Warn\", \"Strict\""
            ))),
        }
    }
}

/// Past the limit, a body is still read (and dropped) up to this size, so
/// that the client, still sending, gets to see the 413 rather than a reset
/// connection; beyond it the connection is dropped.
const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;

/// Reads the whole body, at most [`MAX_BODY`] bytes (413 beyond).
pub async fn read_body<B>(headers: &HeaderMap, body: B) -> ApiResult<Bytes>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > DRAIN_LIMIT) {
        return Err(ApiError::too_large(MAX_BODY));
    }
    let mut buf = bytes::BytesMut::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            if total > DRAIN_LIMIT {
                return Err(ApiError::too_large(MAX_BODY));
            }
            if total <= MAX_BODY as u64 {
                buf.extend_from_slice(&data);
            }
        }
    }
    if total > MAX_BODY as u64 {
        return Err(ApiError::too_large(MAX_BODY));
    }
    Ok(buf.freeze())
}

/// Reads YAML with YAML 1.2 booleans: only `true`/`false` are
/// booleans, so `yes` and `on` stay strings in a JSON value.
pub fn yaml_from_slice(body: &[u8]) -> Result<Value, serde_saphyr::Error> {
    serde_saphyr::from_slice_with_options(body, serde_saphyr::options! { strict_booleans: true })
}

/// Decodes a request body as JSON or YAML per its Content-Type.
pub fn decode_body(headers: &HeaderMap, body: &[u8]) -> ApiResult<Value> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let mime = ctype
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    let v: Value = match mime.as_str() {
        "application/json"
        | ""
        | "*/*"
        | "application/merge-patch+json"
        | "application/json-patch+json"
        | "application/strategic-merge-patch+json" => {
            serde_json::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!("the request body is not valid JSON: {e}"))
            })?
        }
        "application/yaml" | "application/apply-patch+yaml" => {
            yaml_from_slice(body).map_err(|e| {
                ApiError::bad_request(format!("the request body is not valid YAML: {e}"))
            })?
        }
        "application/vnd.kubernetes.protobuf" => super::protobuf::decode(body).map_err(|e| {
            ApiError::bad_request(format!(
                "the request body is not a valid protobuf object: {e}"
            ))
        })?,
        other => {
            return Err(ApiError::unsupported_media_type(format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf (got {other})"
            )));
        }
    };
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers() {
        assert_eq!(negotiate(None, false).unwrap(), Output::Json);
        assert_eq!(
            negotiate(Some("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"), false).unwrap(),
            Output::Table("v1")
        );
        assert_eq!(
            negotiate(Some("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"), false).unwrap(),
            Output::Json
        );
        assert_eq!(
            negotiate(Some("application/yaml"), false).unwrap(),
            Output::Yaml
        );
        assert_eq!(negotiate(Some("*/*"), false).unwrap(), Output::Json);
        assert!(negotiate(Some("text/html"), false).is_err());
    }

    #[test]
    fn yaml_round_trips_what_json_holds() {
        use serde_json::json;
        let v = json!({
            "s": ["true", "yes", "on", "80", "0x1F", "1e3", "", "~", "null", " x", "#x", "a: b", "- a", "multi\nline\n"],
            "n": [1, -3, 2.5, 0, 1e300, true, false, null],
            "nested": {"a": [{"b": {}}, []], "c": {}},
        });
        let yaml = serde_saphyr::to_string(&v).unwrap();
        assert_eq!(yaml_from_slice(yaml.as_bytes()).unwrap(), v, "{yaml}");
        // `08` is not a YAML 1.2 integer (no leading zeros without a radix
        // prefix); it reads as the float 8, as go-yaml v2 (kubectl's and the
        // real apiserver's reader) reads it after its octal parse fails.
        let plain = "a: yes\nb: on\nc: 1.0\nd: 08\ne: 8\n";
        assert_eq!(
            yaml_from_slice(plain.as_bytes()).unwrap(),
            json!({"a": "yes", "b": "on", "c": 1.0, "d": 8.0, "e": 8}),
        );
    }

    #[test]
    fn query() {
        let q = Query::parse(Some("labelSelector=app%3Dweb&watch=1&limit=5"));
        assert_eq!(q.get("labelSelector"), Some("app=web"));
        assert!(q.flag("watch"));
        assert_eq!(q.int("limit").unwrap(), Some(5));
        for (v, want) in [
            ("true", true),
            ("True", true),
            ("TRUE", true),
            ("1", true),
            ("", true),
            ("yes", true),
            ("false", false),
            ("False", false),
            ("0", false),
        ] {
            let q = Query::parse(Some(&format!("watch={v}")));
            assert_eq!(q.flag("watch"), want, "watch={v}");
            assert_eq!(q.bool("watch"), Some(want), "watch={v}");
        }
        assert!(!Query::parse(Some("limit=1")).flag("watch"));
        assert_eq!(Query::parse(Some("limit=1")).bool("watch"), None);
        assert!(Query::parse(Some("limit=x")).int("limit").is_err());
    }
}
