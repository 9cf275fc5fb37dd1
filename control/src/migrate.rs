//! `kcontrol migrate --from DIR --to etcd://…`: copies the embedded store of
//! a data dir into etcd, as k3s does when a user moves to etcd.
//!
//! Every key is copied with its value unchanged (objects keep their uid,
//! timestamps and content); etcd gives each a new revision, so
//! resourceVersions change. The copy reads the source at one revision, and
//! checks the target against it afterwards. An interrupted migration can be
//! run again: keys already copied with the same value are skipped; a key
//! that is in the target with other content stops it (nothing is
//! overwritten).

use std::path::Path;

use anyhow::{Context, Result, bail};
use kcontrol_store::{EtcdOptions, EtcdStore, KeyValue, SqliteStore, Store, StoreError};

/// Writes in flight at a time.
const PARALLEL: usize = 16;

async fn dump(store: &dyn Store, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
    let mut out = Vec::new();
    let mut at = None;
    let mut after: Option<String> = None;
    loop {
        let page = store.list(prefix, at, after.as_deref(), Some(1000)).await?;
        at = Some(page.revision);
        if let Some(last) = page.items.last() {
            after = Some(last.key.clone());
        }
        out.extend(page.items);
        if !page.more {
            return Ok((out, page.revision));
        }
    }
}

pub struct Report {
    pub copied: usize,
    pub already: usize,
    pub source_revision: i64,
    pub target_revision: i64,
}

pub async fn run(from: &Path, to: &str) -> Result<Report> {
    let path = from.join("store.db");
    if !path.is_file() {
        bail!(
            "--from {}: no embedded store there ({} does not exist)",
            from.display(),
            path.display()
        );
    }
    let source = SqliteStore::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let target = EtcdStore::connect_url(to, EtcdOptions::default())
        .await
        .with_context(|| format!("--to {to}"))?;
    let (items, source_revision) = dump(&source, "").await.context("reading the source")?;
    let (existing, _) = dump(&target, "").await.context("reading the target")?;
    let by_key: std::collections::HashMap<&str, &[u8]> = items
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_slice()))
        .collect();
    for kv in &existing {
        if by_key.get(kv.key.as_str()) != Some(&kv.value.as_slice()) {
            bail!(
                "the target already holds {} with other content than the source: migrate copies into an empty etcd \
                 (or resumes an interrupted migration of the same data dir); nothing was written",
                kv.key
            );
        }
    }
    let already = existing.len();
    let present: std::collections::HashSet<&str> =
        existing.iter().map(|kv| kv.key.as_str()).collect();
    let todo: Vec<&KeyValue> = items
        .iter()
        .filter(|kv| !present.contains(kv.key.as_str()))
        .collect();
    for chunk in todo.chunks(PARALLEL) {
        let writes = chunk.iter().map(|kv| {
            let target = &target;
            async move {
                match target.create(&kv.key, kv.value.clone()).await {
                    Ok(_) => Ok(()),
                    Err(StoreError::AlreadyExists(_)) => bail!(
                        "{} appeared in the target during the migration: is an apiserver using it?",
                        kv.key
                    ),
                    Err(e) => Err(anyhow::Error::from(e).context(format!("copying {}", kv.key))),
                }
            }
        });
        for r in kcontrol_store::conformance::join_all(writes.collect()).await {
            r?;
        }
    }
    // Check: the target holds exactly the source's keys and values.
    let (copied, target_revision) = dump(&target, "").await.context("reading back")?;
    if copied.len() != items.len()
        || copied
            .iter()
            .zip(&items)
            .any(|(a, b)| a.key != b.key || a.value != b.value)
    {
        bail!(
            "the target does not match the source after copying ({} keys vs {}): is an apiserver using it?",
            copied.len(),
            items.len()
        );
    }
    // Watches from resourceVersions that mean something else now get 410
    // (relist) rather than events: history before the copy is gone.
    target.compact(target_revision).await?;
    Ok(Report {
        copied: items.len() - already,
        already,
        source_revision,
        target_revision,
    })
}
