//! docs/kproxy.md carries `kproxy --help` verbatim between
//! `<!-- BEGIN GENERATED: kproxy --help -->` and `<!-- END GENERATED -->`.
//! This test fails when the block differs from what the binary prints; with
//! `KPROXY_BLESS_DOCS=1` it rewrites the block instead.
//! control/tests/help_docs.rs does the same for docs/kcontrol.md.

use std::path::Path;
use std::process::Command;

const BLESS_ENV: &str = "KPROXY_BLESS_DOCS";
const END: &str = "<!-- END GENERATED -->";
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

/// Compares each (NAME, text) of `blocks` with the fenced block between
/// `<!-- BEGIN GENERATED: NAME -->` and the next [`END`] in `doc`; with
/// [`BLESS_ENV`] set, writes the differing ones into `doc` instead of
/// failing. Missing markers always fail.
fn check_generated_blocks(doc: &Path, blocks: &[(String, String)], rerun: &str) {
    let bless = std::env::var(BLESS_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
    let mut text =
        std::fs::read_to_string(doc).unwrap_or_else(|e| panic!("reading {}: {e}", doc.display()));
    let mut drifted = Vec::new();
    for (name, output) in blocks {
        let begin = format!("<!-- BEGIN GENERATED: {name} -->\n");
        let start = text.find(&begin).map(|i| i + begin.len());
        let end = start.and_then(|s| text[s..].find(END).map(|n| s + n));
        let (Some(start), Some(end)) = (start, end) else {
            panic!(
                "{}: no generated block `{name}`: add the lines `{}` and `{END}` where it belongs, \
                 then run `{BLESS_ENV}=1 {rerun}` to fill it",
                doc.display(),
                begin.trim_end()
            );
        };
        let want = format!("```text\n{}\n```\n", output.trim_end());
        if text[start..end] != want {
            drifted.push(name.clone());
            text.replace_range(start..end, &want);
        }
    }
    if drifted.is_empty() {
        return;
    }
    if bless {
        std::fs::write(doc, &text).unwrap_or_else(|e| panic!("writing {}: {e}", doc.display()));
        eprintln!("{BLESS_ENV}: rewrote {drifted:?} in {}", doc.display());
        return;
    }
    panic!(
        "{} has drifted from the binary: generated block(s) {drifted:?} differ from its --help. \
         Run `{BLESS_ENV}=1 {rerun}` to rewrite them, then review the diff",
        doc.display()
    );
}
