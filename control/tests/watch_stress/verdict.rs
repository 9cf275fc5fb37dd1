//! The verdict: every session checked against the acknowledged writes.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::LATENCY_BOUND;
use crate::sessions::Session;
use crate::writes::{Kind, Op};

/// The figures of one run.
#[derive(Debug, Default)]
pub(crate) struct Figures {
    pub(crate) writes: usize,
    pub(crate) sessions: usize,
    pub(crate) events_checked: usize,
    pub(crate) worst_latency: Duration,
    pub(crate) p99_latency: Duration,
}

/// Checks every session against the acknowledged writes; panics with every
/// violation found.
pub(crate) fn verdict(store: &str, mut ops: Vec<Op>, sessions: &mut [Session]) -> Figures {
    let mut failures: Vec<String> = Vec::new();
    // A delete's revision, from the watchers that show revisions; they
    // must agree, and it must fall between the key's writes around it.
    let mut delete_rvs: HashMap<(String, u64), i64> = HashMap::new();
    for s in sessions.iter() {
        for e in s.events.iter().filter(|e| e.ty == "DELETED") {
            let Some(rv) = e.rv else { continue };
            let key = (e.name.clone(), e.seq);
            match delete_rvs.get(&key) {
                Some(&other) if other != rv => failures.push(format!(
                    "{}: delete of {}#{} at {rv}, another watcher saw it at {other}",
                    s.client, e.name, e.seq
                )),
                _ => {
                    delete_rvs.insert(key, rv);
                }
            }
        }
    }
    for op in ops.iter_mut().filter(|o| o.kind == Kind::Delete) {
        match delete_rvs.get(&(op.name.clone(), op.seq)) {
            Some(&rv) => op.rv = Some(rv),
            None => failures.push(format!(
                "the delete of {}#{} was acknowledged but no watcher saw it",
                op.name, op.seq
            )),
        }
    }
    // Per key, revisions follow the writer's order.
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in &ops {
        by_key.entry(&op.name).or_default().push(op);
    }
    for (key, key_ops) in &by_key {
        for pair in key_ops.windows(2) {
            if let (Some(a), Some(b)) = (pair[0].rv, pair[1].rv)
                && a >= b
            {
                failures.push(format!(
                    "{key}: {:?}#{} at {a} before {:?}#{} at {b}",
                    pair[0].kind, pair[0].seq, pair[1].kind, pair[1].seq
                ));
            }
        }
    }
    let mut truth: Vec<&Op> = ops.iter().filter(|o| o.rv.is_some()).collect();
    truth.sort_by_key(|o| o.rv);
    for pair in truth.windows(2) {
        if pair[0].rv == pair[1].rv {
            failures.push(format!(
                "{} and {} both at revision {:?}",
                pair[0].name, pair[1].name, pair[0].rv
            ));
        }
    }

    let mut latencies: Vec<Duration> = Vec::new();
    let mut checked = 0;
    for s in sessions.iter() {
        let fail = |what: String| format!("{store} {} (from {}): {what}", s.client, s.list_rv);
        if let Some(e) = &s.error {
            failures.push(fail(format!("{e}; saw {} events", s.events.len())));
            continue;
        }
        // The list: each selected key's state at the list's revision.
        if let Some(listed) = &s.listed {
            let mut want: BTreeMap<&str, i64> = BTreeMap::new();
            for op in truth
                .iter()
                .filter(|o| o.rv <= Some(s.list_rv) && s.selects(o.writer))
            {
                match op.kind {
                    Kind::Delete => want.remove(op.name.as_str()),
                    _ => want.insert(&op.name, op.rv.unwrap()),
                };
            }
            let got: BTreeMap<&str, i64> = listed.iter().map(|(n, r)| (n.as_str(), *r)).collect();
            if got != want {
                failures.push(fail(format!("listed {got:?}, the writes say {want:?}")));
            }
        }
        // The events: exactly the selected writes after the list, in order.
        let want: Vec<&&Op> = truth
            .iter()
            .filter(|o| o.rv > Some(s.list_rv) && s.selects(o.writer))
            .collect();
        if s.to_the_end && s.events.len() != want.len() {
            failures.push(fail(format!(
                "{} events for {} writes after the list",
                s.events.len(),
                want.len()
            )));
        }
        for (i, e) in s.events.iter().enumerate() {
            let Some(op) = want.get(i) else {
                failures.push(fail(format!("event {i} ({e:?}) after all the writes")));
                break;
            };
            let same = e.ty == op.kind.event()
                && e.name == op.name
                && e.seq == op.seq
                && e.rv.is_none_or(|rv| Some(rv) == op.rv);
            if !same {
                failures.push(fail(format!(
                    "event {i} is {} {}#{} at {:?}, the write is {} {}#{} at {:?}",
                    e.ty,
                    e.name,
                    e.seq,
                    e.rv,
                    op.kind.event(),
                    op.name,
                    op.seq,
                    op.rv
                )));
                break;
            }
            checked += 1;
            let latency =
                e.at.saturating_duration_since(op.acked.max(s.watching).max(e.since));
            if latency > LATENCY_BOUND {
                failures.push(fail(format!(
                    "event {i} ({} {}#{}) took {latency:?}",
                    e.ty, e.name, e.seq
                )));
            }
            latencies.push(latency);
        }
        // Bookmarks never go back, nor behind an event already sent, and
        // no event at or below one follows it.
        let mut floor = s.list_rv;
        for &(rv, before) in &s.bookmarks {
            let last_event = before
                .checked_sub(1)
                .and_then(|i| s.events[i].rv)
                .unwrap_or(s.list_rv);
            if rv < floor || rv < last_event {
                failures.push(fail(format!(
                    "bookmark at {rv} after revision {}",
                    floor.max(last_event)
                )));
            }
            floor = floor.max(rv);
            if let Some(next) = s.events.get(before).and_then(|e| e.rv)
                && next <= rv
            {
                failures.push(fail(format!("event at {next} after a bookmark at {rv}")));
            }
        }
    }
    latencies.sort();
    let figures = Figures {
        writes: ops.len(),
        sessions: sessions.len(),
        events_checked: checked,
        worst_latency: latencies.last().copied().unwrap_or_default(),
        p99_latency: latencies
            .get(latencies.len().saturating_mul(99) / 100)
            .or(latencies.last())
            .copied()
            .unwrap_or_default(),
    };
    assert!(
        failures.is_empty(),
        "watch stress on {store}: {} violations ({figures:?}):\n{}",
        failures.len(),
        failures.join("\n")
    );
    // A run that checked nothing proves nothing.
    assert!(
        checked > 0 && sessions.iter().filter(|s| s.to_the_end).count() >= 5,
        "watch stress on {store} checked {checked} events in {} sessions",
        sessions.len()
    );
    figures
}
