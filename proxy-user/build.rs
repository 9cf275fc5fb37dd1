//! Embeds the eBPF object into the agent. `cargo xtask build` builds the
//! object first (nightly, bpfel-unknown-none, BTF, cpu v3) and passes its
//! path in KPROXY_BPF_OBJ; without it we look at the default output path.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=KPROXY_BPF_OBJ");
    let path = match std::env::var_os("KPROXY_BPF_OBJ") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../proxy-ebpf/target/bpfel-unknown-none/release/kproxy-ebpf"),
    };
    if !path.exists() {
        panic!(
            "eBPF object {} not found: run `cargo xtask build` (it builds the object with the \
             nightly toolchain first), or set KPROXY_BPF_OBJ to a built object",
            path.display()
        );
    }
    let path = path.canonicalize().expect("canonicalize eBPF object path");
    println!("cargo:rerun-if-changed={}", path.display());
    println!("cargo:rustc-env=KPROXY_BPF_OBJ_PATH={}", path.display());
}
