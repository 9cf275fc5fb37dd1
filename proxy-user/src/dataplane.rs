//! The eBPF dataplane: loads the embedded object, attaches the TC programs
//! and applies [`Change`]s to the maps incrementally.
//!
//! The agent keeps a mirror of what it wrote (`programmed`), so each change
//! touches only the map entries it concerns: O(changed backends), never a
//! rewrite of the tables. Map layouts are documented in `proxy-common`.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};
use proxy_common::*;

use crate::model::{BackendAddr, DesiredService, DesiredState, Frontend, Proto};
use crate::reconcile::{ApplyStats, Change};

/// The eBPF object built by `cargo xtask build`, embedded at compile time.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("KPROXY_BPF_OBJ_PATH"));

pub const INGRESS_PROG: &str = "kproxy_ingress";
pub const EGRESS_PROG: &str = "kproxy_egress";

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
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_services: MAX_SERVICES,
            max_slots: MAX_SLOTS,
            conntrack_size: MAX_CONNTRACK,
            bpf_log_level: 0,
            pin_dir: None,
        }
    }
}

/// How the programs are attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx links (kernel ≥ 6.6): go away with the agent's file descriptors.
    Tcx,
    /// clsact qdisc + cls_bpf filters through netlink (older kernels).
    Netlink,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Netlink => "netlink",
        })
    }
}

impl AttachMode {
    /// tcx where the kernel has it.
    pub fn auto() -> Self {
        match KernelVersion::current() {
            Ok(v) if v >= KernelVersion::new(6, 6, 0) => AttachMode::Tcx,
            _ => AttachMode::Netlink,
        }
    }
}

struct Attachment {
    iface: String,
    mode: AttachMode,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
    /// Pin files of the tcx links (pinned mode).
    pins: Vec<PathBuf>,
    /// We created the clsact qdisc (netlink mode) and remove it on detach.
    added_qdisc: bool,
}

/// What the agent wrote for one frontend.
struct Programmed {
    id: u32,
    name: String,
    /// Slot i of the service holds `slots[i]`; `slots.len()` is the count.
    slots: Vec<BackendAddr>,
}

/// Service ids: dense indexes into the per-service arrays, reused after a
/// service is removed.
struct IdAllocator {
    next: u32,
    free: Vec<u32>,
    max: u32,
}

impl IdAllocator {
    fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop() {
            return Some(id);
        }
        (self.next < self.max).then(|| {
            self.next += 1;
            self.next - 1
        })
    }
}

pub struct Dataplane {
    bpf: Ebpf,
    services: HashMap<MapData, SvcKey, SvcValue>,
    slots: HashMap<MapData, SlotKey, Backend>,
    cursors: Array<MapData, u64>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    svc_counters: PerCpuArray<MapData, Counters>,
    global_counters: PerCpuArray<MapData, Counters>,
    programmed: BTreeMap<Frontend, Programmed>,
    ids: IdAllocator,
    attachments: Vec<Attachment>,
    nr_cpus: usize,
    /// `<pin_dir>/<layout tag>` when pinning.
    pin_root: Option<PathBuf>,
    /// Leave links and pinned maps in place on drop (graceful handover).
    keep_on_exit: bool,
}

/// Maps pinned in pinned mode. `AYA_LOGS` is per agent and not pinned.
const PINNED_MAPS: [&str; 7] = [
    "SERVICES",
    "SLOTS",
    "RR_CURSOR",
    "CONNTRACK",
    "FRAGS",
    "SVC_COUNTERS",
    "GLOBAL_COUNTERS",
];

/// Names the pinned layout: the layout version, the size of every key and
/// value, and the table capacities. Pinned maps of another tag are never
/// reused (their bytes would be misread); they are removed with a log line.
pub fn layout_tag(opts: &LoadOptions) -> String {
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
    ]
    .map(|s| s.to_string())
    // bpffs refuses '.' in the names of pinned objects.
    .join("_");
    format!(
        "v{LAYOUT_VERSION}-{sizes}-s{}-b{}-c{}",
        opts.max_services, opts.max_slots, opts.conntrack_size
    )
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

fn take<T>(bpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = bpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

pub fn svc_key(fe: &Frontend) -> SvcKey {
    SvcKey {
        addr: ip_raw(fe.ip),
        port: fe.port.to_be(),
        proto: fe.proto.number(),
        _pad: 0,
    }
}

pub fn backend_raw(b: &BackendAddr) -> Backend {
    Backend {
        addr: ip_raw(b.ip),
        port: b.port.to_be(),
        _pad: 0,
    }
}

/// An address as the datapath stores it: network order in memory.
pub fn ip_raw(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
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
            .map_max_entries("SERVICES", opts.max_services)
            .map_max_entries("RR_CURSOR", opts.max_services)
            .map_max_entries("SVC_COUNTERS", opts.max_services)
            .map_max_entries("SLOTS", opts.max_slots)
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
            conntrack: take(&mut bpf, "CONNTRACK")?,
            svc_counters: take(&mut bpf, "SVC_COUNTERS")?,
            global_counters: take(&mut bpf, "GLOBAL_COUNTERS")?,
            bpf,
            programmed: BTreeMap::new(),
            ids: IdAllocator {
                next: 0,
                free: Vec::new(),
                max: opts.max_services,
            },
            attachments: Vec::new(),
            nr_cpus,
            pin_root,
            keep_on_exit: false,
        })
        .and_then(|mut dp| {
            if dp.pin_root.is_some() {
                dp.adopt()?;
            }
            Ok(dp)
        })
    }

    /// Rebuilds the agent's mirror from pinned maps left by a previous agent,
    /// dropping anything inconsistent (a service whose slots are incomplete,
    /// slots of no service or past a service's count). Conntrack is kept:
    /// established flows stay on their backends.
    fn adopt(&mut self) -> Result<()> {
        let mut services = Vec::new();
        for entry in self.services.iter() {
            match entry {
                Ok(kv) => services.push(kv),
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let mut live: HashSet<(u32, u32)> = HashSet::new();
        let mut used_ids = HashSet::new();
        let mut dropped = 0usize;
        for (key, val) in services {
            let fe = Frontend {
                ip: Ipv4Addr::from(key.addr.to_ne_bytes()),
                port: u16::from_be(key.port),
                proto: match key.proto {
                    IPPROTO_TCP => Proto::Tcp,
                    IPPROTO_UDP => Proto::Udp,
                    _ => {
                        self.services.remove(&key).or_else(ignore_missing)?;
                        dropped += 1;
                        continue;
                    }
                },
            };
            let mut slots = Vec::with_capacity(val.count as usize);
            for slot in 0..val.count {
                match self.slots.get(
                    &SlotKey {
                        svc_id: val.id,
                        slot,
                    },
                    0,
                ) {
                    Ok(b) => slots.push(BackendAddr {
                        ip: Ipv4Addr::from(b.addr.to_ne_bytes()),
                        port: u16::from_be(b.port),
                    }),
                    Err(_) => break,
                }
            }
            if slots.len() != val.count as usize
                || val.id >= self.ids.max
                || !used_ids.insert(val.id)
            {
                // Half-written or clashing: remove; the reconcile re-adds it.
                self.services.remove(&key).or_else(ignore_missing)?;
                dropped += 1;
                continue;
            }
            for slot in 0..val.count {
                live.insert((val.id, slot));
            }
            self.programmed.insert(
                fe,
                Programmed {
                    id: val.id,
                    name: format!("{fe} (adopted)"),
                    slots,
                },
            );
        }
        let orphans: Vec<SlotKey> = self
            .slots
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !live.contains(&(k.svc_id, k.slot)))
            .collect();
        for k in &orphans {
            self.slots.remove(k).or_else(ignore_missing)?;
        }
        let max_id = used_ids.iter().copied().max().map_or(0, |m| m + 1);
        self.ids.next = max_id;
        self.ids.free = (0..max_id)
            .filter(|i| !used_ids.contains(i))
            .rev()
            .collect();
        if !self.programmed.is_empty() || dropped > 0 || !orphans.is_empty() {
            log::info!(
                "adopted pinned datapath: {} frontends, {} backends, {} conntrack entries; \
                 dropped {dropped} inconsistent frontends and {} orphaned slots",
                self.programmed.len(),
                self.backend_count(),
                self.conntrack_entries(),
                orphans.len()
            );
        }
        Ok(())
    }

    /// Takes service names from the desired state (adopted entries only know
    /// their frontend).
    pub fn sync_names(&mut self, desired: &DesiredState) {
        for (fe, p) in self.programmed.iter_mut() {
            if let Some(d) = desired.services.get(fe) {
                p.name.clone_from(&d.name);
            }
        }
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

    fn program_mut(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        Ok(self
            .bpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?)
    }

    /// Attaches ingress (DNAT) and egress (reverse NAT) to `iface`.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        check_iface(iface)?;
        let mut added_qdisc = false;
        if mode == AttachMode::Netlink {
            // Filters of a previous agent (crash) would run twice.
            for (kind, name) in [
                (TcAttachType::Ingress, INGRESS_PROG),
                (TcAttachType::Egress, EGRESS_PROG),
            ] {
                let _ = aya::programs::tc::qdisc_detach_program(iface, kind, name);
            }
            match aya::programs::tc::qdisc_add_clsact(iface) {
                Ok(()) => added_qdisc = true,
                Err(aya::programs::tc::TcError::AlreadyAttached) => {}
                // After a crash the qdisc is still there (EEXIST, shown only in
                // the underlying OS error, not in the netlink message).
                Err(e) if format!("{e:?} {e}").contains("File exists") => {}
                Err(e) => return Err(e).context(format!("adding clsact qdisc to {iface}")),
            }
        }
        let options = |mode| match mode {
            AttachMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
            AttachMode::Netlink => TcAttachOptions::Netlink(NlOptions::default()),
        };
        let pin = |dir: &str| {
            self.pin_root
                .as_ref()
                .filter(|_| mode == AttachMode::Tcx)
                .map(|r| r.join("links").join(format!("{iface}_{dir}")))
        };
        let (in_pin, eg_pin) = (pin("ingress"), pin("egress"));
        let ingress = self
            .hook(
                INGRESS_PROG,
                iface,
                TcAttachType::Ingress,
                options(mode),
                in_pin.as_deref(),
            )
            .with_context(|| format!("attaching {INGRESS_PROG} to {iface} ({mode})"))?;
        let egress = match self.hook(
            EGRESS_PROG,
            iface,
            TcAttachType::Egress,
            options(mode),
            eg_pin.as_deref(),
        ) {
            Ok(l) => l,
            Err(e) => {
                let _ = self.program_mut(INGRESS_PROG)?.detach(ingress);
                if let Some(p) = &in_pin {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e).context(format!("attaching {EGRESS_PROG} to {iface} ({mode})"));
            }
        };
        self.attachments.push(Attachment {
            iface: iface.to_string(),
            mode,
            ingress,
            egress,
            pins: in_pin.into_iter().chain(eg_pin).collect(),
            added_qdisc,
        });
        Ok(())
    }

    /// Attaches one program. With a pin path (tcx): a link pinned by a
    /// previous agent is taken over atomically (`bpf_link_update`, no gap
    /// for packets); otherwise a new link is created and pinned.
    fn hook(
        &mut self,
        prog: &str,
        iface: &str,
        kind: TcAttachType,
        options: TcAttachOptions,
        pin: Option<&Path>,
    ) -> Result<SchedClassifierLinkId> {
        let p = self.program_mut(prog)?;
        let Some(pin) = pin else {
            return Ok(p.attach_with_options(iface, kind, options)?);
        };
        if let Ok(old) = PinnedLink::from_pin(pin) {
            let link = SchedClassifierLink::try_from(FdLink::from(old))?;
            log::info!("taking over pinned link {}", pin.display());
            return Ok(p.attach_to_link(link)?);
        }
        let id = p.attach_with_options(iface, kind, options)?;
        let fd = FdLink::try_from(p.take_link(id)?)?;
        let pinned = fd
            .pin(pin)
            .with_context(|| format!("pinning link at {}", pin.display()))?;
        Ok(p.attach_to_link(SchedClassifierLink::try_from(FdLink::from(pinned))?)?)
    }

    /// Detaches from every interface; leaves no links, filters or qdiscs of
    /// ours behind. Returns the first error but tries every attachment.
    pub fn detach_all(&mut self) -> Result<()> {
        let mut first_err = None;
        for a in std::mem::take(&mut self.attachments) {
            let r1 = self
                .program_mut(INGRESS_PROG)
                .and_then(|p| Ok(p.detach(a.ingress)?));
            let r2 = self
                .program_mut(EGRESS_PROG)
                .and_then(|p| Ok(p.detach(a.egress)?));
            for pin in &a.pins {
                let _ = std::fs::remove_file(pin);
            }
            let r3 = if a.added_qdisc {
                remove_clsact(&a.iface)
            } else {
                Ok(())
            };
            for r in [r1, r2, r3] {
                if let Err(e) = r {
                    first_err.get_or_insert(e.context(format!("detaching from {}", a.iface)));
                }
            }
        }
        // A clean stop leaves nothing pinned either.
        if let Some(root) = self.pin_root.take() {
            if let Err(e) = std::fs::remove_dir_all(&root) {
                first_err.get_or_insert(anyhow!("removing pinned maps {}: {e}", root.display()));
            }
            // The pin directory itself, if nothing else lives there.
            if let Some(dir) = root.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Whether the programs are attached to `iface`.
    pub fn is_attached(&self, iface: &str) -> bool {
        self.attachments.iter().any(|a| a.iface == iface)
    }

    /// Drops the attachment to an interface that is gone (the kernel already
    /// released its tcx links / filters with the device): unpins its links
    /// and forgets it. Returns whether it was attached.
    pub fn forget(&mut self, iface: &str) -> bool {
        let Some(pos) = self.attachments.iter().position(|a| a.iface == iface) else {
            return false;
        };
        let a = self.attachments.swap_remove(pos);
        // Detaching a link of a vanished device fails harmlessly; it also
        // closes our fds so the programs are not held by a dead link.
        if let Ok(p) = self.program_mut(INGRESS_PROG) {
            let _ = p.detach(a.ingress);
        }
        if let Ok(p) = self.program_mut(EGRESS_PROG) {
            let _ = p.detach(a.egress);
        }
        for pin in &a.pins {
            let _ = std::fs::remove_file(pin);
        }
        true
    }

    /// Removes pinned links of interfaces that no longer exist (left by an
    /// agent that stopped while pods went away). Returns their names.
    pub fn prune_stale_link_pins(&self) -> Vec<String> {
        let Some(root) = &self.pin_root else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(root.join("links")) else {
            return Vec::new();
        };
        let mut pruned = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((iface, _dir)) = name.rsplit_once('_') else {
                continue;
            };
            if !Path::new("/sys/class/net").join(iface).exists() {
                let _ = std::fs::remove_file(e.path());
                pruned.push(name);
            }
        }
        pruned
    }

    pub fn attached(&self) -> Vec<(String, AttachMode)> {
        self.attachments
            .iter()
            .map(|a| (a.iface.clone(), a.mode))
            .collect()
    }

    /// The desired state the maps currently implement.
    pub fn programmed_state(&self) -> DesiredState {
        DesiredState {
            services: self
                .programmed
                .iter()
                .map(|(fe, p)| {
                    let svc =
                        DesiredService::new(p.name.clone(), p.slots.iter().copied().collect());
                    (*fe, svc)
                })
                .collect(),
        }
    }

    pub fn service_count(&self) -> usize {
        self.programmed.len()
    }

    pub fn backend_count(&self) -> usize {
        self.programmed.values().map(|p| p.slots.len()).sum()
    }

    fn zeroed_counters(&self) -> PerCpuValues<Counters> {
        PerCpuValues::try_from(vec![Counters::default(); self.nr_cpus])
            .expect("nr_cpus matches the per-CPU map")
    }

    /// Applies changes in order. Each change leaves the maps consistent for
    /// packets in flight; flows whose backend went away are flushed from
    /// conntrack at the end, after no slot points at those backends any more.
    pub fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        // (service id, backend) pairs whose flows must go.
        let mut gone_backends: HashSet<(u32, Backend)> = HashSet::new();
        // Ids of removed services: their flows go, then the ids are freed.
        let mut gone_ids: HashSet<u32> = HashSet::new();
        for change in changes {
            match change {
                Change::RemoveService { frontend } => {
                    let Some(p) = self.programmed.remove(frontend) else {
                        continue;
                    };
                    // Frontend first: from here packets pass untouched.
                    self.services
                        .remove(&svc_key(frontend))
                        .or_else(ignore_missing)?;
                    for slot in 0..p.slots.len() as u32 {
                        self.slots
                            .remove(&SlotKey { svc_id: p.id, slot })
                            .or_else(ignore_missing)?;
                    }
                    gone_ids.insert(p.id);
                    stats.services_removed += 1;
                    stats.backends_removed += p.slots.len();
                }
                Change::AddService {
                    frontend,
                    name,
                    backends,
                } => {
                    if self.programmed.contains_key(frontend) {
                        bail!("service {frontend} is already programmed");
                    }
                    let id = self.ids.alloc().ok_or_else(|| {
                        anyhow!(
                            "service table full ({} frontends): raise --max-services",
                            self.ids.max
                        )
                    })?;
                    // A reused id starts with a fresh cursor and counters.
                    self.cursors.set(id, 0, 0)?;
                    let zero = self.zeroed_counters();
                    self.svc_counters.set(id, zero, 0)?;
                    let slots: Vec<BackendAddr> = backends.iter().copied().collect();
                    for (i, b) in slots.iter().enumerate() {
                        self.slots
                            .insert(
                                SlotKey {
                                    svc_id: id,
                                    slot: i as u32,
                                },
                                backend_raw(b),
                                0,
                            )
                            .with_context(|| slot_table_hint(frontend))?;
                    }
                    self.services.insert(
                        svc_key(frontend),
                        SvcValue {
                            id,
                            count: slots.len() as u32,
                        },
                        0,
                    )?;
                    stats.services_added += 1;
                    stats.backends_added += slots.len();
                    self.programmed.insert(
                        *frontend,
                        Programmed {
                            id,
                            name: name.clone(),
                            slots,
                        },
                    );
                }
                Change::UpdateBackends {
                    frontend,
                    added,
                    removed,
                    flush,
                } => {
                    let Some(p) = self.programmed.get_mut(frontend) else {
                        bail!("service {frontend} is not programmed");
                    };
                    let old = p.slots.clone();
                    let mut new = old.clone();
                    // Swap-remove keeps the table dense: the last backend
                    // moves into the hole. Round-robin stays exact over the
                    // new count; existing flows live in conntrack and do not
                    // depend on slots.
                    for b in removed {
                        if let Some(i) = new.iter().position(|x| x == b) {
                            new.swap_remove(i);
                        }
                    }
                    // Draining backends keep their flows (they are in
                    // `removed` but not in `flush`).
                    gone_backends.extend(flush.iter().map(|b| (p.id, backend_raw(b))));
                    new.extend(added.iter().copied());
                    // 1. Slots that change or appear (beyond the old count
                    //    they are invisible until step 2).
                    for (i, b) in new.iter().enumerate() {
                        if old.get(i) != Some(b) {
                            self.slots
                                .insert(
                                    SlotKey {
                                        svc_id: p.id,
                                        slot: i as u32,
                                    },
                                    backend_raw(b),
                                    0,
                                )
                                .with_context(|| slot_table_hint(frontend))?;
                        }
                    }
                    // 2. The new count makes them live.
                    self.services.insert(
                        svc_key(frontend),
                        SvcValue {
                            id: p.id,
                            count: new.len() as u32,
                        },
                        0,
                    )?;
                    // 3. Slots past the new count are unreachable now.
                    for i in new.len()..old.len() {
                        self.slots
                            .remove(&SlotKey {
                                svc_id: p.id,
                                slot: i as u32,
                            })
                            .or_else(ignore_missing)?;
                    }
                    stats.backends_added += added.len();
                    stats.backends_removed += removed.len();
                    p.slots = new;
                }
            }
        }
        if !gone_backends.is_empty() || !gone_ids.is_empty() {
            stats.flows_flushed = self.flush_flows(&gone_backends, &gone_ids)?;
        }
        for id in gone_ids {
            self.ids.free.push(id);
        }
        Ok(stats)
    }

    /// Deletes conntrack entries (both directions) of flows on removed
    /// backends or removed services, so UDP flows move to a live backend on
    /// their next packet and TCP flows get a reset instead of hanging.
    fn flush_flows(
        &mut self,
        backends: &HashSet<(u32, Backend)>,
        ids: &HashSet<u32>,
    ) -> Result<usize> {
        let mut doomed = Vec::new();
        for entry in self.conntrack.iter() {
            let (k, v) = match entry {
                Ok(kv) => kv,
                // An LRU entry evicted while we walk: nothing to flush.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(e.into()),
            };
            let backend = if k.dir == CT_DIR_FORWARD {
                Backend {
                    addr: v.addr,
                    port: v.port,
                    _pad: 0,
                }
            } else {
                Backend {
                    addr: k.saddr,
                    port: k.sport,
                    _pad: 0,
                }
            };
            if ids.contains(&v.svc_id) || backends.contains(&(v.svc_id, backend)) {
                doomed.push(k);
            }
        }
        for k in &doomed {
            self.conntrack.remove(k).or_else(ignore_missing)?;
        }
        Ok(doomed.len())
    }

    /// Number of conntrack entries (two per flow).
    pub fn conntrack_entries(&self) -> usize {
        self.conntrack.keys().filter(|k| k.is_ok()).count()
    }

    /// Global counters summed over CPUs.
    pub fn global_counters(&self) -> Result<Counters> {
        sum(&self.global_counters.get(&0, 0)?)
    }

    /// Per-service counters summed over CPUs, with the service name.
    pub fn service_counters(&self) -> Result<Vec<(Frontend, String, Counters)>> {
        self.programmed
            .iter()
            .map(|(fe, p)| Ok((*fe, p.name.clone(), sum(&self.svc_counters.get(&p.id, 0)?)?)))
            .collect()
    }
}

fn sum(values: &PerCpuValues<Counters>) -> Result<Counters> {
    let mut total = Counters::default();
    for c in values.iter() {
        total.add(c);
    }
    Ok(total)
}

fn ignore_missing(e: aya::maps::MapError) -> Result<(), aya::maps::MapError> {
    match e {
        aya::maps::MapError::KeyNotFound => Ok(()),
        e => Err(e),
    }
}

fn slot_table_hint(fe: &Frontend) -> String {
    format!("writing backend slots of {fe} (slot table full? raise --max-backends)")
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        if self.keep_on_exit {
            return;
        }
        if let Err(e) = self.detach_all() {
            log::warn!("detach on drop: {e:#}");
        }
    }
}

/// A clear error for a missing interface, listing the ones that exist.
fn check_iface(iface: &str) -> Result<()> {
    let cname = std::ffi::CString::new(iface).context("interface name contains NUL")?;
    if unsafe { libc::if_nametoindex(cname.as_ptr()) } != 0 {
        return Ok(());
    }
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    bail!(
        "interface {iface:?} not found in this network namespace (ip link shows: {})",
        names.join(", ")
    )
}

fn remove_clsact(iface: &str) -> Result<()> {
    let out = Command::new("tc")
        .args(["qdisc", "del", "dev", iface, "clsact"])
        .output()
        .context("running tc to remove the clsact qdisc")?;
    if !out.status.success() {
        bail!(
            "tc qdisc del dev {iface} clsact: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Result of one BPF_PROG_TEST_RUN.
#[derive(Debug, Clone)]
pub struct TestRunOutput {
    /// The program's return value as the kernel reports it (so `-1` is
    /// `TC_ACT_UNSPEC`).
    pub verdict: i32,
    /// The packet after the program ran.
    pub packet: Vec<u8>,
    /// Average time per run, as measured by the kernel.
    pub duration: std::time::Duration,
}

impl Dataplane {
    /// Runs `prog` on `packet` `repeat` times through BPF_PROG_TEST_RUN.
    /// The kernel reuses one skb across repeats, so a packet the program
    /// rewrites is seen rewritten from the second run on.
    pub fn test_run(&self, prog: &str, packet: &[u8], repeat: u32) -> Result<TestRunOutput> {
        use aya::programs::{TestRun, TestRunOptions};
        // Room for a reject, which may grow the packet into an ICMP error.
        let mut out = vec![0u8; packet.len().max(128) + 128];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        let r = self
            .program(prog)?
            .test_run(opts)
            .with_context(|| format!("BPF_PROG_TEST_RUN of {prog}"))?;
        out.truncate(r.data_size_out as usize);
        Ok(TestRunOutput {
            verdict: r.return_value as i32,
            packet: out,
            duration: r.duration,
        })
    }
}
