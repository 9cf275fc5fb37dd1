//! docs/kcontrol.md carries `kcontrol --help` and the `--help` of every
//! subcommand verbatim, each between `<!-- BEGIN GENERATED: NAME -->` and
//! `<!-- END GENERATED -->`. This test fails when a block differs from what
//! the binary prints (or a subcommand has no block); with
//! `KPROXY_BLESS_DOCS=1` it rewrites the blocks instead.
//! proxy-user/tests/help_docs.rs does the same for docs/kproxy.md.

use std::path::Path;
use std::process::Command;

const BLESS_ENV: &str = "KPROXY_BLESS_DOCS";
const END: &str = "<!-- END GENERATED -->";
const RERUN: &str = "cargo test --release -p kcontrol --test help_docs";

#[test]
fn docs_kcontrol_md_matches_help() {
    let top = help(&[]);
    let mut blocks = vec![("kcontrol --help".to_owned(), top.clone())];
    for sub in subcommands(&top) {
        blocks.push((format!("kcontrol {sub} --help"), help(&[sub.as_str()])));
    }
    assert!(
        blocks.len() > 1,
        "no subcommands in `kcontrol --help`:\n{top}"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let doc = root.join("docs/kcontrol.md");
    check_generated_blocks(&doc, &blocks, RERUN);
}

/// `kcontrol ARGS --help`, as a user's terminal would show it (no colours).
fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kcontrol"))
        .args(args)
        .arg("--help")
        .env("NO_COLOR", "1")
        .env_remove("CLICOLOR_FORCE")
        .output()
        .expect("running kcontrol --help");
    assert!(out.status.success(), "kcontrol {args:?} --help: {out:?}");
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
