//! Raw HTTP against `kcontrol apiserver`: authentication, error statuses
//! (400, 401, 404, 409, 410, 413, 415, 422), pagination, selectors, tables,
//! resourceVersion semantics, subresources.
//!
//! One target, by topic: access.rs (authentication, discovery),
//! bad_requests.rs (malformed requests, invalid objects),
//! bad_input_per_verb.rs (malformed input for each verb),
//! writes.rs (conflicts, preconditions, concurrent Service creates) and
//! reads.rs (pagination, selectors, watch resourceVersions).

mod common;

#[path = "api/access.rs"]
mod access;
#[path = "api/bad_input_per_verb.rs"]
mod bad_input_per_verb;
#[path = "api/bad_requests.rs"]
mod bad_requests;
#[path = "api/reads.rs"]
mod reads;
#[path = "api/writes.rs"]
mod writes;

const CMS: &str = "/api/v1/namespaces/default/configmaps";
