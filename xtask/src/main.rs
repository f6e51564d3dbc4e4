//! `cargo xtask <task>`: everything beyond a plain cargo build.
//!
//! Every task first runs `setup`, which installs what is missing (pinned
//! nightly with rust-src, bpf-linker, Debian packages, bpffs) and takes
//! seconds when nothing is.

mod chart;
mod fuzz;
mod setup;
mod vm;

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Tasks of the eBPF service mesh workspace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and system packages the build and tests need.
    Setup,
    /// Build the agent (with its eBPF programs) and the test binaries.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run the agent with the given arguments (e.g. `-- run --workloads w.yaml`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Two simulated nodes, a CA and an agent per node, pods on each, Istio
    /// configuration from a directory: real traffic over mutual TLS, and
    /// what the agents and the kernel saw; everything is removed at the end.
    /// `demo --hold` waits for Enter; `demo exec POD -- CMD` meanwhile runs
    /// a command in one of its pods.
    Demo {
        /// Keep the demo running until Enter or Ctrl-C, to explore with bpftool.
        #[arg(long)]
        hold: bool,
        #[command(subcommand)]
        action: Option<DemoAction>,
    },
    /// Lints, then every test tier (unit, in-process, namespaced root tests),
    /// then every fuzz target for a short time (`fuzz --time 15`), then the
    /// capture, mTLS, lifecycle and restart tests in a VM on Debian 12's
    /// kernel (`vm-test`), then `bench --quick` (figures reported, not
    /// asserted).
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// Skip the VM tier.
        #[arg(long)]
        no_vm: bool,
        /// Skip the quick benchmark at the end (and its release build).
        #[arg(long)]
        no_bench: bool,
        /// Skip the short fuzzing.
        #[arg(long)]
        no_fuzz: bool,
        /// Passed to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The libFuzzer targets of mesh-agent/fuzz (HTTP and TLS sniffing,
    /// HBONE CONNECT, configuration files, JWTs) with cargo-fuzz, from the
    /// checked-in seeds; a crash fails it.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Only these targets (sniff, hbone_connect, config_file, jwt).
        targets: Vec<String>,
    },
    /// `cargo fmt --check` and `cargo clippy -D warnings`.
    Lint,
    /// Render the Helm chart (deploy/chart) with its default values into
    /// the files `kubectl apply -k deploy/` applies.
    Chart,
    /// The namespaced tests inside QEMU on other kernels (root): by
    /// default the capture, mTLS, lifecycle and restart tests on Debian 12's 6.1
    /// kernel, fetched and cached under ~/.cache/mesh-dev/kernels.
    VmTest {
        /// Show the cached kernels and exit.
        #[arg(long)]
        list: bool,
        /// Every namespaced test on every cached kernel (Debian 12's and
        /// the newest Debian kernel fetched first).
        #[arg(long)]
        all: bool,
        /// A kernel to boot: a bzImage (modules built in), or a directory
        /// unpacked as `dpkg -x` leaves a kernel package. Repeatable.
        #[arg(long)]
        kernel: Vec<PathBuf>,
        /// A test binary to run (capture, mtls, l7, ...). Repeatable.
        #[arg(long = "test")]
        tests: Vec<String>,
        /// Seconds one test may take in the guest.
        #[arg(long, default_value_t = 600)]
        test_timeout: u64,
        /// The guest's memory, in MiB.
        #[arg(long, default_value_t = 2048)]
        memory: u32,
        /// Substrings of the test names to run.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        filters: Vec<String>,
    },
    /// Benchmarks on release builds (root): the data path (direct, same
    /// node, HBONE, L7, each with the fast path off and on) side by side,
    /// how long a configuration change takes to reach the data plane, and
    /// what idle connections cost (10,000 held, then closed). Markdown on
    /// stdout, JSON in `target/bench/`.
    Bench {
        /// Short loads, one repetition, 2,000 idle connections and a
        /// 2-minute mixed-load soak (about 4 minutes after the build).
        #[arg(long)]
        quick: bool,
        /// Only the mixed-load soak, for 30 minutes: keep-alive requests,
        /// new connections and long streams while the configuration
        /// changes every 10 s and certificates rotate every 2 minutes;
        /// memory, descriptors and map entries every minute. Fails on a
        /// lost request or a growth of 5 % after the warm-up.
        #[arg(long, conflicts_with = "quick")]
        soak: bool,
    },
}

#[derive(Subcommand)]
enum DemoAction {
    /// Run a command as a process of a pod of the demo that holds (in the
    /// pod's cgroup and network namespace, so the mesh captures it; service
    /// names such as `httpbin` resolve to their ClusterIP), e.g.
    /// `cargo xtask demo exec client -- curl -s http://httpbin:8000/`.
    Exec {
        /// The pod: client, server, server-v2 or external.
        pod: String,
        /// The command and its arguments, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let tools = setup::run()?;
    match cli.task {
        Task::Setup => Ok(()),
        Task::Build { release } => build(&tools, release).map(|_| ()),
        Task::Run { args } => {
            let bin = build(&tools, false)?.join("mesh-agent");
            Err(Command::new(bin).args(args).exec()).context("exec mesh-agent")
        }
        Task::Demo { hold, action } => {
            let dir = build(&tools, false)?;
            let mut demo = Command::new(dir.join("mesh-demo"));
            demo.env("MESH_AGENT_BIN", dir.join("mesh-agent"));
            if let Some(DemoAction::Exec { pod, command }) = action {
                demo.arg("exec").arg(pod).arg("--").args(command);
            } else if hold {
                demo.arg("--hold");
            }
            // Replace this process so Ctrl-C reaches the demo, which cleans up.
            Err(demo.exec()).context("exec mesh-demo")
        }
        Task::Test {
            no_lint,
            no_vm,
            no_bench,
            no_fuzz,
            args,
        } => {
            if !no_lint {
                lint(&tools)?;
            }
            build_second(&tools)?;
            let dir = build(&tools, false)?;
            let mut t = tools.cargo();
            t.args(["test", "--workspace", "--exclude", "mesh-ebpf"])
                .args(&args);
            t.env("MESH_AGENT_BIN", dir.join("mesh-agent"))
                .env("MESH_AGENT_SECOND_BIN", dir.join(SECOND_AGENT));
            status(&mut t)?;
            // A filtered run is a developer's loop, not the suite.
            if !args.is_empty() {
                return Ok(());
            }
            if !no_fuzz {
                fuzz::run(15, &[], true)?;
            }
            if !no_vm {
                vm::run(&tools, &dir, vm::Request::readme())?;
            }
            if no_bench {
                return Ok(());
            }
            bench(&tools, true, false)
        }
        Task::Fuzz { time, targets } => fuzz::run(time, &targets, false).map(|_| ()),
        Task::Lint => lint(&tools),
        Task::Chart => chart::write(&root().join("deploy")),
        Task::VmTest { list: true, .. } => vm::list(),
        Task::VmTest {
            list: false,
            all,
            kernel,
            tests,
            test_timeout,
            memory,
            filters,
        } => {
            build_second(&tools)?;
            let bins = build(&tools, false)?;
            let req = vm::Request {
                kernels: kernel,
                all,
                tests,
                filters,
                test_timeout,
                memory,
            };
            vm::run(&tools, &bins, req)
        }
        Task::Bench { quick, soak } => bench(&tools, quick, soak),
    }
}

/// `cargo xtask bench`: release build, then each case.
fn bench(tools: &setup::Tools, quick: bool, soak: bool) -> Result<()> {
    let dir = build(tools, true)?;
    let out = target_dir(tools)?.join("bench");
    std::fs::create_dir_all(&out)?;
    let run = |args: &[&str], json: &str| {
        let mut b = Command::new(dir.join("mesh-bench"));
        b.args(args)
            .arg("--json")
            .arg(out.join(json))
            .env("MESH_AGENT_BIN", dir.join("mesh-agent"))
            .env("MESH_TESTAPP_BIN", dir.join("mesh-testapp"));
        status(&mut b)
    };
    if soak {
        return run(&["soak"], "soak.json");
    }
    let mut data_path = vec!["data-path"];
    if quick {
        data_path.push("--quick");
    }
    run(&data_path, "data-path.json")?;
    let rounds = if quick { "10" } else { "40" };
    run(&["config-apply", "--rounds", rounds], "config-apply.json")?;
    let conns = if quick { "2000" } else { "10000" };
    run(&["idle-soak", "--connections", conns], "idle-soak.json")?;
    if quick {
        // The soak, short: nothing lost, nothing growing after the warm-up.
        return run(
            &[
                "soak",
                "--secs",
                "120",
                "--sample-secs",
                "15",
                "--rotation-secs",
                "30",
            ],
            "soak-short.json",
        );
    }
    // The per-request decisions (routing, load balancing, authorization,
    // JWT), in Criterion's own report.
    status(tools.cargo().args([
        "bench",
        "-p",
        "mesh-agent",
        "--bench",
        "decisions",
        "--bench",
        "policy",
    ]))
}

/// Builds the agent and the test binaries; returns the output directory.
fn build(tools: &setup::Tools, release: bool) -> Result<PathBuf> {
    let mut c = tools.cargo();
    c.args(["build", "-p", "mesh-agent", "-p", "mesh-tests", "--bins"]);
    if release {
        c.arg("--release");
    }
    status(&mut c)?;
    Ok(target_dir(tools)?.join(if release { "release" } else { "debug" }))
}

/// The second build of the agent, beside the first.
pub const SECOND_AGENT: &str = "mesh-agent-second";

/// Builds the agent with feature `second-build` (it calls itself
/// `<version>+second`) and keeps it as [`SECOND_AGENT`]: the restart test
/// upgrades to it. Before [`build`], which puts the first build's binary
/// back: both go to the same path. The same packages as `build`, so the
/// dependencies are shared and only the agent's own crate builds twice.
fn build_second(tools: &setup::Tools) -> Result<()> {
    status(tools.cargo().args([
        "build",
        "-p",
        "mesh-agent",
        "-p",
        "mesh-tests",
        "--bins",
        "--features",
        "mesh-agent/second-build",
    ]))?;
    let dir = target_dir(tools)?.join("debug");
    // A copy renamed into place: the old one may be running (a VM test).
    let tmp = dir.join(format!("{SECOND_AGENT}.tmp"));
    std::fs::copy(dir.join("mesh-agent"), &tmp)?;
    std::fs::rename(&tmp, dir.join(SECOND_AGENT))?;
    Ok(())
}

fn lint(tools: &setup::Tools) -> Result<()> {
    status(tools.cargo().args(["fmt", "--all", "--check"]))
        .context("formatting differs: run `cargo fmt`")?;
    status(tools.cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "mesh-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

fn target_dir(tools: &setup::Tools) -> Result<PathBuf> {
    let out = tools
        .cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(PathBuf::from(
        v["target_directory"]
            .as_str()
            .context("no target_directory")?,
    ))
}

fn status(c: &mut Command) -> Result<()> {
    let s = c.status().with_context(|| format!("cannot run {c:?}"))?;
    if !s.success() {
        bail!("{c:?} failed: {s}");
    }
    Ok(())
}

/// The workspace root (xtask lives one level below it).
///
/// From `cargo run`'s environment, not from where this binary was built:
/// checkouts that share a target directory (CI caches one under `$HOME`)
/// may run an xtask binary another checkout built, which must still work
/// on the checkout it was run from.
pub fn root() -> &'static Path {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
        manifest.parent().expect("workspace root").to_path_buf()
    })
}
