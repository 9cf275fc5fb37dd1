//! docs/kproxy.md carries `kproxy --help` verbatim between
//! `<!-- BEGIN GENERATED: kproxy --help -->` and `<!-- END GENERATED -->`.
//! This test fails when the block differs from what the binary prints; with
//! `KPROXY_BLESS_DOCS=1` it rewrites the block instead.
//! control/tests/help_docs.rs does the same for docs/kcontrol.md.

#[path = "support/generated_docs.rs"]
mod generated_docs;

use std::path::Path;
use std::process::Command;

use generated_docs::check_generated_blocks;

const RERUN: &str = "cargo test --release -p proxy-user --test help_docs";

#[test]
fn docs_kproxy_md_matches_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .arg("--help")
        .env("NO_COLOR", "1")
        .env_remove("CLICOLOR_FORCE")
        // `--node-name` reads NODE_NAME, and clap shows its value.
        .env_remove("NODE_NAME")
        .output()
        .expect("running kproxy --help");
    assert!(out.status.success(), "kproxy --help: {out:?}");
    let help = String::from_utf8(out.stdout).expect("help is UTF-8");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let doc = root.join("docs/kproxy.md");
    check_generated_blocks(&doc, &[("kproxy --help".to_owned(), help)], RERUN);
}
