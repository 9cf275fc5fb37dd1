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
mod setup;
mod test;
mod up;
mod util;

use std::net::SocketAddr;
use std::process::ExitCode;

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
    /// Demo: kproxy in network namespaces serving a Service with three
    /// backends; runs until Ctrl-C
    Up {
        /// Make the demo connections, then tear down instead of waiting for
        /// Ctrl-C (fails if a connection was not answered)
        #[arg(long)]
        once: bool,
    },
    /// Build, then run `kproxy-bench WHAT ARGS...` (proxy-user's benchmark
    /// binary)
    Bench {
        /// What to benchmark, e.g. `dataplane`
        what: String,
        /// Further arguments for kproxy-bench
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
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
        Cmd::Up { once } => up::run_up(once),
        Cmd::Bench { what, rest } => bench::run_bench(&what, &rest),
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
