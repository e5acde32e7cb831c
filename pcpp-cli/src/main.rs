//! `pcpp-cli`: the command line of pcpp (PCPP, arXiv 2412.02962, on SDXL).

mod bench;

use clap::{Parser, Subcommand};

/// Command line of pcpp.
#[derive(Debug, Parser)]
#[command(name = "pcpp-cli", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Time one UNet forward on the CPU.
    Bench(bench::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(a) => bench::run(a),
    }
}
