//! Label selectors (`a=b,c!=d,e in (x,y),f notin (z),g,!h`) and field
//! selectors (`metadata.name=x,spec.nodeName!=`), parsed from query
//! parameters and matched against stored objects (JSON).

use super::resources::ResourceType;
use super::status::ApiError;
use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
    Gt(String, i64),
    Lt(String, i64),
}

/// A parsed label selector; empty matches everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector {
    reqs: Vec<LabelReq>,
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut p = Parser {
            s: s.as_bytes(),
            i: 0,
        };
        let mut reqs = Vec::new();
        p.ws();
        if p.eof() {
            return Ok(LabelSelector { reqs });
        }
        loop {
            reqs.push(p.requirement().map_err(|e| {
                ApiError::bad_request(format!(
                    "unable to parse requirement: {e} (in label selector {s:?})"
                ))
            })?);
            p.ws();
            if p.eof() {
                break;
            }
            if !p.eat(b',') {
                return Err(ApiError::bad_request(format!(
                    "unable to parse label selector {s:?}: expected ',' at position {}",
                    p.i
                )));
            }
            p.ws();
        }
        Ok(LabelSelector { reqs })
    }

    /// Matches an object's `metadata.labels`.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.reqs.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::Gt(k, n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x > *n),
            LabelReq::Lt(k, n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x < *n),
        })
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn eof(&self) -> bool {
        self.i >= self.s.len()
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn ws(&mut self) {
        while self.peek().is_some_and(|c| c == b' ' || c == b'\t') {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn eat_str(&mut self, t: &str) -> bool {
        if self.s[self.i..].starts_with(t.as_bytes()) {
            self.i += t.len();
            true
        } else {
            false
        }
    }
    /// A key or value: label characters plus `/` for prefixed keys.
    fn word(&mut self) -> String {
        let start = self.i;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'/'))
        {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }
    fn set(&mut self) -> Result<Vec<String>, String> {
        self.ws();
        if !self.eat(b'(') {
            return Err("expected '('".into());
        }
        let mut out = Vec::new();
        loop {
            self.ws();
            let w = self.word();
            self.ws();
            if !w.is_empty() {
                out.push(w);
            }
            if self.eat(b')') {
                break;
            }
            if !self.eat(b',') {
                return Err("expected ',' or ')' in set".into());
            }
        }
        Ok(out)
    }
    fn requirement(&mut self) -> Result<LabelReq, String> {
        if self.eat(b'!') {
            self.ws();
            let k = self.word();
            if k.is_empty() {
                return Err("expected a key after '!'".into());
            }
            return Ok(LabelReq::NotExists(k));
        }
        let k = self.word();
        if k.is_empty() {
            return Err(format!("expected a key at position {}", self.i));
        }
        self.ws();
        if self.eof() || self.peek() == Some(b',') {
            return Ok(LabelReq::Exists(k));
        }
        if self.eat_str("==") || self.eat(b'=') {
            self.ws();
            return Ok(LabelReq::Eq(k, self.word()));
        }
        if self.eat_str("!=") {
            self.ws();
            return Ok(LabelReq::NotEq(k, self.word()));
        }
        if self.eat(b'>') || self.eat(b'<') {
            let gt = self.s[self.i - 1] == b'>';
            self.ws();
            let w = self.word();
            let n: i64 = w.parse().map_err(|_| format!("{w:?} is not an integer"))?;
            return Ok(if gt {
                LabelReq::Gt(k, n)
            } else {
                LabelReq::Lt(k, n)
            });
        }
        if self.eat_str("notin") {
            return Ok(LabelReq::NotIn(k, self.set()?));
        }
        if self.eat_str("in") {
            return Ok(LabelReq::In(k, self.set()?));
        }
        Err(format!("unexpected character at position {}", self.i))
    }
}

/// A parsed field selector: `label=value` / `label==value` / `label!=value`
/// terms, all of which must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector {
    terms: Vec<(String, bool, String)>,
}

impl FieldSelector {
    pub fn parse(s: &str, rt: &ResourceType) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (label, eq, value) = if let Some((l, v)) = part.split_once("!=") {
                (l, false, v)
            } else if let Some((l, v)) = part.split_once("==") {
                (l, true, v)
            } else if let Some((l, v)) = part.split_once('=') {
                (l, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector {s:?}: {part:?} is not label=value"
                )));
            };
            let label = label.trim();
            if !rt.supports_field_label(label) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {label}"
                )));
            }
            terms.push((label.to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector { terms })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.terms
            .iter()
            .all(|(label, eq, want)| (field_value(obj, label) == *want) == *eq)
    }
}

/// The string form of a field, "" when absent (as the real apiserver's
/// field sets do).
fn field_value(obj: &Value, label: &str) -> String {
    // `source` on events is `source.component`.
    let path = if label == "source" {
        "source.component"
    } else {
        label
    };
    let mut cur = obj;
    for seg in path.split('.') {
        match cur.get(seg) {
            Some(v) => cur = v,
            None => {
                return match label {
                    "spec.hostNetwork" | "spec.unschedulable" => "false".into(),
                    _ => String::new(),
                };
            }
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({ "metadata": { "name": "a", "namespace": "ns", "labels": labels }, "spec": { "nodeName": "n1" }, "status": { "phase": "Running" } })
    }

    #[test]
    fn label_selectors() {
        let o = obj(json!({ "app": "web", "tier": "fe", "n": "5" }));
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app=web,tier=be", false),
            ("app in (web, db)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("missing!=x", true),
            ("n>4", true),
            ("n<4", false),
            ("  app = web , tier in (fe)", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&o),
                want,
                "{sel}"
            );
        }
        assert!(LabelSelector::parse("app=web,").is_err());
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("=x").is_err());
    }

    #[test]
    fn field_selectors() {
        let pods = super::super::resources::lookup("", "v1", "pods").unwrap();
        let o = obj(json!({}));
        for (sel, want) in [
            ("metadata.name=a", true),
            ("metadata.name!=a", false),
            ("metadata.namespace=ns,spec.nodeName=n1", true),
            ("status.phase=Pending", false),
            ("spec.nodeName!=", true),
        ] {
            assert_eq!(
                FieldSelector::parse(sel, pods).unwrap().matches(&o),
                want,
                "{sel}"
            );
        }
        assert!(FieldSelector::parse("spec.foo=x", pods).is_err());
    }
}
