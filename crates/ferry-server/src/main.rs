//! The `ferry` binary.
//!
//! Today it has one subcommand, `demo`, which runs the GPU-telemetry pipeline of the seed design
//! inside one process and checks the broker's accounting. The command-line structure is meant to
//! grow `serve` (MQTT/HTTP front ends), `pub`, `sub` and `stats` next to it: each subcommand is a
//! variant of [`Command`] with its own `clap::Args` struct and module.
//!
//! Logs go to stderr through `tracing`; set `FERRY_LOG` (an `EnvFilter` directive such as
//! `info` or `ferry=debug`) to see more than warnings.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

mod demo;

/// mimalloc rather than glibc's malloc: a broker allocates records on publishing threads and
/// frees them on consuming threads, a pattern that makes glibc grow and trim per-thread heaps.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The environment variable holding the log filter.
const LOG_ENV: &str = "FERRY_LOG";

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: an embeddable, in-process message broker",
    propagate_version = true,
    after_help = "Logging: set FERRY_LOG to a tracing filter (default: warn), e.g. FERRY_LOG=info."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the GPU-telemetry demo pipeline in process and check the broker's accounting.
    ///
    /// Producers publish JSON telemetry points to `telemetry/gpu/<host>`; fanout collectors on
    /// `telemetry/gpu/+` aggregate every point; a consumer group of workers with manual ack
    /// raises temperature alerts. A live line is printed every second, then the broker is shut
    /// down and the final accounting is checked.
    ///
    /// Exit status: 0 when the accounting is OK, 3 on an accounting mismatch, 1 on error.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "ferry failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferry")
        .build()
        .context("starting the Tokio runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
        }
    })
}

/// Logs to stderr, filtered by `FERRY_LOG` (default `warn`). A malformed filter falls back to
/// the default with a warning rather than failing the command.
fn init_tracing() {
    let (filter, bad) = match std::env::var(LOG_ENV) {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("warn"), Some(format!("{spec:?}: {e}"))),
        },
        _ => (EnvFilter::new("warn"), None),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true)
        .init();
    if let Some(bad) = bad {
        tracing::warn!("ignoring invalid {LOG_ENV} filter {bad}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
