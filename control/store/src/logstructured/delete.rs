//! Delete: append a tombstone that carries the deleted value.

use crate::driver::{Log, NewRow};
use crate::{KeyValue, Result, Revision, StoreError};

/// Returns the tombstone's revision and the value it deleted (with that
/// value's own `mod_revision`).
pub(super) async fn delete<L: Log>(
    log: &L,
    key: &str,
    expected: Option<Revision>,
) -> Result<(Revision, KeyValue)> {
    let name = key.to_string();
    let row = log
        .append(
            key,
            Box::new(move |latest| match latest {
                None => Err(StoreError::NotFound(name)),
                Some(l) if l.deleted => Err(StoreError::NotFound(name)),
                Some(l) if expected.is_some_and(|e| e != l.revision) => Err(StoreError::Conflict {
                    key: name,
                    current: l.revision,
                }),
                Some(l) => Ok(NewRow {
                    created: false,
                    deleted: true,
                    create_revision: l.create_revision(),
                    prev_revision: l.revision,
                    value: Vec::new(),
                    old_value: l.value.clone(),
                }),
            }),
        )
        .await?;
    Ok((row.revision, super::prev_value(&row)))
}
