//! `cargo xtask vm-test`: the namespaced test tier inside QEMU, on other
//! kernels than the host's.
//!
//! One VM per kernel: the kernel and a small initramfs (busybox, the
//! modules for virtio, 9p, veth and bridge, an init script) boot; the
//! host's root is shared read-only over 9p and the init chroots into it,
//! so the test binaries the host built — dynamically linked, like
//! iproute2 and bpftool they call — run unchanged, with tmpfs where they
//! write. Each test runs alone (`--exact`, one thread) under `timeout`;
//! its result comes back over the serial console as a marker line, and
//! the host prints a table per kernel. See the README's "Kernels".

mod initramfs;
pub mod kernels;
mod qemu;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::setup::Tools;

/// The test binaries of the README's test command's VM tier; `--all`
/// runs every namespaced test binary.
pub const DEFAULT_TESTS: [&str; 4] = ["capture", "mtls", "lifecycle", "restart"];

/// What `vm-test` was asked for.
pub struct Request {
    /// Kernels by path; empty: Debian 12's (or every cached one with `all`).
    pub kernels: Vec<PathBuf>,
    /// Every namespaced test on every cached kernel (fetching Debian 12's
    /// and the newest Debian kernel first).
    pub all: bool,
    /// Test binaries to run; empty: `DEFAULT_TESTS` (every one with `all`).
    pub tests: Vec<String>,
    /// Substrings of test names; empty: every test.
    pub filters: Vec<String>,
    /// Seconds one test may take.
    pub test_timeout: u64,
    /// The guest's memory, in MiB.
    pub memory: u32,
}

impl Request {
    /// The README's test command's VM tier: `DEFAULT_TESTS` on Debian 12.
    pub fn readme() -> Self {
        Request {
            kernels: Vec::new(),
            all: false,
            tests: Vec::new(),
            filters: Vec::new(),
            test_timeout: 600,
            memory: 2048,
        }
    }
}

/// Prints the cached kernels.
pub fn list() -> Result<()> {
    let cached = kernels::cached()?;
    println!("kernels cached in {}:", kernels::cache()?.display());
    if cached.is_empty() {
        println!("  (none: `cargo xtask vm-test` fetches Debian 12's)");
    }
    for k in cached {
        let modules = if k.modules.is_some() {
            "with modules"
        } else {
            "no modules"
        };
        println!("  {:<28} {} ({modules})", k.release, k.bzimage.display());
    }
    Ok(())
}

pub fn run(tools: &Tools, bins: &Path, req: Request) -> Result<()> {
    let kernels = if !req.kernels.is_empty() {
        req.kernels
            .iter()
            .map(|p| kernels::from_path(p))
            .collect::<Result<Vec<_>>>()?
    } else if req.all {
        kernels::debian(kernels::DEBIAN_12, false)?;
        if let Err(e) = kernels::debian_newest(false) {
            eprintln!("xtask: the newest Debian kernel could not be fetched: {e:#}");
        }
        kernels::cached()?
    } else {
        vec![kernels::debian(kernels::DEBIAN_12, false)?]
    };
    let wanted: Vec<String> = match (&req.tests[..], req.all) {
        ([], false) => DEFAULT_TESTS.iter().map(|s| s.to_string()).collect(),
        (t, _) => t.to_vec(),
    };
    // The guest mounts tmpfs over these: binaries there are out of its sight.
    for hidden in ["/tmp", "/run", "/var/tmp"] {
        if bins.starts_with(hidden) {
            bail!(
                "the test binaries are under {hidden} ({}), which the guest covers with tmpfs: \
                 set CARGO_TARGET_DIR elsewhere",
                bins.display()
            );
        }
    }
    let plan = plan(tools, &wanted, &req.filters)?;
    if plan.is_empty() {
        bail!("no test matches {:?} in {wanted:?}", req.filters);
    }
    let script = runner(&plan, bins, req.test_timeout);
    let logs = crate::target_dir(tools)?.join("vm-test");
    std::fs::create_dir_all(&logs)?;
    let mut reports = Vec::new();
    for k in &kernels {
        eprintln!("xtask: vm-test on {} ({} tests)", k.release, plan.len());
        let initrd = logs.join(format!("initramfs-{}.cpio", k.release));
        build_initramfs(k, &script, &initrd)?;
        let log = logs.join(format!("console-{}.log", k.release));
        let limits = qemu::Limits {
            boot: Duration::from_secs(180),
            quiet: Duration::from_secs(req.test_timeout + 60),
            memory_mib: req.memory,
        };
        let report = qemu::boot(k, &initrd, &log, &limits, plan.len())?;
        reports.push((k.release.clone(), report, log));
    }
    print_table(&reports);
    let failed: usize = reports.iter().map(|(_, r, _)| r.failures()).sum();
    if failed > 0 {
        bail!("vm-test: {failed} failure(s); the guests' console logs are listed above");
    }
    Ok(())
}

/// One test to run in the guest.
struct Planned {
    exe: PathBuf,
    target: String,
    name: String,
}

/// Builds the test binaries and lists their tests (on the host: the same
/// binaries list the same tests), skipping `#[ignore]`d ones.
fn plan(tools: &Tools, wanted: &[String], filters: &[String]) -> Result<Vec<Planned>> {
    // The same package selection as `cargo xtask test`'s run, so the
    // binaries it just built are reused rather than rebuilt with other
    // feature unification.
    let mut c = tools.cargo();
    c.args([
        "test",
        "--workspace",
        "--exclude",
        "mesh-ebpf",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    let out = c.output().context("cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "building the tests failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(name)) = (v["executable"].as_str(), v["target"]["name"].as_str())
        else {
            continue;
        };
        // The namespaced tier: mesh-tests' integration tests.
        let is_test = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"))
            && v["manifest_path"]
                .as_str()
                .is_some_and(|m| Path::new(m) == crate::root().join("tests/Cargo.toml"));
        let all = wanted.is_empty();
        if is_test && (all || wanted.iter().any(|w| w == name)) {
            exes.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    for w in wanted {
        if !exes.iter().any(|(n, _)| n == w) {
            bail!("no namespaced test binary named {w}");
        }
    }
    let mut plan = Vec::new();
    for (target, exe) in exes {
        let ignored = list_tests(&exe, true)?;
        for name in list_tests(&exe, false)? {
            let selected = filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
            if selected && !ignored.contains(&name) {
                plan.push(Planned {
                    exe: exe.clone(),
                    target: target.clone(),
                    name,
                });
            }
        }
    }
    Ok(plan)
}

fn list_tests(exe: &Path, ignored: bool) -> Result<Vec<String>> {
    let mut c = Command::new(exe);
    c.args(["--list", "--format", "terse"]);
    if ignored {
        c.arg("--ignored");
    }
    let out = c
        .output()
        .with_context(|| format!("{} --list", exe.display()))?;
    if !out.status.success() {
        bail!("{} --list failed", exe.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect())
}

/// The guest's test runner (run by `/bin/sh` of the host's root): each
/// test alone under `timeout`, a marker line per test, the test's output
/// only when it failed. A test counts as passed only when the harness
/// says `1 passed`: a name that matched nothing must not pass.
fn runner(plan: &[Planned], bins: &Path, timeout: u64) -> String {
    let mut s = format!(
        r#"export HOME=/tmp/home PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export RUST_BACKTRACE=1 MESH_AGENT_BIN={agent} MESH_AGENT_SECOND_BIN={second} MESH_TESTAPP_BIN={app}
# The guest's CPU is emulated: the harness's waits for events last longer
# (tests/src/sys.rs, `scaled`); no test measures speed.
export MESH_TEST_TIMEOUT_SCALE=4
mkdir -p "$HOME"
failed=0
run() {{
    start=$(date +%s)
    timeout -k 10 {timeout} "$1" --exact "$3" --test-threads=1 >/tmp/test.log 2>&1
    rc=$?
    secs=$(( $(date +%s) - start ))
    if [ $rc -eq 0 ] && grep -q "test result: ok. 1 passed" /tmp/test.log; then
        r=ok
    elif [ $rc -eq 124 ] || {{ [ $rc -eq 137 ] && [ $secs -ge {timeout} ]; }}; then
        r=TIMEOUT
    else
        r=FAILED
    fi
    if [ $r != ok ]; then
        failed=$((failed + 1))
        echo "MESH-VM-LOG-BEGIN $2 $3"
        tail -n 150 /tmp/test.log
        echo "MESH-VM-LOG-END"
    fi
    echo "MESH-VM-TEST $2 $3 $r $secs"
}}
"#,
        agent = sh_quote(&bins.join("mesh-agent").display().to_string()),
        second = sh_quote(&bins.join(crate::SECOND_AGENT).display().to_string()),
        app = sh_quote(&bins.join("mesh-testapp").display().to_string()),
    );
    for p in plan {
        s.push_str(&format!(
            "run {} {} {}\n",
            sh_quote(&p.exe.display().to_string()),
            sh_quote(&p.target),
            sh_quote(&p.name)
        ));
    }
    s.push_str("exit $failed\n");
    s
}

/// `s` as one shell word.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn build_initramfs(k: &kernels::Kernel, script: &str, out: &Path) -> Result<()> {
    use initramfs::Entry;
    let modules = match &k.modules {
        Some(dir) => initramfs::modules_in_order(dir, &initramfs::MODULES)?,
        None => Vec::new(),
    };
    let busybox = which("busybox")?;
    let mut entries = vec![
        Entry::Dir("bin"),
        Entry::Dir("dev"),
        Entry::Dir("proc"),
        Entry::Dir("sys"),
        Entry::Dir("modules"),
        Entry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            data: std::fs::read(&busybox)?,
        },
    ];
    let mut names = Vec::new();
    for m in modules {
        entries.push(Entry::File {
            path: format!("modules/{}", m.file),
            mode: 0o644,
            data: m.bytes,
        });
        names.push(m.file);
    }
    entries.push(Entry::File {
        path: "init".into(),
        mode: 0o755,
        data: initramfs::init_script(&names).into_bytes(),
    });
    entries.push(Entry::File {
        path: "run-tests.sh".into(),
        mode: 0o755,
        data: script.as_bytes().to_vec(),
    });
    std::fs::write(out, initramfs::archive(&entries))?;
    Ok(())
}

/// A static busybox (Debian's `busybox-static`): the initramfs has no
/// libraries for a dynamic one.
fn which(tool: &str) -> Result<PathBuf> {
    for dir in ["/bin", "/usr/bin", "/sbin", "/usr/sbin"] {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{tool} not found: `cargo xtask setup` installs Debian's busybox-static")
}

fn print_table(reports: &[(String, qemu::Report, PathBuf)]) {
    println!();
    println!("| kernel | passed | failed | timed out | not run | time |");
    println!("|---|---|---|---|---|---|");
    for (release, r, _) in reports {
        println!(
            "| {release} | {} | {} | {} | {} | {:.0} s |",
            r.passed.len(),
            r.failed.len(),
            r.timed_out.len(),
            r.not_run,
            r.elapsed.as_secs_f64()
        );
    }
    for (release, r, log) in reports {
        for t in r.failed.iter().chain(&r.timed_out) {
            println!("{release}: {t}");
        }
        if let Some(e) = &r.error {
            println!("{release}: {e}");
        }
        if r.failures() > 0 {
            println!("{release}: console log {}", log.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_survive_quotes_and_spaces() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        let plan = [Planned {
            exe: "/t/it's dir/capture-1".into(),
            target: "capture".into(),
            name: "mod::a_test".into(),
        }];
        let s = runner(&plan, Path::new("/t/debug"), 300);
        assert!(
            s.contains(r"run '/t/it'\''s dir/capture-1' 'capture' 'mod::a_test'"),
            "{s}"
        );
    }
}
