//! The three patch types of PATCH requests:
//! - JSON merge patch (RFC 7386): objects merge, `null` deletes, lists replace.
//! - Strategic merge patch: merge patch plus per-field list strategies of
//!   the built-in types (containers merge by `name`, service ports by `port`,
//!   …) and the `$patch`, `$retainKeys`, `$deleteFromPrimitiveList/…` and
//!   `$setElementOrder/…` directives. This is what `kubectl apply`/`patch`
//!   send for built-in kinds. The strategies are the subset of the
//!   upstream `patchStrategy`/`patchMergeKey` tags that matter for the kinds
//!   served here ([`list_strategy`]); every other list is replaced.
//! - JSON patch (RFC 6902): add/remove/replace/move/copy/test.

use serde_json::{Map, Value};

/// RFC 7386.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// How a list field is patched.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum ListStrategy {
    Replace,
    /// Merge elements (objects) with the same value of this key.
    MergeKey(&'static str),
    /// A set of primitives: union.
    MergePrimitive,
}

/// The list strategy of the field at `path` (object keys only, list indices
/// left out) in an object of `kind`.
pub(super) fn list_strategy(kind: &str, path: &[String]) -> ListStrategy {
    use ListStrategy::*;
    let n = path.len();
    let last = path[n - 1].as_str();
    let parent = if n >= 2 { path[n - 2].as_str() } else { "" };
    let in_container = matches!(
        parent,
        "containers" | "initContainers" | "ephemeralContainers"
    );
    match last {
        "containers" | "initContainers" | "ephemeralContainers" => MergeKey("name"),
        "ports" if in_container => MergeKey("containerPort"),
        "ports" if kind == "Service" && path.len() == 2 && parent == "spec" => MergeKey("port"),
        "env" if in_container => MergeKey("name"),
        "volumeMounts" if in_container => MergeKey("mountPath"),
        "volumeDevices" if in_container => MergeKey("devicePath"),
        "resizePolicy" if in_container => Replace,
        "volumes" | "imagePullSecrets" | "resourceClaims" | "schedulingGates"
            if parent == "spec" =>
        {
            MergeKey("name")
        }
        "hostAliases" if parent == "spec" => MergeKey("ip"),
        "topologySpreadConstraints" if parent == "spec" => MergeKey("topologyKey"),
        "conditions" if parent == "status" => MergeKey("type"),
        "addresses" if kind == "Node" && parent == "status" => MergeKey("type"),
        "podIPs" | "hostIPs" if parent == "status" => MergeKey("ip"),
        "podCIDRs" if kind == "Node" && parent == "spec" => MergePrimitive,
        "finalizers" if parent == "metadata" => MergePrimitive,
        "ownerReferences" if parent == "metadata" => MergeKey("uid"),
        _ => Replace,
    }
}

/// Applies a strategic merge patch to `original` (an object of `kind`).
pub fn strategic_merge(original: &Value, patch: &Value, kind: &str) -> Result<Value, String> {
    let Value::Object(p) = patch else {
        return Err("a strategic merge patch must be a JSON object".into());
    };
    let mut path = Vec::new();
    let out = merge_map(original.as_object(), p, kind, &mut path)?;
    Ok(Value::Object(out.unwrap_or_default()))
}

/// Merges `patch` into `original`; `None` means the map itself is deleted
/// (`$patch: delete`).
fn merge_map(
    original: Option<&Map<String, Value>>,
    patch: &Map<String, Value>,
    kind: &str,
    path: &mut Vec<String>,
) -> Result<Option<Map<String, Value>>, String> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("delete") => return Ok(None),
        Some("replace") => {
            let mut m = patch.clone();
            m.remove("$patch");
            return Ok(Some(strip_directives_map(&m)));
        }
        Some("merge") | None => {}
        Some(other) => return Err(format!("unknown patch type {other:?} in map")),
    }
    let mut out = original.cloned().unwrap_or_default();

    // Primitive deletions first, then ordinary keys, then ordering hints.
    for (k, v) in patch {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let remove = v
                .as_array()
                .ok_or("$deleteFromPrimitiveList needs a list")?;
            if let Some(Value::Array(items)) = out.get_mut(field) {
                items.retain(|x| !remove.contains(x));
            }
        }
    }
    for (k, v) in patch {
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            out.remove(k);
            continue;
        }
        path.push(k.clone());
        let merged = match v {
            Value::Object(pm) => match out.get(k) {
                Some(Value::Object(om)) => merge_map(Some(om), pm, kind, path)?.map(Value::Object),
                _ => merge_map(None, pm, kind, path)?.map(Value::Object),
            },
            Value::Array(pl) => {
                let ol = out.get(k).and_then(Value::as_array);
                Some(Value::Array(merge_list(ol, pl, kind, path)?))
            }
            other => Some(other.clone()),
        };
        path.pop();
        match merged {
            Some(v) => {
                out.insert(k.clone(), v);
            }
            None => {
                out.remove(k);
            }
        }
    }
    for (k, v) in patch {
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            let order = v.as_array().ok_or("$setElementOrder needs a list")?;
            path.push(field.to_string());
            let strategy = list_strategy(kind, path);
            path.pop();
            if let Some(Value::Array(items)) = out.get_mut(field) {
                reorder(items, order, strategy);
            }
        }
    }
    if let Some(retain) = patch.get("$retainKeys") {
        let keep: Vec<&str> = retain
            .as_array()
            .ok_or("$retainKeys needs a list")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        out.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(Some(out))
}

fn merge_list(
    original: Option<&Vec<Value>>,
    patch: &[Value],
    kind: &str,
    path: &mut Vec<String>,
) -> Result<Vec<Value>, String> {
    // `[{"$patch": "replace"}, …]` replaces the whole list, whatever the strategy.
    if patch
        .iter()
        .any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Ok(patch
            .iter()
            .filter(|e| e.get("$patch").is_none())
            .map(strip_directives)
            .collect());
    }
    match list_strategy(kind, path) {
        ListStrategy::Replace => Ok(patch.iter().map(strip_directives).collect()),
        ListStrategy::MergePrimitive => {
            let mut out = original.cloned().unwrap_or_default();
            for v in patch {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
            Ok(out)
        }
        ListStrategy::MergeKey(key) => {
            let mut out = original.cloned().unwrap_or_default();
            for pe in patch {
                let Value::Object(pm) = pe else {
                    return Err(format!(
                        "{}: expected objects with merge key {key:?} in the patch list",
                        path.join(".")
                    ));
                };
                let Some(kv) = pm.get(key) else {
                    return Err(format!(
                        "{}: map in the patch list has no merge key {key:?}",
                        path.join(".")
                    ));
                };
                let pos = out.iter().position(|o| o.get(key) == Some(kv));
                if pm.get("$patch").and_then(Value::as_str) == Some("delete") {
                    out.retain(|o| o.get(key) != Some(kv));
                    continue;
                }
                match pos {
                    Some(i) => {
                        let merged = merge_map(out[i].as_object(), pm, kind, path)?;
                        match merged {
                            Some(m) => out[i] = Value::Object(m),
                            None => {
                                out.remove(i);
                            }
                        }
                    }
                    None => {
                        if let Some(m) = merge_map(None, pm, kind, path)? {
                            out.push(Value::Object(m));
                        }
                    }
                }
            }
            Ok(out)
        }
    }
}

/// `$setElementOrder`: listed elements take that order, the rest follow in
/// their current order.
fn reorder(items: &mut Vec<Value>, order: &[Value], strategy: ListStrategy) {
    let id = |v: &Value| -> Option<Value> {
        match strategy {
            ListStrategy::MergeKey(k) => v.get(k).cloned(),
            _ => Some(v.clone()),
        }
    };
    let mut rest = std::mem::take(items);
    for o in order {
        let want = id(o);
        if let Some(i) = rest.iter().position(|x| id(x) == want && want.is_some()) {
            items.push(rest.remove(i));
        }
    }
    items.append(&mut rest);
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(strip_directives_map(m)),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn strip_directives_map(m: &Map<String, Value>) -> Map<String, Value> {
    m.iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), strip_directives(v)))
        .collect()
}

/// RFC 6902.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or("a JSON patch must be a list of operations")?;
    for (i, op) in ops.iter().enumerate() {
        apply_op(doc, op).map_err(|e| format!("operation {i}: {e}"))?;
    }
    Ok(())
}

fn apply_op(doc: &mut Value, op: &Value) -> Result<(), String> {
    let name = op
        .get("op")
        .and_then(Value::as_str)
        .ok_or("missing \"op\"")?;
    let path = op
        .get("path")
        .and_then(Value::as_str)
        .ok_or("missing \"path\"")?;
    let value = || {
        op.get("value")
            .cloned()
            .ok_or_else(|| "missing \"value\"".to_string())
    };
    let from = || {
        op.get("from")
            .and_then(Value::as_str)
            .ok_or_else(|| "missing \"from\"".to_string())
    };
    match name {
        "add" => add(doc, path, value()?),
        "remove" => remove(doc, path).map(|_| ()),
        "replace" => {
            let v = value()?;
            let target = doc
                .pointer_mut(path)
                .ok_or(format!("path {path:?} does not exist"))?;
            *target = v;
            Ok(())
        }
        "move" => {
            let from = from()?;
            if path.starts_with(&format!("{from}/")) {
                return Err(format!("cannot move {from:?} into its own child {path:?}"));
            }
            let v = remove(doc, from)?;
            add(doc, path, v)
        }
        "copy" => {
            let v = doc
                .pointer(from()?)
                .cloned()
                .ok_or(format!("path {:?} does not exist", from()?))?;
            add(doc, path, v)
        }
        "test" => {
            let v = value()?;
            if doc.pointer(path) == Some(&v) {
                Ok(())
            } else {
                Err(format!("test failed: value at {path:?} differs"))
            }
        }
        other => Err(format!("unknown operation {other:?}")),
    }
}

fn split_pointer(path: &str) -> Result<(String, String), String> {
    if path.is_empty() {
        return Err("the root cannot be the target".into());
    }
    let i = path
        .rfind('/')
        .ok_or(format!("invalid JSON pointer {path:?}"))?;
    let last = path[i + 1..].replace("~1", "/").replace("~0", "~");
    Ok((path[..i].to_string(), last))
}

fn add(doc: &mut Value, path: &str, v: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = v;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    let target = doc
        .pointer_mut(&parent)
        .ok_or(format!("path {parent:?} does not exist"))?;
    match target {
        Value::Object(m) => {
            m.insert(last, v);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(v);
                return Ok(());
            }
            let i: usize = last
                .parse()
                .map_err(|_| format!("invalid index {last:?}"))?;
            if i > a.len() {
                return Err(format!("index {i} out of bounds"));
            }
            a.insert(i, v);
            Ok(())
        }
        _ => Err(format!("path {parent:?} is not an object or list")),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    let target = doc
        .pointer_mut(&parent)
        .ok_or(format!("path {parent:?} does not exist"))?;
    match target {
        Value::Object(m) => m
            .remove(&last)
            .ok_or(format!("path {path:?} does not exist")),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| format!("invalid index {last:?}"))?;
            if i >= a.len() {
                return Err(format!("index {i} out of bounds"));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("path {parent:?} is not an object or list")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
    }

    #[test]
    fn strategic_containers_merge_by_name() {
        let orig = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}], "ports": [{"containerPort": 80}]},
            {"name": "b", "image": "b:1"}
        ]}}}});
        let patch = json!({"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
        "containers": [
            {"name": "a", "image": "a:2", "env": [{"name": "Y", "value": "2"}], "ports": [{"containerPort": 81}]},
            {"name": "b", "$patch": "delete"}
        ]}}}});
        let out = strategic_merge(&orig, &patch, "Deployment").unwrap();
        let cs = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs.as_array().unwrap().len(), 1);
        assert_eq!(cs[0]["image"], "a:2");
        assert_eq!(cs[0]["env"].as_array().unwrap().len(), 2);
        assert_eq!(cs[0]["ports"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn strategic_service_ports_and_replace_lists() {
        let orig = json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}], "externalIPs": ["1.1.1.1"], "selector": {"a": "b"}}});
        let patch = json!({"spec": {"ports": [{"port": 80, "targetPort": 9090}, {"port": 443}], "externalIPs": ["2.2.2.2"], "selector": {"a": null, "c": "d"}}});
        let out = strategic_merge(&orig, &patch, "Service").unwrap();
        assert_eq!(out["spec"]["ports"][0]["targetPort"], 9090);
        assert_eq!(out["spec"]["ports"][1]["port"], 443);
        assert_eq!(out["spec"]["externalIPs"], json!(["2.2.2.2"]));
        assert_eq!(out["spec"]["selector"], json!({"c": "d"}));
    }

    #[test]
    fn strategic_directives() {
        let orig = json!({"metadata": {"finalizers": ["a", "b"]}, "spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}, "data": {"x": "1"}});
        let patch = json!({
            "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"], "finalizers": ["c"]},
            "spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}},
            "data": {"$patch": "replace", "y": "2"}
        });
        let out = strategic_merge(&orig, &patch, "Deployment").unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["b", "c"]));
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
        assert_eq!(out["data"], json!({"y": "2"}));
    }

    #[test]
    fn json_patch_ops() {
        let mut d = json!({"a": {"b": [1, 2]}, "c": 1});
        json_patch(
            &mut d,
            &json!([
                {"op": "add", "path": "/a/b/-", "value": 3},
                {"op": "replace", "path": "/c", "value": 2},
                {"op": "copy", "from": "/c", "path": "/d"},
                {"op": "move", "from": "/d", "path": "/e"},
                {"op": "remove", "path": "/a/b/0"},
                {"op": "test", "path": "/e", "value": 2}
            ]),
        )
        .unwrap();
        assert_eq!(d, json!({"a": {"b": [2, 3]}, "c": 2, "e": 2}));
        assert!(json_patch(&mut d, &json!([{"op": "remove", "path": "/nope"}])).is_err());
        assert!(json_patch(&mut d, &json!([{"op": "test", "path": "/c", "value": 9}])).is_err());
        assert!(json_patch(&mut d, &json!({"op": "add"})).is_err());
    }
}
