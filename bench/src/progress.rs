//! Progress bars (indicatif) on stdout: one bar for the whole run, one for
//! the current phase of the current (scale, mode). When stdout is not a
//! terminal, each phase is announced with a plain line instead.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    overall: ProgressBar,
    phase: ProgressBar,
    plain: bool,
}

impl Progress {
    pub fn new(steps: u64) -> Progress {
        let plain = !std::io::stdout().is_terminal();
        let target = if plain {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stdout_with_hz(8)
        };
        let mp = MultiProgress::with_draw_target(target);
        let overall = mp.add(ProgressBar::new(steps));
        overall.set_style(
            ProgressStyle::with_template(
                "{prefix:>12.bold} [{bar:32.cyan/blue}] {pos}/{len} {msg}  ({elapsed_precise})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        overall.set_prefix("run");
        let phase = mp.add(ProgressBar::new(1));
        phase.set_style(
            ProgressStyle::with_template("{prefix:>12.bold} [{bar:32.green/white}] {pos}/{len} {msg}  ({elapsed}, eta {eta})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        phase.set_prefix("phase");
        overall.enable_steady_tick(Duration::from_millis(250));
        Progress {
            overall,
            phase,
            plain,
        }
    }

    /// A new (scale, mode) step: `label` such as "10,000 services · iptables".
    pub fn step(&self, label: &str) {
        self.overall.set_message(label.to_owned());
        if self.plain {
            println!("== {label}");
        }
    }

    /// The current step is done.
    pub fn step_done(&self) {
        self.overall.inc(1);
    }

    /// Starts a phase of `len` units named `name` (e.g. "first-packet latency").
    pub fn phase(&self, name: &str, len: u64) {
        self.phase.set_message(name.to_owned());
        self.phase.reset();
        self.phase.set_length(len.max(1));
        self.phase.set_position(0);
        if self.plain {
            println!("   {} — {name} ({len})", self.overall.message());
        }
    }

    /// Handle of the phase bar, to advance it from a measuring thread.
    pub fn bar(&self) -> ProgressBar {
        self.phase.clone()
    }

    /// A line above the bars (or a plain line).
    pub fn println(&self, line: &str) {
        if self.plain {
            println!("{line}");
        } else {
            self.overall.println(line);
        }
    }

    pub fn finish(&self) {
        self.phase.finish_and_clear();
        self.overall.finish();
    }
}
