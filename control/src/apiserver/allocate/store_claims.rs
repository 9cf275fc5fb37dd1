//! Address claims in a store shared by several apiservers: one key per
//! address, created by the apiserver that hands the address out (see the
//! module above for when).

use std::collections::BTreeSet;

use kcontrol_store::{Store, StoreError};
use serde_json::{Value, json};

use super::Addrs;

/// Where address claims live (outside every resource's prefix).
pub const CLAIM_PREFIX: &str = "/registry/kcontrol/allocations/";
/// A claim whose Service does not hold its address is stale after this.
pub const CLAIM_GRACE_SECS: u64 = 60;

/// The claim keys of the addresses a Service holds: its cluster IPs and
/// node ports.
pub fn claim_keys(svc: &Value) -> BTreeSet<String> {
    let a = Addrs::of(svc);
    let ips = a
        .ips
        .iter()
        .map(|ip| format!("{CLAIM_PREFIX}clusterips/{ip}"));
    let ports = a
        .ports
        .iter()
        .map(|p| format!("{CLAIM_PREFIX}nodeports/{p}"));
    ips.chain(ports).collect()
}

pub(super) enum ClaimTarget<'a> {
    Ip(&'a str),
    Port(i32),
}

/// The address a claim key is for.
pub(super) fn claim_target(claim_key: &str) -> Option<ClaimTarget<'_>> {
    let rest = claim_key.strip_prefix(CLAIM_PREFIX)?;
    match rest.split_once('/')? {
        ("clusterips", ip) => Some(ClaimTarget::Ip(ip)),
        ("nodeports", p) => p.parse().ok().map(ClaimTarget::Port),
        _ => None,
    }
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn claim_value(owner: &str, uid: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({ "owner": owner, "uid": uid, "claimedAt": unix_now() }))
        .expect("json")
}

pub(super) fn uid_of(v: &Value) -> &str {
    v.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub enum ClaimError {
    /// Another Service holds (or is about to hold) the address of this key.
    Taken(String),
    Store(StoreError),
}

/// Claims one key for `owner`/`uid`: true if it is now ours.
async fn claim_one(
    store: &dyn Store,
    key: &str,
    owner: &str,
    uid: &str,
) -> Result<bool, StoreError> {
    for _ in 0..3 {
        match store.create(key, claim_value(owner, uid)).await {
            Ok(_) => return Ok(true),
            Err(StoreError::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
        let Some(kv) = store.get(key).await? else {
            continue; // released meanwhile: try again
        };
        let claim: Value = serde_json::from_slice(&kv.value).unwrap_or_default();
        let c_owner = claim["owner"].as_str().unwrap_or_default();
        let c_uid = claim["uid"].as_str().unwrap_or_default();
        if c_owner == owner && c_uid == uid {
            return Ok(true);
        }
        // Does the claiming Service hold the address?
        let held = match store.get(c_owner).await? {
            Some(svc) => serde_json::from_slice::<Value>(&svc.value)
                .map(|s| uid_of(&s) == c_uid && claim_keys(&s).contains(key))
                .unwrap_or(false),
            None => false,
        };
        let age = unix_now().saturating_sub(claim["claimedAt"].as_u64().unwrap_or(0));
        if held || age < CLAIM_GRACE_SECS {
            return Ok(false);
        }
        // Stale: take it over, unless it changed meanwhile.
        match store.delete(key, Some(kv.mod_revision)).await {
            Ok(_) | Err(StoreError::NotFound(_)) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Claims every key for the Service `owner` (its key) with `uid`; on
/// failure releases what it claimed.
pub async fn claim(
    store: &dyn Store,
    keys: &BTreeSet<String>,
    owner: &str,
    uid: &str,
) -> Result<Vec<String>, ClaimError> {
    let mut claimed = Vec::new();
    for k in keys {
        match claim_one(store, k, owner, uid).await {
            Ok(true) => claimed.push(k.clone()),
            Ok(false) => {
                release(store, &claimed, owner, uid).await;
                return Err(ClaimError::Taken(k.clone()));
            }
            Err(e) => {
                release(store, &claimed, owner, uid).await;
                return Err(ClaimError::Store(e));
            }
        }
    }
    Ok(claimed)
}

/// Releases the claims among `keys` that belong to `owner`/`uid`. Errors
/// are only logged: a claim left behind goes stale and is taken over.
pub async fn release<'a>(
    store: &dyn Store,
    keys: impl IntoIterator<Item = &'a String>,
    owner: &str,
    uid: &str,
) {
    for key in keys {
        let kv = match store.get(key).await {
            Ok(Some(kv)) => kv,
            Ok(None) => continue,
            Err(e) => {
                eprintln!("kcontrol: releasing {key}: {e}");
                continue;
            }
        };
        let claim: Value = serde_json::from_slice(&kv.value).unwrap_or_default();
        if claim["owner"].as_str() != Some(owner) || claim["uid"].as_str() != Some(uid) {
            continue;
        }
        match store.delete(key, Some(kv.mod_revision)).await {
            Ok(_) | Err(StoreError::NotFound(_)) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => eprintln!("kcontrol: releasing {key}: {e}"),
        }
    }
}

/// After a Service went from `old` to `new` (`None`: deleted): releases the
/// claims of the addresses it no longer holds.
pub async fn release_dropped(store: &dyn Store, owner: &str, old: &Value, new: Option<&Value>) {
    let keep = new.map(claim_keys).unwrap_or_default();
    let gone: Vec<String> = claim_keys(old).difference(&keep).cloned().collect();
    release(store, &gone, owner, uid_of(old)).await;
}
