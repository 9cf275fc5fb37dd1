//! The eBPF dataplane: loads the embedded object, attaches the TC programs
//! and applies [`Change`]s to the maps incrementally.
//!
//! The agent keeps a mirror of what it wrote (`programmed`), so each change
//! touches only the map entries it concerns: O(changed backends), never a
//! rewrite of the tables. Map layouts are documented in `proxy-common`.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};
use proxy_common::*;

use crate::model::{BackendAddr, DesiredService, DesiredState, Frontend};
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
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_services: MAX_SERVICES,
            max_slots: MAX_SLOTS,
            conntrack_size: MAX_CONNTRACK,
            bpf_log_level: 0,
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
        let mut bpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &opts.bpf_log_level, true)
            .map_max_entries("SERVICES", opts.max_services)
            .map_max_entries("RR_CURSOR", opts.max_services)
            .map_max_entries("SVC_COUNTERS", opts.max_services)
            .map_max_entries("SLOTS", opts.max_slots)
            .map_max_entries("CONNTRACK", opts.conntrack_size)
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
        })
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
            match aya::programs::tc::qdisc_add_clsact(iface) {
                Ok(()) => added_qdisc = true,
                Err(aya::programs::tc::TcError::AlreadyAttached) => {}
                Err(e) if e.to_string().contains("exists") => {}
                Err(e) => return Err(e).context(format!("adding clsact qdisc to {iface}")),
            }
        }
        let options = |mode| match mode {
            AttachMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
            AttachMode::Netlink => TcAttachOptions::Netlink(NlOptions::default()),
        };
        let ingress = self
            .program_mut(INGRESS_PROG)?
            .attach_with_options(iface, TcAttachType::Ingress, options(mode))
            .with_context(|| format!("attaching {INGRESS_PROG} to {iface} ({mode})"))?;
        let egress = match self.program_mut(EGRESS_PROG)?.attach_with_options(
            iface,
            TcAttachType::Egress,
            options(mode),
        ) {
            Ok(l) => l,
            Err(e) => {
                let _ = self.program_mut(INGRESS_PROG)?.detach(ingress);
                return Err(e).context(format!("attaching {EGRESS_PROG} to {iface} ({mode})"));
            }
        };
        self.attachments.push(Attachment {
            iface: iface.to_string(),
            mode,
            ingress,
            egress,
            added_qdisc,
        });
        Ok(())
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
        first_err.map_or(Ok(()), Err)
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
                    let svc = DesiredService {
                        name: p.name.clone(),
                        backends: p.slots.iter().copied().collect(),
                    };
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
                            gone_backends.insert((p.id, backend_raw(b)));
                        }
                    }
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
