//! The initramfs: the binaries, the host tools with their libraries, the
//! kernel's modules and the plan, written as a newc cpio archive.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::builds::GuestBinaries;
use super::kernels::Kernel;
use super::modules::{module_bytes, module_plan};
use super::protocol::{GUEST_DIR, GUEST_PLAN, GUEST_TEST_TIMEOUT, GuestPlan};
use crate::util::{self, which};

/// Host programs the tests call (`ip netns …`, `tc`, `sysctl`, `nsenter
/// --net=`, `ethtool -K` for the north-south topology's NIC-like veths).
/// Busybox would not do: its `ip` has no `netns` nor veth peers in another
/// netns.
const REQUIRED_TOOLS: &[&str] = &["ip", "tc", "sysctl", "nsenter", "ethtool"];
/// Copied when the host has them: `bpftool` (cleanup.rs checks links with
/// it, and skips that part without it), iptables, `nft` and `conntrack`
/// (kproxy's iptables and nftables modes; inspect.rs asks both in a bare
/// namespace), `kubectl` (api.rs drives kcontrol with it; a static Go
/// binary of ~57 MB, the largest file in the initramfs), `etcd` (api.rs runs
/// kcontrol on a one-member etcd too; Debian's etcd-server, ~21 MB).
const OPTIONAL_TOOLS: &[&str] = &[
    "bpftool",
    "iptables",
    "iptables-save",
    "iptables-restore",
    "nft",
    "conntrack",
    "kubectl",
    "etcd",
];

/// The guest's PATH: the host tools keep their host paths in the image.
const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One initramfs entry.
#[derive(Clone)]
enum Node {
    Dir,
    /// Contents copied from a host file.
    File {
        src: PathBuf,
        mode: u32,
    },
    Bytes {
        data: Vec<u8>,
        mode: u32,
    },
    Symlink(String),
    CharDev(u32, u32),
}

/// Guest path (without the leading `/`) → entry. Sorted, so every
/// directory comes before what it contains.
#[derive(Clone, Default)]
pub(super) struct Image {
    entries: BTreeMap<String, Node>,
}

impl Image {
    fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        let mut prefix = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.entries.entry(prefix.clone()).or_insert(Node::Dir);
        }
    }

    fn put(&mut self, path: &str, node: Node) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entries.insert(path.to_string(), node);
    }

    /// Copies a host path into the same place in the guest, recreating every
    /// symlink on the way (`/lib64` → `usr/lib64`, `libbpf.so.1` →
    /// `libbpf.so.1.1.0`, `iptables` → `xtables-nft-multi`, …), so that
    /// interpreters, sonames and multi-call names resolve as on the host.
    fn add_host_path(&mut self, path: &Path) -> Result<()> {
        // Walk name by name from /; `cur` never contains a symlink.
        let mut pending: VecDeque<OsString> = names(path);
        let mut cur = PathBuf::from("/");
        let mut hops = 0;
        while let Some(name) = pending.pop_front() {
            if name == ".." {
                cur.pop();
                continue;
            }
            let next = cur.join(&name);
            let meta = fs::symlink_metadata(&next).with_context(|| {
                format!("{} (while copying {})", next.display(), path.display())
            })?;
            let guest = next.to_string_lossy().into_owned();
            if meta.file_type().is_symlink() {
                hops += 1;
                if hops > 40 {
                    bail!("too many symlinks resolving {}", path.display());
                }
                let target = fs::read_link(&next)?;
                self.put(&guest, Node::Symlink(target.to_string_lossy().into_owned()));
                if target.is_absolute() {
                    cur = PathBuf::from("/");
                }
                let mut resolved = names(&target);
                resolved.extend(pending.drain(..));
                pending = resolved;
            } else if !pending.is_empty() {
                self.dir(&guest);
                cur = next;
            } else if meta.is_dir() {
                self.dir(&guest);
            } else {
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode() & 0o7777;
                self.put(&guest, Node::File { src: next, mode });
            }
        }
        Ok(())
    }

    /// Total bytes of file contents.
    fn payload(&self) -> u64 {
        self.entries
            .values()
            .map(|n| match n {
                Node::File { src, .. } => src.metadata().map(|m| m.len()).unwrap_or(0),
                Node::Bytes { data, .. } => data.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// Writes the image as a cpio archive in the "newc" format the kernel
    /// unpacks into its initial rootfs.
    fn write_cpio(&self, out: &Path) -> Result<()> {
        let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut w = BufWriter::new(file);
        let mut ino = 1u32;
        for (path, node) in &self.entries {
            ino += 1;
            match node {
                Node::Dir => cpio_entry(&mut w, path, 0o040755, ino, (0, 0), &[])?,
                Node::Symlink(target) => {
                    cpio_entry(&mut w, path, 0o120777, ino, (0, 0), target.as_bytes())?
                }
                Node::CharDev(major, minor) => {
                    cpio_entry(&mut w, path, 0o020600, ino, (*major, *minor), &[])?
                }
                Node::Bytes { data, mode } => {
                    cpio_entry(&mut w, path, 0o100000 | mode, ino, (0, 0), data)?
                }
                Node::File { src, mode } => {
                    let data =
                        fs::read(src).with_context(|| format!("reading {}", src.display()))?;
                    cpio_entry(&mut w, path, 0o100000 | mode, ino, (0, 0), &data)?
                }
            }
        }
        cpio_entry(&mut w, "TRAILER!!!", 0, 0, (0, 0), &[])?;
        w.flush()?;
        Ok(())
    }
}

/// The names in a path, `..` kept (resolved against the real directory
/// walked so far), `/` and `.` dropped.
fn names(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// One newc record: 110-byte ASCII header, name, data, each padded to 4.
fn cpio_entry(
    w: &mut impl Write,
    name: &str,
    mode: u32,
    ino: u32,
    rdev: (u32, u32),
    data: &[u8],
) -> Result<()> {
    let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime: fixed, so identical inputs give identical images
        u32::try_from(data.len()).context("file too large for cpio")?,
        0, // dev major
        0, // dev minor
        rdev.0,
        rdev.1,
        u32::try_from(name.len() + 1)?,
        0, // check
    ];
    let mut header = String::from("070701");
    for f in fields {
        header.push_str(&format!("{f:08x}"));
    }
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    w.write_all(&[0u8; 3][..pad4(header.len() + name.len() + 1)])?;
    w.write_all(data)?;
    w.write_all(&[0u8; 3][..pad4(data.len())])?;
    Ok(())
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Everything but the modules: directories, the console device, the
/// binaries, the host tools with their libraries.
pub(super) fn add_base(image: &mut Image, bins: &GuestBinaries) -> Result<()> {
    for dir in ["dev", "proc", "sys", "run", "tmp", "etc", "root", "var"] {
        image.dir(dir);
    }
    // The kernel opens /dev/console for init before anything is mounted.
    image.put("dev/console", Node::CharDev(5, 1));
    image.put("var/run", Node::Symlink("../run".into()));
    image.put("var/tmp", Node::Symlink("../tmp".into()));
    image.put(
        "init",
        Node::File {
            src: bins.init.clone(),
            mode: 0o755,
        },
    );
    for (_, name, path) in &bins.programs {
        image.put(
            &format!("{GUEST_DIR}/bin/{name}"),
            Node::File {
                src: path.clone(),
                mode: 0o755,
            },
        );
    }
    for (name, path) in &bins.tests {
        image.put(
            &format!("{GUEST_DIR}/tests/{name}"),
            Node::File {
                src: path.clone(),
                mode: 0o755,
            },
        );
    }
    image.put(
        "etc/hosts",
        Node::Bytes {
            data: b"127.0.0.1 localhost\n".to_vec(),
            mode: 0o644,
        },
    );

    let mut programs = Vec::new();
    for tool in REQUIRED_TOOLS {
        let path = which(tool).with_context(|| {
            format!("`{tool}` is not on PATH; the guest needs it (cargo xtask setup installs iproute2 and procps)")
        })?;
        programs.push(path);
    }
    let mut optional = Vec::new();
    for tool in OPTIONAL_TOOLS {
        match which(tool) {
            Some(path) => {
                optional.push(*tool);
                programs.push(path);
            }
            None => say!("==> vm-test: `{tool}` not on this machine: the guest has none either"),
        }
    }
    // iptables loads its matches and targets with dlopen from here.
    let mut copies = programs.clone();
    if optional.contains(&"iptables") {
        for dir in ["/usr/lib/x86_64-linux-gnu/xtables", "/usr/lib/xtables"] {
            let dir = Path::new(dir);
            if dir.is_dir() {
                for entry in fs::read_dir(dir)?.flatten() {
                    copies.push(entry.path());
                }
                break;
            }
        }
    }
    for path in &copies {
        image.add_host_path(path)?;
    }
    // The guest's own binaries need libraries only with --dynamic; ldd
    // reports none for the static musl ones.
    let mut libs_of = copies;
    libs_of.push(bins.init.clone());
    libs_of.extend(bins.programs.iter().map(|(_, _, path)| path.clone()));
    libs_of.extend(bins.tests.iter().map(|(_, path)| path.clone()));
    for lib in shared_libraries(&libs_of)? {
        image.add_host_path(&lib)?;
    }
    // Lets the dynamic loader find the libraries exactly as on the host.
    if Path::new("/etc/ld.so.cache").exists() {
        image.add_host_path(Path::new("/etc/ld.so.cache"))?;
    }
    say!(
        "==> vm-test: guest tools: {} {}",
        REQUIRED_TOOLS.join(" "),
        optional.join(" ")
    );
    let unknown = programs_called_by_tests()
        .into_iter()
        .filter(|p| !REQUIRED_TOOLS.contains(&p.as_str()) && !OPTIONAL_TOOLS.contains(&p.as_str()))
        .collect::<Vec<_>>();
    if !unknown.is_empty() {
        say!(
            "==> vm-test: WARNING: the tests call {} but the guest has no such program: \
             add it to REQUIRED_TOOLS/OPTIONAL_TOOLS in xtask/src/vmtest/initramfs.rs",
            unknown.join(", ")
        );
    }
    Ok(())
}

/// The shared base plus this kernel's modules and the guest's plan, as
/// `DIR/initrd.cpio`.
pub(super) fn write_initramfs(
    kernel: &Kernel,
    base: &Image,
    bins: &GuestBinaries,
    dir: &Path,
) -> Result<PathBuf> {
    let label = &kernel.label;
    let (modules, skipped) = module_plan(kernel)?;
    let mut image = base.clone();
    let mut env = vec![("PATH".to_string(), GUEST_PATH.to_string())];
    for (var, name, _) in &bins.programs {
        env.push((var.clone(), format!("/{GUEST_DIR}/bin/{name}")));
    }
    // The kernel-dependent datapath; iptables mode is kernel-independent.
    env.push(("KPROXY_MODE".into(), "ebpf".into()));
    env.push(("HOME".into(), "/root".into()));
    env.push(("RUST_BACKTRACE".into(), "1".into()));
    let mut plan = GuestPlan {
        label: label.clone(),
        test_timeout: GUEST_TEST_TIMEOUT,
        env,
        modules: Vec::new(),
        tests: Vec::new(),
    };
    for (i, m) in modules.iter().enumerate() {
        let guest = format!("/{GUEST_DIR}/modules/{i:02}-{}.ko", m.name);
        image.put(
            &guest,
            Node::Bytes {
                data: module_bytes(&m.path)?,
                mode: 0o644,
            },
        );
        plan.modules.push((m.name.clone(), guest.into()));
    }
    for (name, _) in &bins.tests {
        plan.tests
            .push((name.clone(), format!("/{GUEST_DIR}/tests/{name}").into()));
    }
    image.put(
        GUEST_PLAN,
        Node::Bytes {
            data: plan.render().into_bytes(),
            mode: 0o644,
        },
    );
    let initrd = dir.join("initrd.cpio");
    image.write_cpio(&initrd)?;
    say!(
        "==> vm-test [{label}]: {} ({}), {} modules ({}){}, initramfs {} MiB",
        kernel.release,
        kernel.vmlinuz.display(),
        modules.len(),
        modules
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        if skipped.is_empty() {
            String::new()
        } else {
            format!(", not in this kernel: {}", skipped.join(" "))
        },
        image.payload() / (1024 * 1024)
    );
    Ok(initrd)
}

/// Program names the test sources start (`Command::new("x")`, the
/// harness's `cmd("x", …)`, `exec("x", …)`, …): a cheap early warning when
/// a test starts calling a program that the guest lacks.
fn programs_called_by_tests() -> BTreeSet<String> {
    let root = util::workspace_root().join("tests");
    let mut found = BTreeSet::new();
    for dir in [root.join("src"), root.join("tests")] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if let Ok(text) = fs::read_to_string(entry.path()) {
                found.extend(called_programs(&text));
            }
        }
    }
    found
}

pub(crate) fn called_programs(source: &str) -> BTreeSet<String> {
    const CALLS: &[&str] = &[
        "Command::new(\"",
        "cmd(\"",
        "cmd_output(\"",
        "exec(\"",
        "exec_output(\"",
        "have_program(\"",
    ];
    let mut found = BTreeSet::new();
    for call in CALLS {
        for (at, _) in source.match_indices(call) {
            // `ns.cmd(` etc. count too; `fn cmd(` declarations have no quote.
            let rest = &source[at + call.len()..];
            if let Some(name) = rest.split('"').next()
                && !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                found.insert(name.to_string());
            }
        }
    }
    found
}

/// Shared libraries (and the dynamic loader) of `binaries`, from one `ldd`.
fn shared_libraries(binaries: &[PathBuf]) -> Result<BTreeSet<PathBuf>> {
    let out = Command::new("ldd")
        .args(binaries)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("running ldd (Debian package libc-bin)")?;
    // ldd exits non-zero when one of them is static; its output still counts.
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

/// `\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` and
/// `\t/lib64/ld-linux-x86-64.so.2 (0x…)` → their absolute paths.
fn parse_ldd(text: &str) -> BTreeSet<PathBuf> {
    text.lines()
        .filter(|l| l.starts_with('\t'))
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => l,
            };
            let path = path.split(" (").next()?.trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::modules::{module_name, parse_softdep};
    use super::*;

    #[test]
    fn finds_programs_the_tests_call() {
        let src = r#"cmd("ip", &["netns"]); Command::new("nsenter"); ns.exec("bpftool", &[]);
            Command::new(program); fn cmd(program: &str) {} have_program("x/y");"#;
        let found: Vec<String> = called_programs(src).into_iter().collect();
        assert_eq!(found, ["bpftool", "ip", "nsenter"]);
    }

    #[test]
    fn cpio_records_are_padded() {
        let mut out = Vec::new();
        cpio_entry(&mut out, "init", 0o100755, 2, (0, 0), b"abcde").unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        assert_eq!(&out[110..115], b"init\0");
    }

    #[test]
    fn parses_ldd_and_softdeps() {
        let ldd = "/usr/sbin/ip:\n\tlinux-vdso.so.1 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x1)\n\t/lib64/ld-linux-x86-64.so.2 (0x2)\n";
        let libs: Vec<PathBuf> = parse_ldd(ldd).into_iter().collect();
        assert_eq!(
            libs,
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert_eq!(
            parse_softdep("pre: crc32c post: foo bar"),
            (
                vec!["crc32c".to_string()],
                vec!["foo".to_string(), "bar".to_string()]
            )
        );
        assert_eq!(module_name("veth.ko.xz"), Some("veth"));
    }
}
