//! `pacer-operator`: parses arguments and hands over to the library code.
use clap::{Parser, Subcommand};

/// Pacer's Kubernetes operator.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CRD YAML of QuotaPool and ModelChain (what `kubectl apply -f` takes).
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Crd => print!("{}", pacer_crds::crd_yaml()?),
    }
    Ok(())
}
