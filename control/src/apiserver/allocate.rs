//! ClusterIP and NodePort allocation for Services.
//!
//! What is taken is read from the stored Services while [`Allocator::lock`]
//! is held, and the lock is kept until the write that claims the address is
//! committed. That serializes one apiserver's allocations; several
//! apiservers on one etcd also need each address *claimed* in the store:
//! a claim is a key per address (`/registry/kcontrol/allocations/clusterips/IP`,
//! `…/nodeports/PORT`) made with the store's create, which only one writer
//! can win, before the Service that holds the address is written (as
//! upstream's IPAddress objects). A claim names its Service (key and uid);
//! it is released when that Service lets the address go, and a claim whose
//! Service does not hold the address (a crash between claim and write) is
//! taken over once it is older than [`CLAIM_GRACE_SECS`]. Services stored
//! before claims existed (or migrated) hold their addresses through the
//! stored-Services check.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, bail};
use kcontrol_store::{Store, StoreError};
use serde_json::{Value, json};

use super::status::FieldError;

/// `a.b.c.d/n` (or an IPv6 CIDR) → (address, prefix length).
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

pub struct Allocator {
    cidr: String,
    base: u32,
    size: u64,
    node_ports: (i32, i32),
    /// Held from reading the taken addresses until the claiming write is done.
    pub lock: tokio::sync::Mutex<()>,
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("getrandom");
    u64::from_le_bytes(b)
}

impl Allocator {
    pub fn new(service_cidr: &str, node_port_range: &str) -> anyhow::Result<Self> {
        let Some((IpAddr::V4(ip), len)) = parse_cidr(service_cidr) else {
            bail!("--service-cidr {service_cidr:?}: expected an IPv4 CIDR like 10.96.0.0/12");
        };
        if !(8..=30).contains(&len) {
            bail!("--service-cidr {service_cidr:?}: prefix length must be between 8 and 30");
        }
        let size = 1u64 << (32 - len);
        let base = u32::from(ip) & !((size - 1) as u32);
        let (lo, hi) = node_port_range
            .split_once('-')
            .context("--node-port-range: expected LOW-HIGH")?;
        let lo: i32 = lo
            .trim()
            .parse()
            .context("--node-port-range: bad low port")?;
        let hi: i32 = hi
            .trim()
            .parse()
            .context("--node-port-range: bad high port")?;
        if !(1..=65535).contains(&lo) || !(lo..=65535).contains(&hi) {
            bail!("--node-port-range {node_port_range:?}: must be within 1-65535, low ≤ high");
        }
        Ok(Allocator {
            cidr: format!("{}/{len}", Ipv4Addr::from(base)),
            base,
            size,
            node_ports: (lo, hi),
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Usable addresses exclude the network and broadcast addresses.
    fn in_range(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip) as u64;
        let base = self.base as u64;
        v > base && v < base + self.size - 1
    }

    /// Fills in `spec.clusterIP(s)` and node ports of a normalized Service,
    /// keeping what `old` had (a PUT or patch that leaves them out must not
    /// move them), and checks requested ones. `others` are all the other
    /// stored Services.
    pub fn assign(
        &self,
        svc: &mut Value,
        old: Option<&Value>,
        others: &[Value],
    ) -> Result<(), Vec<FieldError>> {
        let mut used_ips = BTreeSet::new();
        let mut used_ports = BTreeSet::new();
        for o in others {
            for ip in o
                .pointer("/spec/clusterIPs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(ip) = ip.as_str() {
                    used_ips.insert(ip.to_string());
                }
            }
            for p in o
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(n) = p.get("nodePort").and_then(Value::as_i64) {
                    used_ports.insert(n as i32);
                }
            }
            if let Some(n) = o
                .pointer("/spec/healthCheckNodePort")
                .and_then(Value::as_i64)
            {
                used_ports.insert(n as i32);
            }
        }

        let spec = svc["spec"]
            .as_object_mut()
            .expect("normalized service has a spec");
        let ty = spec
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_string();
        let old_spec = old.and_then(|o| o.get("spec"));
        let mut errs = Vec::new();

        // Cluster IP.
        if ty == "ExternalName" {
            spec.remove("clusterIP");
            spec.remove("clusterIPs");
            spec.remove("ipFamilies");
            spec.remove("ipFamilyPolicy");
            spec.remove("internalTrafficPolicy");
        } else {
            let mut ip = spec
                .get("clusterIP")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if ip.is_empty()
                && let Some(prev) = old_spec
                    .and_then(|s| s.get("clusterIP"))
                    .and_then(Value::as_str)
            {
                ip = prev.to_string();
            }
            let unchanged = old_spec
                .and_then(|s| s.get("clusterIP"))
                .and_then(Value::as_str)
                == Some(ip.as_str());
            if ip.is_empty() {
                match self.pick_ip(&used_ips) {
                    Some(a) => ip = a.to_string(),
                    None => errs.push(FieldError::invalid(
                        "spec.clusterIPs",
                        json!([]),
                        format!(
                            "failed to allocate a serviceIP: range {} is full",
                            self.cidr
                        ),
                    )),
                }
            } else if ip != "None" && !unchanged {
                match ip.parse::<IpAddr>() {
                    Ok(IpAddr::V4(a)) if self.in_range(a) => {
                        if used_ips.contains(&ip) {
                            errs.push(FieldError::invalid(
                                "spec.clusterIPs",
                                json!([ip]),
                                format!("failed to allocate IP {ip}: provided IP is already allocated"),
                            ));
                        }
                    }
                    Ok(_) => errs.push(FieldError::invalid(
                        "spec.clusterIPs",
                        json!([ip]),
                        format!(
                            "failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. The range of valid IPs is {}",
                            self.cidr
                        ),
                    )),
                    // Already reported by validation.
                    Err(_) => {}
                }
            }
            spec.insert("clusterIP".into(), json!(ip));
            spec.insert("clusterIPs".into(), json!([ip]));
        }

        // Node ports.
        let wants_node_ports = ty == "NodePort"
            || (ty == "LoadBalancer"
                && spec.get("allocateLoadBalancerNodePorts") != Some(&json!(false)));
        let old_ports: Vec<Value> = old_spec
            .and_then(|s| s.get("ports"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut mine = BTreeSet::new();
        if let Some(Value::Array(ports)) = spec.get_mut("ports") {
            for (i, p) in ports.iter_mut().enumerate() {
                let port = p.get("port").cloned();
                let proto = p.get("protocol").cloned();
                let prev = old_ports
                    .iter()
                    .find(|o| o.get("port") == port.as_ref() && o.get("protocol") == proto.as_ref())
                    .and_then(|o| o.get("nodePort"))
                    .and_then(Value::as_i64)
                    .map(|n| n as i32);
                let Some(pm) = p.as_object_mut() else {
                    continue;
                };
                if !wants_node_ports {
                    pm.remove("nodePort");
                    continue;
                }
                let mut np = pm.get("nodePort").and_then(Value::as_i64).unwrap_or(0) as i32;
                if np == 0 {
                    np = prev.unwrap_or(0);
                }
                if np == 0 {
                    let mut taken = used_ports.clone();
                    taken.extend(mine.iter().copied());
                    match self.pick_port(&taken) {
                        Some(n) => np = n,
                        None => {
                            errs.push(FieldError::invalid(
                                format!("spec.ports[{i}].nodePort"),
                                0,
                                "failed to allocate a nodePort: range is full",
                            ));
                            continue;
                        }
                    }
                } else if Some(np) != prev {
                    if !(self.node_ports.0..=self.node_ports.1).contains(&np) {
                        errs.push(FieldError::invalid(
                            format!("spec.ports[{i}].nodePort"),
                            np,
                            format!(
                                "provided port is not in the valid range. The range of valid ports is {}-{}",
                                self.node_ports.0, self.node_ports.1
                            ),
                        ));
                    } else if used_ports.contains(&np) {
                        errs.push(FieldError::invalid(
                            format!("spec.ports[{i}].nodePort"),
                            np,
                            "provided port is already allocated",
                        ));
                    }
                }
                mine.insert(np);
                pm.insert("nodePort".into(), json!(np));
            }
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    fn pick_ip(&self, used: &BTreeSet<String>) -> Option<Ipv4Addr> {
        let usable = self.size - 2;
        let start = random_u64() % usable;
        (0..usable).find_map(|i| {
            let a = Ipv4Addr::from(self.base + 1 + ((start + i) % usable) as u32);
            (!used.contains(&a.to_string())).then_some(a)
        })
    }

    fn pick_port(&self, used: &BTreeSet<i32>) -> Option<i32> {
        let (lo, hi) = self.node_ports;
        let n = (hi - lo + 1) as u64;
        let start = random_u64() % n;
        (0..n).find_map(|i| {
            let p = lo + ((start + i) % n) as i32;
            (!used.contains(&p)).then_some(p)
        })
    }
}

/// Where address claims live (outside every resource's prefix).
pub const CLAIM_PREFIX: &str = "/registry/kcontrol/allocations/";
/// A claim whose Service does not hold its address is stale after this.
pub const CLAIM_GRACE_SECS: u64 = 60;

/// The claim keys of the addresses a Service holds: its cluster IPs and
/// node ports.
pub fn claim_keys(svc: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for ip in svc
        .pointer("/spec/clusterIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|ip| !ip.is_empty() && *ip != "None")
    {
        out.insert(format!("{CLAIM_PREFIX}clusterips/{ip}"));
    }
    for p in svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(n) = p.get("nodePort").and_then(Value::as_i64) {
            out.insert(format!("{CLAIM_PREFIX}nodeports/{n}"));
        }
    }
    out
}

/// A stand-in Service holding the address of a claim key, so that
/// [`Allocator::assign`] treats it as taken.
pub fn holder_of(claim_key: &str) -> Value {
    let rest = claim_key.strip_prefix(CLAIM_PREFIX).unwrap_or_default();
    match rest.split_once('/') {
        Some(("clusterips", ip)) => json!({ "spec": { "clusterIPs": [ip] } }),
        Some(("nodeports", p)) => {
            json!({ "spec": { "ports": [{ "nodePort": p.parse::<i64>().unwrap_or(0) }] } })
        }
        _ => json!({}),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn claim_value(owner: &str, uid: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({ "owner": owner, "uid": uid, "claimedAt": unix_now() }))
        .expect("json")
}

fn uid_of(v: &Value) -> &str {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ty: &str, ip: Option<&str>, node_port: Option<i32>) -> Value {
        let mut port = json!({"port": 80, "protocol": "TCP"});
        if let Some(n) = node_port {
            port["nodePort"] = json!(n);
        }
        let mut s = json!({"spec": {"type": ty, "ports": [port]}});
        if let Some(ip) = ip {
            s["spec"]["clusterIP"] = json!(ip);
        }
        s
    }

    #[test]
    fn allocates_within_ranges_and_rejects_taken() {
        let a = Allocator::new("10.96.0.0/28", "30000-30001").unwrap();
        let mut s1 = svc("NodePort", None, None);
        a.assign(&mut s1, None, &[]).unwrap();
        let ip: Ipv4Addr = s1["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
        assert!(a.in_range(ip));
        let np = s1["spec"]["ports"][0]["nodePort"].as_i64().unwrap() as i32;
        assert!((30000..=30001).contains(&np));

        let mut dup = svc("NodePort", Some(&ip.to_string()), Some(np));
        let errs = a
            .assign(&mut dup, None, std::slice::from_ref(&s1))
            .unwrap_err();
        assert_eq!(errs.len(), 2);
        assert!(errs[0].to_string().contains("already allocated"));
        assert!(errs[1].to_string().contains("spec.ports[0].nodePort"));

        let mut out = svc("ClusterIP", Some("10.97.0.1"), None);
        let errs = a.assign(&mut out, None, &[]).unwrap_err();
        assert!(errs[0].to_string().contains("not in the valid range"));

        // An update that omits the allocated values keeps them.
        let mut upd = svc("NodePort", None, None);
        a.assign(&mut upd, Some(&s1), &[]).unwrap();
        assert_eq!(upd["spec"]["clusterIP"], s1["spec"]["clusterIP"]);
        assert_eq!(upd["spec"]["ports"][0]["nodePort"], np);

        // NodePort → ClusterIP drops the node ports.
        let mut back = svc("ClusterIP", None, Some(np));
        a.assign(&mut back, Some(&s1), &[]).unwrap();
        assert!(back["spec"]["ports"][0].get("nodePort").is_none());

        let mut headless = svc("ClusterIP", Some("None"), None);
        a.assign(&mut headless, None, &[]).unwrap();
        assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));
    }
}
