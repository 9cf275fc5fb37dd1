//! docs/kproxy.md carries `kproxy --help` and the `--help` of every
//! subcommand (`kproxy inspect --help`) verbatim, each between
//! `<!-- BEGIN GENERATED: NAME -->` and `<!-- END GENERATED -->`. This test
//! fails when a block differs from what the binary prints (or a subcommand
//! has no block); with `KPROXY_BLESS_DOCS=1` it rewrites the blocks instead.
//! control/tests/help_docs.rs does the same for docs/kcontrol.md.

#[path = "support/generated_docs.rs"]
mod generated_docs;

use std::path::Path;
use std::process::Command;

use generated_docs::check_generated_blocks;

const RERUN: &str = "cargo test --release -p proxy-user --test help_docs";

#[test]
fn docs_kproxy_md_matches_help() {
    let top = help(&[]);
    let mut blocks = vec![("kproxy --help".to_owned(), top.clone())];
    for sub in subcommands(&top) {
        blocks.push((format!("kproxy {sub} --help"), help(&[sub.as_str()])));
    }
    assert!(
        blocks
            .iter()
            .any(|(name, _)| name == "kproxy inspect --help"),
        "no `inspect` in the Commands of `kproxy --help`:\n{top}"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let doc = root.join("docs/kproxy.md");
    check_generated_blocks(&doc, &blocks, RERUN);
}

/// `kproxy ARGS --help`, as a user's terminal would show it (no colours).
fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args(args)
        .arg("--help")
        .env("NO_COLOR", "1")
        .env_remove("CLICOLOR_FORCE")
        // `--node-name` reads NODE_NAME, and clap shows its value.
        .env_remove("NODE_NAME")
        .output()
        .expect("running kproxy --help");
    assert!(out.status.success(), "kproxy {args:?} --help: {out:?}");
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// The names in the `Commands:` section of the top-level help, but `help`.
fn subcommands(top: &str) -> Vec<String> {
    top.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}
