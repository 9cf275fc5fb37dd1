//! What was written: the writers and their acknowledged writes.

use std::time::Instant;

use serde_json::{Value, json};

use crate::common;
use crate::{KEYS_PER_WRITER, NS};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Create,
    Update,
    Delete,
}

impl Kind {
    /// The watch event type a watcher of everything sees for it.
    pub(crate) fn event(self) -> &'static str {
        match self {
            Kind::Create => "ADDED",
            Kind::Update => "MODIFIED",
            Kind::Delete => "DELETED",
        }
    }
}

/// One acknowledged write.
#[derive(Clone, Debug)]
pub(crate) struct Op {
    pub(crate) name: String,
    pub(crate) writer: usize,
    pub(crate) kind: Kind,
    /// The `seq` label the event carries (a delete's event carries the
    /// deleted object, so the seq of the write before it).
    pub(crate) seq: u64,
    /// From the answer; a delete's (its answer is a Status) is learned from
    /// the watchers, which must all agree on it.
    pub(crate) rv: Option<i64>,
    pub(crate) acked: Instant,
    /// The key's last write, made after the write phase.
    pub(crate) last: bool,
}

/// Deterministic pseudo-random numbers (xorshift), so a failing run can be
/// told apart from another by its seed only.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub(crate) fn path(name: Option<&str>) -> String {
    match name {
        Some(n) => format!("/api/v1/namespaces/{NS}/configmaps/{n}"),
        None => format!("/api/v1/namespaces/{NS}/configmaps"),
    }
}

fn configmap(name: &str, writer: usize, seq: u64) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "labels": { "writer": writer.to_string(), "seq": seq.to_string() },
        },
        "data": { "seq": seq.to_string() },
    })
}

/// Writes the writer's keys (create, update, now and then delete) until
/// `phase_end`, then once more each (so every key ends on a write whose
/// revision is known). Returns its acknowledged writes in order.
pub(crate) async fn writer(
    client: kube::Client,
    w: usize,
    phase_end: Instant,
) -> Result<Vec<Op>, String> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((w as u64 + 1) * 0x1000_0001));
    let names: Vec<String> = (0..KEYS_PER_WRITER).map(|k| format!("w{w}-k{k}")).collect();
    // Per key: exists, seq of the last write.
    let mut state = [(false, 0u64); KEYS_PER_WRITER];
    let mut ops = Vec::new();
    let mut write = async |k: usize, last: bool, rng: &mut Rng| -> Result<Op, String> {
        let name = &names[k];
        let (exists, seq) = state[k];
        let (kind, reply) = if !exists {
            let body = configmap(name, w, seq + 1);
            (
                Kind::Create,
                common::post_json(&client, &path(None), &body).await,
            )
        } else if !last && rng.below(6) == 0 {
            (
                Kind::Delete,
                common::delete(&client, &path(Some(name))).await,
            )
        } else {
            let body = configmap(name, w, seq + 1);
            (
                Kind::Update,
                common::put_json(&client, &path(Some(name)), &body).await,
            )
        };
        if !(200..300).contains(&reply.code) {
            return Err(format!(
                "writer {w}: {kind:?} {name} answered {}: {}",
                reply.code,
                String::from_utf8_lossy(&reply.body)
            ));
        }
        let acked = Instant::now();
        let (seq, rv) = match kind {
            Kind::Delete => (seq, None),
            _ => {
                let rv = reply.json()["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|r| r.parse().ok())
                    .ok_or_else(|| format!("writer {w}: {kind:?} {name}: no resourceVersion"))?;
                (seq + 1, Some(rv))
            }
        };
        state[k] = (kind != Kind::Delete, seq);
        Ok(Op {
            name: name.clone(),
            writer: w,
            kind,
            seq,
            rv,
            acked,
            last,
        })
    };
    while Instant::now() < phase_end {
        let k = rng.below(KEYS_PER_WRITER as u64) as usize;
        ops.push(write(k, false, &mut rng).await?);
    }
    for k in 0..KEYS_PER_WRITER {
        ops.push(write(k, true, &mut rng).await?);
    }
    Ok(ops)
}
