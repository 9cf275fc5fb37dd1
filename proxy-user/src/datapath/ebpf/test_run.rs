//! BPF_PROG_TEST_RUN: the programs run on a packet in memory, for tests
//! and the per-packet benchmark.

use anyhow::{Context, Result};

use super::Dataplane;

/// Result of one BPF_PROG_TEST_RUN.
#[derive(Debug, Clone)]
pub struct TestRunOutput {
    /// The program's return value as the kernel reports it (so `-1` is
    /// `TC_ACT_UNSPEC`).
    pub verdict: i32,
    /// The packet after the program ran.
    pub packet: Vec<u8>,
    /// Average time per run, as measured by the kernel.
    pub duration: std::time::Duration,
}

impl Dataplane {
    /// Runs `prog` on `packet` `repeat` times through BPF_PROG_TEST_RUN.
    /// The kernel reuses one skb across repeats, so a packet the program
    /// rewrites is seen rewritten from the second run on.
    /// Works for the TC programs and for `kproxy_xdp` (whose verdicts are
    /// XDP actions: 1 drop, 2 pass, 3 tx, 4 redirect).
    pub fn test_run(&self, prog: &str, packet: &[u8], repeat: u32) -> Result<TestRunOutput> {
        use aya::programs::{Program, TestRun, TestRunOptions};
        // Room for a reject, which may grow the packet into an ICMP error.
        let mut out = vec![0u8; packet.len().max(128) + 128];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        let program = self
            .bpf
            .program(prog)
            .with_context(|| format!("program {prog} missing"))?;
        let r = match program {
            Program::SchedClassifier(p) => p.test_run(opts),
            Program::Xdp(p) => p.test_run(opts),
            _ => anyhow::bail!("{prog}: not a TC or XDP program"),
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN of {prog}"))?;
        out.truncate(r.data_size_out as usize);
        Ok(TestRunOutput {
            verdict: r.return_value as i32,
            packet: out,
            duration: r.duration,
        })
    }
}
