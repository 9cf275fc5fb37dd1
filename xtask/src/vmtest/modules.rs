//! The kernel modules the tests need, in load order: dependencies first,
//! read from each module's own `depends=`/`softdep=` (the .deb has no
//! modules.dep).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::kernels::Kernel;
use crate::util::output;

/// Modules without which no dataplane test can run: veths between the
/// namespaces, clsact (in sch_ingress) and cls_bpf for netlink attach.
const REQUIRED_MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf"];
/// Modules a Kubernetes node has loaded and kproxy's iptables mode uses
/// (conntrack, NAT, the statistic match, nf_tables for iptables-nft,
/// ctnetlink for `conntrack -D`). Loaded when the kernel has them.
const NODE_MODULES: &[&str] = &[
    "nf_conntrack",
    "nf_nat",
    "nf_conntrack_netlink",
    "x_tables",
    "ip_tables",
    "iptable_nat",
    "iptable_filter",
    "xt_statistic",
    "xt_conntrack",
    "xt_comment",
    "xt_mark",
    "xt_nat",
    "xt_addrtype",
    "xt_MASQUERADE",
    "xt_tcpudp",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_ct",
];

/// A module to load, in order.
pub(super) struct Module {
    pub(super) name: String,
    pub(super) path: PathBuf,
}

/// Modules of `kernel` to load, every dependency before its users. Required
/// modules must exist (as a module file or built in); node modules are
/// skipped, with their users, when the kernel lacks them.
pub(super) fn module_plan(kernel: &Kernel) -> Result<(Vec<Module>, Vec<String>)> {
    let mut index: HashMap<String, PathBuf> = HashMap::new();
    index_modules(&kernel.modules, &mut index)?;
    let builtin: BTreeSet<String> = fs::read_to_string(kernel.modules.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .map(|f| module_name(f).unwrap_or(f).replace('-', "_"))
        .collect();

    let mut plan = Planner {
        index,
        builtin,
        done: BTreeSet::new(),
        visiting: BTreeSet::new(),
        order: Vec::new(),
        skipped: Vec::new(),
    };
    for name in REQUIRED_MODULES {
        if !plan.visit(name)? {
            bail!(
                "kernel {}: module {name} is neither in {} nor built in (modules.builtin)",
                kernel.release,
                kernel.modules.display()
            );
        }
    }
    for name in NODE_MODULES {
        if !plan.visit(name)? {
            plan.skipped.push(name.to_string());
        }
    }
    Ok((plan.order, plan.skipped))
}

struct Planner {
    index: HashMap<String, PathBuf>,
    builtin: BTreeSet<String>,
    done: BTreeSet<String>,
    visiting: BTreeSet<String>,
    order: Vec<Module>,
    skipped: Vec<String>,
}

impl Planner {
    /// Plans `name` after its dependencies. False when it cannot be loaded.
    fn visit(&mut self, name: &str) -> Result<bool> {
        let name = name.replace('-', "_");
        if self.done.contains(&name) || self.builtin.contains(&name) {
            return Ok(true);
        }
        if !self.visiting.insert(name.clone()) {
            bail!("module dependency cycle through {name}");
        }
        let Some(path) = self.index.get(&name).cloned() else {
            self.visiting.remove(&name);
            return Ok(false);
        };
        let (depends, pre, post) = module_deps(&path)?;
        // softdep pre: modules are wanted, not needed (e.g. crc32c's
        // implementation for libcrc32c): load them when they exist.
        for soft in &pre {
            self.visit(soft)?;
        }
        for dep in &depends {
            if !self.visit(dep)? {
                self.visiting.remove(&name);
                return Ok(false);
            }
        }
        self.visiting.remove(&name);
        self.done.insert(name.clone());
        self.order.push(Module { name, path });
        for soft in &post {
            self.visit(soft)?;
        }
        Ok(true)
    }
}

/// `depends` and the `pre:`/`post:` parts of `softdep`, from modinfo.
fn module_deps(path: &Path) -> Result<(Vec<String>, Vec<String>, Vec<String>)> {
    let field = |f: &str| -> Result<String> {
        output(Command::new("modinfo").args(["-F", f]).arg(path))
            .with_context(|| format!("modinfo -F {f} {} (Debian package kmod)", path.display()))
    };
    let depends: Vec<String> = field("depends")?
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect();
    let (pre, post) = parse_softdep(&field("softdep")?);
    Ok((depends, pre, post))
}

/// `pre: a b post: c` (one softdep per line) → ([a, b], [c]).
pub(super) fn parse_softdep(text: &str) -> (Vec<String>, Vec<String>) {
    let (mut pre, mut post) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let mut into_pre = true;
        for word in line.split_whitespace() {
            match word {
                "pre:" => into_pre = true,
                "post:" => into_pre = false,
                w if into_pre => pre.push(w.to_string()),
                w => post.push(w.to_string()),
            }
        }
    }
    (pre, post)
}

/// `veth.ko.xz` → `veth`.
pub(super) fn module_name(file: &str) -> Option<&str> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
}

fn index_modules(dir: &Path, index: &mut HashMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(name) = module_name(&entry.file_name().to_string_lossy()) {
            index.insert(name.replace('-', "_"), path);
        }
    }
    Ok(())
}

/// The module as an uncompressed .ko: the guest loads it with finit_module
/// without asking the kernel to decompress (6.1 cannot).
pub(super) fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {tool} -dc {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}
