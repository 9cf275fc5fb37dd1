//! ClusterIP and NodePort allocation for Services.
//!
//! There is no allocator state of its own: what is taken is read from the
//! stored Services while [`Allocator::lock`] is held, and the lock is kept
//! until the write that claims the address is committed. One apiserver owns
//! a data dir, so this is race-free, and nothing can leak after a crash (a
//! deleted Service frees its addresses by no longer existing).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, bail};
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
