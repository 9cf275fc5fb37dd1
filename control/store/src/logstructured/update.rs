//! Update: compare-and-swap on the key's latest revision.

use crate::driver::{Log, NewRow};
use crate::{Result, Revision, StoreError};

pub(super) async fn update<L: Log>(
    log: &L,
    key: &str,
    value: Vec<u8>,
    expected: Revision,
) -> Result<Revision> {
    let name = key.to_string();
    let row = log
        .append(
            key,
            Box::new(move |latest| match latest {
                None => Err(StoreError::NotFound(name)),
                Some(l) if l.deleted => Err(StoreError::NotFound(name)),
                Some(l) if l.revision != expected => Err(StoreError::Conflict {
                    key: name,
                    current: l.revision,
                }),
                Some(l) => Ok(NewRow {
                    created: false,
                    deleted: false,
                    create_revision: l.create_revision(),
                    prev_revision: l.revision,
                    value,
                    old_value: l.value.clone(),
                }),
            }),
        )
        .await?;
    Ok(row.revision)
}
