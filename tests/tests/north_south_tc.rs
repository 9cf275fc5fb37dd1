//! The north-south cases (`north_south/mod.rs`) with `--xdp off`: the TC
//! programs alone must be as correct as with the XDP fast path in front.
//! eBPF only (iptables has no XDP to turn off).

// Each target uses part of the shared module.
#[allow(dead_code)]
#[path = "north_south/mod.rs"]
mod cases;

use cases::Xdp;

north_south_tests!(Xdp::Off);
