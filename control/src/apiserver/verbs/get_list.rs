//! List with selectors, limit/continue and resourceVersion semantics.

use kcontrol_store::{Revision, StoreError};

use super::ListResult;
use crate::apiserver::http::Query;
use crate::apiserver::object::{decode_continue, encode_continue, from_kv, internal, parse_rv};
use crate::apiserver::resources::ResourceType;
use crate::apiserver::selectors::{FieldSelector, LabelSelector};
use crate::apiserver::state::State;
use crate::apiserver::status::{ApiError, ApiResult};

impl State {
    /// List with selectors, limit/continue and resourceVersion semantics.
    pub async fn list_objects(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        q: &Query,
    ) -> ApiResult<ListResult> {
        let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or_default())?;
        let fields = FieldSelector::parse(q.get("fieldSelector").unwrap_or_default(), rt)?;
        let limit = q.int("limit")?.filter(|l| *l > 0).map(|l| l as usize);
        let prefix = rt.prefix(ns);
        let mut at: Option<Revision> = None;
        let mut start_after: Option<String> = None;
        let rv = q.get("resourceVersion").unwrap_or_default();
        let rv_match = q.get("resourceVersionMatch").unwrap_or_default();
        if let Some(token) = q.get("continue").filter(|c| !c.is_empty()) {
            if !rv.is_empty() && rv != "0" {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let (rev, key) = decode_continue(token)?;
            if !key.starts_with(&prefix) {
                return Err(ApiError::bad_request(
                    "continue key is not valid: it belongs to another list",
                ));
            }
            at = Some(rev);
            start_after = Some(key);
        } else {
            match (rv, rv_match) {
                ("", "") => {}
                ("", _) => {
                    return Err(ApiError::bad_request(
                        "resourceVersionMatch is forbidden unless resourceVersion is provided",
                    ));
                }
                (rv, "Exact") => {
                    if rv == "0" {
                        return Err(ApiError::bad_request(
                            "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
                        ));
                    }
                    at = Some(parse_rv(rv)?);
                }
                (rv, "" | "NotOlderThan") => {
                    // Served from the latest state, which is never older.
                    if rv != "0" {
                        let want = parse_rv(rv)?;
                        let cur = self.store.current_revision().await.map_err(internal)?;
                        if want > cur {
                            return Err(ApiError::timeout(format!(
                                "Too large resource version: {want}, current: {cur}"
                            )));
                        }
                    }
                }
                (_, other) => {
                    return Err(ApiError::bad_request(format!(
                        "resourceVersionMatch: unsupported value {other:?}: supported values: \"Exact\", \"NotOlderThan\""
                    )));
                }
            }
        }
        let page_size = limit.map_or(1000, |l| l.clamp(50, 1000));
        let mut items = Vec::new();
        let mut revision = None;
        let mut cont_key = None;
        'pages: loop {
            let page = self
                .store
                .list(&prefix, at, start_after.as_deref(), Some(page_size))
                .await
                .map_err(|e| match e {
                    StoreError::Compacted { requested, compacted } => ApiError::gone(format!(
                        "The resourceVersion for the provided list is too old (requested {requested}, oldest kept {compacted}); start a new list without a continue token or resourceVersion"
                    )),
                    StoreError::FutureRevision(r) => {
                        ApiError::timeout(format!("Too large resource version: {r}"))
                    }
                    other => internal(other),
                })?;
            at = Some(page.revision);
            revision.get_or_insert(page.revision);
            let n = page.items.len();
            for (i, kv) in page.items.iter().enumerate() {
                start_after = Some(kv.key.clone());
                let obj = from_kv(kv)?;
                if labels.matches(&obj) && fields.matches(&obj) {
                    items.push(obj);
                    if limit == Some(items.len()) {
                        if i + 1 < n || page.more {
                            cont_key = Some(kv.key.clone());
                        }
                        break 'pages;
                    }
                }
            }
            if !page.more {
                break;
            }
        }
        let revision = revision.unwrap_or(0);
        Ok(ListResult {
            cont: cont_key.map(|k| encode_continue(revision, &k)),
            items,
            revision,
        })
    }
}
