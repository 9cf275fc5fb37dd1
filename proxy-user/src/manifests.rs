//! The manifests source: Services and EndpointSlices from a YAML/JSON file or
//! a directory of them (multi-document YAML and `kind: List` included).
//!
//! Loading is all-or-nothing: any malformed file or object makes the whole
//! load fail with an error naming the file and the object, and the caller
//! keeps the state it had.

use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use serde_json::Value;

use crate::model::{self, DesiredState};

/// Why a load failed. `file` is the manifest that holds the bad object
/// (or the path that could not be read).
#[derive(Debug)]
pub struct LoadError {
    pub file: PathBuf,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.message)
    }
}

impl std::error::Error for LoadError {}

/// The files a path stands for: the file itself, or the `.yaml`, `.yml`
/// and `.json` files of a directory (not recursive, hidden files skipped so
/// editors' and atomic writers' temporary files are ignored), sorted.
pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let meta = std::fs::metadata(path).map_err(|e| LoadError {
        file: path.to_path_buf(),
        message: format!("cannot read: {e}"),
    })?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let rd = std::fs::read_dir(path).map_err(|e| LoadError {
        file: path.to_path_buf(),
        message: format!("cannot list directory: {e}"),
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.starts_with('.')
                && p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Objects read from manifests, with the file each came from.
#[derive(Default)]
pub struct Objects {
    pub services: Vec<(PathBuf, Service)>,
    pub slices: Vec<(PathBuf, EndpointSlice)>,
}

#[derive(Deserialize)]
struct TypeMeta {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

fn describe(doc: &Value, index: usize) -> String {
    let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or("object");
    let meta = doc.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(|n| n.as_str());
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str())
        .unwrap_or("default");
    match name {
        Some(name) => format!("{kind} {ns}/{name}"),
        None => format!("document {} ({kind} without a name)", index + 1),
    }
}

fn add_doc(file: &Path, index: usize, doc: Value, out: &mut Objects) -> Result<(), LoadError> {
    let err = |message: String| LoadError {
        file: file.to_path_buf(),
        message,
    };
    if doc.is_null() {
        return Ok(()); // empty document (`---` at the end)
    }
    let what = describe(&doc, index);
    let tm: TypeMeta = serde_json::from_value(doc.clone())
        .map_err(|e| err(format!("{what}: not a Kubernetes object: {e}")))?;
    match (tm.api_version.as_deref(), tm.kind.as_deref()) {
        (Some("v1"), Some("Service")) => {
            let svc: Service = serde_json::from_value(doc)
                .map_err(|e| err(format!("{what}: invalid Service: {e}")))?;
            out.services.push((file.to_path_buf(), svc));
        }
        (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => {
            let s: EndpointSlice = serde_json::from_value(doc)
                .map_err(|e| err(format!("{what}: invalid EndpointSlice: {e}")))?;
            out.slices.push((file.to_path_buf(), s));
        }
        (Some("v1"), Some("List")) => {
            let items = doc
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default();
            for (i, item) in items.into_iter().enumerate() {
                add_doc(file, i, item, out)?;
            }
        }
        (None, _) | (_, None) => {
            return Err(err(format!("{what}: apiVersion and kind are required")));
        }
        // Other kinds (Deployments, ConfigMaps…) may share the directory.
        _ => {}
    }
    Ok(())
}

/// Parses one manifest file's text: YAML documents (JSON is YAML too).
pub fn parse_text(file: &Path, text: &str, out: &mut Objects) -> Result<(), LoadError> {
    // One line per error (no source snippet): it ends up in a `kproxy:
    // rejected` line. The error names the line and column.
    let options = serde_saphyr::options! { with_snippet: false };
    let docs: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| LoadError {
            file: file.to_path_buf(),
            message: format!("invalid YAML/JSON: {e}"),
        })?;
    for (i, doc) in docs.into_iter().enumerate() {
        add_doc(file, i, doc, out)?;
    }
    Ok(())
}

/// Reads every manifest under `path` and builds the desired state.
pub fn load(path: &Path) -> Result<DesiredState, LoadError> {
    let mut objects = Objects::default();
    for file in manifest_files(path)? {
        let text = std::fs::read_to_string(&file).map_err(|e| LoadError {
            file: file.clone(),
            message: format!("cannot read: {e}"),
        })?;
        parse_text(&file, &text, &mut objects)?;
    }
    to_state(objects)
}

fn to_state(objects: Objects) -> Result<DesiredState, LoadError> {
    let services: Vec<Service> = objects.services.iter().map(|(_, s)| s.clone()).collect();
    let slices: Vec<EndpointSlice> = objects.slices.iter().map(|(_, s)| s.clone()).collect();
    model::build(&model::Node::default(), &services, &slices).map_err(|e| {
        // Find the file that holds the offending object.
        let file = objects
            .services
            .iter()
            .map(|(f, s)| (f, "Service", &s.metadata))
            .chain(
                objects
                    .slices
                    .iter()
                    .map(|(f, s)| (f, "EndpointSlice", &s.metadata)),
            )
            .find(|(_, kind, m)| {
                format!(
                    "{kind} {}/{}",
                    m.namespace.as_deref().unwrap_or("default"),
                    m.name.as_deref().unwrap_or("")
                ) == e.object
            })
            .map(|(f, _, _)| f.clone())
            .unwrap_or_default();
        LoadError {
            file,
            message: e.to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DesiredState, LoadError> {
        let mut o = Objects::default();
        parse_text(Path::new("m.yaml"), text, &mut o)?;
        to_state(o)
    }

    #[test]
    fn multi_document_and_list() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: b}
  spec: {clusterIP: 10.96.0.2, ports: [{port: 81, protocol: UDP}]}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: ignored}
---
"#;
        let st = parse(text).unwrap();
        assert_eq!(st.services.len(), 2);
    }

    #[test]
    fn json_is_accepted() {
        let st = parse(
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"j"},
               "spec":{"clusterIP":"10.96.0.3","ports":[{"port":53,"protocol":"UDP"}]}}"#,
        )
        .unwrap();
        assert_eq!(st.services.len(), 1);
    }

    #[test]
    fn errors_name_document_and_object() {
        let e = parse("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: [1, 2]\n")
            .unwrap_err();
        assert!(e.message.contains("Service default/x"), "{e}");
        let e = parse("key: [unclosed\n").unwrap_err();
        assert!(e.message.contains("invalid YAML"), "{e}");
        let e = parse("metadata: {name: y}\n").unwrap_err();
        assert!(
            e.message.contains("apiVersion and kind are required"),
            "{e}"
        );
    }

    #[test]
    fn model_error_points_at_the_file() {
        let e = parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: z}\nspec: {clusterIP: 1.2.3, ports: [{port: 1}]}\n",
        )
        .unwrap_err();
        assert_eq!(e.file, Path::new("m.yaml"));
        assert!(
            e.message.contains("Service default/z: spec.clusterIP"),
            "{e}"
        );
    }
}
