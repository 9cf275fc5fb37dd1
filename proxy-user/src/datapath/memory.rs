//! A datapath that only keeps the state it was given: the model the real
//! datapaths are held to, and a stand-in for them in tests of the diff
//! (the proptest in `source.rs`).

use anyhow::{Result, bail};

use super::Datapath;
use crate::model::{DesiredService, DesiredState};
use crate::reconcile::{ApplyStats, Change};

/// Applies changes with the same rules as the eBPF datapath (an added
/// frontend must be new, an updated one must exist) to a [`DesiredState`].
#[derive(Debug, Default)]
pub struct Memory {
    state: DesiredState,
}

impl Memory {
    /// A datapath that already holds `state` (as after adoption).
    pub fn with_state(state: DesiredState) -> Self {
        Self { state }
    }
}

impl Datapath for Memory {
    fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        for change in changes {
            match change {
                Change::RemoveService { frontend } => {
                    if let Some(s) = self.state.services.remove(frontend) {
                        stats.services_removed += 1;
                        stats.backends_removed += s.backends.len();
                    }
                }
                Change::AddService {
                    frontend,
                    name,
                    backends,
                    policy,
                } => {
                    if self.state.services.contains_key(frontend) {
                        bail!("service {frontend} is already programmed");
                    }
                    stats.services_added += 1;
                    stats.backends_added += backends.len();
                    self.state.services.insert(
                        *frontend,
                        DesiredService {
                            policy: policy.clone(),
                            ..DesiredService::new(name, backends.clone())
                        },
                    );
                }
                Change::RenameService { frontend, name } => {
                    let Some(s) = self.state.services.get_mut(frontend) else {
                        bail!("service {frontend} is not programmed");
                    };
                    s.name.clone_from(name);
                }
                Change::UpdateBackends {
                    frontend,
                    added,
                    removed,
                    flush: _,
                } => {
                    let Some(s) = self.state.services.get_mut(frontend) else {
                        bail!("service {frontend} is not programmed");
                    };
                    for b in removed {
                        s.backends.remove(b);
                    }
                    s.backends.extend(added.iter().copied());
                    stats.backends_added += added.len();
                    stats.backends_removed += removed.len();
                }
            }
        }
        Ok(stats)
    }

    fn programmed_state(&self) -> DesiredState {
        self.state.clone()
    }

    fn service_count(&self) -> usize {
        self.state.services.len()
    }

    fn backend_count(&self) -> usize {
        self.state.backend_count()
    }

    fn shutdown(&mut self) -> Result<()> {
        self.state = DesiredState::default();
        Ok(())
    }
}
