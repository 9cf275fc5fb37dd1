//! Get and list: reads of the latest row per key, now or at a revision.

use crate::driver::{KeyRange, Log};
use crate::{KeyValue, ListPage, Result, Revision};

pub(super) async fn get<L: Log>(log: &L, key: &str) -> Result<Option<KeyValue>> {
    Ok(log
        .latest(key)
        .await?
        .filter(|r| !r.deleted)
        .map(|r| super::key_value(&r)))
}

/// `limit` of `None` or `Some(0)` means no limit (Kubernetes' `limit=0`).
pub(super) async fn list<L: Log>(
    log: &L,
    prefix: &str,
    at: Option<Revision>,
    start_after: Option<&str>,
    limit: Option<usize>,
) -> Result<ListPage> {
    let limit = limit.filter(|&l| l > 0);
    // One row more than asked tells whether more follow.
    let rows = log
        .list(
            &KeyRange::prefix(prefix),
            at,
            start_after,
            limit.map(|l| l + 1),
        )
        .await?;
    let mut items: Vec<KeyValue> = rows.rows.iter().map(super::key_value).collect();
    let more = limit.is_some_and(|l| items.len() > l);
    if let Some(l) = limit {
        items.truncate(l);
    }
    Ok(ListPage {
        items,
        revision: at.unwrap_or(rows.revisions.current),
        more,
    })
}
