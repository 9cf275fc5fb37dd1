//! The lines kproxy prints on stdout when its state changes, and their parser.
//!
//! They are the agent's interface to whoever supervises it (the test
//! harness, `cargo xtask up`, the benchmarks): "the datapath is attached to
//! IF", "the first sync is done", "generation N is applied". The agent
//! formats them with [`Event`]'s `Display`; supervisors read them back with
//! [`Event::parse`], so the wording lives in this one place.
//!
//! | line | meaning |
//! |---|---|
//! | `kproxy: attached IF mode=M` | programs attached to IF (`tcx` or `netlink`) |
//! | `kproxy: released IF` | IF went away or stopped matching; its attachment is dropped |
//! | `kproxy: ready services=S backends=B load_us=L sync_us=T` | first full sync programmed |
//! | `kproxy: applied generation=G services=S backends=B changes=C took_us=T` | a later change is in the datapath |
//! | `kproxy: rejected FILE: MSG` | a manifest was refused at start |
//! | `kproxy: rejected FILE: MSG (previous state kept)` | a changed manifest was refused; what it held before stays |
//! | `kproxy: error applying changes: MSG` | the datapath refused a change; the next round resyncs |
//! | `kproxy: metrics on URL` | /metrics is served |
//! | `kproxy: exiting, datapath left attached and pinned under DIR` | stop with `--keep-datapath-on-exit` |
//! | `kproxy: detached` | clean stop: everything removed |

use core::fmt;
use std::string::{String, ToString};

/// Every lifecycle line starts with this.
pub const PREFIX: &str = "kproxy: ";

/// One lifecycle line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Attached {
        iface: String,
        mode: String,
    },
    Released {
        iface: String,
    },
    Ready {
        services: u64,
        backends: u64,
        load_us: u64,
        sync_us: u64,
    },
    Applied {
        generation: u64,
        services: u64,
        backends: u64,
        changes: u64,
        took_us: u64,
    },
    Rejected {
        file: String,
        message: String,
        previous_kept: bool,
    },
    ApplyError {
        message: String,
    },
    Metrics {
        url: String,
    },
    LeftAttached {
        pin_dir: String,
    },
    Detached,
}

const KEPT: &str = " (previous state kept)";

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PREFIX)?;
        match self {
            Event::Attached { iface, mode } => write!(f, "attached {iface} mode={mode}"),
            Event::Released { iface } => write!(f, "released {iface}"),
            Event::Ready {
                services,
                backends,
                load_us,
                sync_us,
            } => write!(
                f,
                "ready services={services} backends={backends} load_us={load_us} sync_us={sync_us}"
            ),
            Event::Applied {
                generation,
                services,
                backends,
                changes,
                took_us,
            } => write!(
                f,
                "applied generation={generation} services={services} backends={backends} \
                 changes={changes} took_us={took_us}"
            ),
            Event::Rejected {
                file,
                message,
                previous_kept,
            } => {
                write!(f, "rejected {file}: {message}")?;
                if *previous_kept {
                    f.write_str(KEPT)?;
                }
                Ok(())
            }
            Event::ApplyError { message } => write!(f, "error applying changes: {message}"),
            Event::Metrics { url } => write!(f, "metrics on {url}"),
            Event::LeftAttached { pin_dir } => {
                write!(
                    f,
                    "exiting, datapath left attached and pinned under {pin_dir}"
                )
            }
            Event::Detached => f.write_str("detached"),
        }
    }
}

impl Event {
    /// The event a stdout line of kproxy reports, or `None` for any other
    /// line (counters, logs, another program's output).
    pub fn parse(line: &str) -> Option<Event> {
        let rest = line.trim_end().strip_prefix(PREFIX)?;
        let (word, args) = rest.split_once(' ').unwrap_or((rest, ""));
        Some(match word {
            "attached" => {
                let (iface, mode) = args.split_once(' ')?;
                Event::Attached {
                    iface: iface.to_string(),
                    mode: mode.strip_prefix("mode=")?.to_string(),
                }
            }
            "released" if !args.is_empty() => Event::Released {
                iface: args.to_string(),
            },
            "ready" => Event::Ready {
                services: field(args, "services")?,
                backends: field(args, "backends")?,
                load_us: field(args, "load_us")?,
                sync_us: field(args, "sync_us")?,
            },
            "applied" => Event::Applied {
                generation: field(args, "generation")?,
                services: field(args, "services")?,
                backends: field(args, "backends")?,
                changes: field(args, "changes")?,
                took_us: field(args, "took_us")?,
            },
            "rejected" => {
                let (message, previous_kept) = match args.strip_suffix(KEPT) {
                    Some(m) => (m, true),
                    None => (args, false),
                };
                let (file, message) = message.split_once(": ")?;
                Event::Rejected {
                    file: file.to_string(),
                    message: message.to_string(),
                    previous_kept,
                }
            }
            "error" => Event::ApplyError {
                message: args.strip_prefix("applying changes: ")?.to_string(),
            },
            "metrics" => Event::Metrics {
                url: args.strip_prefix("on ")?.to_string(),
            },
            "exiting," => Event::LeftAttached {
                pin_dir: args
                    .strip_prefix("datapath left attached and pinned under ")?
                    .to_string(),
            },
            "detached" if args.is_empty() => Event::Detached,
            _ => return None,
        })
    }

    /// Whether the datapath holds a full state after this event: the first
    /// sync (`ready`) or a later one (`applied`).
    pub fn is_sync(&self) -> bool {
        matches!(self, Event::Ready { .. } | Event::Applied { .. })
    }
}

/// The value of `key=N` among space-separated fields.
fn field(args: &str, key: &str) -> Option<u64> {
    args.split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    #[test]
    fn every_event_parses_back() {
        let all = vec![
            Event::Attached {
                iface: "c0".into(),
                mode: "tcx".into(),
            },
            Event::Released {
                iface: "kcv1a2b".into(),
            },
            Event::Ready {
                services: 3,
                backends: 9,
                load_us: 120,
                sync_us: 40,
            },
            Event::Applied {
                generation: 7,
                services: 3,
                backends: 8,
                changes: 2,
                took_us: 310,
            },
            Event::Rejected {
                file: "/m/a.yaml".into(),
                message: "bad: x: y".into(),
                previous_kept: false,
            },
            Event::Rejected {
                file: "/m/a.yaml".into(),
                message: "bad".into(),
                previous_kept: true,
            },
            Event::ApplyError {
                message: "map full".into(),
            },
            Event::Metrics {
                url: "http://127.0.0.1:9/metrics".into(),
            },
            Event::LeftAttached {
                pin_dir: "/sys/fs/bpf/kproxy".into(),
            },
            Event::Detached,
        ];
        for e in all {
            let line = e.to_string();
            assert_eq!(Event::parse(&line).as_ref(), Some(&e), "{line}");
        }
    }

    #[test]
    fn the_documented_wording() {
        assert_eq!(
            Event::Ready {
                services: 1,
                backends: 3,
                load_us: 5,
                sync_us: 6
            }
            .to_string(),
            "kproxy: ready services=1 backends=3 load_us=5 sync_us=6"
        );
        assert_eq!(
            Event::Attached {
                iface: "eth0".into(),
                mode: "netlink".into()
            }
            .to_string(),
            "kproxy: attached eth0 mode=netlink"
        );
    }

    #[test]
    fn other_lines_are_not_events() {
        for line in [
            "",
            "kproxy",
            "kproxy: counters packets=1 bytes=2",
            "kproxy: service default/web 10.96.0.1:80/TCP packets=1",
            "kcontrol: listening on 127.0.0.1:6443",
            "kproxy: ready services=x backends=1 load_us=1 sync_us=1",
            "kproxy: attached c0",
            "kproxy: detached now",
        ] {
            assert_eq!(Event::parse(line), None, "{line}");
        }
    }
}
