//! What a cluster leaves on the machine and how it is removed: the check
//! after every stop ([`Cluster::leftovers`]) and the clean-up before a
//! host cluster starts ([`clean_stale`]) after a run that could not clean
//! up (xtask or kcontrol SIGKILLed, a crash).
//!
//! The kubelet keeps no database; its objects are found by name
//! (kcontrol-names: containers `kc-<hash>-…`, namespaces `kcns-<hash>`,
//! veths `kcv<hash>`, hashes of the pod UIDs recorded under
//! `<data dir>/kubelet/pods`), by the node (cgroups `kcontrol/<node>`) and
//! by the data dir on the command line (processes).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kcontrol_names::{NETNS_PREFIX, VETH_PREFIX, hash_of_container_id, netns, pod_hash, veth};

use super::{Cluster, Options, Place};
use crate::log::Log;
use crate::process::{our_children, pids_with_arg, terminate};

/// Pod UIDs the kubelet recorded under `dir`.
pub(super) fn recorded_uids(dir: &Path) -> Vec<String> {
    fs::read_dir(dir.join("kubelet/pods"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Names in `dir` (/sys/class/net, /run/netns, a pin dir) starting with
/// `prefix`.
fn names_with_prefix(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

/// Runs a command quietly; its stdout if it succeeded.
fn quiet(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Ids of the containers under a crun root.
fn crun_containers(root: &Path) -> Vec<String> {
    if !root.is_dir() {
        return Vec::new();
    }
    quiet(Command::new("crun").arg("--root").arg(root).arg("list"))
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn delete_container(root: &Path, id: &str) {
    let _ = quiet(
        Command::new("crun")
            .arg("--root")
            .arg(root)
            .args(["delete", "--force", id]),
    );
}

fn delete_netns(name: &str) {
    let _ = quiet(Command::new("ip").args(["netns", "del", name]));
}

/// Mount points of every cgroup hierarchy (cgroup2, or each v1 controller
/// on a v1/hybrid host): the kubelet makes `kcontrol/<node>` in each.
fn cgroup_roots() -> Vec<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            matches!(kind, "cgroup" | "cgroup2").then(|| PathBuf::from(dir))
        })
        .collect()
}

/// The node's cgroup in every hierarchy where it exists.
fn node_cgroups(node: &str) -> Vec<PathBuf> {
    cgroup_roots()
        .into_iter()
        .map(|r| r.join("kcontrol").join(node))
        .filter(|p| p.exists())
        .collect()
}

/// Removes a cgroup directory tree bottom-up (cgroupfs only allows rmdir of
/// empty groups; processes still inside are killed through cgroup.kill).
fn remove_cgroup_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let _ = fs::write(path.join("cgroup.kill"), "1");
    for e in fs::read_dir(path)?.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_cgroup_tree(&e.path())?;
        }
    }
    // cgroup.kill is asynchronous: retry the rmdir briefly while it is busy.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
}

/// Removes what a previous host cluster on the same data dir left behind:
/// its processes, crun containers, pod namespaces and veths, the bridge,
/// the node's cgroups and kproxy's pins; then the data dir itself, for a
/// fresh store.
pub fn clean_stale(log: &Log, opts: &Options) -> Result<()> {
    let dir = &opts.data_dir;
    let bridge = opts.bridge.as_str();
    let mut stale = pids_with_arg(&dir.to_string_lossy());
    if let Some(pins) = &opts.pin_dir {
        stale.extend(pids_with_arg(&pins.to_string_lossy()));
    }
    if !stale.is_empty() {
        log.note(&format!(
            "==> stopping processes of a previous run: {stale:?}"
        ));
        terminate(&stale, Duration::from_secs(15));
    }
    let crun_root = dir.join("kubelet/crun");
    for id in crun_containers(&crun_root) {
        log.note(&format!("==> removing stale container {id}"));
        delete_container(&crun_root, &id);
    }
    for uid in recorded_uids(dir) {
        let hash = pod_hash(&uid);
        let (ns, veth) = (netns(&hash), veth(&hash));
        if netns_exists(&ns) {
            log.note(&format!("==> removing stale network namespace {ns}"));
            delete_netns(&ns);
        }
        if link_exists(&veth) {
            log.note(&format!("==> removing stale veth {veth}"));
            let _ = quiet(Command::new("ip").args(["link", "del", &veth]));
        }
    }
    if link_exists(bridge) {
        // Veths still enslaved to our bridge belong to our lost pods.
        for veth in names_with_prefix(Path::new("/sys/class/net"), VETH_PREFIX) {
            let master = fs::read_link(format!("/sys/class/net/{veth}/master")).ok();
            if master.is_some_and(|m| m.ends_with(bridge)) {
                log.note(&format!("==> removing stale veth {veth}"));
                let _ = quiet(Command::new("ip").args(["link", "del", &veth]));
            }
        }
        log.note(&format!("==> removing stale bridge {bridge}"));
        let _ = quiet(Command::new("ip").args(["link", "del", bridge]));
    }
    for cg in node_cgroups(&opts.node) {
        log.note(&format!("==> removing stale cgroups {}", cg.display()));
        remove_cgroup_tree(&cg)?;
    }
    if let Some(pins) = &opts.pin_dir
        && pins.exists()
    {
        log.note(&format!(
            "==> removing stale kproxy pins under {}",
            pins.display()
        ));
        let _ = fs::remove_dir_all(pins);
    }
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

impl Cluster {
    /// Names of the links in the node's network namespace that belong to
    /// the cluster: the bridge and the pod veths (on the host, only those
    /// of our pods: other kubelets may run there).
    fn cluster_links(&self, hashes: &[String]) -> Vec<String> {
        let bridge = &self.opts.bridge;
        match &self.netns {
            Some(ns) => ns
                .ip(&["-o", "link", "show"])
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split(": ").nth(1))
                .filter_map(|n| n.split('@').next())
                .filter(|n| n.starts_with(VETH_PREFIX) || n == bridge)
                .map(str::to_owned)
                .collect(),
            None => hashes
                .iter()
                .map(|h| veth(h))
                .chain([bridge.clone()])
                .filter(|n| link_exists(n))
                .collect(),
        }
    }

    /// Checks, after the processes stopped, that nothing of the cluster is
    /// left; prints each check; removes what is left and names it.
    pub(super) fn leftovers(&self) -> Vec<String> {
        let log = &self.log;
        log.note("==> checking that nothing is left behind");
        let mut left = Vec::new();
        let mut check = |what: String, found: Vec<String>| {
            if found.is_empty() {
                log.note(&format!("    ok    {what}: none"));
            } else {
                log.note(&format!("    LEFT  {what}: {}", found.join(", ")));
                left.push(format!("{what}: {}", found.join(", ")));
            }
        };
        let dir_arg = self.dir.to_string_lossy().into_owned();
        let hashes: Vec<String> = self.uids.iter().map(|u| pod_hash(u)).collect();

        let stray = pids_with_arg(&dir_arg);
        let mut procs: Vec<String> = stray.iter().map(|p| format!("pid {p}")).collect();
        if self.opts.place == Place::Host {
            procs.extend(our_children().into_iter().map(|(p, n)| format!("{n}[{p}]")));
        }
        check(
            format!("processes (children of this one, or running on {dir_arg})"),
            procs,
        );
        terminate(&stray, Duration::from_secs(5));

        let containers = crun_containers(&self.crun_root);
        for id in &containers {
            delete_container(&self.crun_root, id);
            if let Some(hash) = hash_of_container_id(id) {
                delete_netns(&netns(hash));
            }
        }
        check(
            format!("crun containers under {}", self.crun_root.display()),
            containers,
        );

        let namespaces: Vec<String> = hashes
            .iter()
            .map(|h| netns(h))
            .filter(|n| netns_exists(n))
            .collect();
        namespaces.iter().for_each(|n| delete_netns(n));
        check(
            format!(
                "pod network namespaces ({} pods: /run/netns/{NETNS_PREFIX}<hash>)",
                hashes.len()
            ),
            namespaces,
        );

        let links = self.cluster_links(&hashes);
        for l in &links {
            let _ = match &self.netns {
                Some(ns) => ns.ip(&["link", "del", l]).ok(),
                None => quiet(Command::new("ip").args(["link", "del", l])),
            };
        }
        check(
            format!(
                "pod veths ({VETH_PREFIX}<hash>) and bridge {}",
                self.opts.bridge
            ),
            links,
        );

        let cgroups = node_cgroups(&self.opts.node);
        for cg in &cgroups {
            let _ = remove_cgroup_tree(cg);
        }
        check(
            format!(
                "cgroups kcontrol/{} (in {} cgroup hierarchies)",
                self.opts.node,
                cgroup_roots().len()
            ),
            cgroups.iter().map(|p| p.display().to_string()).collect(),
        );

        if let Some(pins) = &self.opts.pin_dir {
            let found = names_with_prefix(pins, "");
            if !found.is_empty() {
                let _ = fs::remove_dir_all(pins);
            }
            check(format!("kproxy pins under {}", pins.display()), found);
        }

        if self.opts.place == Place::Host {
            // Other kubelets (tests) may run on this host: their objects
            // are reported, not counted against us.
            let others: Vec<String> = names_with_prefix(Path::new("/run/netns"), NETNS_PREFIX)
                .into_iter()
                .chain(names_with_prefix(Path::new("/sys/class/net"), VETH_PREFIX))
                .collect();
            log.note(&format!(
                "    info  {NETNS_PREFIX}* namespaces / {VETH_PREFIX}* links on the host (any kubelet): {}",
                if others.is_empty() {
                    "none".to_string()
                } else {
                    others.join(", ")
                }
            ));
        }
        if left.is_empty() {
            log.note("==> clean: nothing left behind");
        }
        left
    }
}
