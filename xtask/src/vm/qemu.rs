//! Boots one kernel under QEMU and reads the guest's markers from its
//! serial console.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::kernels::Kernel;

pub struct Limits {
    /// Until the guest's init says it runs.
    pub boot: Duration,
    /// The longest silence on the console after boot (a test's timeout
    /// is enforced in the guest; this catches a hung guest).
    pub quiet: Duration,
    pub memory_mib: u32,
}

/// What one guest reported.
#[derive(Default)]
pub struct Report {
    pub passed: Vec<String>,
    pub failed: Vec<String>,
    pub timed_out: Vec<String>,
    /// Planned tests with no result (the guest died or hung first).
    pub not_run: usize,
    /// Why the run ended early, if it did.
    pub error: Option<String>,
    pub elapsed: Duration,
}

impl Report {
    pub fn failures(&self) -> usize {
        self.failed.len() + self.timed_out.len() + self.not_run + usize::from(self.error.is_some())
    }
}

/// KVM only where it can run guests: `/dev/kvm` exists on these
/// machines while the CPU has no virtualisation extensions, and KVM then
/// does not boot (see ../shared/EBPF-TOOLCHAIN.md); software emulation
/// (TCG) always does.
fn kvm_usable() -> bool {
    std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
        && std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
            c.lines()
                .find(|l| l.starts_with("flags"))
                .is_some_and(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
}

/// QEMU, killed and reaped when dropped.
struct Guest(std::process::Child);

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn boot(
    k: &Kernel,
    initrd: &Path,
    log: &Path,
    limits: &Limits,
    planned: usize,
) -> Result<Report> {
    let kvm = kvm_usable();
    let report = boot_with(k, initrd, log, limits, planned, kvm)?;
    if kvm && report.error.as_deref() == Some(NO_BOOT) {
        eprintln!("xtask: the guest did not boot under KVM; retrying with TCG");
        return boot_with(k, initrd, log, limits, planned, false);
    }
    Ok(report)
}

const NO_BOOT: &str = "the guest did not boot in time";

fn boot_with(
    k: &Kernel,
    initrd: &Path,
    log: &Path,
    limits: &Limits,
    planned: usize,
    kvm: bool,
) -> Result<Report> {
    let mut c = Command::new("qemu-system-x86_64");
    if kvm {
        c.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        c.args(["-accel", "tcg", "-cpu", "max"]);
    }
    c.args(["-smp", "2", "-m", &limits.memory_mib.to_string()]);
    c.args([
        "-no-reboot",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-append",
        "console=ttyS0 panic=-1 quiet loglevel=4",
    ])
    .arg("-kernel")
    .arg(&k.bzimage)
    .arg("-initrd")
    .arg(initrd)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = c
        .spawn()
        .context("qemu-system-x86_64 (Debian's qemu-system-x86; `cargo xtask setup`)")?;
    // Killed on every way out, an early error's included.
    let mut guest = Guest(child);
    let mut file = std::fs::File::create(log)?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = guest.0.stdout.take().expect("piped");
    std::thread::spawn(move || {
        // Bytes, not UTF-8 lines: a test's output may hold anything.
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
            buf.clear();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Drained as it comes, so a chatty QEMU never blocks on a full pipe.
    let mut stderr = guest.0.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let start = Instant::now();
    let mut r = Report::default();
    let mut booted = false;
    let mut failure_log = false;
    loop {
        let wait = if booted { limits.quiet } else { limits.boot };
        let line = match rx.recv_timeout(wait) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                r.error = Some(if booted {
                    format!("the guest said nothing for {} s", wait.as_secs())
                } else {
                    NO_BOOT.to_owned()
                });
                break;
            }
            // QEMU exited (the guest powered off, or crashed).
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let line = line.as_str();
        writeln!(file, "{line}")?;
        // The test's output may end without a newline: the end marker
        // then follows its last line.
        if line.ends_with("MESH-VM-LOG-END") {
            failure_log = false;
            continue;
        }
        if failure_log {
            eprintln!("    | {line}");
        }
        let mut f = line.split_whitespace();
        match f.next() {
            Some("MESH-VM-BOOTED") => {
                booted = true;
                eprintln!(
                    "xtask: {} booted in {:.1} s ({})",
                    k.release,
                    start.elapsed().as_secs_f64(),
                    if kvm { "KVM" } else { "TCG" }
                );
            }
            Some("MESH-VM-ERROR") => eprintln!("xtask: guest: {line}"),
            Some("MESH-VM-LOG-BEGIN") => failure_log = true,
            Some("MESH-VM-TEST") => {
                let (Some(bin), Some(name), Some(result), secs) =
                    (f.next(), f.next(), f.next(), f.next().unwrap_or("?"))
                else {
                    continue;
                };
                let id = format!("{bin}::{name}");
                eprintln!("xtask: [{}] {result:<7} {id} ({secs} s)", k.release);
                match result {
                    "ok" => r.passed.push(id),
                    "TIMEOUT" => r.timed_out.push(id),
                    _ => r.failed.push(id),
                }
            }
            Some("MESH-VM-DONE") => {}
            _ => {}
        }
    }
    drop(guest);
    let stderr = errors.join().unwrap_or_default();
    r.elapsed = start.elapsed();
    let seen = r.passed.len() + r.failed.len() + r.timed_out.len();
    r.not_run = planned.saturating_sub(seen);
    if r.not_run > 0 && r.error.is_none() {
        r.error = Some(if booted {
            format!("the guest stopped with {} test(s) not run", r.not_run)
        } else {
            format!("the guest did not boot: {}", stderr.trim())
        });
    }
    Ok(r)
}
