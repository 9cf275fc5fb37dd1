//! The guest side of `cargo xtask vm-test` (the host side is
//! xtask/src/vmtest/): the initramfs's `/init`, PID 1 of the guest.
//!
//! It mounts the pseudo filesystems, loads the modules, runs every test of
//! every test binary on its own (`--exact NAME --test-threads=1
//! --nocapture`, so kproxy's `attached IF mode=…` lines reach the console),
//! prints one `KPROXY-VM-TEST:` line per test and a `KPROXY-VM-VERDICT:`
//! line, and powers the machine off. What to load and run comes from the
//! plan the host put into the image (protocol.rs).

mod protocol;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use protocol::{GUEST_PLAN, GuestPlan, INFO_MARK, TEST_MARK, VERDICT_MARK};

/// Never returns: it powers off.
fn main() -> ! {
    match guest_main() {
        Ok(()) => {}
        Err(e) => {
            println!("{VERDICT_MARK}FAIL passed=0 failed=0 ignored=0 error={e:#}");
        }
    }
    power_off()
}

fn guest_main() -> Result<()> {
    mount_pseudo_filesystems()?;
    let plan = GuestPlan::parse(&fs::read_to_string(GUEST_PLAN).context(GUEST_PLAN)?)?;
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "{INFO_MARK}[{}] kernel {} on {cpus} CPUs",
        plan.label,
        release.trim()
    );

    let t = Instant::now();
    let mut loaded = Vec::new();
    for (name, path) in &plan.modules {
        match load_module(path) {
            Ok(()) => loaded.push(name.as_str()),
            Err(e) => println!("{INFO_MARK}module {name}: {e:#}"),
        }
    }
    println!(
        "{INFO_MARK}loaded {} modules in {}: {}",
        loaded.len(),
        secs(t.elapsed()),
        loaded.join(" ")
    );
    guest_cmd(&plan, "ip", &["link", "set", "lo", "up"])?;

    let (mut passed, mut failed, mut ignored) = (0usize, 0usize, 0usize);
    for (binary, path) in &plan.tests {
        let all = list_tests(&plan, path, false)?;
        let skip: BTreeSet<String> = list_tests(&plan, path, true)?.into_iter().collect();
        println!("{INFO_MARK}{binary}: {} tests", all.len());
        for test in &all {
            let full = format!("{binary}::{test}");
            if skip.contains(test) {
                println!("{TEST_MARK}ignored {full}");
                ignored += 1;
                continue;
            }
            let t = Instant::now();
            let ok = run_guest_test(&plan, path, test)?;
            let took = secs(t.elapsed());
            if ok {
                passed += 1;
                println!("{TEST_MARK}ok {full} ({took})");
            } else {
                failed += 1;
                println!("{TEST_MARK}FAILED {full} ({took})");
            }
        }
    }
    let verdict = if failed == 0 && passed > 0 {
        "PASS"
    } else {
        "FAIL"
    };
    println!("{VERDICT_MARK}{verdict} passed={passed} failed={failed} ignored={ignored}");
    Ok(())
}

fn mount_pseudo_filesystems() -> Result<()> {
    let mounts: &[(&str, &str, &str, &str)] = &[
        ("proc", "/proc", "proc", ""),
        ("sysfs", "/sys", "sysfs", ""),
        ("devtmpfs", "/dev", "devtmpfs", ""),
        ("tmpfs", "/run", "tmpfs", "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", "mode=1777"),
        ("bpf", "/sys/fs/bpf", "bpf", "mode=0700"),
    ];
    for (source, target, fstype, data) in mounts {
        fs::create_dir_all(target).ok();
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in mount arguments");
        let (source_c, target_c, fstype_c, data_c) = (c(source), c(target), c(fstype), c(data));
        // SAFETY: all pointers are valid NUL-terminated strings for the call.
        let rc = unsafe {
            libc::mount(
                source_c.as_ptr(),
                target_c.as_ptr(),
                fstype_c.as_ptr(),
                0,
                data_c.as_ptr().cast(),
            )
        };
        if rc != 0 {
            bail!(
                "mount -t {fstype} {source} {target}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    // `ip netns add` keeps its handles here (tests use /var/run/netns).
    fs::create_dir_all("/run/netns")?;
    Ok(())
}

fn load_module(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let file = File::open(path)?;
    // SAFETY: finit_module reads the module from a valid open fd; the
    // parameter string is an empty NUL-terminated string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), 0) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(err).context("finit_module");
        }
    }
    Ok(())
}

fn guest_cmd(plan: &GuestPlan, program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Test names of a libtest binary (`--list`; with `ignored`, only those
/// marked #[ignore]).
fn list_tests(plan: &GuestPlan, binary: &Path, ignored: bool) -> Result<Vec<String>> {
    let path = binary.to_string_lossy();
    let mut args = vec!["--list"];
    if ignored {
        args.push("--ignored");
    }
    let out = guest_cmd(plan, &path, &args)?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect())
}

/// Runs one test on its own with the console as stdout/stderr. As PID 1 we
/// also reap whatever the tests orphaned, so the child is awaited through
/// waitpid(-1) rather than `Child::wait`.
fn run_guest_test(plan: &GuestPlan, binary: &Path, test: &str) -> Result<bool> {
    use std::os::unix::process::CommandExt;
    let child = Command::new(binary)
        .args(["--exact", test, "--test-threads=1", "--nocapture"])
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        // Own process group: a timeout kills kproxy and the servers too.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child.id() as libc::pid_t;
    let deadline = Instant::now() + plan.test_timeout;
    let mut killed = false;
    loop {
        let mut status = 0;
        // SAFETY: plain waitpid on any child; `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if r == pid {
            return Ok(!killed && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        }
        if r > 0 {
            continue;
        }
        if !killed && Instant::now() >= deadline {
            println!(
                "{INFO_MARK}{test}: still running after {}: killing it",
                secs(plan.test_timeout)
            );
            // SAFETY: kill(2) on the process group we created.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn power_off() -> ! {
    let _ = std::io::stdout().flush();
    // SAFETY: sync and reboot have no memory-safety preconditions; we are
    // PID 1 in a throwaway VM.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
        // Without ACPI power-off, a reset also ends qemu (-no-reboot).
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // Exiting PID 1 panics the kernel; panic=-1 then resets, too.
    std::process::exit(1)
}

/// A duration as the host's progress lines print it (xtask's `util::secs`).
fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
