//! The decoder's tests: real kubectl bodies, and the listings against k8s-openapi.

use super::*;

/// A listed message: its JSON names and, but for the messages only ever
/// inlined, the field names of its k8s-openapi type.
pub(crate) struct Check {
    pub message: &'static str,
    pub names: Vec<String>,
    pub openapi: Option<&'static [&'static str]>,
}

/// The field names `T`'s Deserialize implementation gives
/// `deserialize_struct` (a deserializer that only collects them).
pub(crate) fn openapi_fields<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    #[derive(Debug)]
    struct Fields(&'static [&'static str]);
    impl std::fmt::Display for Fields {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }
    impl std::error::Error for Fields {}
    impl serde::de::Error for Fields {
        fn custom<T: std::fmt::Display>(_: T) -> Self {
            Fields(&[])
        }
    }
    struct Collect;
    impl<'de> serde::Deserializer<'de> for Collect {
        type Error = Fields;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Fields> {
            Err(Fields(&[]))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Fields> {
            Err(Fields(fields))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    match T::deserialize(Collect) {
        Err(Fields(fields)) => fields,
        Ok(_) => unreachable!("the collector deserializes nothing"),
    }
}

fn key(n: u64, wt: u64) -> Vec<u8> {
    let mut v = Vec::new();
    let mut k = (n << 3) | wt;
    loop {
        let b = (k & 0x7f) as u8;
        k >>= 7;
        if k == 0 {
            v.push(b);
            break;
        }
        v.push(b | 0x80);
    }
    v
}

fn bytes(n: u64, b: &[u8]) -> Vec<u8> {
    let mut v = key(n, 2);
    v.push(b.len() as u8);
    v.extend_from_slice(b);
    v
}

fn varint_field(n: u64, x: u8) -> Vec<u8> {
    let mut v = key(n, 0);
    v.push(x);
    v
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// What the server keeps of a JSON body: `null` is the same as unset.
fn without_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(without_nulls).collect()),
        v => v,
    }
}

/// What replaced the hand-kept table's consistency check: every JSON
/// name of every listed message (inlined messages' names included) is a
/// field of the k8s-openapi type of the same name, and none is twice.
#[test]
fn listings_match_kubernetes() {
    let mut checks = objects::checks();
    checks.extend(pod::checks());
    let mut messages = std::collections::HashSet::new();
    for c in &checks {
        assert!(messages.insert(c.message), "{} listed twice", c.message);
        let mut names = std::collections::HashSet::new();
        for n in &c.names {
            assert!(names.insert(n), "{}: {n} twice", c.message);
            if let Some(known) = c.openapi {
                assert!(!known.is_empty(), "{}: no k8s-openapi fields", c.message);
                assert!(
                    known.contains(&n.as_str()),
                    "{}: {n} is not in {known:?}",
                    c.message
                );
            }
        }
    }
    assert!(checks.len() > 100, "{}", checks.len());
}

fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
    let mut tm = bytes(1, api_version.as_bytes());
    tm.extend(bytes(2, kind.as_bytes()));
    let mut body = b"k8s\0".to_vec();
    body.extend(bytes(1, &tm));
    body.extend(bytes(2, raw));
    body
}

#[test]
fn every_kind_decodes_an_empty_message() {
    let kinds = KINDS.iter().map(|(v, k, _)| (*v, *k));
    for (v, k) in kinds.chain([("v1", "DeleteOptions"), ("meta.k8s.io/v1", "DeleteOptions")]) {
        let want = json!({"apiVersion": v, "kind": k});
        assert_eq!(decode(&envelope(v, k, &[])).unwrap(), want, "{v} {k}");
    }
    assert!(decode(&envelope("v1", "Deployment", &[])).is_err());
}

/// Value fields without `omitempty` and pointers keep their zero;
/// `omitempty` fields drop it; inlined messages merge.
#[test]
fn zeros_and_inlining() {
    let deployment = pb::apps::Deployment {
        spec: Some(pb::apps::DeploymentSpec {
            replicas: Some(0),
            min_ready_seconds: Some(0),
            paused: Some(false),
            revision_history_limit: Some(0),
            template: Some(pb::core::PodTemplateSpec {
                spec: Some(pb::core::PodSpec {
                    containers: vec![pb::core::Container {
                        name: Some("c".into()),
                        image: Some(String::new()),
                        stdin: Some(false),
                        liveness_probe: Some(pb::core::Probe {
                            handler: Some(pb::core::ProbeHandler {
                                exec: Some(pb::core::ExecAction {
                                    command: vec!["true".into()],
                                }),
                                ..Default::default()
                            }),
                            period_seconds: Some(0),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let body = envelope("apps/v1", "Deployment", &deployment.encode_to_vec());
    assert_eq!(
        decode(&body).unwrap(),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {
            "replicas": 0, "revisionHistoryLimit": 0,
            "template": {"spec": {"containers": [{"name": "c",
                "livenessProbe": {"exec": {"command": ["true"]}}}]}}}})
    );
}

#[test]
fn decodes_a_configmap() {
    // ConfigMap{metadata{name "cm", namespace "", labels{a: b}}, data{k: v}}
    let mut label = bytes(1, b"a");
    label.extend(bytes(2, b"b"));
    let mut meta = bytes(1, b"cm");
    meta.extend(bytes(3, b""));
    meta.extend(bytes(11, &label));
    meta.extend(bytes(8, &[])); // zero Time
    meta.extend(bytes(99, b"?")); // unknown: skipped
    let mut entry = bytes(1, b"k");
    entry.extend(bytes(2, b"v"));
    let mut cm = bytes(1, &meta);
    cm.extend(bytes(2, &entry));
    cm.extend(bytes(2, &bytes(1, b"empty"))); // no value: ""
    cm.extend(bytes(3, &[bytes(1, b"bin"), bytes(2, &[0, 255])].concat()));
    cm.extend(varint_field(4, 1)); // immutable: true
    let mut tm = bytes(1, b"v1");
    tm.extend(bytes(2, b"ConfigMap"));
    let mut body = b"k8s\0".to_vec();
    body.extend(bytes(1, &tm));
    body.extend(bytes(2, &cm));
    let v = decode(&body).unwrap();
    assert_eq!(
        v,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "immutable": true,
               "metadata": {"name": "cm", "labels": {"a": "b"}},
               "data": {"k": "v", "empty": ""}, "binaryData": {"bin": "AP8="}})
    );
    assert!(decode(b"{}").is_err());
    assert!(decode(b"k8s\0\x0a\x05").is_err());
    // Kinds outside the table are refused, not guessed at.
    let mut tm = bytes(1, b"v1");
    tm.extend(bytes(2, b"Secret"));
    let mut body = b"k8s\0".to_vec();
    body.extend(bytes(1, &tm));
    assert!(decode(&body).unwrap_err().contains("Secret"));
}

/// `kubectl.1.33 create namespace team` (protobuf) against what
/// `kubectl.1.30` sends for the same command.
#[test]
fn kubectl_namespace() {
    let body = hex(
        "6b387300 0a0f0a02 76311209 4e616d65 73706163 65121c0a 140a0474 65616d12
         001a0022 002a0032 00380042 0012001a 020a001a 002200",
    );
    let json130: Value = serde_json::from_str(
        r#"{"kind":"Namespace","apiVersion":"v1","metadata":{"name":"team",
"creationTimestamp":null},"spec":{},"status":{}}"#,
    )
    .unwrap();
    assert_eq!(decode(&body).unwrap(), without_nulls(json130));
}

/// `kubectl.1.33 create deployment api --image=nginx:1.27 --replicas=3
/// --port=8080` (protobuf) against what `kubectl.1.30` sends.
#[test]
fn kubectl_deployment() {
    let body = hex(
        "6b387300 0a150a07 61707073 2f763112 0a446570 6c6f796d 656e7412 be010a1f
         0a036170 6912001a 0022002a 00320038 0042005a 0a0a0361 70701203 61706912
         8c010803 120c0a0a 0a036170 70120361 70691a72 0a1c0a00 12001a00 22002a00
         32003800 42005a0a 0a036170 70120361 70691252 12340a05 6e67696e 78120a6e
         67696e78 3a312e32 372a0032 0b0a0010 0018903f 22002a00 42006a00 72008001
         00880100 900100a2 01001a00 32004200 4a005200 58006000 68008201 008a0100
         9a0100c2 01002202 0a002800 38001a0c 08001000 18002000 28003800 1a002200",
    );
    let json130: Value = serde_json::from_str(
        r#"{"kind":"Deployment","apiVersion":"apps/v1","metadata":{"name":"api",
"creationTimestamp":null,"labels":{"app":"api"}},"spec":{"replicas":3,
"selector":{"matchLabels":{"app":"api"}},
"template":{"metadata":{"creationTimestamp":null,"labels":{"app":"api"}},
"spec":{"containers":[{"name":"nginx","image":"nginx:1.27",
"ports":[{"containerPort":8080}],"resources":{}}]}},"strategy":{}},"status":{}}"#,
    )
    .unwrap();
    assert_eq!(decode(&body).unwrap(), without_nulls(json130));
}
