//! Attaching the programs to an interface: tcx links (pinned, so the next
//! agent takes them over) or a clsact qdisc with cls_bpf filters.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{LinkOrder, TcAttachType};
use aya::util::KernelVersion;

use super::{Dataplane, EGRESS_PROG, INGRESS_PROG};

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

pub(super) struct Attachment {
    iface: String,
    mode: AttachMode,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
    /// Pin files of the tcx links (pinned mode).
    pins: Vec<PathBuf>,
    /// We created the clsact qdisc (netlink mode) and remove it on detach.
    added_qdisc: bool,
}

impl Dataplane {
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
        let mut first_err = self.detach_xdp_all().err();
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
