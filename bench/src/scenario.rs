//! What the benchmark programs: N bulk services over three shared backends,
//! plus two services of its own (iperf3 and the "flip" service whose one
//! endpoint the change-latency phase moves back and forth), and the seeded
//! generator that picks target services.

use std::net::Ipv4Addr;

use anyhow::Result;
use kproxy_tests::{ManifestDir, backend_ip, endpointslice_yaml, multi_doc, service_yaml};
use serde_json::{Value, json};

/// Service port of every bulk service (TCP).
pub const SERVICE_PORT: u16 = 80;
/// Port the backends' "which backend are you" servers listen on.
pub const TARGET_PORT: u16 = 8080;
/// Backends shared by all bulk services.
pub const BULK_BACKENDS: [usize; 3] = [1, 2, 3];
/// Backend the flip service alternates with backend 1; used by no other service.
pub const FLIP_OTHER: usize = 4;
/// Number of backend namespaces.
pub const BACKENDS: usize = 4;
/// Bulk services per manifest file.
pub const PER_FILE: u32 = 1_000;

/// iperf3 service: ClusterIP:5201 → backend 1:5201 only. Outside the bulk
/// range (10.96.0.0 + i, i < 131,072) but inside the service CIDR 10.96.0.0/12.
pub const IPERF_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
pub const IPERF_PORT: u16 = 5201;
pub const IPERF_FILE: &str = "iperf.yaml";

/// The flip service: one endpoint, backend 1 or backend 4, on port 80 → 8080.
pub const FLIP_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
pub const FLIP_SERVICE_FILE: &str = "flip-service.yaml";
pub const FLIP_SLICE_FILE: &str = "flip-slice.yaml";

/// Services kproxy must report besides the bulk ones (iperf, flip).
pub const EXTRA_SERVICES: usize = 2;

/// ClusterIP of bulk service `i`: 10.96.0.0 + i.
pub fn cluster_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

fn bulk_name(i: u32) -> String {
    format!("svc-{i:06}")
}

fn bulk_objects(i: u32) -> [Value; 2] {
    let name = bulk_name(i);
    let endpoints: Vec<Value> = BULK_BACKENDS
        .iter()
        .map(|b| json!({ "addresses": [backend_ip(*b).to_string()], "conditions": { "ready": true } }))
        .collect();
    [
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": name, "namespace": "bench" },
            "spec": {
                "type": "ClusterIP",
                "clusterIP": cluster_ip(i).to_string(),
                "selector": { "app": name },
                "ports": [{ "name": "http", "port": SERVICE_PORT, "targetPort": TARGET_PORT, "protocol": "TCP" }],
            },
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{name}-b3nch"),
                "namespace": "bench",
                "labels": { "kubernetes.io/service-name": name },
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{ "name": "http", "port": TARGET_PORT, "protocol": "TCP" }],
        }),
    ]
}

/// The flip service's EndpointSlice with its one endpoint on `backend`.
pub fn flip_slice(backend: usize) -> String {
    endpointslice_yaml(
        "flip-f1ip0",
        "flip",
        &[(&backend_ip(backend).to_string(), true)],
        &[("http", TARGET_PORT, "TCP")],
    )
}

/// Writes the manifests of one scale: `n` bulk services in `bulk-NNNN.json`
/// files of [`PER_FILE`] services each (a `kind: List` of Services and
/// EndpointSlices), the iperf service and the flip service (slice on
/// backend 1). Returns the number of bytes written.
pub fn write_manifests(dir: &ManifestDir, n: u32, mut progress: impl FnMut(u32)) -> Result<u64> {
    let mut bytes = 0u64;
    let mut start = 0;
    let mut file_no = 0;
    while start < n {
        let end = (start + PER_FILE).min(n);
        let items: Vec<Value> = (start..end).flat_map(bulk_objects).collect();
        let text =
            serde_json::to_string(&json!({ "apiVersion": "v1", "kind": "List", "items": items }))?;
        bytes += text.len() as u64;
        dir.write(&format!("bulk-{file_no:04}.json"), &text)?;
        progress(end);
        start = end;
        file_no += 1;
    }
    let iperf = multi_doc(&[
        service_yaml(
            "iperf",
            &IPERF_IP.to_string(),
            &[("iperf", IPERF_PORT, IPERF_PORT, "TCP")],
        ),
        endpointslice_yaml(
            "iperf-1perf",
            "iperf",
            &[(&backend_ip(1).to_string(), true)],
            &[("iperf", IPERF_PORT, "TCP")],
        ),
    ]);
    let flip = service_yaml(
        "flip",
        &FLIP_IP.to_string(),
        &[("http", SERVICE_PORT, TARGET_PORT, "TCP")],
    );
    let slice = flip_slice(1);
    bytes += (iperf.len() + flip.len() + slice.len()) as u64;
    dir.write(IPERF_FILE, &iperf)?;
    dir.write(FLIP_SERVICE_FILE, &flip)?;
    dir.write(FLIP_SLICE_FILE, &slice)?;
    Ok(bytes)
}

/// splitmix64 (Steele, Lea, Flood 2014): tiny, seedable, good enough to
/// spread target services; the seed is printed in the report.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is < n / 2^64).
    pub fn below(&mut self, n: u32) -> u32 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_reference_values() {
        // First outputs for seed 0 of the reference implementation.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = SplitMix64::new(42);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let v = r.below(10);
            assert!(v < 10);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn bulk_addresses_stay_in_the_service_cidr_and_off_the_extra_services() {
        let last = cluster_ip(131_071);
        assert_eq!(last, Ipv4Addr::new(10, 97, 255, 255));
        assert!(u32::from(IPERF_IP) > u32::from(last));
        assert!(u32::from(FLIP_IP) < u32::from(Ipv4Addr::new(10, 112, 0, 0)));
    }
}
