//! Create: append a row that creates the key, if it has no live value.

use crate::driver::{Log, NewRow};
use crate::{Result, Revision, StoreError};

pub(super) async fn create<L: Log>(log: &L, key: &str, value: Vec<u8>) -> Result<Revision> {
    let name = key.to_string();
    let row = log
        .append(
            key,
            Box::new(move |latest| match latest {
                Some(l) if !l.deleted => Err(StoreError::AlreadyExists(name)),
                latest => Ok(NewRow {
                    created: true,
                    deleted: false,
                    create_revision: 0,
                    // The tombstone, if the key was deleted: two creates
                    // racing on it collide on UNIQUE(key, prev_revision).
                    prev_revision: latest.map_or(0, |l| l.revision),
                    value,
                    old_value: Vec::new(),
                }),
            }),
        )
        .await?;
    Ok(row.revision)
}
