//! Debian packages: what setup installs with apt, the table of every program
//! the project's code starts and the package it comes from, and the protoc
//! check the etcd store's build needs.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::Summary;
use crate::util::{output, run, which};

/// Debian packages the tests and the demo use: `ip` (iproute2), iptables (the
/// comparison baseline in tests), iperf3 (throughput checks), sysctl/pkill
/// (procps), modprobe (kmod), `conntrack` (kproxy's iptables and nftables
/// modes delete stale UDP flows with it, as kube-proxy does), `nft`
/// (nftables: kproxy's nftables mode), and `nc` (netcat-openbsd),
/// which the demo (`cargo xtask up`) tells the user to try. `cargo xtask
/// vm-test` boots kernels in qemu (qemu-system-x86), unpacks their .ko.xz
/// modules (xz-utils) and builds static musl binaries, some with C inside
/// (ring, through kube's rustls): musl-tools has `x86_64-linux-musl-gcc`.
/// kcontrol's etcd store: the `etcd-client` crate compiles etcd's protobufs
/// with `protoc` (protobuf-compiler), and those import the well-known types
/// (`google/protobuf/descriptor.proto`), which Debian ships separately in
/// libprotobuf-dev (see [`check_protoc`]); the etcd tests, the `--store etcd`
/// benchmark and users' etcd clusters run `/usr/bin/etcd` (etcd-server).
/// bpftool: the cleanup and cluster tests and `bench cluster` read BPF links
/// and maps with it. ethtool: the north-south tests give the outside
/// namespaces' veths a NIC's offloads (full checksums on transmit, GRO so
/// XDP can redirect into them). python3-venv: the Python client's own interpreter
/// (see [`super::kubernetes::ensure_python_kubernetes`]).
pub const APT_REQUIRED: &[&str] = &[
    "iproute2",
    "iptables",
    "iperf3",
    "procps",
    "kmod",
    "conntrack",
    "nftables",
    "netcat-openbsd",
    "qemu-system-x86",
    "xz-utils",
    "musl-tools",
    "protobuf-compiler",
    "libprotobuf-dev",
    "etcd-server",
    "bpftool",
    "ethtool",
    "python3-venv",
    // kcontrol's kubelet runs pod containers with crun, from a rootfs made of
    // busybox-static (see `ensure_busybox_rootfs`).
    "crun",
    "busybox-static",
];

/// Every program the project's code starts, and where it comes from: a
/// package of [`APT_REQUIRED`], a package every Debian system has
/// ([`BASE_PACKAGES`]), or something else that setup installs or checks
/// (`rustup`: the toolchains; `machine`: kubectl, which this kind of machine
/// ships; `venv`: the Python client's interpreter). A unit test fails when the
/// code starts a program missing here, and (on Debian) when a program is not
/// in the package named for it — so a program installed by hand cannot keep
/// the suite green here while a fresh machine fails.
pub const PROGRAMS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("ss", "iproute2"),
    ("iptables", "iptables"),
    ("iptables-save", "iptables"),
    ("iptables-restore", "iptables"),
    ("conntrack", "conntrack"),
    ("nft", "nftables"),
    ("unshare", "util-linux"),
    ("iperf3", "iperf3"),
    ("sysctl", "procps"),
    ("modinfo", "kmod"),
    ("bpftool", "bpftool"),
    ("ethtool", "ethtool"),
    ("crun", "crun"),
    ("busybox", "busybox-static"),
    ("etcd", "etcd-server"),
    ("protoc", "protobuf-compiler"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("nc", "netcat-openbsd"),
    ("nsenter", "util-linux"),
    ("mount", "mount"),
    ("sh", "dash"),
    ("date", "coreutils"),
    ("false", "coreutils"),
    ("ldd", "libc-bin"),
    ("strip", "binutils"),
    ("git", "machine"),
    ("dpkg", "dpkg"),
    ("dpkg-query", "dpkg"),
    ("dpkg-deb", "dpkg"),
    ("apt-get", "apt"),
    ("apt-cache", "apt"),
    ("python3", "python3-minimal"),
    ("cargo", "rustup"),
    ("rustc", "rustup"),
    ("rustup", "rustup"),
    ("kubectl", "machine"),
];

/// The [`PROGRAMS`] sources that are not Debian packages.
const NOT_APT: &[&str] = &["machine", "rustup"];

/// Packages of every Debian 12 system of this kind (essential or priority
/// required/important, or on the machine before anything is installed:
/// binutils and python3 come with its toolchains). `machine` is what this
/// kind of machine ships outside Debian's packages: kubectl (checked by
/// [`super::kubernetes::check_kubectl`]) and a git under /usr/local.
const BASE_PACKAGES: &[&str] = &[
    "util-linux",
    "mount",
    "dash",
    "coreutils",
    "libc-bin",
    "binutils",
    "dpkg",
    "apt",
    "python3-minimal",
];

pub(super) fn ensure_apt_packages(summary: &mut Summary) -> Result<()> {
    if which("dpkg-query").is_none() || which("apt-get").is_none() {
        summary.note(
            "system packages",
            format!(
                "not a Debian-like system: install the equivalents of {} yourself",
                APT_REQUIRED.join(", ")
            ),
        );
        return Ok(());
    }
    let missing_required: Vec<&str> = APT_REQUIRED
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing_required.is_empty() {
        summary.note("system packages", "already present");
        return Ok(());
    }

    let mut apt = Apt { updated: false };
    // apt-get cannot install anything before the package lists exist.
    if !apt.lists_present() {
        apt.update()?;
    }

    if !apt.install(&missing_required) {
        // Stale lists are the usual reason (a mirror dropped the old
        // version): refresh them once and try again.
        if apt.updated {
            bail!("apt-get install {} failed", missing_required.join(" "));
        }
        apt.update()?;
        if !apt.install(&missing_required) {
            bail!("apt-get install {} failed", missing_required.join(" "));
        }
    }
    summary.note(
        "system packages",
        format!("installed {}", missing_required.join(" ")),
    );
    Ok(())
}

/// Every program of [`PROGRAMS`] is on PATH now (kubectl has a check of its
/// own; the toolchain's programs are rustup's). Names the package to install
/// for each one that is not.
pub(super) fn check_programs(summary: &mut Summary) -> Result<()> {
    let missing: Vec<String> = PROGRAMS
        .iter()
        .filter(|(_, package)| !NOT_APT.contains(package))
        .filter(|(program, _)| which(program).is_none())
        .map(|(program, package)| {
            let kind = if BASE_PACKAGES.contains(package) {
                "base package"
            } else {
                "package"
            };
            format!("{program} ({kind} {package})")
        })
        .collect();
    if !missing.is_empty() {
        bail!(
            "programs the build, tests or demo run are missing after setup: {}; install those \
             packages",
            missing.join(", ")
        );
    }
    summary.note(
        "programs",
        format!("all {} the project runs are on PATH", PROGRAMS.len()),
    );
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", pkg]))
        .is_ok_and(|s| s == "installed")
}

struct Apt {
    updated: bool,
}

impl Apt {
    fn lists_present(&self) -> bool {
        fs::read_dir("/var/lib/apt/lists")
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
            })
            .unwrap_or(false)
    }

    fn update(&mut self) -> Result<()> {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["update", "-q"]))?;
        self.updated = true;
        Ok(())
    }

    fn install(&self, pkgs: &[&str]) -> bool {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(pkgs))
        .is_ok()
    }
}

/// `protoc` as etcd-client's build script runs it: a file importing a
/// well-known type must compile. Debian's protobuf-compiler has no
/// `google/protobuf/*.proto`; without libprotobuf-dev this fails minutes into
/// the build ("google/protobuf/descriptor.proto: File not found"), so check
/// it here and name the package.
pub(super) fn check_protoc(summary: &mut Summary) -> Result<()> {
    let dir = tempdir("protoc-check")?;
    fs::write(
        dir.join("check.proto"),
        "syntax = \"proto3\";\nimport \"google/protobuf/descriptor.proto\";\n\
         message Check { google.protobuf.FileDescriptorProto f = 1; }\n",
    )?;
    let result = output(
        Command::new("protoc")
            .arg("-I")
            .arg(&dir)
            .arg("--descriptor_set_out")
            .arg(dir.join("check.pb"))
            .arg(dir.join("check.proto")),
    );
    let _ = fs::remove_dir_all(&dir);
    match result {
        Ok(_) => {
            let version = output(Command::new("protoc").arg("--version")).unwrap_or_default();
            summary.note(
                "protoc",
                format!("{version} compiles google/protobuf/descriptor.proto imports"),
            );
            Ok(())
        }
        Err(e) => bail!(
            "protoc cannot compile a file importing google/protobuf/descriptor.proto, which the etcd \
             store's build needs: install the Debian package libprotobuf-dev (and protobuf-compiler) \
             ({e:#})"
        ),
    }
}

/// A fresh directory under the system temp dir.
fn tempdir(tag: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kproxy-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;
    use crate::util;

    /// Sources whose `Command::new("x")`-style calls start programs on the
    /// host (the vm-test guest's own list is checked by vm-test).
    const SOURCE_DIRS: &[&str] = &[
        "tests/src",
        "tests/tests",
        "control/src",
        "control/tests",
        "control/store/src",
        "control/store/tests",
        "control/names/src",
        "testbed/src",
        "proxy-user/src",
        "bench/src",
        "xtask/src",
    ];

    #[test]
    fn every_program_the_code_starts_comes_from_setup() {
        let root = util::workspace_root();
        let mut files = Vec::new();
        for d in SOURCE_DIRS {
            util::files_with_extension(&root.join(d), "rs", true, &mut files).unwrap();
        }
        assert!(files.len() > 50, "found only {} sources", files.len());
        let mut unknown = std::collections::BTreeMap::new();
        for f in &files {
            let text = fs::read_to_string(f).unwrap();
            for program in crate::vmtest::called_programs(&text) {
                // Calls inside this test's own fixtures (xtask's unit tests
                // of the scanner use made-up names).
                if ["x", "x/y"].contains(&program.as_str()) {
                    continue;
                }
                if !PROGRAMS.iter().any(|(p, _)| *p == program) {
                    unknown
                        .entry(program)
                        .or_insert_with(Vec::new)
                        .push(f.strip_prefix(&root).unwrap().display().to_string());
                }
            }
        }
        assert!(
            unknown.is_empty(),
            "programs started by the code but not in setup::PROGRAMS (add each with the \
             package that provides it, and that package to APT_REQUIRED): {unknown:#?}"
        );
        for (program, package) in PROGRAMS {
            assert!(
                APT_REQUIRED.contains(package)
                    || BASE_PACKAGES.contains(package)
                    || NOT_APT.contains(package),
                "{program}: package {package} is neither installed by setup nor a base package"
            );
        }
    }

    /// `coreutils, util-linux: /usr/bin/x` or `iproute2:amd64: /bin/ip` →
    /// the package names.
    fn dpkg_owners(out: &str) -> Vec<String> {
        out.lines()
            .filter_map(|l| l.split_once(": "))
            .flat_map(|(pkgs, _)| {
                pkgs.split(", ")
                    .map(|p| p.split(':').next().unwrap_or(p).to_owned())
            })
            .collect()
    }

    /// The table names the right packages: each program on this machine
    /// (setup has run) belongs to the package the table says.
    #[test]
    fn program_table_matches_the_installed_packages() {
        let mut wrong = Vec::new();
        for (program, package) in PROGRAMS {
            if NOT_APT.contains(package) {
                continue;
            }
            let path = which(program)
                .unwrap_or_else(|| panic!("{program} is not on PATH: run `cargo xtask setup`"));
            let real = fs::canonicalize(&path).unwrap();
            // dpkg records the path the package ships (/bin or /usr/bin with
            // merged /usr): ask for each spelling; python3 on PATH may be a
            // shim, so for it ask for Debian's interpreter.
            let mut candidates = vec![path.clone(), real.clone()];
            if *program == "python3" {
                candidates.push(PathBuf::from("/usr/bin/python3"));
            }
            for p in candidates.clone() {
                match p.strip_prefix("/usr") {
                    Ok(rest) => candidates.push(Path::new("/").join(rest)),
                    Err(_) => candidates.push(Path::new("/usr").join(p.strip_prefix("/").unwrap())),
                }
            }
            let owners: BTreeSet<String> = candidates
                .iter()
                .filter_map(|p| output(Command::new("dpkg").arg("-S").arg(p)).ok())
                .flat_map(|out| dpkg_owners(&out))
                .collect();
            if !owners.iter().any(|o| o == package) {
                wrong.push(format!(
                    "{program} ({}) belongs to {owners:?}, not {package}",
                    real.display()
                ));
            }
        }
        assert!(wrong.is_empty(), "setup::PROGRAMS is wrong: {wrong:#?}");
    }
}
