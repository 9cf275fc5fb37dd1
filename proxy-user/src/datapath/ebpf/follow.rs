//! Interfaces followed by name prefix (`--iface-prefix`, e.g. the kubelet's
//! pod veths): attached when they appear, released when they vanish.
//!
//! The events come from [`crate::links`]; the agent loop owns the rtnetlink
//! socket and hands each batch to [`FollowLinks::links_changed`].

use proxy_common::lifecycle::Event;

use super::{AttachMode, Dataplane};
use crate::datapath::FollowLinks;
use crate::links::{self, LinkEvent};

/// Which interfaces to follow and how to attach to them.
#[derive(Clone, Debug)]
pub struct Following {
    pub prefixes: Vec<String>,
    pub mode: AttachMode,
}

impl Dataplane {
    /// Starts following interfaces whose names start with one of
    /// `following.prefixes`; attaches to those that exist now. Returns the
    /// lifecycle events to report.
    pub fn follow(&mut self, following: Following) -> Vec<Event> {
        self.following = Some(following);
        self.attach_matching()
    }

    /// Compares the attachments with the interfaces that exist now: attaches
    /// to matching ones not attached yet, releases the vanished.
    fn attach_matching(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        let present = match links::current_links() {
            Ok(p) => p,
            Err(e) => {
                log::warn!("listing interfaces: {e}");
                return events;
            }
        };
        for (name, _) in self.attached() {
            if !present.contains(&name) && self.forget(&name) {
                events.push(Event::Released { iface: name });
            }
        }
        for name in present {
            if self.is_followed(&name) {
                events.extend(self.attach_followed(&name));
            }
        }
        events
    }

    fn is_followed(&self, name: &str) -> bool {
        self.following
            .as_ref()
            .is_some_and(|f| links::matches(&f.prefixes, name))
    }

    fn attach_followed(&mut self, name: &str) -> Option<Event> {
        let mode = self.following.as_ref()?.mode;
        if self.is_attached(name) {
            return None;
        }
        match self.attach(name, mode) {
            Ok(()) => Some(Event::Attached {
                iface: name.to_string(),
                mode: mode.to_string(),
            }),
            // It may already be gone again (or moved into a pod's namespace).
            Err(e) => {
                log::warn!("attaching to {name}: {e:#}");
                None
            }
        }
    }
}

impl FollowLinks for Dataplane {
    fn links_changed(&mut self, events: Vec<LinkEvent>) -> Vec<Event> {
        let mut out = Vec::new();
        let mut rescan = false;
        for ev in events {
            match ev {
                LinkEvent::Present(name) if self.is_followed(&name) => {
                    out.extend(self.attach_followed(&name));
                }
                LinkEvent::Gone(name) if self.forget(&name) => {
                    out.push(Event::Released { iface: name });
                }
                LinkEvent::Rescan => rescan = true,
                _ => {}
            }
        }
        if rescan {
            out.extend(self.attach_matching());
        }
        out
    }
}
