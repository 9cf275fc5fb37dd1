//! Diff of two desired states: the only thing a datapath is ever asked to
//! apply. Pure, so it is tested without a kernel.
//!
//! Two entry points, one rule per frontend: [`diff`] compares whole states
//! (at start, against what the datapath holds, and after a failed apply);
//! [`diff_touched`] compares only the frontends one edit touched (every
//! event of a source). Both agree by construction, and the property test in
//! `source.rs` checks it through the whole source.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{BackendAddr, DesiredService, DesiredState, Frontend, Policy};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A frontend appears, with its backends (possibly none).
    AddService {
        frontend: Frontend,
        name: String,
        backends: BTreeSet<BackendAddr>,
        /// Traffic policy, source ranges, session affinity.
        policy: Policy,
    },
    /// A frontend's backend set changes.
    UpdateBackends {
        frontend: Frontend,
        /// Enter the rotation.
        added: BTreeSet<BackendAddr>,
        /// Leave the rotation: no new flows.
        removed: BTreeSet<BackendAddr>,
        /// Gone for good: the flows they still have are cut (UDP moves to a
        /// live backend, TCP gets a reset). A removed backend that is
        /// draining (terminating but serving) is not here until it leaves
        /// the slice.
        flush: BTreeSet<BackendAddr>,
    },
    /// A frontend now belongs to another service port: same backends and
    /// flows, a new name for messages and counters.
    RenameService { frontend: Frontend, name: String },
    /// A frontend disappears.
    RemoveService { frontend: Frontend },
}

/// Counts of one apply, whatever the datapath.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyStats {
    pub services_added: usize,
    pub services_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    pub flows_flushed: usize,
}

/// Changes that turn `old` into `new`, removals first so that freed service
/// ids and slots can be reused by the additions of the same batch.
pub fn diff(old: &DesiredState, new: &DesiredState) -> Vec<Change> {
    let mut out = Changes::default();
    for (fe, svc) in &old.services {
        if !new.services.contains_key(fe) {
            out.key(*fe, Some(svc), None);
        }
    }
    for (fe, svc) in &new.services {
        out.key(*fe, old.services.get(fe), Some(svc));
    }
    out.into_vec()
}

/// What the frontends touched by an edit held before it (`None`: absent).
/// An edit of one origin records the first value of every frontend it
/// touches; [`diff_touched`] then gives its changes.
pub type Before = BTreeMap<Frontend, Option<DesiredService>>;

/// [`diff`] restricted to the frontends in `before`: the same changes, in
/// the same order, as the full diff from the state before the edit to
/// `new`, when `before` holds every frontend the edit touched.
pub fn diff_touched(before: &Before, new: &DesiredState) -> Vec<Change> {
    let mut out = Changes::default();
    for (fe, old) in before {
        out.key(*fe, old.as_ref(), new.services.get(fe));
    }
    out.into_vec()
}

fn add(fe: Frontend, new: &DesiredService) -> Change {
    Change::AddService {
        frontend: fe,
        name: new.name.clone(),
        backends: new.backends.clone(),
        policy: new.policy.clone(),
    }
}

/// Changes being collected, removals apart so they go first.
#[derive(Default)]
struct Changes {
    removes: Vec<Change>,
    others: Vec<Change>,
}

impl Changes {
    /// The one rule for one frontend, whichever diff asks.
    fn key(&mut self, fe: Frontend, old: Option<&DesiredService>, new: Option<&DesiredService>) {
        match (old, new) {
            (Some(_), None) => self.removes.push(Change::RemoveService { frontend: fe }),
            (None, Some(new)) => self.others.push(add(fe, new)),
            // A frontend whose policy changes (traffic policy, source
            // ranges, affinity; or that turns from a ClusterIP into an
            // external address) is replaced: its flows were admitted under
            // the old rule.
            (Some(old), Some(new)) if old.policy != new.policy => {
                self.removes.push(Change::RemoveService { frontend: fe });
                self.others.push(add(fe, new));
            }
            (Some(old), Some(new)) => {
                // Another service port took the frontend over (or an entry
                // adopted after a restart learns its name): it stays in
                // place, flows and all; only its name follows.
                if old.name != new.name {
                    self.others.push(Change::RenameService {
                        frontend: fe,
                        name: new.name.clone(),
                    });
                }
                self.others.extend(update(fe, old, new));
            }
            (None, None) => {}
        }
    }

    fn into_vec(mut self) -> Vec<Change> {
        self.removes.append(&mut self.others);
        self.removes
    }
}

/// The `UpdateBackends` that turns `old` into `new` for one frontend, if
/// anything changes for the datapath.
pub fn update(frontend: Frontend, old: &DesiredService, new: &DesiredService) -> Option<Change> {
    let added: BTreeSet<BackendAddr> = new.backends.difference(&old.backends).copied().collect();
    let removed: BTreeSet<BackendAddr> = old.backends.difference(&new.backends).copied().collect();
    // Flows are cut for what was in the rotation or draining and is now
    // neither.
    let flush: BTreeSet<BackendAddr> = old
        .backends
        .union(&old.draining)
        .filter(|b| !new.backends.contains(b) && !new.draining.contains(b))
        .copied()
        .collect();
    if added.is_empty() && removed.is_empty() && flush.is_empty() {
        return None;
    }
    Some(Change::UpdateBackends {
        frontend,
        added,
        removed,
        flush,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proto;

    fn fe(port: u16) -> Frontend {
        Frontend {
            ip: "10.96.0.1".parse().unwrap(),
            port,
            proto: Proto::Tcp,
        }
    }
    fn be(last: u8) -> BackendAddr {
        BackendAddr::new(std::net::Ipv4Addr::from([10, 0, 0, last]), 8080)
    }
    fn state(entries: &[(u16, &[u8])]) -> DesiredState {
        let mut s = DesiredState::default();
        for (port, bes) in entries {
            s.services.insert(
                fe(*port),
                DesiredService::new(format!("svc{port}"), bes.iter().map(|b| be(*b)).collect()),
            );
        }
        s
    }

    #[test]
    fn identical_states_give_no_changes() {
        let s = state(&[(80, &[1, 2, 3])]);
        assert!(diff(&s, &s).is_empty());
    }

    #[test]
    fn only_the_difference_is_emitted() {
        let old = state(&[(80, &[1, 2, 3]), (81, &[1]), (82, &[])]);
        let new = state(&[(80, &[2, 3, 4]), (82, &[]), (83, &[5])]);
        let changes = diff(&old, &new);
        assert_eq!(
            changes,
            vec![
                Change::RemoveService { frontend: fe(81) },
                Change::UpdateBackends {
                    frontend: fe(80),
                    added: [be(4)].into(),
                    removed: [be(1)].into(),
                    flush: [be(1)].into(),
                },
                Change::AddService {
                    frontend: fe(83),
                    name: "svc83".into(),
                    backends: [be(5)].into(),
                    policy: Policy::default(),
                },
            ]
        );
    }

    #[test]
    fn a_draining_backend_leaves_the_rotation_but_keeps_its_flows_until_it_is_gone() {
        let ready = state(&[(80, &[1, 2, 3])]);
        let mut draining = state(&[(80, &[2, 3])]);
        draining.services.get_mut(&fe(80)).unwrap().draining = [be(1)].into();
        assert_eq!(
            diff(&ready, &draining),
            vec![Change::UpdateBackends {
                frontend: fe(80),
                added: [].into(),
                removed: [be(1)].into(),
                flush: [].into(),
            }]
        );
        // It leaves the slice: now its flows go.
        let gone = state(&[(80, &[2, 3])]);
        assert_eq!(
            diff(&draining, &gone),
            vec![Change::UpdateBackends {
                frontend: fe(80),
                added: [].into(),
                removed: [].into(),
                flush: [be(1)].into(),
            }]
        );
        // Ready again while draining: back in the rotation, nothing cut.
        assert_eq!(
            diff(&draining, &ready),
            vec![Change::UpdateBackends {
                frontend: fe(80),
                added: [be(1)].into(),
                removed: [].into(),
                flush: [].into(),
            }]
        );
        // A draining endpoint that appears without ever being ready changes
        // nothing in the datapath.
        let mut extra = state(&[(80, &[2, 3])]);
        extra.services.get_mut(&fe(80)).unwrap().draining = [be(1), be(9)].into();
        assert!(diff(&draining, &extra).is_empty());
    }

    #[test]
    fn a_frontend_changing_owner_stays_in_place_and_takes_the_new_name() {
        let old = state(&[(80, &[1, 2])]);
        let mut new = state(&[(80, &[2, 3])]);
        new.services.get_mut(&fe(80)).unwrap().name = "other:http".into();
        let changes = vec![
            Change::RenameService {
                frontend: fe(80),
                name: "other:http".into(),
            },
            Change::UpdateBackends {
                frontend: fe(80),
                added: [be(3)].into(),
                removed: [be(1)].into(),
                flush: [be(1)].into(),
            },
        ];
        assert_eq!(diff(&old, &new), changes);
        let touched: Before = [(fe(80), old.services.get(&fe(80)).cloned())].into();
        assert_eq!(diff_touched(&touched, &new), changes);
    }
}
