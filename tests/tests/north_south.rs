//! North-south (NodePort, externalIPs, LoadBalancer, traffic policies,
//! source ranges, health checks) in the suite's datapath; eBPF with its
//! default XDP fast path on the external interfaces. The cases are in
//! `north_south/mod.rs`.

// Each target uses part of the shared module.
#[allow(dead_code)]
#[path = "north_south/mod.rs"]
mod cases;

use cases::Xdp;

north_south_tests!(Xdp::Default);
