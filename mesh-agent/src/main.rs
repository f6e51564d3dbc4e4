use std::{process::ExitCode, sync::Arc};

use clap::Parser as _;
use mesh_agent::{
    app, ca,
    config::{self, CaCommand, Cli, Command, Config},
    inspect::View,
    istio::Severity,
    telemetry,
};

/// sysexits EX_USAGE: bad flags or settings.
const EX_USAGE: u8 = 64;
/// sysexits EX_SOFTWARE.
const EX_SOFTWARE: u8 = 70;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EX_USAGE);
        }
    };
    match cli.command {
        Command::Run(config) => run(*config),
        Command::Ca { command } => ca_command(command),
        Command::Uninstall {
            bpffs_dir,
            cni_conf_dir,
            cni_bin_dir,
        } => uninstall(&bpffs_dir, cni_conf_dir.zip(cni_bin_dir)),
        Command::Cni { command } => cni_command(command),
        Command::Analyze {
            paths,
            failure_threshold,
            dataplane_mode_label,
            json,
        } => analyze(&paths, failure_threshold, &dataplane_mode_label, json),
        Command::Validate {
            paths,
            errors_only,
            strict,
            json,
        } => validate(&paths, errors_only, strict, json),
        Command::Status(i) => inspect(View::Status, &i),
        Command::Workloads(i) => inspect(View::Workloads, &i),
        Command::Services(i) => inspect(View::Services, &i),
        Command::Policies(i) => inspect(View::Policies, &i),
        Command::Certs(i) => inspect(View::Certs, &i),
        Command::Connections(i) => inspect(View::Connections, &i),
        Command::ConfigDump(i) => inspect(View::ConfigDump, &i),
        Command::LogLevel { level, inspect } => {
            printed(mesh_agent::inspect::log_level(level.as_deref(), &inspect))
        }
        Command::Bpf { command } => printed(match command {
            config::BpfCommand::Progs(p) => mesh_agent::inspect::progs(&p),
            config::BpfCommand::Maps(p) => mesh_agent::inspect::maps(&p),
        }),
    }
}

fn inspect(view: View, i: &config::Inspect) -> ExitCode {
    printed(mesh_agent::inspect::show(view, i))
}

/// Prints what an inspect command got; exit status 69 (EX_UNAVAILABLE)
/// when the agent or its pins could not be read.
fn printed(r: Result<String, mesh_agent::inspect::Error>) -> ExitCode {
    match r {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh-agent: error: {e}");
            ExitCode::from(69)
        }
    }
}

fn uninstall(
    bpffs_dir: &std::path::Path,
    cni: Option<(std::path::PathBuf, std::path::PathBuf)>,
) -> ExitCode {
    // The plugin goes first: once the programs are gone, a pod the plugin
    // waited for would start uncaptured anyway.
    if let Some((conf_dir, bin_dir)) = cni {
        match mesh_agent::cni::conflist::uninstall(&bin_dir, &conf_dir) {
            Ok(said) => println!("{said}"),
            Err(e) => {
                eprintln!("mesh-agent: error: {e}");
                return ExitCode::from(EX_SOFTWARE);
            }
        }
    }
    match mesh_agent::ebpf::uninstall(bpffs_dir) {
        Ok(removed) => {
            println!("{removed}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh-agent: error: {e}");
            ExitCode::from(EX_SOFTWARE)
        }
    }
}

fn cni_command(command: config::CniCommand) -> ExitCode {
    let config::CniCommand::Install {
        plugin,
        cni_bin_dir,
        cni_conf_dir,
        agent_socket,
        exclude_namespaces,
        timeout_seconds,
    } = command;
    let plugin = plugin.or_else(|| {
        Some(
            std::env::current_exe()
                .ok()?
                .with_file_name(mesh_agent::cni::PLUGIN_TYPE),
        )
    });
    let Some(plugin) = plugin else {
        eprintln!(
            "mesh-agent cni install: cannot find mesh-cni beside this program: give --plugin"
        );
        return ExitCode::from(EX_USAGE);
    };
    let settings = mesh_agent::cni::conflist::Settings {
        agent_socket,
        exclude_namespaces,
        timeout_seconds,
    };
    match mesh_agent::cni::conflist::install(&plugin, &cni_bin_dir, &cni_conf_dir, &settings) {
        Ok(said) => {
            println!("{said}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh-agent cni install: error: {e}");
            ExitCode::from(EX_SOFTWARE)
        }
    }
}

fn validate(paths: &[std::path::PathBuf], errors_only: bool, strict: bool, json: bool) -> ExitCode {
    let mut report = mesh_agent::documents::check::paths(paths);
    if strict {
        // A policy that is not enforced fails the check outright.
        for p in &mut report.problems {
            if p.severity == Severity::Warning {
                p.severity = Severity::Error;
                p.message.push_str(" (--strict)");
            }
        }
    }
    let shown: Vec<_> = report
        .problems
        .iter()
        .filter(|p| !errors_only || p.severity != Severity::Note)
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&shown).unwrap_or_default()
        );
    } else {
        for p in &shown {
            println!("{p}");
        }
    }
    let (errors, warnings) = (report.errors(), report.warnings());
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    eprintln!(
        "validated {}: {} accepted, {}, {}, {}",
        plural(report.files, "file"),
        plural(report.documents, "document"),
        plural(errors, "error"),
        plural(warnings, "warning"),
        plural(report.problems.len() - errors - warnings, "note")
    );
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// istioctl's exit status for findings at or above the threshold.
const EX_ANALYSIS: u8 = 79;

fn analyze(
    paths: &[std::path::PathBuf],
    threshold: config::Threshold,
    label: &str,
    json: bool,
) -> ExitCode {
    use mesh_agent::analyze::Level;
    let messages = mesh_agent::analyze::paths(paths, label);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&messages).unwrap_or_default()
        );
    } else {
        for m in &messages {
            println!("{m}");
        }
    }
    let count = |l: Level| messages.iter().filter(|m| m.level == l).count();
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    if messages.is_empty() {
        eprintln!("no issues found");
    } else {
        eprintln!(
            "{}, {}, {} info",
            plural(count(Level::Error), "error"),
            plural(count(Level::Warning), "warning"),
            count(Level::Info)
        );
    }
    let fails = |l: Level| match threshold {
        config::Threshold::Error => l == Level::Error,
        config::Threshold::Warning => l != Level::Info,
        config::Threshold::Info => true,
    };
    if messages.iter().any(|m| fails(m.level)) {
        ExitCode::from(EX_ANALYSIS)
    } else {
        ExitCode::SUCCESS
    }
}

fn runtime(worker_threads: Option<usize>) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = worker_threads {
        rt.worker_threads(n);
    }
    rt.build().map_err(|e| {
        eprintln!("mesh-agent: cannot start the runtime: {e}");
        ExitCode::from(EX_SOFTWARE)
    })
}

fn run(config: Config) -> ExitCode {
    if let Err(e) = config.validate() {
        eprintln!("mesh-agent: invalid configuration: {e}");
        return ExitCode::from(EX_USAGE);
    }
    let log = match telemetry::logging::init(&config.log_level, config.log_format) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            eprintln!("mesh-agent: invalid configuration: --log-level: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let rt = match runtime(config.worker_threads) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(app::run(config, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-agent: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn ca_command(command: CaCommand) -> ExitCode {
    let cfg = match command {
        CaCommand::Run(cfg) => cfg,
        offline => {
            return match ca::commands::run(offline) {
                Ok(msg) => {
                    println!("{msg}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mesh-agent ca: error: {e}");
                    ExitCode::from(EX_USAGE)
                }
            };
        }
    };
    if let Err(e) = telemetry::logging::init(&cfg.log_level, cfg.log_format) {
        eprintln!("mesh-agent ca: invalid configuration: --log-level: {e}");
        return ExitCode::from(EX_USAGE);
    }
    let rt = match runtime(None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(ca::server::run(*cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-agent ca: error: {e}");
            ExitCode::from(69)
        }
    }
}
