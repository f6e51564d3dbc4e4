//! `cargo xtask fuzz [--time S] [TARGET…]`: the libFuzzer targets of
//! `mesh-agent/fuzz`, each for S seconds, starting from the checked-in
//! seeds and the corpus earlier runs grew (kept under `~/.cache/mesh-dev`,
//! never in the repository). A crash fails the run, its input kept under
//! `~/.cache/mesh-dev/fuzz-artifacts/<target>/` to be turned into a
//! regression test.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{root, setup};

/// Each target and its seed directories (relative to the workspace root).
const TARGETS: [(&str, &[&str]); 4] = [
    ("sniff", &["mesh-agent/fuzz/seeds/sniff"]),
    ("hbone_connect", &["mesh-agent/fuzz/seeds/hbone_connect"]),
    (
        "config_file",
        &[
            "mesh-agent/fuzz/seeds/config_file",
            "mesh-agent/tests/corpus",
        ],
    ),
    ("jwt", &["mesh-agent/fuzz/seeds/jwt"]),
];

fn cache() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/mesh-dev"))
}

fn cargo_fuzz(bin: &std::path::Path) -> Command {
    let mut c = Command::new("cargo");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin.to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    c.env("PATH", std::env::join_paths(dirs).expect("PATH"))
        .arg(format!("+{}", setup::NIGHTLY))
        .arg("fuzz")
        // The parsers need no kernel programs.
        .env("AYA_BUILD_SKIP", "1")
        .current_dir(root());
    c
}

/// Free space below which the fuzz build cache is dropped first.
const MIN_FREE: u64 = 20 << 30;

/// Bytes available on the file system holding `path` (`df`).
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// Runs `only` (every target when empty), `secs` seconds each; returns the
/// inputs run in all. `dev`: an unoptimised build (minutes less to build
/// cold, fewer inputs a second; the test command's short runs).
pub fn run(secs: u64, only: &[String], dev: bool) -> Result<u64> {
    for t in only {
        if !TARGETS.iter().any(|(n, _)| n == t) {
            bail!(
                "no fuzz target {t}; there are {}",
                TARGETS.map(|(n, _)| n).join(", ")
            );
        }
    }
    let bin = setup::cargo_fuzz()?;
    let cache = cache()?;
    let target_dir = cache.join("fuzz-target");
    // Sanitized builds are large and each dependency change adds a set:
    // on a disk close to full, the cache goes (a cold build is minutes)
    // rather than the build failing half-way.
    if free_bytes(&cache).is_some_and(|b| b < MIN_FREE) && target_dir.exists() {
        eprintln!(
            "xtask: less than {} GiB free: removing {} before building",
            MIN_FREE >> 30,
            target_dir.display()
        );
        std::fs::remove_dir_all(&target_dir)?;
    }
    let fuzz_dir = root().join("mesh-agent/fuzz");
    let profile: &[&str] = if dev { &["--dev"] } else { &[] };
    let s = cargo_fuzz(&bin)
        .args(["build", "--fuzz-dir"])
        .arg(&fuzz_dir)
        .args(profile)
        .arg("--target-dir")
        .arg(&target_dir)
        // Incremental state would double the size of these builds, for
        // rebuilds that are rare.
        .env("CARGO_INCREMENTAL", "0")
        .status()
        .context("cargo fuzz build")?;
    if !s.success() {
        bail!("cargo fuzz build failed");
    }
    let (mut total, mut targets) = (0, 0);
    for (target, seeds) in TARGETS {
        if !only.is_empty() && !only.iter().any(|t| t == target) {
            continue;
        }
        let corpus = cache.join("fuzz-corpus").join(target);
        let artifacts = cache.join("fuzz-artifacts").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        eprintln!("xtask: fuzzing {target} for {secs} s");
        let out = cargo_fuzz(&bin)
            .args(["run", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .args(profile)
            .arg("--target-dir")
            .arg(&target_dir)
            .arg(target)
            .arg(&corpus)
            .args(seeds.iter().map(|s| root().join(s)))
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .arg("-rss_limit_mb=2048")
            .output()
            .context("cargo fuzz run")?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            bail!(
                "fuzz target {target} failed (input kept in {}):\n{}",
                artifacts.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        // libFuzzer's final stats; a run that printed none did not run.
        let stat = |name: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let executions = stat("number_of_executed_units").with_context(|| {
            format!("fuzz target {target}: no execution count in libFuzzer's output:\n{log}")
        })?;
        if executions == 0 {
            bail!("fuzz target {target} ran no input");
        }
        let corpus = std::fs::read_dir(&corpus)?.count();
        eprintln!("xtask: {target}: {executions} executions, 0 crashes, corpus {corpus}");
        total += executions;
        targets += 1;
    }
    eprintln!("xtask: fuzzing done: {total} executions over {targets} target(s), 0 crashes");
    Ok(total)
}
