//! An acknowledged write survives `kill -9`: a child process (this test
//! binary, re-run on `durability_child`) writes and prints each revision
//! once its write returned; the parent kills it mid-stream, reopens the
//! store and finds every acknowledged write, and nothing else but possibly
//! the one write in flight.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use kcontrol_store::conformance::{block_on, next_event};
use kcontrol_store::{EventKind, Revision, SqliteStore, Store};

const CHILD_ENV: &str = "KCONTROL_STORE_DURABILITY_CHILD";
/// Acknowledgements the parent reads before it kills the child.
const ACKS_BEFORE_KILL: usize = 150;

/// The child: creates and updates keys until killed (or 100000 writes), one
/// `ACK <revision> <key> <value>` line per acknowledged write.
#[test]
fn durability_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    block_on(async {
        let store = SqliteStore::open(&path).unwrap();
        let mut out = std::io::stdout().lock();
        let mut latest: Vec<Revision> = Vec::new();
        for i in 0..100_000usize {
            let (key, value) = if i % 3 == 2 {
                let k = i % latest.len();
                (format!("/d/{k:06}"), format!("u{i}"))
            } else {
                (format!("/d/{:06}", latest.len()), format!("c{i}"))
            };
            // A value of a few pages now and then makes the WAL grow and checkpoint.
            let value = if i % 10 == 0 {
                value.repeat(2000)
            } else {
                value
            };
            let revision = if i % 3 == 2 {
                let k = i % latest.len();
                let r = store
                    .update(&key, value.clone().into_bytes(), latest[k])
                    .await
                    .unwrap();
                latest[k] = r;
                r
            } else {
                let r = store
                    .create(&key, value.clone().into_bytes())
                    .await
                    .unwrap();
                latest.push(r);
                r
            };
            // One write(2) per line: a kill never leaves half an acknowledgement.
            out.write_all(format!("ACK {revision} {key} {value}\n").as_bytes())
                .unwrap();
            out.flush().unwrap();
        }
    });
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "durability_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut acked: BTreeMap<Revision, (String, String)> = BTreeMap::new();
    let mut killed = false;
    let mut line = String::new();
    loop {
        line.clear();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
        // Only whole lines count; libtest's own output is ignored.
        let Some(ack) = line
            .strip_suffix('\n')
            .and_then(|l| l.find("ACK ").map(|i| &l[i + 4..]))
        else {
            continue;
        };
        let mut parts = ack.splitn(3, ' ');
        let revision: Revision = parts.next().unwrap().parse().unwrap();
        let key = parts.next().unwrap().to_string();
        let value = parts.next().unwrap().to_string();
        acked.insert(revision, (key, value));
        if acked.len() == ACKS_BEFORE_KILL && !killed {
            child.kill().unwrap(); // SIGKILL
            killed = true;
        }
    }
    let status = child.wait().unwrap();
    assert!(killed, "the child finished before it was killed: {status}");
    assert!(!status.success(), "the child was killed: {status}");
    // Lines already in the pipe when it died are acknowledged too.
    assert!(acked.len() >= ACKS_BEFORE_KILL);
    let max_acked = *acked.keys().last().unwrap();

    block_on(async {
        let store = SqliteStore::open(&path).unwrap();
        let current = store.current_revision().await.unwrap();
        eprintln!(
            "{} acknowledged writes, the last at {max_acked}; store at {current}",
            acked.len()
        );
        assert!(
            current >= max_acked,
            "current {current} < acknowledged {max_acked}"
        );
        assert!(
            current <= max_acked + 1,
            "more than one write in flight: {current} > {max_acked} + 1"
        );
        // The log holds every acknowledged write, with its value.
        let mut log = store.watch("/d/", 0).await.unwrap();
        for revision in 1..=current {
            let e = next_event(&mut log).await;
            assert_eq!(e.kind, EventKind::Put);
            assert_eq!(e.kv.mod_revision, revision);
            if let Some((key, value)) = acked.get(&revision) {
                assert_eq!(&e.kv.key, key);
                assert_eq!(e.kv.value, value.as_bytes());
            } else {
                assert_eq!(
                    revision,
                    max_acked + 1,
                    "revision {revision} missing from the acknowledgements"
                );
            }
        }
        // Latest values agree with the last acknowledged write of each key.
        let mut last: BTreeMap<&str, Revision> = BTreeMap::new();
        for (r, (k, _)) in &acked {
            last.insert(k, *r);
        }
        for (key, revision) in last {
            let kv = store.get(key).await.unwrap().expect("acknowledged key");
            assert!(kv.mod_revision >= revision);
        }
        // The store still works, and revisions go on.
        let r = store.create("/d/after", b"x".to_vec()).await.unwrap();
        assert_eq!(r, current + 1);
        assert_eq!(
            store.get("/d/after").await.unwrap().unwrap().mod_revision,
            r
        );
    });
}
