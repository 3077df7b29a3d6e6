//! `ferry-bench`: Ferry's benchmark harness.
//!
//! Each subcommand is a module that measures Ferry and its peers (or the machine's own limits)
//! side by side in the same run and reports through [`report`]: `inproc`, `log`, `mqtt` and
//! `backends`, each a module with a variant in [`Command`].
//!
//! ```text
//! cargo run --release -p ferry-bench -- inproc [--json] [--messages N] [--quick]
//! cargo run --release -p ferry-bench -- log [--json] [--quick] [--dir PATH]
//! cargo build --release -p ferry-server && cargo run --release -p ferry-bench -- mqtt [--json] [--quick]
//! ```

mod backends;
mod inproc;
mod log;
mod measure;
mod mqtt;
mod report;

/// Every system in a run shares this allocator, the one the `ferry` binary uses. With glibc's
/// malloc, records allocated on one thread and freed on another make it grow and trim its
/// per-thread heaps (mprotect calls and page faults) often enough to dominate the profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Ferry's benchmark harness.
#[derive(Debug, Parser)]
#[command(name = "ferry-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// In-process throughput and latency: Ferry vs tokio broadcast, flume and crossbeam.
    Inproc(inproc::Args),
    /// Durable topics: log append, engine publish, read and recovery vs the disk's own limits.
    Log(log::Args),
    /// MQTT over loopback: Ferry's server vs Mosquitto, throughput, latency and memory.
    Mqtt(mqtt::Args),
    /// The same workload over every ferry-backends adapter and each engine's own client.
    Backends(backends::Args),
    /// A measurement of `log` in a process of its own (run by `log`).
    #[command(hide = true)]
    LogProbe(log::ProbeArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Inproc(args) => inproc::run(&args),
        Command::Log(args) => log::run(&args),
        Command::Mqtt(args) => mqtt::run(&args),
        Command::Backends(args) => backends::run(&args),
        Command::LogProbe(args) => log::probe(&args),
    }
}
