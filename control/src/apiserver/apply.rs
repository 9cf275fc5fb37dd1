//! Server-side apply (`PATCH` with `application/apply-patch+yaml`), as
//! kube-rs controllers (`Patch::Apply`) and `kubectl apply --server-side`
//! use it.
//!
//! A simplification of upstream's: each field manager's applied field set
//! is kept in `metadata.managedFields` (operation `Apply`, `FieldsV1` form:
//! `f:field`, `k:{"key":…}` for list elements merged by key, `v:value` for
//! set elements). An apply
//! 1. removes the fields the manager applied last time and no longer
//!    applies, unless another applier still applies them,
//! 2. merges the applied configuration into the object (lists merged by
//!    the same keys as strategic merge patch, other lists replaced),
//! 3. records the new field set.
//!
//! Ownership conflicts are not detected: every apply acts as `force=true`,
//! and non-apply writers own nothing.

use serde_json::{Map, Value, json};

use super::patch::{ListStrategy, list_strategy, strategic_merge};

/// Fields the server owns; never part of a field set.
fn server_owned(path: &[String], key: &str) -> bool {
    match path.len() {
        0 => matches!(key, "apiVersion" | "kind" | "status" | "metadata"),
        _ => false,
    }
}

const META_OWNED: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// The field set of an applied configuration (`status` only for a status
/// apply, everything but `status` otherwise).
pub fn field_set(applied: &Value, kind: &str, status: bool) -> Value {
    let mut set = Map::new();
    let Some(m) = applied.as_object() else {
        return json!({});
    };
    if let Some(Value::Object(meta)) = m.get("metadata") {
        let meta: Map<String, Value> = meta
            .iter()
            .filter(|(k, _)| !META_OWNED.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut path = vec!["metadata".to_string()];
        let s = map_set(&meta, kind, &mut path);
        if !s.is_empty() {
            set.insert("f:metadata".into(), Value::Object(s));
        }
    }
    let mut path = Vec::new();
    for (k, v) in m {
        let wanted = if status {
            k == "status"
        } else {
            !server_owned(&path, k)
        };
        if wanted {
            path.push(k.clone());
            set.insert(format!("f:{k}"), value_set(v, kind, &mut path));
            path.pop();
        }
    }
    Value::Object(set)
}

fn map_set(m: &Map<String, Value>, kind: &str, path: &mut Vec<String>) -> Map<String, Value> {
    m.iter()
        .map(|(k, v)| {
            path.push(k.clone());
            let s = value_set(v, kind, path);
            path.pop();
            (format!("f:{k}"), s)
        })
        .collect()
}

fn value_set(v: &Value, kind: &str, path: &mut Vec<String>) -> Value {
    match v {
        Value::Object(m) => Value::Object(map_set(m, kind, path)),
        Value::Array(items) => match list_strategy(kind, path) {
            ListStrategy::MergeKey(key) => {
                let mut s = Map::new();
                for e in items {
                    let Some(kv) = e.get(key) else { continue };
                    let mut child = match e {
                        Value::Object(m) => map_set(m, kind, path),
                        _ => Map::new(),
                    };
                    child.insert(".".into(), json!({}));
                    s.insert(format!("k:{}", json!({ key: kv })), Value::Object(child));
                }
                Value::Object(s)
            }
            ListStrategy::MergePrimitive => Value::Object(
                items
                    .iter()
                    .map(|e| (format!("v:{e}"), json!({})))
                    .collect(),
            ),
            ListStrategy::Replace => json!({}),
        },
        _ => json!({}),
    }
}

/// Removes from `obj` what `prev` has and `new` lacks, unless one of
/// `others` (the other appliers' sets at the same place) has it.
fn prune(
    obj: &mut Value,
    prev: &Map<String, Value>,
    new: Option<&Map<String, Value>>,
    others: &[&Map<String, Value>],
) {
    for (pk, pchild) in prev {
        if pk == "." {
            continue;
        }
        let nchild = new.and_then(|n| n.get(pk)).and_then(Value::as_object);
        let still_applied = new.is_some_and(|n| n.contains_key(pk));
        let other_children: Vec<&Map<String, Value>> = others
            .iter()
            .filter_map(|o| o.get(pk))
            .filter_map(Value::as_object)
            .collect();
        let co_owned = others.iter().any(|o| o.contains_key(pk));
        if !still_applied && !co_owned {
            remove(obj, pk);
            continue;
        }
        // Descend: fields below may have been dropped.
        if let Some(pchild) = pchild.as_object()
            && !pchild.is_empty()
            && let Some(child) = locate(obj, pk)
        {
            prune(child, pchild, nchild, &other_children);
        }
    }
}

fn element_matches(e: &Value, pk: &str) -> bool {
    if let Some(k) = pk.strip_prefix("k:") {
        let Ok(Value::Object(keys)) = serde_json::from_str::<Value>(k) else {
            return false;
        };
        keys.iter().all(|(k, v)| e.get(k) == Some(v))
    } else if let Some(v) = pk.strip_prefix("v:") {
        serde_json::from_str::<Value>(v).is_ok_and(|v| *e == v)
    } else {
        false
    }
}

fn locate<'a>(obj: &'a mut Value, pk: &str) -> Option<&'a mut Value> {
    match obj {
        Value::Object(m) => m.get_mut(pk.strip_prefix("f:")?),
        Value::Array(a) => a.iter_mut().find(|e| element_matches(e, pk)),
        _ => None,
    }
}

fn remove(obj: &mut Value, pk: &str) {
    match obj {
        Value::Object(m) => {
            if let Some(f) = pk.strip_prefix("f:") {
                m.remove(f);
            }
        }
        Value::Array(a) => a.retain(|e| !element_matches(e, pk)),
        _ => {}
    }
}

/// The `Apply` entry of `manager` (for the main resource or status).
fn entry_index(managed: &[Value], manager: &str, subresource: &str) -> Option<usize> {
    managed.iter().position(|e| {
        e.get("manager").and_then(Value::as_str) == Some(manager)
            && e.get("operation").and_then(Value::as_str) == Some("Apply")
            && e.get("subresource")
                .and_then(Value::as_str)
                .unwrap_or_default()
                == subresource
    })
}

/// Applies `applied` (by `manager`) to `current` (None: the object does not
/// exist yet). Returns the object to store.
pub fn apply(
    current: Option<&Value>,
    applied: &Value,
    manager: &str,
    kind: &str,
    status: bool,
    now: &str,
) -> Result<Value, String> {
    let new_set = field_set(applied, kind, status);
    let subresource = if status { "status" } else { "" };
    let mut obj = current.cloned().unwrap_or_else(|| json!({}));
    let mut managed: Vec<Value> = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mine = entry_index(&managed, manager, subresource);
    if let Some(i) = mine {
        let prev = managed[i]
            .get("fieldsV1")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let others: Vec<&Map<String, Value>> = managed
            .iter()
            .enumerate()
            .filter(|(j, e)| *j != i && e.get("operation").and_then(Value::as_str) == Some("Apply"))
            .filter_map(|(_, e)| e.get("fieldsV1").and_then(Value::as_object))
            .collect();
        prune(&mut obj, &prev, new_set.as_object(), &others);
    }
    // Merge what is applied; directives and nulls have no place in an
    // applied configuration.
    let mut patch = applied.clone();
    if let Some(m) = patch.as_object_mut() {
        if status {
            m.retain(|k, _| k == "status" || k == "apiVersion" || k == "kind");
        } else {
            m.remove("status");
        }
        if let Some(Value::Object(meta)) = m.get_mut("metadata") {
            meta.retain(|k, _| {
                !META_OWNED.contains(&k.as_str()) || k == "name" || k == "namespace"
            });
        }
    }
    let mut out = strategic_merge(&obj, &patch, kind)?;
    let unchanged = mine.is_some_and(|i| managed[i].get("fieldsV1") == Some(&new_set));
    if !unchanged {
        let entry = json!({
            "manager": manager,
            "operation": "Apply",
            "apiVersion": applied.get("apiVersion").cloned().unwrap_or(Value::Null),
            "time": now,
            "fieldsType": "FieldsV1",
            "fieldsV1": new_set,
        });
        let mut entry = entry;
        if status {
            entry["subresource"] = json!("status");
        }
        match mine {
            Some(i) => managed[i] = entry,
            None => managed.push(entry),
        }
    }
    if let Some(meta) = out.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("managedFields".into(), Value::Array(managed));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(labels: Value, containers: Value) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "labels": labels},
               "spec": {"template": {"spec": {"containers": containers}}}})
    }

    #[test]
    fn field_sets() {
        let s = field_set(
            &dep(json!({"a": "1"}), json!([{"name": "c", "image": "x"}])),
            "Deployment",
            false,
        );
        assert_eq!(
            s,
            json!({"f:metadata": {"f:labels": {"f:a": {}}},
                   "f:spec": {"f:template": {"f:spec": {"f:containers": {
                       "k:{\"name\":\"c\"}": {".": {}, "f:name": {}, "f:image": {}}}}}}})
        );
    }

    #[test]
    fn apply_prunes_what_the_manager_dropped() {
        let first = dep(
            json!({"a": "1", "b": "2"}),
            json!([{"name": "c", "image": "x"}, {"name": "s", "image": "y"}]),
        );
        let o1 = apply(None, &first, "ctl", "Deployment", false, "t").unwrap();
        // Someone else adds a label with a non-apply write: not owned, kept.
        let mut o1 = o1;
        o1["metadata"]["labels"]["other"] = json!("z");
        let second = dep(json!({"a": "1"}), json!([{"name": "c", "image": "x2"}]));
        let o2 = apply(Some(&o1), &second, "ctl", "Deployment", false, "t").unwrap();
        assert_eq!(o2["metadata"]["labels"], json!({"a": "1", "other": "z"}));
        let cs = o2["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0]["image"], "x2");
        assert_eq!(o2["metadata"]["managedFields"].as_array().unwrap().len(), 1);

        // A second applier co-owning label `a` keeps it when ctl drops it.
        let o3 = apply(
            Some(&o2),
            &dep(json!({"a": "1"}), json!([])),
            "other",
            "Deployment",
            false,
            "t",
        )
        .unwrap();
        let o4 = apply(
            Some(&o3),
            &dep(json!({}), json!([{"name": "c", "image": "x2"}])),
            "ctl",
            "Deployment",
            false,
            "t",
        )
        .unwrap();
        assert_eq!(o4["metadata"]["labels"]["a"], "1");
        assert_eq!(o4["metadata"]["managedFields"].as_array().unwrap().len(), 2);
    }
}
