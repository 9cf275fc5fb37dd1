//! Developer tasks for kproxy, run as `cargo xtask <command>` (an alias in
//! .cargo/config.toml). See `cargo xtask --help`.

/// `println!` that ignores a closed stdout. Progress output must never abort
/// the program: when `cargo xtask up | tee log` gets Ctrl-C, tee dies first,
/// and a panicking println! would skip the namespace cleanup.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod bench;
mod build;
mod cluster_bench;
mod setup;
mod smoke;
mod test;
mod testcount;
mod up;
mod util;
mod vmtest;
mod watch_bench;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for kproxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install or check everything kproxy needs: nightly + rust-src,
    /// bpf-linker, system packages, bpffs (idempotent; build/test/up/bench
    /// run it first)
    Setup,
    /// Build the eBPF object (nightly) and the kproxy agent that embeds it
    Build {
        /// Build the agent without --release (the eBPF object is always
        /// built with --release)
        #[arg(long)]
        debug: bool,
    },
    /// Everything CI checks: setup, build, fmt, clippy (both workspaces),
    /// cargo test
    Test {
        /// Arguments for `cargo test`, e.g. a test-name filter; after a
        /// second `--`, arguments for the test binaries, e.g.
        /// `cargo xtask test -- dataplane -- --nocapture`
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// A single-node cluster on this host (`kcontrol all` + kproxy) with a
    /// demo Deployment and Service, requested from a client pod; runs until
    /// Ctrl-C, then stops everything and checks nothing is left
    Up {
        /// Make the demo requests, then tear down instead of waiting for
        /// Ctrl-C (fails if a request was not answered)
        #[arg(long)]
        once: bool,
        /// The older demo instead: kproxy alone in network namespaces, fed
        /// from manifest files, serving three backends
        #[arg(long)]
        manifests_demo: bool,
    },
    /// Build, then benchmark: `cargo xtask bench [compare] [--quick]` runs
    /// eBPF mode against iptables mode side by side (kproxy-compare, report
    /// and plots in bench/results/); `cargo xtask bench dataplane [ARGS...]`
    /// runs proxy-user's BPF_PROG_TEST_RUN benchmark (kproxy-bench);
    /// `cargo xtask bench apiserver [--quick] [--store sqlite]` measures
    /// `kcontrol apiserver` (kcontrol-bench); `cargo xtask bench cluster
    /// [--pods N]` measures pod create → Running/Ready/endpoint programmed
    /// on a single-node cluster; `cargo xtask bench watch [--secs N]` runs
    /// kcontrol's watch stress test for N seconds per store. Each takes
    /// `--smoke` (smallest scale, report under target/bench-smoke/; `cargo
    /// xtask test` runs them all)
    Bench {
        /// `compare` (default), `dataplane` or `apiserver`, then their arguments, e.g.
        /// `--quick`
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the dataplane tests (kproxy-tests) inside qemu on Debian
    /// kernels: by default the newest 6.1 and 6.12 cloud kernels from apt
    VmTest {
        /// Kernel to boot, repeatable: a line (`6.1`, newest cloud kernel of
        /// it), a Debian package (`linux-image-6.1.0-57-cloud-amd64-unsigned`)
        /// or `path/to/vmlinuz:path/to/modules-dir`
        #[arg(long = "kernel", value_name = "SPEC")]
        kernels: Vec<String>,
        /// Only the test files whose behaviour depends on the kernel
        /// (a few minutes; for CI)
        #[arg(long)]
        quick: bool,
        /// Build the eBPF program with the `broken-for-tests` feature (drops
        /// all service traffic): the run must fail
        #[arg(long)]
        break_program: bool,
        /// Put the host target's builds (glibc, dynamically linked, with
        /// their shared libraries) into the guest instead of static musl
        /// builds: no second build of the workspace
        #[arg(long)]
        dynamic: bool,
        /// Per-kernel limit in seconds for boot, tests and poweroff
        /// (default 600, 300 with --quick)
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Internal (used by `up`): TCP server answering every connection with
    /// REPLY, optionally inside network namespace NS
    #[command(name = "__serve", hide = true)]
    Serve {
        #[arg(long)]
        ns: Option<String>,
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        reply: String,
    },
}

fn main() -> ExitCode {
    util::ensure_cargo_bin_on_path();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::run_setup(),
        Cmd::Build { debug } => {
            setup::run_setup().and_then(|()| build::build_all(!debug).map(drop))
        }
        Cmd::Test { args } => test::run_test(&args),
        Cmd::Up {
            once,
            manifests_demo,
        } => {
            if manifests_demo {
                up::run_manifests_demo(once)
            } else {
                up::run_up(once)
            }
        }
        Cmd::Bench { args } => bench::run_bench(&args),
        Cmd::VmTest {
            kernels,
            quick,
            break_program,
            dynamic,
            timeout,
        } => vmtest::run_vm_test(&vmtest::Options {
            kernels,
            quick,
            break_program,
            dynamic,
            timeout: timeout.map(Duration::from_secs),
        }),
        Cmd::Serve { ns, addr, reply } => up::serve(ns.as_deref(), addr, &reply),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
