//! Loading the object: map sizes, pinning under a layout tag, and adoption
//! of the maps a previous agent left pinned.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use aya::programs::SchedClassifier;
use aya::{Ebpf, EbpfLoader};
use proxy_common::*;

use super::maps::IdAllocator;
use super::{BPF_OBJECT, Dataplane, EGRESS_PROG, INGRESS_PROG};

/// Map sizes and in-kernel log level, chosen at load time.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub max_services: u32,
    pub max_slots: u32,
    pub conntrack_size: u32,
    /// aya-log level in the kernel: 0 = off … 5 = trace.
    pub bpf_log_level: u8,
    /// Pin maps and tcx links under this bpffs directory, so that the
    /// datapath outlives the agent (crash, `kill -9`, upgrade) and the next
    /// agent adopts it. `None`: nothing is pinned.
    pub pin_dir: Option<PathBuf>,
    /// How long a TCP conntrack entry lives after a FIN or RST, in ns.
    pub ct_tcp_close_ns: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_services: MAX_SERVICES,
            max_slots: MAX_SLOTS,
            conntrack_size: MAX_CONNTRACK,
            bpf_log_level: 0,
            pin_dir: None,
            ct_tcp_close_ns: CT_TCP_CLOSE_TIMEOUT_NS,
        }
    }
}

/// Maps pinned in pinned mode. `AYA_LOGS` is per agent and not pinned.
const PINNED_MAPS: [&str; 14] = [
    "SERVICES",
    "SLOTS",
    "RR_CURSOR",
    "CONNTRACK",
    "FRAGS",
    "SVC_COUNTERS",
    "GLOBAL_COUNTERS",
    "SOURCE_RANGES",
    "AFFINITY",
    "MAGLEV",
    "SERVICES6",
    "SLOTS6",
    "CONNTRACK6",
    "AFFINITY6",
];

/// Names the pinned layout: the layout version, the size of every key and
/// value, and the table capacities. Pinned maps of another tag are never
/// reused (their bytes would be misread); they are removed with a log line.
pub fn layout_tag(opts: &LoadOptions) -> String {
    format!(
        "{}-s{}-b{}-c{}",
        layout_tag_prefix(),
        opts.max_services,
        opts.max_slots,
        opts.conntrack_size
    )
}

/// The part of [`layout_tag`] that decides how the maps' bytes are read
/// (version and key/value sizes), without the capacities: a reader such as
/// `kproxy inspect` can read any tag that starts with it and `-s`.
pub fn layout_tag_prefix() -> String {
    use std::mem::size_of;
    let sizes = [
        size_of::<SvcKey>(),
        size_of::<SvcValue>(),
        size_of::<SlotKey>(),
        size_of::<Backend>(),
        size_of::<CtKey>(),
        size_of::<CtValue>(),
        size_of::<FragKey>(),
        size_of::<Counters>(),
        size_of::<SrcRangeKey>(),
        size_of::<AffinityKey>(),
        size_of::<AffinityValue>(),
        size_of::<MaglevTable>(),
        size_of::<SvcKey6>(),
        size_of::<Backend6>(),
        size_of::<CtKey6>(),
        size_of::<CtValue6>(),
        size_of::<AffinityValue6>(),
    ]
    .map(|s| s.to_string())
    // bpffs refuses '.' in the names of pinned objects.
    .join("_");
    format!("v{LAYOUT_VERSION}-{sizes}")
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

fn mount_bpffs(at: &Path) -> Result<()> {
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())?;
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting a bpffs at {} failed: {}",
            at.display(),
            std::io::Error::last_os_error()
        );
    }
    log::info!("mounted bpffs at {}", at.display());
    Ok(())
}

/// Makes sure `pin_dir` exists on a bpffs. The standard mount point
/// `/sys/fs/bpf` is mounted when it is not (e.g. after `ip netns exec`
/// remounted /sys); any other directory gets a bpffs of its own.
fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    if pin_dir.is_dir() {
        if !is_bpffs(pin_dir) {
            mount_bpffs(pin_dir)?;
        }
        return Ok(());
    }
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if parent == Path::new("/sys/fs/bpf") && parent.is_dir() && !is_bpffs(parent) {
        mount_bpffs(parent)?;
    }
    if is_bpffs(parent) {
        std::fs::create_dir(pin_dir)
            .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
        return Ok(());
    }
    std::fs::create_dir_all(pin_dir)
        .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
    mount_bpffs(pin_dir)
}

/// Makes `<pin_dir>/<tag>` on a bpffs (mounting one at `pin_dir` if
/// needed), root-only, and removes pinned layouts of other tags.
fn prepare_pin_root(pin_dir: &Path, tag: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    ensure_bpffs(pin_dir)?;
    std::fs::set_permissions(pin_dir, std::fs::Permissions::from_mode(0o700))?;
    for entry in std::fs::read_dir(pin_dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != tag && name.starts_with('v') && entry.path().is_dir() {
            log::warn!(
                "pinned datapath layout {name} differs from this agent's {tag}: removing it and \
                 starting with fresh maps (existing flows lose their conntrack entries)"
            );
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("removing old pinned layout {name}"))?;
        }
    }
    let root = pin_dir.join(tag);
    std::fs::create_dir_all(root.join("links"))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
    Ok(root)
}

/// A second descriptor of hash map `name`, for batch reads (aya's typed
/// maps do not hand theirs out).
fn hash_map_fd(bpf: &Ebpf, name: &str) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    match bpf.map(name) {
        Some(aya::maps::Map::HashMap(m) | aya::maps::Map::LruHashMap(m)) => {
            Ok(m.fd().as_fd().try_clone_to_owned()?)
        }
        Some(_) => bail!("map {name} is not a hash map"),
        None => bail!("map {name} missing from the eBPF object"),
    }
}

fn take<T>(bpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = bpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Dataplane {
    /// Loads the embedded object and its programs (verifier runs here).
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        Self::load_object(BPF_OBJECT, opts)
    }

    pub fn load_object(object: &[u8], opts: &LoadOptions) -> Result<Self> {
        let pin_root = match &opts.pin_dir {
            Some(dir) => Some(prepare_pin_root(dir, &layout_tag(opts))?),
            None => None,
        };
        let pin_paths: Vec<(&str, PathBuf)> = match &pin_root {
            Some(root) => PINNED_MAPS.iter().map(|m| (*m, root.join(m))).collect(),
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        loader
            .override_global(aya_log::LEVEL, &opts.bpf_log_level, true)
            .override_global(CT_TCP_CLOSE_GLOBAL, &opts.ct_tcp_close_ns, true)
            .map_max_entries("SERVICES", opts.max_services)
            .map_max_entries("RR_CURSOR", opts.max_services)
            .map_max_entries("SVC_COUNTERS", opts.max_services)
            .map_max_entries("SLOTS", opts.max_slots)
            .map_max_entries("SERVICES6", opts.max_services)
            .map_max_entries("SLOTS6", opts.max_slots)
            .map_max_entries("CONNTRACK", opts.conntrack_size);
        for (name, path) in &pin_paths {
            // Reuses the pinned map if it exists, else creates and pins it.
            loader.map_pin_path(name, path.as_path());
        }
        let mut bpf = loader
            .load(object)
            .context("loading the eBPF object (are you root, with BPF enabled?)")?;
        for name in [INGRESS_PROG, EGRESS_PROG] {
            let prog: &mut SchedClassifier = bpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the verifier rejected {name}"))?;
        }
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        Ok(Self {
            services: take(&mut bpf, "SERVICES")?,
            slots: take(&mut bpf, "SLOTS")?,
            cursors: take(&mut bpf, "RR_CURSOR")?,
            conntrack_fd: hash_map_fd(&bpf, "CONNTRACK")?,
            conntrack: take(&mut bpf, "CONNTRACK")?,
            svc_counters: take(&mut bpf, "SVC_COUNTERS")?,
            global_counters: take(&mut bpf, "GLOBAL_COUNTERS")?,
            node_ips: take(&mut bpf, "NODE_IPS")?,
            snat_addrs: take(&mut bpf, "SNAT_ADDRS")?,
            source_ranges: take(&mut bpf, "SOURCE_RANGES")?,
            affinity: take(&mut bpf, "AFFINITY")?,
            maglev: take(&mut bpf, "MAGLEV")?,
            services6: take(&mut bpf, "SERVICES6")?,
            slots6: take(&mut bpf, "SLOTS6")?,
            conntrack6_fd: hash_map_fd(&bpf, "CONNTRACK6")?,
            conntrack6: take(&mut bpf, "CONNTRACK6")?,
            affinity6: take(&mut bpf, "AFFINITY6")?,
            xdp_counters: take(&mut bpf, "XDP_COUNTERS")?,
            node_addrs: Vec::new(),
            xdp_loaded: false,
            ct_tcp_close_ns: opts.ct_tcp_close_ns,
            ct_capacity: opts.conntrack_size as usize,
            bpf,
            programmed: std::collections::BTreeMap::new(),
            ids: IdAllocator {
                next: 0,
                free: Vec::new(),
                max: opts.max_services,
            },
            attachments: Vec::new(),
            xdp_attachments: Vec::new(),
            nr_cpus,
            pin_root,
            keep_on_exit: false,
            following: None,
        })
        .and_then(|mut dp| {
            if dp.pin_root.is_some() {
                dp.adopt()?;
            }
            Ok(dp)
        })
    }

    /// Leave the datapath running (pinned) when this agent exits, for the
    /// next agent to adopt.
    pub fn keep_on_exit(&mut self, keep: bool) {
        self.keep_on_exit = keep;
    }

    pub fn pin_root(&self) -> Option<&Path> {
        self.pin_root.as_deref()
    }

    /// The loaded eBPF object, for BPF_PROG_TEST_RUN and the aya-log reader.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.bpf
    }

    pub fn program(&self, name: &str) -> Result<&SchedClassifier> {
        Ok(self
            .bpf
            .program(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?)
    }

    pub(super) fn program_mut(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        Ok(self
            .bpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?)
    }

    /// Forwards aya-log records from the kernel to `log`, from a task on
    /// the current tokio runtime.
    pub fn spawn_logger(&mut self) -> Result<()> {
        let logger = aya_log::EbpfLogger::init(self.ebpf_mut()).context("starting aya-log")?;
        // SAFETY: the logger owns the ring buffer's fd and lives inside the
        // AsyncFd, so the fd stays open for as long as it is registered.
        let mut fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .map_err(|e| anyhow!("registering the aya-log ring buffer: {e}"))?;
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = fd.readable_mut().await else {
                    return;
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
        Ok(())
    }
}
