//! Measurements that need the namespaced harness (root): run through
//! `cargo xtask bench`, which builds release binaries first.
//!
//! ```text
//! mesh-bench config-apply [--rounds N] [--json PATH]
//! mesh-bench data-path [--quick] [--json PATH]
//! mesh-bench idle-soak [--connections N] [--json PATH]
//! mesh-bench soak [--secs N] [--sample-secs N] [--rotation-secs N] [--json PATH]
//! ```
//!
//! Each case builds its own simulated nodes and removes them at the end
//! (also on Ctrl-C).

mod config_apply;
mod data_path;
mod mixed_soak;
mod soak;

use std::{process::ExitCode, sync::Arc};

use mesh_tests::Env;

const USAGE: &str = "usage: mesh-bench config-apply [--rounds N] [--json PATH] | data-path [--quick] \
                     [--json PATH] | idle-soak [--connections N] [--json PATH] | soak [--secs N] \
                     [--sample-secs N] [--rotation-secs N] [--json PATH]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut rounds = 30usize;
    let mut connections = 10_000usize;
    let mut quick = false;
    // The soak's: 30 minutes, a sample a minute, certificates every 2.
    let (mut secs, mut sample_secs, mut rotation_secs) = (1800u64, 60u64, 120u64);
    let mut json_out = None;
    let mut it = args.iter();
    let Some(case) = it.next().cloned() else {
        eprintln!("{USAGE}");
        return ExitCode::from(64);
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--rounds" => match it.next().and_then(|n| n.parse::<usize>().ok()) {
                Some(n) if n >= 2 => rounds = n,
                _ => {
                    eprintln!("{USAGE} (rounds ≥ 2)");
                    return ExitCode::from(64);
                }
            },
            "--connections" => match it.next().and_then(|n| n.parse::<usize>().ok()) {
                Some(n) if n >= 1 => connections = n,
                _ => {
                    eprintln!("{USAGE} (connections ≥ 1)");
                    return ExitCode::from(64);
                }
            },
            flag @ ("--secs" | "--sample-secs" | "--rotation-secs") => {
                match it.next().and_then(|n| n.parse::<u64>().ok()) {
                    Some(n) if n >= 1 => match flag {
                        "--secs" => secs = n,
                        "--sample-secs" => sample_secs = n,
                        _ => rotation_secs = n,
                    },
                    _ => {
                        eprintln!("{USAGE} ({flag} ≥ 1)");
                        return ExitCode::from(64);
                    }
                }
            }
            "--json" => match it.next() {
                Some(p) => json_out = Some(p.clone()),
                None => {
                    eprintln!("{USAGE}");
                    return ExitCode::from(64);
                }
            },
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(64);
            }
        }
    }
    if !["config-apply", "data-path", "idle-soak", "soak"].contains(&case.as_str()) {
        eprintln!("unknown case {case:?}; {USAGE}");
        return ExitCode::from(64);
    }

    let env = Arc::new(Env::new(&format!("bench-{case}")));
    Env::cleanup_on_signal(&env);

    // The signal handler holds the environment too, so a panic would not
    // drop it: clean up explicitly either way.
    let run = std::panic::catch_unwind(|| match case.as_str() {
        "config-apply" => {
            let r = config_apply::run(&env, rounds);
            (r.markdown(), r.json())
        }
        "idle-soak" => {
            let r = soak::run(&env, connections);
            (r.markdown(), r.json())
        }
        "soak" => {
            let r = mixed_soak::run(
                &env,
                &mixed_soak::Settings {
                    duration: std::time::Duration::from_secs(secs),
                    sample: std::time::Duration::from_secs(sample_secs),
                    rotation: std::time::Duration::from_secs(rotation_secs),
                },
            );
            (r.markdown(), r.json())
        }
        _ => {
            let r = data_path::run(&env, quick);
            (r.markdown(), r.json())
        }
    });
    env.cleanup();
    let Ok((markdown, json)) = run else {
        eprintln!(
            "mesh-bench {case} failed (see the panic above); everything it set up is removed"
        );
        return ExitCode::from(70);
    };
    print!("{markdown}");
    if let Some(p) = json_out {
        let doc = serde_json::to_vec_pretty(&json).expect("JSON");
        if let Err(e) = std::fs::write(&p, doc) {
            eprintln!("cannot write {p}: {e}");
            return ExitCode::from(73);
        }
        println!("\n(JSON: {p})");
    }
    ExitCode::SUCCESS
}

/// What the figures were measured on.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, Linux {}", kernel.trim())
}
