//! Packet counters (global and per service, per CPU in the kernel, summed
//! here) and the conntrack table size.

use anyhow::Result;
use aya::maps::PerCpuValues;
use proxy_common::Counters;

use super::Dataplane;
use crate::datapath::PacketCounters;
use crate::metrics::Snapshot;
use crate::model::Frontend;

impl Dataplane {
    pub(super) fn zeroed_counters(&self) -> PerCpuValues<Counters> {
        PerCpuValues::try_from(vec![Counters::default(); self.nr_cpus])
            .expect("nr_cpus matches the per-CPU map")
    }
    /// Number of conntrack entries (two per flow), both families.
    pub fn conntrack_entries(&self) -> usize {
        self.conntrack.keys().filter(|k| k.is_ok()).count()
            + self.conntrack6.keys().filter(|k| k.is_ok()).count()
    }

    /// Writes one conntrack entry as the programs would (for benchmarks of
    /// the sweep).
    pub fn conntrack_insert(
        &mut self,
        key: proxy_common::CtKey,
        value: proxy_common::CtValue,
    ) -> Result<()> {
        self.conntrack.insert(key, value, 0)?;
        Ok(())
    }

    /// Every conntrack entry as it is now (for tests; entries evicted
    /// while reading are skipped).
    pub fn conntrack_snapshot(&self) -> Vec<(proxy_common::CtKey, proxy_common::CtValue)> {
        self.conntrack.iter().filter_map(|e| e.ok()).collect()
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

impl Dataplane {
    /// The XDP counters if XDP is attached anywhere (logged if unreadable).
    fn xdp_report_counters(&self) -> Option<proxy_common::XdpCounters> {
        if self.xdp_attached().is_empty() {
            return None;
        }
        self.xdp_counters()
            .map_err(|e| log::warn!("reading XDP counters: {e:#}"))
            .ok()
    }
}

fn sum(values: &PerCpuValues<Counters>) -> Result<Counters> {
    let mut total = Counters::default();
    for c in values.iter() {
        total.add(c);
    }
    Ok(total)
}

impl PacketCounters for Dataplane {
    fn snapshot(&self) -> Option<Snapshot> {
        match (self.global_counters(), self.service_counters()) {
            (Ok(global), Ok(per_service)) => Some(Snapshot {
                global,
                xdp: self.xdp_report_counters(),
                conntrack_entries: self.conntrack_entries(),
                per_service,
            }),
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("reading counters for /metrics: {e:#}");
                None
            }
        }
    }

    fn report(&self) -> Vec<String> {
        let mut lines = Vec::new();
        match self.global_counters() {
            Ok(c) => lines.push(format!(
                "kproxy: counters packets={} bytes={} new_flows={} rejects={} drops={} \
                 malformed={} fragments={} fragments_unmatched={} conntrack_entries={}",
                c.packets,
                c.bytes,
                c.new_flows,
                c.rejects,
                c.drops,
                c.malformed,
                c.fragments,
                c.fragments_unmatched,
                self.conntrack_entries()
            )),
            Err(e) => log::warn!("reading counters: {e:#}"),
        }
        if let Some(x) = self.xdp_report_counters() {
            lines.push(format!(
                "kproxy: xdp tx={} redirected={} bytes={} passed={} dropped={} new_flows={}",
                x.tx, x.redirected, x.bytes, x.passed, x.dropped, x.new_flows
            ));
        }
        if let Ok(per_service) = self.service_counters() {
            for (fe, name, c) in per_service {
                lines.push(format!(
                    "kproxy: service {name} {fe} packets={} bytes={} new_flows={} rejects={} \
                     drops={}",
                    c.packets, c.bytes, c.new_flows, c.rejects, c.drops
                ));
            }
        }
        lines
    }
}
