//! The boot: qemu with the kernel and its initramfs, the console streamed,
//! logged and read until the verdict, the end of qemu or the timeout.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::kernels::Kernel;
use super::protocol::{TEST_MARK, VERDICT_MARK};
use super::verdict::{KernelRun, parse_verdict, printable};
use crate::util;

/// Boots the kernel, streams and parses its console until the verdict,
/// the end of qemu or the timeout.
pub(super) fn run_qemu(
    kernel: &Kernel,
    initrd: &Path,
    dir: &Path,
    timeout: Duration,
) -> Result<KernelRun> {
    let label = &kernel.label;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg",
        "-m",
        "1G",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .arg("-append")
    .arg("console=ttyS0 panic=-1 quiet")
    // -nographic puts a terminal on stdin into raw mode; the guest
    // needs no input.
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    say!(
        "==> vm-test [{label}]: booting (timeout {}): {}",
        util::secs(timeout),
        util::display(&cmd)
    );
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .context("starting qemu-system-x86_64 (Debian package qemu-system-x86)")?;
    let (tx, rx) = channel::<(bool, String)>();
    for (is_err, stream) in [
        (
            false,
            Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
        ),
        (
            true,
            Box::new(child.stderr.take().expect("piped")) as Box<dyn Read + Send>,
        ),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = printable(&String::from_utf8_lossy(&buf));
                        if tx.send((is_err, line)).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    drop(tx);

    let mut log = BufWriter::new(File::create(dir.join("console.log"))?);
    let mut run = KernelRun {
        problem: None,
        ..KernelRun::failed(kernel, String::new())
    };
    let deadline = started + timeout;
    // After the verdict the guest powers off at once; give it a moment.
    let mut grace: Option<Instant> = None;
    loop {
        let limit = grace.unwrap_or(deadline);
        let now = Instant::now();
        if now >= limit {
            if grace.is_none() {
                run.problem = Some(format!("timed out after {}", util::secs(timeout)));
                say!(
                    "[{label}] !! timeout after {}: killing qemu",
                    util::secs(timeout)
                );
            }
            child.kill().ok();
            break;
        }
        match rx.recv_timeout(limit - now) {
            Ok((is_err, line)) => {
                let _ = writeln!(log, "{line}");
                if is_err {
                    say!("[{label} qemu] {line}");
                } else {
                    say!("[{label}] {line}");
                }
                run.attach.line(&line);
                if let Some(rest) = line.split_once(TEST_MARK).map(|(_, r)| r)
                    && let Some(name) = rest.strip_prefix("FAILED ")
                {
                    run.failed_tests
                        .push(name.split(" (").next().unwrap_or(name).to_string());
                }
                if line.contains("Kernel panic - not syncing") && run.problem.is_none() {
                    run.problem = Some(format!("kernel panic: {}", line.trim()));
                }
                if let Some(v) = parse_verdict(&line) {
                    run.verdict = Some(v);
                    grace = Some(Instant::now() + Duration::from_secs(15));
                }
            }
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().context("waiting for qemu")?;
    log.flush()?;
    run.wall = started.elapsed();
    if run.verdict.is_none() && run.problem.is_none() {
        run.problem = Some(format!(
            "no {} line on the console (qemu exited: {status})",
            VERDICT_MARK.trim()
        ));
    }
    say!(
        "==> vm-test [{label}]: {} in {}",
        if run.passed() { "PASS" } else { "FAIL" },
        util::secs(run.wall)
    );
    Ok(run)
}
