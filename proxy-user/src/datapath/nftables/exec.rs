//! Running `nft`: its version, and transactions fed on its standard input
//! (`nft -f -`), either applied or only checked (`nft -c`).

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::super::netfilter::run;

/// `nft --version`'s line, or an error saying what to install.
pub(super) fn version() -> Result<String> {
    let out = run(Command::new("nft").arg("--version"))
        .context("nft not found: install the nftables package (cargo xtask setup does)")?;
    if !out.status.success() {
        bail!(
            "nft --version failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Feeds `input` to `nft -f -`: one transaction, all or nothing. With
/// `check`, nft only parses and validates it against the kernel (`-c`).
pub(super) fn nft(input: &str, check: bool) -> Result<()> {
    let mut cmd = Command::new("nft");
    if check {
        cmd.arg("-c");
    }
    let mut child = cmd
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft -f failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
