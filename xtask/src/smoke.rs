//! Smoke paths: every workflow that `cargo xtask test` does not run anyway,
//! at its smallest scale (`--smoke`: seconds to a minute each), so that a
//! workflow that cannot start, or whose report comes out wrong, fails CI
//! instead of the first person who tries it.
//!
//! [`run_smokes`] runs each one as its own `cargo xtask …` process (the way
//! a user types it; each installs its own Ctrl-C handler and cleans up on
//! its own), reusing the test command's builds: [`REUSE_BUILDS_ENV`] and
//! the build outputs in the environment make [`builds`] skip setup and the
//! eBPF/agent build in the child.
//!
//! Smoke reports go to target/bench-smoke/NAME/ (emptied first), never to
//! bench/results/, and [`check_report`] then checks that the report is
//! there, links its plots, and that every file it links to exists. The unit
//! test at the bottom applies the same link check to every committed
//! document.

use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::build::{self, BPF_OBJ_ENV, BuildOutputs, KCONTROL_BIN_ENV, KPROXY_BIN_ENV};
use crate::setup;
use crate::util::{self, Toolchain, run};

/// Set (to `1`) by [`run_smokes`] for its `cargo xtask` children: reuse the
/// builds named by [`BPF_OBJ_ENV`], [`KPROXY_BIN_ENV`] and
/// [`KCONTROL_BIN_ENV`] instead of running setup and the build again.
pub const REUSE_BUILDS_ENV: &str = "XTASK_REUSE_BUILDS";

/// The workflows [`run_smokes`] runs, in order: (name, `cargo xtask` args).
/// `up --once` and `vm-test` are not here: `cargo xtask test` runs them
/// itself.
pub const SMOKES: &[(&str, &[&str])] = &[
    ("bench compare", &["bench", "compare", "--smoke"]),
    ("bench dataplane", &["bench", "dataplane", "--smoke"]),
    ("bench nodeport", &["bench", "nodeport", "--smoke"]),
    (
        "bench apiserver",
        &["bench", "apiserver", "--smoke", "--store", "sqlite,etcd"],
    ),
    ("bench cluster", &["bench", "cluster", "--smoke"]),
    ("bench watch", &["bench", "watch", "--smoke"]),
    ("up --manifests-demo", &["up", "--manifests-demo", "--once"]),
];

/// Where the smoke run of benchmark `name` writes its report.
pub fn out_dir(name: &str) -> PathBuf {
    util::target_dir().join("bench-smoke").join(name)
}

/// Empties (or creates) `dir`, so that only files the run about to start
/// writes can pass [`check_report`].
pub fn fresh_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("emptying {}", dir.display())),
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// The builds handed down by [`run_smokes`], if this process is one of its
/// children; fails when it is but a build is missing.
pub fn reused_builds() -> Result<Option<BuildOutputs>> {
    if std::env::var_os(REUSE_BUILDS_ENV).is_none() {
        return Ok(None);
    }
    let get = |var: &str| -> Result<PathBuf> {
        let p = std::env::var_os(var)
            .map(PathBuf::from)
            .with_context(|| format!("{REUSE_BUILDS_ENV} is set but {var} is not"))?;
        if !p.is_file() {
            bail!("{var}={} does not exist", p.display());
        }
        Ok(p)
    };
    let outputs = BuildOutputs {
        bpf_obj: get(BPF_OBJ_ENV)?,
        kproxy: get(KPROXY_BIN_ENV)?,
        kcontrol: get(KCONTROL_BIN_ENV)?,
    };
    say!(
        "==> reusing the builds of `cargo xtask test`: {}, {}",
        outputs.kproxy.display(),
        outputs.kcontrol.display()
    );
    Ok(Some(outputs))
}

/// Setup and the release build, or the builds [`run_smokes`] handed down.
pub fn builds() -> Result<BuildOutputs> {
    if let Some(outputs) = reused_builds()? {
        return Ok(outputs);
    }
    setup::run_setup()?;
    build::build_all(true)
}

/// Runs every workflow of [`SMOKES`] at its smoke scale, in order, each as
/// `cargo xtask ARGS` with `outputs` reused, and prints how long each took
/// (first the build of the benchmark binaries they share). All of them run
/// even when one fails; the error names every one that failed.
pub fn run_smokes(outputs: &BuildOutputs) -> Result<()> {
    let xtask = std::env::current_exe().context("locating the running xtask binary")?;
    let mut timings: Vec<(String, Duration)> = Vec::new();

    // kproxy-compare, kcontrol-bench and kcluster-report in one build (the
    // same features as each `cargo run --bin`, so the runs below find them
    // fresh); the workflows' timings then measure the workflows.
    say!("==> smoke: building the benchmark binaries");
    let t = Instant::now();
    run(util::cargo(Toolchain::Active)
        .current_dir(util::workspace_root())
        .env(BPF_OBJ_ENV, &outputs.bpf_obj)
        .args([
            "build",
            "--release",
            "-p",
            "kproxy-compare",
            "--bins",
            "--target-dir",
        ])
        .arg(util::target_dir()))
    .context("smoke: building the benchmark binaries (kproxy-compare package)")?;
    timings.push(("build bench binaries".to_owned(), t.elapsed()));

    let mut failed = Vec::new();
    for (name, args) in SMOKES {
        say!("==> smoke: {name}");
        let mut cmd = Command::new(&xtask);
        cmd.args(*args)
            .current_dir(util::workspace_root())
            .env(REUSE_BUILDS_ENV, "1")
            .env(BPF_OBJ_ENV, &outputs.bpf_obj)
            .env(KPROXY_BIN_ENV, &outputs.kproxy)
            .env(KCONTROL_BIN_ENV, &outputs.kcontrol);
        let t = Instant::now();
        let result = run(&mut cmd);
        let took = t.elapsed();
        timings.push(((*name).to_owned(), took));
        match result {
            Ok(()) => say!("==> smoke: {name}: ok ({})", util::secs(took)),
            Err(e) => {
                say!("==> smoke: {name}: FAILED ({})", util::secs(took));
                failed.push(format!("`cargo xtask {}` ({name}): {e:#}", args.join(" ")));
            }
        }
    }
    say!("==> smoke timings:");
    for (name, took) in &timings {
        say!("    {name:<22} {}", util::secs(*took));
    }
    if !failed.is_empty() {
        bail!(
            "{} smoke run(s) failed: {}",
            failed.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

/// Checks the report a smoke run wrote: it exists and is not empty, it
/// links at least `min_plots` plots (SVG or PNG), and every file it links
/// to exists inside the report's own directory (plots and data travel with
/// the report); an SVG must hold an `<svg` element.
pub fn check_report(md: &Path, min_plots: usize) -> Result<()> {
    let text = std::fs::read_to_string(md)
        .with_context(|| format!("smoke: the report {} was not written", md.display()))?;
    if text.trim().is_empty() {
        bail!("smoke: the report {} is empty", md.display());
    }
    let dir = md.parent().context("report without a directory")?;
    let links = relative_links(&text);
    let plots = links
        .iter()
        .filter(|l| l.ends_with(".svg") || l.ends_with(".png"))
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    if plots < min_plots {
        bail!(
            "smoke: {} links {plots} plot(s), expected at least {min_plots}",
            md.display()
        );
    }
    let mut problems = Vec::new();
    for link in &links {
        let path = resolve(dir, link, dir);
        if !inside(&path, dir) {
            problems.push(format!("{link}: outside {}", dir.display()));
        } else if !path.is_file() {
            problems.push(format!("{link}: no such file"));
        } else if link.ends_with(".svg") {
            let svg = std::fs::read_to_string(&path).unwrap_or_default();
            if !svg.contains("<svg") {
                problems.push(format!("{link}: not an SVG image"));
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "smoke: broken links in {}: {}",
            md.display(),
            problems.join("; ")
        );
    }
    say!(
        "==> smoke: {} written; its {} link(s) ({plots} plot(s)) resolve",
        md.display(),
        links.len()
    );
    Ok(())
}

/// `link` (relative to the directory `dir` of the document; a leading `/`
/// means the repository root `root`, as on GitHub) as a path.
fn resolve(dir: &Path, link: &str, root: &Path) -> PathBuf {
    match link.strip_prefix('/') {
        Some(rest) => root.join(rest),
        None => dir.join(link),
    }
}

/// Whether `path`, with `.` and `..` resolved lexically, lies in `dir`.
fn inside(path: &Path, dir: &Path) -> bool {
    fn normal(p: &Path) -> PathBuf {
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                Component::ParentDir => {
                    out.pop();
                }
                Component::CurDir => {}
                other => out.push(other),
            }
        }
        out
    }
    normal(path).starts_with(normal(dir))
}

/// The local link targets of a Markdown document, as a CommonMark renderer
/// (GitHub's) sees them: inline links and images, reference definitions,
/// and `src=`/`href=` of HTML tags; not inside code. `#fragment` and `?query`
/// removed, `%XX` decoded. URLs with a scheme (`https:`, `mailto:`) and links
/// to an anchor of the same document are not included.
pub fn relative_links(md: &str) -> Vec<String> {
    use pulldown_cmark::{Event, Parser, Tag};
    let parser = Parser::new(md);
    let definitions: Vec<String> = parser
        .reference_definitions()
        .iter()
        .map(|(_, d)| d.dest.to_string())
        .collect();
    let mut raw = Vec::new();
    for event in parser {
        match event {
            Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => {
                raw.push(dest_url.to_string())
            }
            Event::Html(html) | Event::InlineHtml(html) => raw.extend(html_links(&html)),
            _ => {}
        }
    }
    // A definition some link uses came in with that link already.
    for d in definitions {
        if !raw.contains(&d) {
            raw.push(d);
        }
    }
    raw.into_iter()
        .filter_map(|t| {
            let t = t.split(['#', '?']).next().unwrap_or("").trim();
            let scheme = t.split_once(':').is_some_and(|(s, _)| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            });
            (!t.is_empty() && !scheme).then(|| {
                percent_encoding::percent_decode_str(t)
                    .decode_utf8_lossy()
                    .into_owned()
            })
        })
        .collect()
}

/// The quoted `src=` and `href=` values of the HTML tags in `html`.
fn html_links(html: &str) -> Vec<String> {
    let lower = html.to_ascii_lowercase();
    let mut found = Vec::new();
    for attr in ["src=", "href="] {
        let mut from = 0;
        while let Some(i) = lower[from..].find(attr) {
            let start = from + i + attr.len();
            from = start;
            let preceded = lower[..start - attr.len()]
                .chars()
                .next_back()
                .is_some_and(char::is_whitespace);
            let Some(quote) = html[start..]
                .chars()
                .next()
                .filter(|c| *c == '"' || *c == '\'')
            else {
                continue;
            };
            if !preceded || !lower[..start].contains('<') {
                continue;
            }
            let value = &html[start + 1..];
            if let Some(end) = value.find(quote) {
                found.push(value[..end].to_owned());
            }
        }
    }
    found
}

/// The committed documents whose links must resolve: README.md,
/// ARCHITECTURE.md, CHANGELOG.md, docs/**/*.md and bench/results/*.md
/// (the ones that exist).
#[cfg(test)]
fn committed_documents(root: &Path) -> Result<Vec<PathBuf>> {
    let mut docs: Vec<PathBuf> = ["README.md", "ARCHITECTURE.md", "CHANGELOG.md"]
        .iter()
        .map(|f| root.join(f))
        .filter(|p| p.is_file())
        .collect();
    util::files_with_extension(&root.join("docs"), "md", true, &mut docs)?;
    util::files_with_extension(&root.join("bench/results"), "md", false, &mut docs)?;
    docs.sort();
    Ok(docs)
}

/// `document: target` for every local link of the documents under `root`
/// whose target does not exist.
#[cfg(test)]
fn broken_links(root: &Path) -> Result<Vec<String>> {
    let mut broken = Vec::new();
    for doc in committed_documents(root)? {
        let text =
            std::fs::read_to_string(&doc).with_context(|| format!("reading {}", doc.display()))?;
        let dir = doc.parent().unwrap_or(root);
        for link in relative_links(&text) {
            if !resolve(dir, &link, root).exists() {
                let shown = doc.strip_prefix(root).unwrap_or(&doc);
                broken.push(format!("{}: {link}", shown.display()));
            }
        }
    }
    Ok(broken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_a_committed_document_links_to_exists() {
        let root = util::workspace_root();
        let docs = committed_documents(&root).unwrap();
        // The scan really covers the reports: a wrong path here would make
        // this test pass on nothing.
        for must in ["README.md", "bench/results/latest.md"] {
            assert!(
                docs.contains(&root.join(must)),
                "{must} not scanned: {docs:?}"
            );
        }
        let broken = broken_links(&root).unwrap();
        assert!(
            broken.is_empty(),
            "links to files that do not exist (commit the file or fix the link):\n  {}",
            broken.join("\n  ")
        );
    }

    #[test]
    fn finds_links_images_references_and_html() {
        let md = "\
# Title [not a link]
See [the report](results/latest.md#headline) and ![a plot](plot.svg \"title\").
A [link whose
text wraps](wrapped.md), an [anchor](#headline), [web](https://example.com/x.svg),
[mail](mailto:a@b.c), <img src=\"img/p.png\" width=\"300\"> and <a href='x y.md'>.

[ref]: refs/target.md \"Title\"
Code: `[no](code-span.md)` and ``a `[no](double.md)` b``.
```markdown
[no](fenced.md)
```
[angle](<with space.md>) [paren](file_(1).md) [pct](a%20b.md?raw=1)
";
        assert_eq!(
            relative_links(md),
            [
                "results/latest.md",
                "plot.svg",
                "wrapped.md",
                "img/p.png",
                "x y.md",
                "with space.md",
                "file_(1).md",
                "a b.md",
                "refs/target.md",
            ]
        );
    }

    #[test]
    fn the_report_check_needs_the_report_its_plots_and_every_link() {
        let dir = std::env::temp_dir().join(format!("xtask-smoke-test-{}", std::process::id()));
        fresh_dir(&dir).unwrap();
        let md = dir.join("latest.md");
        // No report at all.
        assert!(check_report(&md, 1).is_err());
        std::fs::write(&md, "# r\n![plot](r-plot.svg)\n[raw](r.json)\n").unwrap();
        // Plot and JSON missing.
        let err = check_report(&md, 1).unwrap_err().to_string();
        assert!(err.contains("r-plot.svg: no such file"), "{err}");
        assert!(err.contains("r.json: no such file"), "{err}");
        std::fs::write(dir.join("r-plot.svg"), "not svg").unwrap();
        std::fs::write(dir.join("r.json"), "{}").unwrap();
        let err = check_report(&md, 1).unwrap_err().to_string();
        assert!(err.contains("not an SVG"), "{err}");
        std::fs::write(
            dir.join("r-plot.svg"),
            "<svg xmlns=\"http://www.w3.org/2000/svg\"/>",
        )
        .unwrap();
        check_report(&md, 1).unwrap();
        // Fewer plots than the workflow writes.
        assert!(check_report(&md, 2).is_err());
        // A link out of the report's directory (to a committed report, say)
        // does not count even if the file exists.
        std::fs::write(&md, "![plot](r-plot.svg)\n[other](../../README.md)\n").unwrap();
        let err = check_report(&md, 1).unwrap_err().to_string();
        assert!(err.contains("outside"), "{err}");
        // fresh_dir empties: the files of an earlier run cannot pass.
        fresh_dir(&dir).unwrap();
        assert!(!dir.join("r-plot.svg").exists() && dir.is_dir());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn broken_links_are_reported_per_document() {
        let root = std::env::temp_dir().join(format!("xtask-links-test-{}", std::process::id()));
        fresh_dir(&root).unwrap();
        std::fs::create_dir_all(root.join("bench/results")).unwrap();
        std::fs::create_dir_all(root.join("docs/deep")).unwrap();
        std::fs::write(
            root.join("README.md"),
            "[ok](bench/results/r.md) [abs](/docs/deep/d.md) [gone](missing.md)\n",
        )
        .unwrap();
        std::fs::write(
            root.join("bench/results/r.md"),
            "![p](r.svg) [back](../../README.md)\n",
        )
        .unwrap();
        std::fs::write(root.join("docs/deep/d.md"), "[x](nope.svg)\n").unwrap();
        let broken = broken_links(&root).unwrap();
        assert_eq!(
            broken,
            [
                "README.md: missing.md",
                "bench/results/r.md: r.svg",
                "docs/deep/d.md: nope.svg",
            ]
        );
        std::fs::write(root.join("bench/results/r.svg"), "<svg/>").unwrap();
        std::fs::write(root.join("docs/deep/nope.svg"), "<svg/>").unwrap();
        std::fs::write(root.join("missing.md"), "").unwrap();
        assert!(broken_links(&root).unwrap().is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn smokes_cover_every_benchmark_and_the_manifests_demo_but_not_what_test_runs() {
        let names: Vec<&str> = SMOKES.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "bench compare",
                "bench dataplane",
                "bench nodeport",
                "bench apiserver",
                "bench cluster",
                "bench watch",
                "up --manifests-demo"
            ]
        );
        for (name, args) in SMOKES {
            if args[0] == "bench" {
                assert!(args.contains(&"--smoke"), "{name}: {args:?}");
                // The benchmark parser accepts it (a typo would only show
                // in CI's smoke step).
                crate::bench::split(&args[1..].iter().map(|a| a.to_string()).collect::<Vec<_>>())
                    .unwrap();
            }
            assert!(!args.contains(&"vm-test"), "{name}");
        }
        assert!(
            SMOKES
                .iter()
                .find(|(n, _)| *n == "bench apiserver")
                .is_some_and(|(_, a)| a.ends_with(&["--store", "sqlite,etcd"])),
            "apiserver smoke must cover both stores"
        );
        assert!(out_dir("compare").starts_with(util::target_dir()));
    }
}
