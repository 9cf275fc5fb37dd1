//! Diff of two desired states: the only thing the dataplane is ever asked to
//! apply. Pure, so it is tested without a kernel.

use std::collections::BTreeSet;

use crate::model::{BackendAddr, DesiredState, Frontend};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A frontend appears, with its backends (possibly none).
    AddService {
        frontend: Frontend,
        name: String,
        backends: BTreeSet<BackendAddr>,
    },
    /// A frontend's backend set changes.
    UpdateBackends {
        frontend: Frontend,
        added: BTreeSet<BackendAddr>,
        removed: BTreeSet<BackendAddr>,
    },
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
    let mut removes = Vec::new();
    let mut others = Vec::new();
    for fe in old.services.keys() {
        if !new.services.contains_key(fe) {
            removes.push(Change::RemoveService { frontend: *fe });
        }
    }
    for (fe, svc) in &new.services {
        match old.services.get(fe) {
            None => others.push(Change::AddService {
                frontend: *fe,
                name: svc.name.clone(),
                backends: svc.backends.clone(),
            }),
            Some(prev) if prev.backends != svc.backends => others.push(Change::UpdateBackends {
                frontend: *fe,
                added: svc.backends.difference(&prev.backends).copied().collect(),
                removed: prev.backends.difference(&svc.backends).copied().collect(),
            }),
            Some(_) => {}
        }
    }
    removes.extend(others);
    removes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DesiredService, Proto};

    fn fe(port: u16) -> Frontend {
        Frontend {
            ip: "10.96.0.1".parse().unwrap(),
            port,
            proto: Proto::Tcp,
        }
    }
    fn be(last: u8) -> BackendAddr {
        BackendAddr {
            ip: [10, 0, 0, last].into(),
            port: 8080,
        }
    }
    fn state(entries: &[(u16, &[u8])]) -> DesiredState {
        let mut s = DesiredState::default();
        for (port, bes) in entries {
            s.services.insert(
                fe(*port),
                DesiredService {
                    name: format!("svc{port}"),
                    backends: bes.iter().map(|b| be(*b)).collect(),
                },
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
                },
                Change::AddService {
                    frontend: fe(83),
                    name: "svc83".into(),
                    backends: [be(5)].into(),
                },
            ]
        );
    }
}
