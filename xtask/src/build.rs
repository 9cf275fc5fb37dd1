//! `cargo xtask build`: the eBPF object (nightly, BPF target) and then the
//! kproxy agent, which embeds that object.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::util::{self, Toolchain, run};

/// The BPF target; `bpfel` because every machine we run on is little-endian.
pub const BPF_TARGET: &str = "bpfel-unknown-none";
/// Binary target name of the eBPF crate (proxy-ebpf/Cargo.toml `[[bin]]`).
const BPF_BIN: &str = "kproxy-ebpf";
/// Environment variable through which proxy-user's build.rs finds the object
/// to embed (and tests find it to load it directly).
pub const BPF_OBJ_ENV: &str = "KPROXY_BPF_OBJ";
/// The agent binary the integration tests, benchmarks and smoke runs use.
pub const KPROXY_BIN_ENV: &str = "KPROXY_BIN";
/// The kcontrol binary for the tests that run a real apiserver (and the
/// smoke runs).
pub const KCONTROL_BIN_ENV: &str = "KCONTROL_BIN";

/// What a build produced, as absolute paths.
pub struct BuildOutputs {
    /// The eBPF ELF object (always a release build).
    pub bpf_obj: PathBuf,
    /// The kproxy agent binary (target/release/kproxy or target/debug/kproxy).
    pub kproxy: PathBuf,
    /// The kcontrol binary (same profile), which the API tests start.
    pub kcontrol: PathBuf,
}

/// proxy-ebpf/: its own cargo workspace, built with cwd there so that its
/// .cargo/config.toml (BPF rustflags, build-std) is the one cargo reads.
pub fn ebpf_dir() -> PathBuf {
    util::workspace_root().join("proxy-ebpf")
}

/// Builds the eBPF object and then the agent. Does not run setup: callers
/// (the subcommands) do that first.
///
/// `release` only selects the agent's profile: the eBPF object is always built
/// with `--release`, since unoptimised BPF code does not get past the verifier.
pub fn build_all(release: bool) -> Result<BuildOutputs> {
    let bpf_obj = build_ebpf()?;
    let kproxy = build_agent(release, &bpf_obj)?;
    let kcontrol = kproxy.with_file_name("kcontrol");
    Ok(BuildOutputs {
        bpf_obj,
        kproxy,
        kcontrol,
    })
}

/// `cargo +nightly build --release --target bpfel-unknown-none -Z build-std=core`
/// in proxy-ebpf/. Returns the object's absolute path.
pub fn build_ebpf() -> Result<PathBuf> {
    let dir = ebpf_dir();
    let config = dir.join(".cargo/config.toml");
    if !config.is_file() {
        // The rustflags (BTF, target-cpu=v3) live there and nowhere else.
        bail!(
            "{} is missing: it carries the BPF rustflags (-C debuginfo=2 -C link-arg=--btf -C target-cpu=v3)",
            config.display()
        );
    }
    let target_dir = dir.join("target");
    let mut cmd = util::cargo(Toolchain::Nightly);
    cmd.current_dir(&dir)
        .args([
            "build",
            "--release",
            "--target",
            BPF_TARGET,
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    run(&mut cmd).context("building the eBPF object")?;

    let obj = target_dir.join(BPF_TARGET).join("release").join(BPF_BIN);
    let size = obj
        .metadata()
        .with_context(|| format!("eBPF build succeeded but {} is missing", obj.display()))?
        .len();
    say!("==> eBPF object: {} ({size} bytes)", obj.display());
    Ok(obj)
}

/// `cargo build [--release] -p proxy-user -p kcontrol` with KPROXY_BPF_OBJ
/// set. Returns the kproxy binary's absolute path (kcontrol is beside it).
pub fn build_agent(release: bool, bpf_obj: &Path) -> Result<PathBuf> {
    let mut cmd = util::cargo(Toolchain::Active);
    cmd.current_dir(util::workspace_root())
        .env(BPF_OBJ_ENV, bpf_obj)
        .args(["build", "-p", "proxy-user", "-p", "kcontrol"])
        .args(release.then_some("--release"))
        .arg("--target-dir")
        .arg(util::target_dir());
    run(&mut cmd).context("building the kproxy agent")?;

    let profile = if release { "release" } else { "debug" };
    let kproxy = util::target_dir().join(profile).join("kproxy");
    if !kproxy.is_file() {
        bail!("agent build succeeded but {} is missing", kproxy.display());
    }
    say!("==> kproxy binary: {}", kproxy.display());
    Ok(kproxy)
}
