//! The `ferry` binary.
//!
//! Subcommands: `demo` runs the GPU-telemetry pipeline of the seed design inside one process and
//! checks the broker's accounting; `serve` runs the MQTT 3.1.1/5 broker and the HTTP admin API
//! (`ferry-net`); `hash-password` prints an argon2 hash for the `[mqtt] users` of the config;
//! `pub` and `sub` are MQTT clients (`mosquitto_pub`/`mosquitto_sub` flags); `stats` and `dlq`
//! call the HTTP admin API.
//! Each subcommand is a variant of [`Command`] with its own `clap::Args` struct and module.
//!
//! Logs go to stderr through `tracing`; set `FERRY_LOG` (an `EnvFilter` directive such as
//! `info` or `ferry=debug`) to change the level (default: warn, info for `serve`, which logs
//! each client's connection and disconnection at debug).

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_net::config::{LogFormat, ServeConfig};
use tracing_subscriber::EnvFilter;

mod admin;
mod client;
mod demo;
mod memory;
mod serve;

/// mimalloc rather than glibc's malloc: a broker allocates records on publishing threads and
/// frees them on consuming threads, a pattern that makes glibc grow and trim per-thread heaps.
/// `ferry serve` has it return free memory once a second ([`memory`]).
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
    after_help = "Logging: set FERRY_LOG to a tracing filter, e.g. FERRY_LOG=debug (default: warn; \
                  info for `ferry serve`, whose per-connection events are at debug)."
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
    /// Run the MQTT 3.1.1/5 broker and the HTTP admin API until SIGINT/SIGTERM.
    ///
    /// Settings: flags > FERRY_* environment variables > the TOML file (--config or
    /// FERRY_CONFIG) > defaults (MQTT 0.0.0.0:1883, HTTP 0.0.0.0:8080, data in ./ferry-data).
    Serve(serve::ServeArgs),
    /// Print an argon2 hash of a password for the `[mqtt] users` list of the config file.
    HashPassword {
        /// The password; `-` reads it from the first line of standard input (which keeps it
        /// out of the shell history and the process list).
        password: String,
    },
    /// Publish MQTT messages: -m message, -f file, -l one per line of stdin.
    ///
    /// Exits once every message is acknowledged (QoS 1/2) or written (QoS 0).
    #[command(disable_help_flag = true, disable_version_flag = true)]
    Pub(client::PubArgs),
    /// Subscribe to MQTT topic filters and print what arrives, one message per line.
    #[command(disable_help_flag = true, disable_version_flag = true)]
    Sub(client::SubArgs),
    /// Print the server's stats (or one topic's) from the HTTP API.
    Stats(admin::StatsArgs),
    /// List, redrive or purge a topic's dead letters through the HTTP API.
    Dlq(admin::DlqArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serve_config = match &cli.command {
        Command::Serve(args) => match args.resolve() {
            Ok(resolved) => Some(resolved),
            Err(e) => {
                eprintln!("error: {}", report(&e));
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let serve_config = match serve_config {
        Some(resolved) => {
            init_tracing("info", resolved.config.log_format == LogFormat::Json);
            for warning in &resolved.warnings {
                tracing::warn!("{warning}");
            }
            Some(resolved.config)
        }
        None => {
            init_tracing("warn", false);
            None
        }
    };
    let serving = serve_config.is_some();
    match run(cli, serve_config) {
        Ok(code) => code,
        // The server's log is where its operators look (and may be JSON lines); the clients
        // print a plain line. Either way once.
        Err(e) if serving => {
            tracing::error!(error = report(&e), "ferry failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: an error whose message already
/// includes its source's (as most I/O wrappers do) does not repeat it.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn run(cli: Cli, serve_config: Option<ServeConfig>) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::HashPassword { password } => {
            let password = if password == "-" {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .context("reading the password from standard input")?;
                line.trim_end_matches(['\r', '\n']).to_string()
            } else {
                password.clone()
            };
            if password.is_empty() {
                anyhow::bail!("the password is empty");
            }
            println!("{}", ferry_net::auth::hash_password(&password)?);
            return Ok(ExitCode::SUCCESS);
        }
        Command::Serve(args) if args.print_config => {
            if let Some(c) = &serve_config {
                serve::print_config(c)?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferry")
        .build()
        .context("starting the Tokio runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Serve(_) => match serve_config {
                Some(config) => serve::run(config).await,
                None => anyhow::bail!("no configuration"),
            },
            Command::HashPassword { .. } => Ok(ExitCode::SUCCESS),
            Command::Pub(args) => client::publish(args).await,
            Command::Sub(args) => client::subscribe(args).await,
            Command::Stats(args) => admin::stats(args).await,
            Command::Dlq(args) => admin::dlq(args).await,
        }
    })
}

/// Logs to stderr, filtered by `FERRY_LOG` (default `default`), as text or JSON lines. A
/// malformed filter falls back to the default with a warning rather than failing the command.
fn init_tracing(default: &str, json: bool) {
    let (filter, bad) = match std::env::var(LOG_ENV) {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new(default), Some(format!("{spec:?}: {e}"))),
        },
        _ => (EnvFilter::new(default), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(true);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
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

    #[test]
    fn a_cause_already_in_its_error_is_not_repeated() {
        let io = std::io::Error::other("disk on fire");
        let e = anyhow::Error::new(io).context("writing x: disk on fire");
        let e = e.context("saving");
        assert_eq!(report(&e), "saving: writing x: disk on fire");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(report(&e), "outer: inner");
    }
}
