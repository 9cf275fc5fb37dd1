//! ClusterIP and NodePort allocation for Services.
//!
//! ClusterIPs come from one range per IP family (`range.rs`; two for a
//! dual-stack cluster); which families a Service gets, and which of its
//! addresses are requested or still to pick, is `cluster_ips.rs`. Below,
//! an address is its canonical text (`fd00::a`, however it was written),
//! in memory and in claim keys alike.
//!
//! What is taken is kept in memory: the addresses of every stored Service
//! (loaded from the store at start, then updated after each committed
//! Service write or delete, in revision order per key) plus the addresses
//! claimed by writes in flight. A write claims its addresses under a short
//! lock ([`Allocator::claim`]), commits without holding it (so Service
//! writes group-commit like any other), and then settles its claim: kept as
//! stored on commit, released on failure. Nothing can leak after a crash
//! (the state is rebuilt from the stored Services at start).
//!
//! That is the whole story on the embedded store, which one apiserver owns.
//! Several apiservers sharing one etcd ([`Allocator::shared_store`]) also
//! need each address *claimed in the store*: a claim is a key per address
//! (`/registry/kcontrol/allocations/clusterips/IP`, `…/nodeports/PORT`)
//! made with the store's create, which only one writer can win, after the
//! in-memory claim and before the Service that holds the address is written
//! (as upstream's IPAddress objects); again no lock is held while it is
//! written. A claim names its Service (key and uid); it is released when
//! that Service lets the address go, and a claim whose Service does not
//! hold the address (a crash between claim and write) is taken over once it
//! is older than [`CLAIM_GRACE_SECS`]. The memory of such an apiserver is
//! a cache in front of the claims: an address found claimed elsewhere, or a
//! range that looks full, makes it re-read the stored Services and claims
//! ([`Allocator::resynced`]) and try again. Services stored before claims
//! existed (or migrated) hold their addresses through the stored-Services
//! part.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use kcontrol_store::{KeyValue, Revision};
use serde_json::{Value, json};

use super::status::FieldError;

mod cluster_ips;
mod range;
mod store_claims;

use range::ServiceRange;
pub use range::{Family, parse_cidr};
pub use store_claims::{
    CLAIM_GRACE_SECS, CLAIM_PREFIX, ClaimError, claim, claim_keys, release, release_dropped,
};
use store_claims::{ClaimTarget, claim_target, uid_of, unix_now};

pub struct Allocator {
    /// One range per IP family the cluster serves, the primary first.
    ranges: Vec<ServiceRange>,
    node_ports: (i32, i32),
    claims: Arc<Mutex<Claims>>,
    /// Notified whenever a ticket is settled or dropped.
    settled_signal: Arc<tokio::sync::Notify>,
    /// The store is shared with other apiservers: claim addresses in it too.
    shared: bool,
}

/// The addresses one Service holds.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Addrs {
    ips: Vec<String>,
    ports: Vec<i32>,
}

/// An address as the allocator keys it: its canonical text, so that
/// `fd00:0::A` and `fd00::a` are one address (and one claim key).
fn canonical_ip(ip: &str) -> Option<String> {
    ip.parse::<IpAddr>().ok().map(|a| a.to_string())
}

impl Addrs {
    pub fn of(svc: &Value) -> Addrs {
        let mut a = Addrs::default();
        for ip in svc
            .pointer("/spec/clusterIPs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            a.ips.extend(canonical_ip(ip));
        }
        for p in svc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(n) = p.get("nodePort").and_then(Value::as_i64) {
                a.ports.push(n as i32);
            }
        }
        if let Some(ip) = svc
            .pointer("/spec/clusterIP")
            .and_then(Value::as_str)
            .and_then(canonical_ip)
            && !a.ips.contains(&ip)
        {
            a.ips.push(ip);
        }
        if let Some(n) = svc
            .pointer("/spec/healthCheckNodePort")
            .and_then(Value::as_i64)
        {
            a.ports.push(n as i32);
        }
        a
    }
}

/// What is taken: stored Services and claims of writes in flight, with a
/// count per address (so that removing one holder keeps the others').
#[derive(Default)]
struct Claims {
    /// Stored Service key → (revision of the newest write seen, addresses);
    /// a deleted Service keeps its revision with no addresses, so that an
    /// older write settling late cannot bring it back.
    stored: HashMap<String, (i64, Addrs)>,
    /// Ticket → (key, addresses) of writes in flight.
    pending: HashMap<u64, (String, Addrs)>,
    ips: HashMap<String, u32>,
    ports: HashMap<i32, u32>,
    /// Shared store only: addresses claimed in the store for which no
    /// stored Service known here holds the address (writes in flight on
    /// another apiserver). Taken; replaced by each resync.
    foreign_ips: HashSet<String>,
    foreign_ports: HashSet<i32>,
    next_ticket: u64,
}

impl Claims {
    fn add(&mut self, a: &Addrs) {
        for ip in &a.ips {
            *self.ips.entry(ip.clone()).or_default() += 1;
        }
        for p in &a.ports {
            *self.ports.entry(*p).or_default() += 1;
        }
    }

    fn remove(&mut self, a: &Addrs) {
        for ip in &a.ips {
            if let Some(n) = self.ips.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    self.ips.remove(ip);
                }
            }
        }
        for p in &a.ports {
            if let Some(n) = self.ports.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    self.ports.remove(p);
                }
            }
        }
    }

    /// The key's own holdings (stored and in flight): not taken for it.
    fn own(&self, key: &str) -> Addrs {
        let mut a = self
            .stored
            .get(key)
            .map(|(_, a)| a.clone())
            .unwrap_or_default();
        for (k, p) in self.pending.values() {
            if k == key {
                a.ips.extend(p.ips.iter().cloned());
                a.ports.extend(p.ports.iter().copied());
            }
        }
        a
    }

    fn record(&mut self, key: &str, rev: i64, addrs: Addrs) {
        if let Some((r, _)) = self.stored.get(key)
            && *r >= rev
        {
            return;
        }
        if let Some((_, old)) = self.stored.remove(key) {
            self.remove(&old);
        }
        self.add(&addrs);
        self.stored.insert(key.to_string(), (rev, addrs));
    }
}

/// Whether an address is taken, for [`Allocator::assign`].
pub trait Taken {
    fn ip(&self, ip: &str) -> bool;
    fn port(&self, port: i32) -> bool;
}

/// Taken = held by anyone but `own`'s key.
struct ClaimsExcept<'a> {
    claims: &'a Claims,
    own: Addrs,
}

impl Taken for ClaimsExcept<'_> {
    fn ip(&self, ip: &str) -> bool {
        if self.claims.foreign_ips.contains(ip) {
            return true;
        }
        let own = self.own.ips.iter().filter(|i| *i == ip).count() as u32;
        self.claims.ips.get(ip).copied().unwrap_or(0) > own
    }
    fn port(&self, port: i32) -> bool {
        if self.claims.foreign_ports.contains(&port) {
            return true;
        }
        let own = self.own.ports.iter().filter(|p| **p == port).count() as u32;
        self.claims.ports.get(&port).copied().unwrap_or(0) > own
    }
}

/// Taken = held by one of a list of Services (unit tests).
#[cfg(test)]
pub struct Used {
    ips: BTreeSet<String>,
    ports: BTreeSet<i32>,
}

#[cfg(test)]
impl Used {
    pub fn from_services(others: &[Value]) -> Used {
        let mut u = Used {
            ips: BTreeSet::new(),
            ports: BTreeSet::new(),
        };
        for o in others {
            let a = Addrs::of(o);
            u.ips.extend(a.ips);
            u.ports.extend(a.ports);
        }
        u
    }
}

#[cfg(test)]
impl Taken for Used {
    fn ip(&self, ip: &str) -> bool {
        self.ips.contains(ip)
    }
    fn port(&self, port: i32) -> bool {
        self.ports.contains(&port)
    }
}

/// A claim of a write in flight. Dropped without [`Ticket::settle`] (the
/// write was not attempted), its addresses are released.
pub struct Ticket {
    claims: Arc<Mutex<Claims>>,
    settled_signal: Arc<tokio::sync::Notify>,
    id: u64,
    key: String,
    settled: bool,
}

impl Ticket {
    /// The write committed at `rev` (`Some`: the claimed addresses are now
    /// stored) or did not happen (`None`: released).
    pub fn settle(mut self, committed: Option<i64>) {
        self.settled = true;
        let mut c = self.claims.lock().expect("claims lock");
        if let Some((_, addrs)) = c.pending.remove(&self.id) {
            c.remove(&addrs);
            if let Some(rev) = committed {
                c.record(&self.key, rev, addrs);
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled {
            let mut c = self.claims.lock().expect("claims lock");
            if let Some((_, addrs)) = c.pending.remove(&self.id) {
                c.remove(&addrs);
            }
        }
        self.settled_signal.notify_waiters();
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("getrandom");
    u64::from_le_bytes(b)
}

impl Allocator {
    /// `service_cidr`: one CIDR, or an IPv4 and an IPv6 one separated by a
    /// comma (dual-stack; the first is the primary family).
    pub fn new(service_cidr: &str, node_port_range: &str) -> anyhow::Result<Self> {
        let ranges = range::parse_service_cidrs(service_cidr)?;
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
            ranges,
            node_ports: (lo, hi),
            claims: Arc::default(),
            settled_signal: Arc::default(),
            shared: false,
        })
    }

    /// Whether other apiservers share the store (etcd): addresses are then
    /// claimed in the store as well (see the module doc).
    pub fn shared_store(mut self, shared: bool) -> Self {
        self.shared = shared;
        self
    }

    pub fn shared(&self) -> bool {
        self.shared
    }

    /// The stored Services (key, revision, object), at start.
    #[cfg(test)]
    pub fn load(&self, services: impl IntoIterator<Item = (String, i64, Value)>) {
        let mut c = self.claims.lock().expect("claims lock");
        for (key, rev, svc) in services {
            c.record(&key, rev, Addrs::of(&svc));
        }
    }

    /// Assigns `svc`'s addresses (see [`Allocator::assign`]) against
    /// everything held by other keys, and claims them until the returned
    /// ticket is settled.
    pub fn claim(
        &self,
        key: &str,
        svc: &mut Value,
        old: Option<&Value>,
    ) -> Result<Ticket, Vec<FieldError>> {
        let mut c = self.claims.lock().expect("claims lock");
        let taken = ClaimsExcept {
            own: c.own(key),
            claims: &c,
        };
        self.assign(svc, old, &taken)?;
        let addrs = Addrs::of(svc);
        c.add(&addrs);
        let id = c.next_ticket;
        c.next_ticket += 1;
        c.pending.insert(id, (key.to_string(), addrs));
        Ok(Ticket {
            claims: self.claims.clone(),
            settled_signal: self.settled_signal.clone(),
            id,
            key: key.to_string(),
            settled: false,
        })
    }

    /// What the store held at revision `at`: every stored Service (key,
    /// revision, object) and every address claim key. Services known here
    /// but not listed were deleted (through another apiserver); claims no
    /// listed Service holds are taken (in flight elsewhere) unless older
    /// than [`CLAIM_GRACE_SECS`] (stale: [`claim`] takes them over).
    pub fn resynced(&self, at: Revision, services: Vec<(String, i64, Value)>, claims: &[KeyValue]) {
        let holds: HashMap<&str, (&str, BTreeSet<String>)> = services
            .iter()
            .map(|(k, _, v)| (k.as_str(), (uid_of(v), claim_keys(v))))
            .collect();
        let now = unix_now();
        let mut foreign_ips = HashSet::new();
        let mut foreign_ports = HashSet::new();
        for kv in claims {
            let claim: Value = serde_json::from_slice(&kv.value).unwrap_or_default();
            let owner = claim["owner"].as_str().unwrap_or_default();
            let uid = claim["uid"].as_str().unwrap_or_default();
            let held = holds
                .get(owner)
                .is_some_and(|(u, keys)| *u == uid && keys.contains(&kv.key));
            let age = now.saturating_sub(claim["claimedAt"].as_u64().unwrap_or(0));
            if held || age >= CLAIM_GRACE_SECS {
                continue;
            }
            match claim_target(&kv.key) {
                Some(ClaimTarget::Ip(ip)) => {
                    foreign_ips.insert(ip.to_string());
                }
                Some(ClaimTarget::Port(p)) => {
                    foreign_ports.insert(p);
                }
                None => {}
            }
        }
        let mut c = self.claims.lock().expect("claims lock");
        let gone: Vec<String> = c
            .stored
            .iter()
            .filter(|(k, (rev, a))| {
                *rev < at && *a != Addrs::default() && !holds.contains_key(k.as_str())
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            c.record(&k, at, Addrs::default());
        }
        for (key, rev, svc) in services {
            c.record(&key, rev, Addrs::of(&svc));
        }
        c.foreign_ips = foreign_ips;
        c.foreign_ports = foreign_ports;
    }

    /// Waits (at most `within`) until a write in flight here for a key
    /// other than `key` settles: what it holds may come free (a write that
    /// loses its store claim lets its in-memory one go). False at once if
    /// there is none, or when the time is up.
    pub async fn settled_elsewhere(&self, key: &str, within: std::time::Duration) -> bool {
        let signal = self.settled_signal.notified();
        tokio::pin!(signal);
        signal.as_mut().enable();
        let others = self
            .claims
            .lock()
            .expect("claims lock")
            .pending
            .values()
            .any(|(k, _)| k != key);
        others && tokio::time::timeout(within, signal).await.is_ok()
    }

    /// The store claim `claim_key` belongs to someone else: taken until the
    /// next resync.
    pub fn claimed_elsewhere(&self, claim_key: &str) {
        let mut c = self.claims.lock().expect("claims lock");
        match claim_target(claim_key) {
            Some(ClaimTarget::Ip(ip)) => {
                c.foreign_ips.insert(ip.to_string());
            }
            Some(ClaimTarget::Port(p)) => {
                c.foreign_ports.insert(p);
            }
            None => {}
        }
    }

    /// The Service at `key` was deleted at `rev`: its addresses are free.
    pub fn deleted(&self, key: &str, rev: i64) {
        self.claims
            .lock()
            .expect("claims lock")
            .record(key, rev, Addrs::default());
    }

    /// Fills in `spec.clusterIP(s)` and node ports of a normalized Service,
    /// keeping what `old` had (a PUT or patch that leaves them out must not
    /// move them), and checks requested ones against `taken`.
    pub fn assign(
        &self,
        svc: &mut Value,
        old: Option<&Value>,
        taken: &dyn Taken,
    ) -> Result<(), Vec<FieldError>> {
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

        // Cluster IPs.
        if ty == "ExternalName" {
            spec.remove("clusterIP");
            spec.remove("clusterIPs");
            spec.remove("ipFamilies");
            spec.remove("ipFamilyPolicy");
            spec.remove("internalTrafficPolicy");
        } else {
            cluster_ips::assign(&self.ranges, spec, old_spec, taken, &mut errs);
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
                    match self.pick_port(|p| taken.port(p) || mine.contains(&p)) {
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
                    } else if taken.port(np) {
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

    fn pick_port(&self, taken: impl Fn(i32) -> bool) -> Option<i32> {
        let (lo, hi) = self.node_ports;
        let n = (hi - lo + 1) as u64;
        let start = random_u64() % n;
        (0..n).find_map(|i| {
            let p = lo + ((start + i) % n) as i32;
            (!taken(p)).then_some(p)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> Used {
        Used::from_services(&[])
    }

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
        a.assign(&mut s1, None, &none()).unwrap();
        let ip: IpAddr = s1["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
        assert!(a.ranges[0].contains(ip));
        let np = s1["spec"]["ports"][0]["nodePort"].as_i64().unwrap() as i32;
        assert!((30000..=30001).contains(&np));

        let mut dup = svc("NodePort", Some(&ip.to_string()), Some(np));
        let errs = a
            .assign(
                &mut dup,
                None,
                &Used::from_services(std::slice::from_ref(&s1)),
            )
            .unwrap_err();
        assert_eq!(errs.len(), 2);
        assert!(errs[0].to_string().contains("already allocated"));
        assert!(errs[1].to_string().contains("spec.ports[0].nodePort"));

        let mut out = svc("ClusterIP", Some("10.97.0.1"), None);
        let errs = a.assign(&mut out, None, &none()).unwrap_err();
        assert!(errs[0].to_string().contains("not in the valid range"));

        // An update that omits the allocated values keeps them.
        let mut upd = svc("NodePort", None, None);
        a.assign(&mut upd, Some(&s1), &none()).unwrap();
        assert_eq!(upd["spec"]["clusterIP"], s1["spec"]["clusterIP"]);
        assert_eq!(upd["spec"]["ports"][0]["nodePort"], np);

        // NodePort → ClusterIP drops the node ports.
        let mut back = svc("ClusterIP", None, Some(np));
        a.assign(&mut back, Some(&s1), &none()).unwrap();
        assert!(back["spec"]["ports"][0].get("nodePort").is_none());

        let mut headless = svc("ClusterIP", Some("None"), None);
        a.assign(&mut headless, None, &none()).unwrap();
        assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));
    }
}

#[cfg(test)]
mod claim_tests {
    use super::*;

    fn svc(ip: Option<&str>) -> Value {
        let mut s =
            json!({"spec": {"type": "ClusterIP", "ports": [{"port": 80, "protocol": "TCP"}]}});
        if let Some(ip) = ip {
            s["spec"]["clusterIP"] = json!(ip);
        }
        s
    }

    #[test]
    fn claims_hold_until_settled_and_deletes_free() {
        let a = Allocator::new("10.96.0.0/24", "30000-30001").unwrap();
        // In flight: another key cannot take the address.
        let mut s1 = svc(Some("10.96.0.10"));
        let t1 = a.claim("/s/a", &mut s1, None).unwrap();
        let mut s2 = svc(Some("10.96.0.10"));
        assert!(a.claim("/s/b", &mut s2, None).is_err());
        // The same key (an update racing it) may.
        let mut again = svc(Some("10.96.0.10"));
        drop(a.claim("/s/a", &mut again, None).unwrap());
        // A write that did not happen releases it.
        drop(t1);
        let t2 = a.claim("/s/b", &mut s2, None).unwrap();
        t2.settle(Some(5));
        let mut s3 = svc(Some("10.96.0.10"));
        assert!(a.claim("/s/c", &mut s3, None).is_err());
        // An older write settling after the delete does not bring it back.
        a.deleted("/s/b", 7);
        let mut late = svc(Some("10.96.0.11"));
        let t = a.claim("/s/b", &mut late, None).unwrap();
        t.settle(Some(6));
        let t3 = a.claim("/s/c", &mut s3, None).unwrap();
        t3.settle(Some(8));
        let mut s4 = svc(Some("10.96.0.11"));
        drop(a.claim("/s/d", &mut s4, None).unwrap());
        // Loaded state counts as stored.
        a.load([("/s/e".to_string(), 9, svc(Some("10.96.0.12")))]);
        let mut s5 = svc(Some("10.96.0.12"));
        assert!(a.claim("/s/f", &mut s5, None).is_err());
        // Automatic picks avoid everything held.
        for i in 0..200 {
            let mut s = svc(None);
            let t = a.claim(&format!("/s/auto{i}"), &mut s, None).unwrap();
            let ip = s["spec"]["clusterIP"].as_str().unwrap().to_string();
            assert!(ip != "10.96.0.10" && ip != "10.96.0.12", "{ip}");
            t.settle(Some(100 + i));
        }
    }

    fn claim_kv(addr: &str, owner: &str, uid: &str, claimed_at: u64) -> KeyValue {
        KeyValue {
            key: format!("{CLAIM_PREFIX}{addr}"),
            value: serde_json::to_vec(
                &json!({"owner": owner, "uid": uid, "claimedAt": claimed_at}),
            )
            .unwrap(),
            create_revision: 1,
            mod_revision: 1,
        }
    }

    #[test]
    fn resync_learns_what_other_apiservers_did() {
        let a = Allocator::new("10.96.0.0/24", "30000-30001")
            .unwrap()
            .shared_store(true);
        let mut s = svc(Some("10.96.0.10"));
        a.claim("/s/a", &mut s, None).unwrap().settle(Some(3));
        let mut held = svc(Some("10.96.0.11"));
        held["metadata"] = json!({"uid": "u-b"});
        // At revision 10: /s/a was deleted elsewhere, /s/b holds .11 with
        // its claim, .12 is claimed by a write in flight elsewhere, .13 by
        // a stale claim.
        let now = unix_now();
        a.resynced(
            10,
            vec![("/s/b".into(), 9, held)],
            &[
                claim_kv("clusterips/10.96.0.11", "/s/b", "u-b", now),
                claim_kv("clusterips/10.96.0.12", "/s/c", "u-c", now),
                claim_kv(
                    "clusterips/10.96.0.13",
                    "/s/d",
                    "u-d",
                    now - CLAIM_GRACE_SECS - 1,
                ),
            ],
        );
        for (ip, free) in [
            ("10.96.0.10", true),
            ("10.96.0.11", false),
            ("10.96.0.12", false),
            ("10.96.0.13", true),
        ] {
            let mut s = svc(Some(ip));
            assert_eq!(a.claim("/s/new", &mut s, None).is_ok(), free, "{ip}");
        }
        // A claim found in the store by a write counts until the next resync.
        a.claimed_elsewhere(&format!("{CLAIM_PREFIX}clusterips/10.96.0.14"));
        let mut s = svc(Some("10.96.0.14"));
        assert!(a.claim("/s/new", &mut s, None).is_err());
        a.resynced(11, vec![], &[]);
        assert!(a.claim("/s/new", &mut s, None).is_ok());
    }
}
