//! Running `nft`: its version, and transactions fed on its standard input
//! (`nft -f -`).

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

/// Feeds `input` to `nft -f -`: one transaction, all or nothing.
pub(super) fn nft(input: &str) -> Result<()> {
    let mut child = Command::new("nft")
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
