//! The `pacer` command line: one clap struct, every flag also readable from the environment.
use clap::{Parser, Subcommand};

pub mod simulate;

/// Pacer keeps a fleet of image generators under a provider's project-wide rate limits.
#[derive(Parser, Debug)]
#[command(name = "pacer", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve a faithful Gemini API simulator (quotas, faults, real PNGs).
    Simulate(simulate::SimulateArgs),
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Simulate(args) => simulate::run(args).await,
    }
}
