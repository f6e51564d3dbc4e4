use std::{process::ExitCode, sync::Arc};

use clap::Parser as _;
use mesh_agent::{
    app,
    config::{Cli, Command, Config},
    telemetry,
};

/// sysexits EX_USAGE: bad flags or settings.
const EX_USAGE: u8 = 64;

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
    }
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
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = config.worker_threads {
        rt.worker_threads(n);
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-agent: cannot start the runtime: {e}");
            return ExitCode::from(70);
        }
    };
    match rt.block_on(app::run(config, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-agent: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
