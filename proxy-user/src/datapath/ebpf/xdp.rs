//! The XDP program on the external interfaces (`--xdp native|generic|off`):
//! attached like the TC programs (a pinned bpf_link, taken over by the next
//! agent with `bpf_link_update`), and its counters.

use std::path::PathBuf;

use anyhow::{Context, Result};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::{XdpLink, XdpLinkId};
use aya::programs::{Xdp, XdpMode};
use proxy_common::XdpCounters;

use super::{Dataplane, XDP_PROG};

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttach {
    /// In the driver (veth, most NICs): before an skb exists.
    Native,
    /// In the stack, on an skb (any interface; slower, for drivers without
    /// XDP).
    Generic,
}

impl std::fmt::Display for XdpAttach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XdpAttach::Native => "xdp-native",
            XdpAttach::Generic => "xdp-generic",
        })
    }
}

pub(super) struct XdpAttachment {
    iface: String,
    mode: XdpAttach,
    link: XdpLinkId,
    pin: Option<PathBuf>,
}

impl Dataplane {
    fn xdp_program(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .ebpf_mut()
            .program_mut(XDP_PROG)
            .with_context(|| format!("program {XDP_PROG} missing"))?
            .try_into()?)
    }

    /// Loads (verifies) `kproxy_xdp` if that has not happened yet.
    pub fn load_xdp(&mut self) -> Result<()> {
        if !self.xdp_loaded {
            self.xdp_program()?.load().with_context(|| {
                format!("the verifier rejected {XDP_PROG} (--xdp off runs without it)")
            })?;
            self.xdp_loaded = true;
        }
        Ok(())
    }

    /// Attaches `kproxy_xdp` to `iface`. With pinning, a link a previous
    /// agent pinned is taken over (no gap), else a new one is pinned.
    pub fn attach_xdp(&mut self, iface: &str, mode: XdpAttach) -> Result<()> {
        let pin = self
            .pin_root
            .as_ref()
            .map(|r| r.join("links").join(format!("{iface}_xdp")));
        self.load_xdp()?;
        let flags = match mode {
            XdpAttach::Native => XdpMode::Driver,
            XdpAttach::Generic => XdpMode::Skb,
        };
        let prog = self.xdp_program()?;
        let link = match &pin {
            Some(p) if p.exists() => {
                let old = PinnedLink::from_pin(p)
                    .with_context(|| format!("opening pinned link {}", p.display()))?;
                log::info!("taking over pinned link {}", p.display());
                prog.attach_to_link(XdpLink::try_from(FdLink::from(old))?)?
            }
            _ => {
                let id = prog
                    .attach(iface, flags)
                    .with_context(|| format!("attaching {XDP_PROG} to {iface} ({mode})"))?;
                match &pin {
                    Some(p) => {
                        let fd = FdLink::try_from(prog.take_link(id)?)
                            .context("XDP link is not a bpf_link (kernel < 5.9?)")?;
                        let pinned = fd
                            .pin(p)
                            .with_context(|| format!("pinning link at {}", p.display()))?;
                        prog.attach_to_link(XdpLink::try_from(FdLink::from(pinned))?)?
                    }
                    None => id,
                }
            }
        };
        self.xdp_attachments.push(XdpAttachment {
            iface: iface.to_owned(),
            mode,
            link,
            pin,
        });
        Ok(())
    }

    /// Detaches XDP everywhere; returns the first error, trying them all.
    pub(super) fn detach_xdp_all(&mut self) -> Result<()> {
        let mut first_err = None;
        for a in std::mem::take(&mut self.xdp_attachments) {
            let r = self
                .xdp_program()
                .and_then(|p| Ok(p.detach(a.link)?))
                .with_context(|| format!("detaching XDP from {}", a.iface));
            if let Some(pin) = &a.pin {
                let _ = std::fs::remove_file(pin);
            }
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Interfaces XDP is attached to, and how.
    pub fn xdp_attached(&self) -> Vec<(String, XdpAttach)> {
        self.xdp_attachments
            .iter()
            .map(|a| (a.iface.clone(), a.mode))
            .collect()
    }

    /// The XDP counters summed over CPUs.
    pub fn xdp_counters(&self) -> Result<XdpCounters> {
        let mut total = XdpCounters::default();
        for c in self.xdp_counters.get(&0, 0)?.iter() {
            total.add(c);
        }
        Ok(total)
    }
}
