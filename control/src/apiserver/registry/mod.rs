//! Per-kind rules behind the generic verbs, as upstream's
//! `pkg/registry/<group>/<kind>/strategy.go`: each served kind has a file
//! here with its [`ResourceType`] (`RESOURCE`) and its [`Strategy`];
//! `resources::RESOURCES` lists them. The verbs (`verbs/`) only call the
//! strategy, so adding a kind is one file here plus one line in that table.

pub mod configmap;
pub mod deployment;
pub mod endpoints;
pub mod endpointslice;
pub mod event;
pub mod lease;
pub mod namespace;
pub mod node;
pub mod pod;
pub mod replicaset;
pub mod service;
pub mod serviceaccount;
mod workload;

use std::future::Future;
use std::pin::Pin;

use kcontrol_store::{Revision, Store, StoreError};
use serde_json::{Map, Value};

use super::allocate::{self, Ticket};
use super::http::Query;
use super::resources::ResourceType;
use super::state::State;
use super::status::{ApiError, ApiResult, FieldError};
use super::{table, validate};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

fn done<'a, T: Send + 'a>(v: T) -> BoxFuture<'a, T> {
    Box::pin(std::future::ready(v))
}

/// A write about to be stored, as [`Strategy::prepare`] sees it.
pub struct Write<'a> {
    pub rt: &'a ResourceType,
    pub name: &'a str,
    pub key: &'a str,
    /// The stored object on updates.
    pub old: Option<&'a Value>,
    pub dry_run: bool,
}

/// The rules of one kind. Every hook but [`Strategy::normalize`] defaults
/// to "nothing special".
pub trait Strategy: Sync {
    /// Decodes `input` into the kind's type, defaults it and validates it
    /// (against `old` on updates): the object to store and the kind's
    /// field errors (usually [`validate::typed`]).
    fn normalize(
        &self,
        rt: &ResourceType,
        input: &Value,
        old: Option<&Value>,
    ) -> ApiResult<(Value, Vec<FieldError>)>;

    /// Syntax of `metadata.name`: `Err` carries the message upstream gives.
    fn check_name(&self, name: &str) -> Result<(), &'static str> {
        validate::subdomain_name(name)
    }

    /// Spec changes bump `metadata.generation`.
    fn tracks_generation(&self) -> bool {
        false
    }

    /// Resets the status fields a client may not set on create.
    fn reset_status_on_create(&self, _obj: &mut Map<String, Value>) {}

    /// At start, before anything is served.
    fn start<'a>(&'a self, _state: &'a State) -> BoxFuture<'a, anyhow::Result<()>> {
        done(Ok(()))
    }

    /// Objects that always exist (created at start when missing).
    fn initial_objects(&self) -> Vec<Value> {
        Vec::new()
    }

    /// After validation, before a create or an update of the main resource
    /// is stored: may fill in `out` and hold resources for the write until
    /// it is settled ([`Held`]).
    fn prepare<'a>(
        &'a self,
        _state: &'a State,
        _write: Write<'a>,
        _out: &'a mut Value,
    ) -> BoxFuture<'a, ApiResult<Held>> {
        done(Ok(Held::default()))
    }

    /// After an update of `key` from `old` to `new` was committed.
    fn after_update<'a>(
        &'a self,
        _state: &'a State,
        _key: &'a str,
        _old: &'a Value,
        _new: &'a Value,
    ) -> BoxFuture<'a, ()> {
        done(())
    }

    /// Before a DELETE of `name` touches the object: may refuse it or do
    /// what must go first.
    fn before_delete<'a>(
        &'a self,
        _state: &'a State,
        _name: &'a str,
        _dry_run: bool,
    ) -> BoxFuture<'a, ApiResult<()>> {
        done(Ok(()))
    }

    /// `Some(seconds)`: a DELETE only marks the object (deletionTimestamp
    /// that far ahead); whoever runs it deletes it again when it is done.
    fn grace_period(&self, _obj: &Value, _opts: &Value, _q: &Query) -> ApiResult<Option<i64>> {
        Ok(None)
    }

    /// `metadata.finalizers` keep a deleted object (marked) until they are
    /// removed.
    fn finalizers_hold_delete(&self) -> bool {
        true
    }

    /// The columns of `kubectl get` (a server-side Table), as upstream's
    /// printers (`pkg/printers/internalversion`); priority-1 columns are
    /// the ones `-o wide` adds.
    fn columns(&self) -> Vec<Value> {
        vec![table::name_column(), table::age_column()]
    }

    /// One object's row under [`Strategy::columns`].
    fn cells(&self, o: &Value, now: jiff::Timestamp) -> Vec<Value> {
        vec![table::name_cell(o), table::age_cell(o, now)]
    }

    /// After `obj` at `key` was deleted at `rev`.
    fn after_delete<'a>(
        &'a self,
        _state: &'a State,
        _key: &'a str,
        _rev: Revision,
        _obj: &'a Value,
    ) -> BoxFuture<'a, ()> {
        done(())
    }
}

impl std::fmt::Debug for dyn Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Strategy")
    }
}

/// What a prepared write holds until it is settled: a Service's addresses,
/// claimed in memory (the ticket) and, on a shared store, in the store.
#[derive(Default)]
pub struct Held {
    ticket: Option<Ticket>,
    claimed: Vec<String>,
}

impl Held {
    pub fn new(ticket: Ticket, claimed: Vec<String>) -> Held {
        Held {
            ticket: Some(ticket),
            claimed,
        }
    }

    /// Runs the store write. One that holds something runs in a task of its
    /// own and settles the hold with the outcome: a client that goes away
    /// cannot stop it between the commit and the bookkeeping.
    pub async fn commit(
        &mut self,
        write: impl Future<Output = Result<Revision, StoreError>> + Send + 'static,
    ) -> ApiResult<Result<Revision, StoreError>> {
        let Some(ticket) = self.ticket.take() else {
            return Ok(write.await);
        };
        tokio::spawn(async move {
            let res = write.await;
            ticket.settle(res.as_ref().ok().copied());
            res
        })
        .await
        .map_err(|e| ApiError::internal(format!("store write task: {e}")))
    }

    /// Releases the store claims the object as stored (`None`: the write
    /// failed or did not happen) does not use.
    pub async fn release_unused(
        self,
        store: &dyn Store,
        key: &str,
        uid: &str,
        stored: Option<&Value>,
    ) {
        let Held { ticket, claimed } = self;
        drop(ticket);
        let keep = stored.map(allocate::claim_keys).unwrap_or_default();
        let unused: Vec<String> = claimed.into_iter().filter(|k| !keep.contains(k)).collect();
        if !unused.is_empty() {
            allocate::release(store, &unused, key, uid).await;
        }
    }
}
