//! `loractl`: control lorad from the command line. See `loractl --help` and DESIGN.md section 8.
//!
//! Exit codes: 0 ok, 1 failure (including any error from the daemon), 2 usage, 3 `wait` timeout,
//! 4 `watch` returned because a job was paused.
#[path = "../cli/mod.rs"]
mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Usage errors exit with 2 here, from clap.
    let args = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loractl: error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::EXIT_FAILURE);
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(e) => {
            if let Some(line) = cli::describe(&e) {
                eprintln!("loractl: {line}");
            }
            ExitCode::from(cli::EXIT_FAILURE)
        }
    }
}
