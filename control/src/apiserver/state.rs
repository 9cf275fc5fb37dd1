//! What every request handler shares: the store, the Service address
//! allocator, the admin token and the server's own address.

use std::sync::Arc;
use std::time::Duration;

use kcontrol_store::{KeyValue, Revision, Store, StoreError};

use super::allocate::Allocator;
use super::object::{from_kv, internal};
use super::resources::{ResourceType, lookup};
use super::status::{ApiError, ApiResult};

pub struct State {
    pub store: Arc<dyn Store>,
    pub alloc: Allocator,
    pub token: String,
    /// `host:port` clients reach this server at (discovery).
    pub server_address: String,
    /// How often a watch that allows bookmarks gets one.
    pub bookmark_interval: Duration,
}

impl State {
    pub(crate) async fn get_kv(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
    ) -> ApiResult<KeyValue> {
        self.store
            .get(&rt.key(ns, name))
            .await
            .map_err(internal)?
            .ok_or_else(|| ApiError::not_found(rt.group, rt.plural, name))
    }

    /// Nothing new goes into a namespace that is missing or being deleted.
    pub(crate) async fn ensure_namespace(&self, ns: &str) -> ApiResult<()> {
        let nsrt = lookup("", "v1", "namespaces").expect("namespaces");
        let kv = self.get_kv(nsrt, None, ns).await?;
        let obj = from_kv(&kv)?;
        if obj.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(ApiError::forbidden(format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            )));
        }
        Ok(())
    }

    /// Every key under `prefix` at revision `at` (latest if `None`), and
    /// the revision read at.
    pub(crate) async fn list_all(
        &self,
        prefix: &str,
        mut at: Option<Revision>,
    ) -> Result<(Revision, Vec<KeyValue>), StoreError> {
        let mut after: Option<String> = None;
        let mut out = Vec::new();
        loop {
            let page = self
                .store
                .list(prefix, at, after.as_deref(), Some(1000))
                .await?;
            at = Some(page.revision);
            after = page.items.last().map(|kv| kv.key.clone()).or(after);
            out.extend(page.items);
            if !page.more {
                return Ok((page.revision, out));
            }
        }
    }
}
