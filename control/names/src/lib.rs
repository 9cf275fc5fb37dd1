//! How kcontrol's kubelet names what it creates on the host for a pod.
//!
//! Every name derives from [`pod_hash`] of the pod UID, so a harness that
//! knows a pod's UID can find (or clean up after a crash) its container,
//! network namespace and veth without asking the kubelet:
//!
//! | object | name |
//! |---|---|
//! | crun container | `kc-<hash>-<container>` ([`container_id`]) |
//! | network namespace | `/run/netns/kcns-<hash>` ([`netns`]) |
//! | host-side veth | `kcv<hash>` ([`veth`]) |
//! | cgroup | `/kcontrol/<node>/<hash>/<container>` |
//!
//! The hash is 12 hex digits so that `kcv` + hash fits Linux's 15-byte
//! interface names.

/// Host-side pod veths carry this prefix (kproxy's `--iface-prefix kcv`
/// follows them).
pub const VETH_PREFIX: &str = "kcv";
/// Pod network namespaces (under /run/netns) carry this prefix.
pub const NETNS_PREFIX: &str = "kcns-";
/// crun container ids carry this prefix.
pub const CONTAINER_PREFIX: &str = "kc-";

/// 12 hex digits of FNV-1a 64 over the pod UID (its low 48 bits).
pub fn pod_hash(uid: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

/// The crun container id of `container` in the pod with hash `hash`.
pub fn container_id(hash: &str, container: &str) -> String {
    format!("{CONTAINER_PREFIX}{hash}-{container}")
}

/// The network namespace name (under /run/netns) of the pod with hash `hash`.
pub fn netns(hash: &str) -> String {
    format!("{NETNS_PREFIX}{hash}")
}

/// The host-side veth of the pod with hash `hash`.
pub fn veth(hash: &str) -> String {
    format!("{VETH_PREFIX}{hash}")
}

/// The pod hash in a container id made by [`container_id`], if it is one.
pub fn hash_of_container_id(id: &str) -> Option<&str> {
    let rest = id.strip_prefix(CONTAINER_PREFIX)?;
    let hash = rest.get(..12)?;
    (rest.as_bytes().get(12) == Some(&b'-') && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_hash_is_fnv1a_48_bits() {
        // FNV-1a 64 of "" is its offset basis; of "a" 0xaf63dc4c8601ec8c.
        assert_eq!(pod_hash(""), "9ce484222325");
        assert_eq!(pod_hash("a"), "dc4c8601ec8c");
    }

    #[test]
    fn names_fit_an_interface_name_and_round_trip() {
        let h = pod_hash("0b7c1f9e-2f47-4c4e-9d1a-5a3c1c0e9f11");
        assert!(veth(&h).len() <= 15, "{}", veth(&h));
        let id = container_id(&h, "web");
        assert_eq!(hash_of_container_id(&id), Some(h.as_str()));
        assert_eq!(netns(&h), format!("kcns-{h}"));
        assert_eq!(hash_of_container_id("kc-short-web"), None);
        assert_eq!(hash_of_container_id("other"), None);
    }
}
