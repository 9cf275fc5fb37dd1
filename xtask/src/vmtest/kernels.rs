//! Kernels to boot: `--kernel` values resolved to a vmlinuz and a modules
//! directory, Debian packages fetched with apt and unpacked into a cache.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::util::{self, output, run, which};

/// The kernel lines tested by default: the newest cloud kernel of each.
/// 6.1 is Debian 12's own kernel (no tcx: kproxy attaches through netlink),
/// 6.12 comes from bookworm-security (tcx links).
pub(super) const DEFAULT_LINES: &[&str] = &["6.1", "6.12"];

/// A bootable kernel and its modules.
pub(super) struct Kernel {
    /// Short name for the console prefix and the summary, e.g. `6.1`.
    pub(super) label: String,
    /// `uname -r` of the kernel, e.g. `6.1.0-57-cloud-amd64`.
    pub(super) release: String,
    pub(super) vmlinuz: PathBuf,
    /// A `/lib/modules/<release>` directory (searched recursively).
    pub(super) modules: PathBuf,
}

/// What a `--kernel` value names.
#[derive(Debug, PartialEq, Eq)]
enum KernelSpec {
    /// `6.1`: the newest `linux-image-6.1.*-cloud-amd64-unsigned`.
    Line(String),
    /// A Debian package name.
    Package(String),
    /// `path/to/vmlinuz:path/to/modules-dir`.
    Paths(PathBuf, PathBuf),
}

fn parse_spec(spec: &str) -> Result<KernelSpec> {
    if let Some((vmlinuz, modules)) = spec.split_once(':') {
        return Ok(KernelSpec::Paths(vmlinuz.into(), modules.into()));
    }
    let is_line = spec.split('.').count() == 2
        && spec
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if is_line {
        return Ok(KernelSpec::Line(spec.to_string()));
    }
    if spec.starts_with("linux-image-") {
        return Ok(KernelSpec::Package(spec.to_string()));
    }
    bail!(
        "--kernel {spec:?}: expected a kernel line (6.1), a Debian package \
         (linux-image-6.1.0-57-cloud-amd64-unsigned) or path/to/vmlinuz:path/to/modules-dir"
    )
}

pub(super) fn resolve_kernel(spec: &str, vm_dir: &Path, apt: &mut AptIndex) -> Result<Kernel> {
    match parse_spec(spec)? {
        KernelSpec::Paths(vmlinuz, modules) => {
            if !vmlinuz.is_file() {
                bail!("--kernel {spec}: {} is not a file", vmlinuz.display());
            }
            if !modules.is_dir() {
                bail!("--kernel {spec}: {} is not a directory", modules.display());
            }
            let release = modules
                .canonicalize()?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "custom".into());
            Ok(Kernel {
                label: String::new(),
                release,
                vmlinuz,
                modules,
            })
        }
        KernelSpec::Package(pkg) => fetch_package(&pkg, vm_dir),
        KernelSpec::Line(line) => {
            let pkg = match apt.newest_cloud_kernel(&line)? {
                Some(pkg) => pkg,
                None => match newest_cached(&line, vm_dir) {
                    Some(pkg) => {
                        say!(
                            "==> vm-test: apt offers no {line} cloud kernel; using the cached {pkg}"
                        );
                        pkg
                    }
                    None => bail!(
                        "no linux-image-{line}.*-cloud-amd64-unsigned in this machine's apt sources \
                         (even after apt-get update); Debian 12 has 6.1 in bookworm and 6.12 in \
                         bookworm-security. Name a package or give path/to/vmlinuz:path/to/modules-dir"
                    ),
                },
            };
            say!("==> vm-test: kernel line {line}: {pkg}");
            fetch_package(&pkg, vm_dir)
        }
    }
}

/// Package names of the apt cache, read once (and refreshed once with
/// `apt-get update` when a line has no kernel at all).
#[derive(Default)]
pub(super) struct AptIndex {
    names: Option<Vec<String>>,
    updated: bool,
}

impl AptIndex {
    fn load(&mut self) -> Result<&[String]> {
        if self.names.is_none() {
            let out = output(Command::new("apt-cache").args(["pkgnames", "linux-image-"]))
                .context("listing kernel packages with apt-cache")?;
            self.names = Some(out.lines().map(str::to_string).collect());
        }
        Ok(self.names.as_deref().unwrap_or_default())
    }

    fn newest_cloud_kernel(&mut self, line: &str) -> Result<Option<String>> {
        if which("apt-cache").is_none() {
            return Ok(None);
        }
        if let Some(pkg) = newest_of_line(line, self.load()?) {
            return Ok(Some(pkg));
        }
        if !self.updated {
            say!("==> vm-test: no {line} cloud kernel in the apt lists; refreshing them");
            run(Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["update", "-q"]))?;
            self.updated = true;
            self.names = None;
            return Ok(newest_of_line(line, self.load()?));
        }
        Ok(None)
    }
}

/// The newest `linux-image-<line>.…-cloud-amd64-unsigned` among `names`.
fn newest_of_line<S: AsRef<str>>(line: &str, names: &[S]) -> Option<String> {
    names
        .iter()
        .map(AsRef::as_ref)
        .filter_map(|n| Some((n, cloud_release(n)?)))
        .filter(|(_, rel)| rel.starts_with(&format!("{line}.")))
        .max_by_key(|(_, rel)| version_key(rel))
        .map(|(n, _)| n.to_string())
}

/// `linux-image-6.12.117+deb12-cloud-amd64-unsigned` → `6.12.117+deb12`.
fn cloud_release(pkg: &str) -> Option<&str> {
    pkg.strip_prefix("linux-image-")?
        .strip_suffix("-cloud-amd64-unsigned")
}

/// Numeric components of a release, for ordering: `6.1.0-57` → [6,1,0,57].
fn version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn kernels_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("kernels")
}

/// The newest already unpacked package of `line`, for offline runs.
fn newest_cached(line: &str, vm_dir: &Path) -> Option<String> {
    let names: Vec<String> = fs::read_dir(kernels_dir(vm_dir))
        .ok()?
        .flatten()
        .filter(|e| e.path().join(UNPACKED_STAMP).exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    newest_of_line(line, &names)
}

/// Written after a package was unpacked completely.
const UNPACKED_STAMP: &str = ".unpacked";

/// `apt-get download` + `dpkg-deb -x` into target/vm/kernels/<pkg>/, unless
/// it is there already.
fn fetch_package(pkg: &str, vm_dir: &Path) -> Result<Kernel> {
    let dir = kernels_dir(vm_dir).join(pkg);
    if dir.join(UNPACKED_STAMP).exists() {
        say!("==> vm-test: {pkg}: cached in {}", dir.display());
    } else {
        let debs = vm_dir.join("debs");
        fs::create_dir_all(&debs)?;
        let t = Instant::now();
        say!("==> vm-test: downloading {pkg}");
        // The sandbox user _apt cannot write into target/: download as root.
        run(Command::new("apt-get").current_dir(&debs).args([
            "download",
            "-q",
            "-o",
            "APT::Sandbox::User=root",
            pkg,
        ]))
        .with_context(|| format!("downloading {pkg} (is it in `apt-cache policy {pkg}`?)"))?;
        let deb = fs::read_dir(&debs)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
            })
            .with_context(|| {
                format!(
                    "apt-get download {pkg} left no {pkg}_*.deb in {}",
                    debs.display()
                )
            })?;
        // Package names contain dots: no with_extension here.
        fs::create_dir_all(kernels_dir(vm_dir))?;
        let partial = kernels_dir(vm_dir).join(format!("{pkg}.partial"));
        if partial.exists() {
            fs::remove_dir_all(&partial)?;
        }
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        say!("==> vm-test: unpacking {}", deb.display());
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        fs::rename(&partial, &dir)?;
        fs::write(dir.join(UNPACKED_STAMP), format!("{}\n", deb.display()))?;
        fs::remove_file(&deb).ok();
        say!(
            "==> vm-test: {pkg}: downloaded and unpacked in {}",
            util::secs(t.elapsed())
        );
    }
    let vmlinuz = only_entry(&dir.join("boot"), "vmlinuz-")?;
    let modules = only_entry(&dir.join("lib/modules"), "")?;
    let release = modules
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Kernel {
        label: String::new(),
        release,
        vmlinuz,
        modules,
    })
}

/// The single entry of `dir` whose name starts with `prefix`.
fn only_entry(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected exactly one {prefix}* in {}, found {}",
            dir.display(),
            found.len()
        ),
    }
}

/// Labels are the kernel's major.minor (`6.1`), or the whole release when
/// two kernels share it.
pub(super) fn assign_labels(kernels: &mut [Kernel]) {
    let short = |k: &Kernel| {
        let mut parts = k.release.split(|c: char| !c.is_ascii_digit());
        match (parts.next(), parts.next()) {
            (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => format!("{a}.{b}"),
            _ => k.release.clone(),
        }
    };
    let shorts: Vec<String> = kernels.iter().map(short).collect();
    for (k, s) in kernels.iter_mut().zip(&shorts) {
        let unique = shorts.iter().filter(|o| *o == s).count() == 1;
        k.label = if unique { s.clone() } else { k.release.clone() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_newest_cloud_kernel_of_a_line() {
        let names = [
            "linux-image-6.1.0-9-cloud-amd64-unsigned",
            "linux-image-6.1.0-57-cloud-amd64-unsigned",
            "linux-image-6.1.0-57-cloud-amd64",
            "linux-image-6.1.0-57-cloud-amd64-dbg",
            "linux-image-6.12.9+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.113+deb12-cloud-amd64-unsigned",
        ];
        assert_eq!(
            newest_of_line("6.1", &names).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64-unsigned")
        );
        assert_eq!(
            newest_of_line("6.12", &names).as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64-unsigned")
        );
        assert_eq!(newest_of_line("5.10", &names), None);
    }

    #[test]
    fn parses_kernel_specs() {
        assert_eq!(parse_spec("6.12").unwrap(), KernelSpec::Line("6.12".into()));
        assert_eq!(
            parse_spec("linux-image-6.1.0-57-cloud-amd64-unsigned").unwrap(),
            KernelSpec::Package("linux-image-6.1.0-57-cloud-amd64-unsigned".into())
        );
        assert_eq!(
            parse_spec("a/vmlinuz:b/modules").unwrap(),
            KernelSpec::Paths("a/vmlinuz".into(), "b/modules".into())
        );
        assert!(parse_spec("6.1.0").is_err());
    }
}
