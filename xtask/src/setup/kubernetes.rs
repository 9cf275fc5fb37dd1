//! What kcontrol's cluster and its tests need beyond packages: kubectl
//! (checked, not installed), the official Python client in a venv of the
//! project's own, the busybox rootfs the kubelet's containers run on, and a
//! cgroup layout crun accepts.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::Summary;
use crate::util::{self, output, run, succeeds, which};

/// The kubectl versions the tests pin to (the oldest and newest this kind of
/// machine ships): `kubectl.1.27` and `kubectl.1.33` beside the `kubectl`
/// dispatcher.
const KUBECTL_PINNED: &[&str] = &["1.27", "1.33"];
/// The oldest kubectl the tests and `cargo xtask up` work with.
const KUBECTL_MIN_MINOR: u32 = 27;

/// kubectl cannot come from apt here (Debian's kubernetes-client conflicts
/// with the one the machine image ships), so setup only checks: a kubectl ≥
/// 1.27 on PATH and the pinned versioned binaries next to its real target.
pub(super) fn check_kubectl(summary: &mut Summary) -> Result<()> {
    const HOW: &str = "install kubectl ≥ 1.27 on PATH (https://kubernetes.io/docs/tasks/tools/), \
                       with the versioned binaries kubectl.1.27 and kubectl.1.33 in the same folder \
                       (the Google Cloud SDK's kubectl component ships them)";
    let Some(kubectl) = which("kubectl") else {
        bail!("kubectl is not on PATH: {HOW}");
    };
    let version = output(Command::new(&kubectl).args(["version", "--client", "-o", "json"]))
        .with_context(|| format!("`{} version --client` failed: {HOW}", kubectl.display()))?;
    let minor = kubectl_minor(&version).with_context(|| {
        format!("no clientVersion.minor in `kubectl version --client -o json`:\n{version}")
    })?;
    if minor < KUBECTL_MIN_MINOR {
        bail!("kubectl on PATH is 1.{minor}, older than 1.{KUBECTL_MIN_MINOR}: {HOW}");
    }
    let dir = fs::canonicalize(&kubectl)
        .with_context(|| format!("resolving {}", kubectl.display()))?
        .parent()
        .map(Path::to_path_buf)
        .context("kubectl has no folder")?;
    let missing: Vec<String> = KUBECTL_PINNED
        .iter()
        .map(|v| dir.join(format!("kubectl.{v}")))
        .filter(|p| !util::is_executable(p))
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        bail!("missing {}: {HOW}", missing.join(", "));
    }
    summary.note(
        "kubectl",
        format!(
            "1.{minor} at {}, pinned {} beside it",
            kubectl.display(),
            KUBECTL_PINNED.join(", ")
        ),
    );
    Ok(())
}

/// `"minor": "33"` (sometimes `"33+"`) of `kubectl version --client -o json`.
fn kubectl_minor(json: &str) -> Option<u32> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let minor = value.get("clientVersion")?.get("minor")?.as_str()?;
    minor.trim_end_matches('+').parse().ok()
}

/// The Python client's virtual environment, under the workspace's target dir
/// (`KPROXY_PYTHON` tells the tests its interpreter).
pub const PYTHON_VENV: &str = "pyenv";
/// kubernetes-client/python 33.x is generated from Kubernetes 1.33.
const PYTHON_KUBERNETES_VERSION: &str = "33.1.0";

/// The official Kubernetes Python client, which kcontrol's apiserver tests
/// drive (`control/tests/py/client.py`), in a virtual environment of the
/// project's own ([`PYTHON_VENV`] under target/), never in the system
/// interpreter. The version is pinned to the client generation that matches
/// the newest API the apiserver serves (1.33). Only `import kubernetes` runs
/// when it is there already.
pub(super) fn ensure_python_kubernetes(summary: &mut Summary) -> Result<()> {
    if which("python3").is_none() {
        bail!("python3 is missing: install it (Debian: apt-get install python3 python3-venv)");
    }
    let venv = util::target_dir().join(PYTHON_VENV);
    let python = venv.join("bin/python3");
    let wanted = format!("kubernetes=={PYTHON_KUBERNETES_VERSION}");
    let check = format!(
        "import kubernetes, sys; sys.exit(kubernetes.__version__ != '{PYTHON_KUBERNETES_VERSION}')"
    );
    if python.exists() && succeeds(Command::new(&python).args(["-c", &check])) {
        summary.note(
            "python kubernetes client",
            format!("already present ({wanted} in {})", venv.display()),
        );
        return Ok(());
    }
    if !python.exists() {
        // Debian's interpreter (its venv module is python3-venv), not
        // whatever python3 comes first on PATH.
        let system = if Path::new("/usr/bin/python3").exists() {
            PathBuf::from("/usr/bin/python3")
        } else {
            PathBuf::from("python3")
        };
        run(Command::new(system).args(["-m", "venv"]).arg(&venv)).with_context(|| {
            format!(
                "creating the virtual environment {} (Debian: apt-get install python3-venv)",
                venv.display()
            )
        })?;
    }
    run(Command::new(&python).args(["-m", "pip", "install", "--quiet", &wanted]))
        .with_context(|| format!("pip install {wanted} into {}", venv.display()))?;
    if !succeeds(Command::new(&python).args(["-c", &check])) {
        bail!(
            "{wanted} was installed into {} but does not import",
            venv.display()
        );
    }
    summary.note(
        "python kubernetes client",
        format!("installed {wanted} into {}", venv.display()),
    );
    Ok(())
}

/// Where the kubelet finds the image it resolves `busybox` (any tag) to; the
/// same default as kcontrol's `--busybox-rootfs`.
pub const BUSYBOX_ROOTFS: &str = "/var/lib/kcontrol/images/busybox";

/// Builds the busybox root filesystem the kubelet's containers run on, from
/// Debian's busybox-static: /bin/busybox plus one symlink per applet, the
/// mount points crun needs in a read-only root, and a minimal /etc. Rebuilt
/// only when the busybox binary changed (a stamp records its size and mtime).
pub(super) fn ensure_busybox_rootfs(summary: &mut Summary) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    let meta = fs::metadata(busybox)
        .context("/bin/busybox is missing: install the Debian package busybox-static")?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let stamp_text = format!("busybox {} {mtime} layout 1\n", meta.len());
    let root = Path::new(BUSYBOX_ROOTFS);
    let stamp = root.join(".kcontrol-rootfs");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(stamp_text.as_str()) {
        summary.note("busybox rootfs", format!("{BUSYBOX_ROOTFS} up to date"));
        return Ok(());
    }
    let tmp = root.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    for d in [
        "bin", "dev", "proc", "sys", "tmp", "etc", "root", "run", "var/www", "home", "usr",
    ] {
        fs::create_dir_all(tmp.join(d))
            .with_context(|| format!("creating {}", tmp.join(d).display()))?;
    }
    fs::copy(busybox, tmp.join("bin/busybox")).context("copying /bin/busybox")?;
    let list = output(Command::new(busybox).arg("--list"))?;
    for applet in list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        std::os::unix::fs::symlink("busybox", tmp.join("bin").join(applet))
            .with_context(|| format!("linking applet {applet}"))?;
    }
    for (link, target) in [
        ("sbin", "bin"),
        ("usr/bin", "../bin"),
        ("usr/sbin", "../bin"),
    ] {
        std::os::unix::fs::symlink(target, tmp.join(link))?;
    }
    let files = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        // Mount points for the per-pod files the kubelet bind-mounts.
        ("etc/hosts", ""),
        ("etc/hostname", ""),
        ("etc/resolv.conf", ""),
    ];
    for (name, text) in files {
        fs::write(tmp.join(name), text)?;
    }
    fs::write(tmp.join(".kcontrol-rootfs"), &stamp_text)?;
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("removing the old {BUSYBOX_ROOTFS}"))?;
    }
    fs::rename(&tmp, root).with_context(|| format!("moving the rootfs into {BUSYBOX_ROOTFS}"))?;
    summary.note("busybox rootfs", format!("built {BUSYBOX_ROOTFS}"));
    Ok(())
}

/// crun refuses a hybrid cgroup layout (v1 controllers plus a cgroup2 tree
/// at /sys/fs/cgroup/unified) while the cgroup2 tree still owns a
/// controller ("cgroups in hybrid mode not supported"). Some machines leave
/// e.g. hugetlb there: give each such controller its own v1 hierarchy, the
/// layout systemd's hybrid mode makes.
pub(super) fn ensure_crun_cgroups(summary: &mut Summary) -> Result<()> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        summary.note("cgroups for crun", "unified (v2)");
        return Ok(());
    }
    let left = fs::read_to_string(base.join("unified/cgroup.controllers")).unwrap_or_default();
    let left: Vec<&str> = left.split_whitespace().collect();
    if left.is_empty() {
        summary.note("cgroups for crun", "v1/hybrid, no controller in cgroup2");
        return Ok(());
    }
    for c in &left {
        let dir = base.join(c);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        run(Command::new("mount")
            .args(["-t", "cgroup", "-o", c, "cgroup"])
            .arg(&dir))
        .with_context(|| format!("mounting a cgroup v1 hierarchy for {c}"))?;
    }
    summary.note(
        "cgroups for crun",
        format!("moved {} from cgroup2 to v1 hierarchies", left.join(", ")),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubectl_minor() {
        let json = r#"{"clientVersion":{"major":"1","minor":"32+","gitVersion":"v1.32.4"},"kustomizeVersion":"v5"}"#;
        assert_eq!(kubectl_minor(json), Some(32));
        assert_eq!(kubectl_minor(r#"{"clientVersion":{"major":"1"}}"#), None);
        assert_eq!(kubectl_minor("not json"), None);
    }
}
