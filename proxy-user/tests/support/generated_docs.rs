//! Generated blocks in docs/: `<!-- BEGIN GENERATED: NAME -->`, a fenced
//! block, `<!-- END GENERATED -->`. Shared by proxy-user/tests/help_docs.rs
//! and control/tests/help_docs.rs (included with `#[path]`).

use std::path::Path;

const BLESS_ENV: &str = "KPROXY_BLESS_DOCS";
const END: &str = "<!-- END GENERATED -->";

/// Compares each (NAME, text) of `blocks` with the fenced block between
/// `<!-- BEGIN GENERATED: NAME -->` and the next [`END`] in `doc`; with
/// [`BLESS_ENV`] set, writes the differing ones into `doc` instead of
/// failing. Missing markers always fail.
pub fn check_generated_blocks(doc: &Path, blocks: &[(String, String)], rerun: &str) {
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
