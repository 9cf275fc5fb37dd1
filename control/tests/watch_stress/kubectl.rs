//! The kubectl clients: `kubectl get -w --watch-only`, Table and JSON.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::Server;
use crate::sessions::{Format, Phase, Seen, Session, Stop, rv_of, seq_label};
use crate::{CATCH_UP_BOUND, NS};

/// kubectl sessions, as [`raw_client`](crate::raw::raw_client)'s (`hold`:
/// each session's length).
pub(crate) fn kubectl_client(
    server: &Server,
    name: &str,
    format: Format,
    hold: Option<Duration>,
    phase: &Phase,
) -> Vec<Session> {
    let cache = server.data_dir.join(format!("kube-cache-{name}"));
    let mut sessions = Vec::new();
    for i in 0.. {
        let until = match hold {
            Some(h) if !phase.writes_done.load(Ordering::SeqCst) => Some(Instant::now() + h),
            _ => None,
        };
        let s = kubectl_session(
            server,
            &cache,
            &format!("{name}#{i}"),
            format,
            Stop { until },
            phase,
        );
        let failed = s.error.is_some();
        sessions.push(s);
        if until.is_none() || failed {
            break;
        }
    }
    sessions
}

/// A `kubectl get configmaps -w --watch-only` session; its watch starts at
/// its list's resourceVersion, which its `-v=6` log shows.
fn kubectl_session(
    server: &Server,
    cache: &std::path::Path,
    name: &str,
    format: Format,
    stop: Stop,
    phase: &Phase,
) -> Session {
    let mut s = Session::new(name, None);
    let mut cmd = testbed::Kubectl::new(&server.kubeconfig)
        .cache_dir(cache)
        .command();
    cmd.args([
        "get",
        "configmaps",
        "-n",
        NS,
        "--watch-only",
        "--output-watch-events",
    ])
    .arg("-v=6");
    match format {
        Format::Json => cmd.args(["-o", "json"]),
        Format::Table => cmd.args(["--no-headers", "-L", "seq"]),
    };
    let mut child = match cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => {
            s.error = Some(format!("running kubectl: {e}"));
            return s;
        }
    };
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let _child = Kill(child);
    // The watch's start: resourceVersion=N in the URL of the request that
    // got a 200 with watch=true.
    let (rv_tx, rv_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && l.contains("watch=true") && l.contains("200 OK") {
                let rv = l
                    .split("resourceVersion=")
                    .nth(1)
                    .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|r| r.parse::<i64>().ok());
                let _ = rv_tx.send(rv.ok_or(l));
                sent = true;
            }
        }
    });
    let (ev_tx, ev_rx) = mpsc::channel::<Result<Seen, String>>();
    std::thread::spawn(move || match format {
        Format::Table => {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                // EVENT NAME DATA AGE SEQ
                let f: Vec<&str> = l.split_whitespace().collect();
                let seen = match (f.first(), f.get(1), f.last().and_then(|q| q.parse().ok())) {
                    (Some(ty), Some(name), Some(seq)) if f.len() >= 5 => Ok(Seen {
                        ty: ty.to_string(),
                        name: name.to_string(),
                        rv: None,
                        seq,
                        at: Instant::now(),
                        // Set when it is taken in.
                        since: Instant::now(),
                    }),
                    _ => Err(format!("unexpected line {l:?}")),
                };
                if ev_tx.send(seen).is_err() {
                    return;
                }
            }
        }
        Format::Json => {
            let values = serde_json::Deserializer::from_reader(stdout).into_iter::<Value>();
            for v in values {
                let seen = match v {
                    Ok(ev) => {
                        let meta = &ev["object"]["metadata"];
                        match (ev["type"].as_str(), meta["name"].as_str(), seq_label(meta)) {
                            (Some(ty), Some(name), Some(seq)) => Ok(Seen {
                                ty: ty.to_string(),
                                name: name.to_string(),
                                rv: rv_of(meta),
                                seq,
                                at: Instant::now(),
                                since: Instant::now(),
                            }),
                            _ => Err(format!("unexpected event {ev}")),
                        }
                    }
                    Err(e) => Err(format!("kubectl -o json printed no JSON: {e}")),
                };
                let stop = seen.is_err();
                if ev_tx.send(seen).is_err() || stop {
                    return;
                }
            }
        }
    });
    match rv_rx.recv_timeout(CATCH_UP_BOUND) {
        Ok(Ok(rv)) => s.list_rv = rv,
        Ok(Err(line)) => {
            s.error = Some(format!("no resourceVersion in the watch request: {line}"));
            return s;
        }
        Err(_) => {
            s.error = Some(format!("kubectl did not watch within {CATCH_UP_BOUND:?}"));
            return s;
        }
    }
    s.watching = Instant::now();
    if stop.until.is_none() {
        phase.ready.fetch_add(1, Ordering::SeqCst);
    }
    loop {
        if stop.until.is_some_and(|u| Instant::now() >= u) {
            return s;
        }
        if stop.until.is_none() && s.complete(phase) {
            s.to_the_end = true;
            return s;
        }
        if let Err(e) = phase.catch_up_over() {
            s.error = Some(e);
            return s;
        }
        match ev_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(seen)) => {
                let since = s.watching;
                s.push(Seen { since, ..seen })
            }
            Ok(Err(e)) => {
                s.error = Some(e);
                return s;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                s.error = Some("kubectl exited".into());
                return s;
            }
        }
    }
}
