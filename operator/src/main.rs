//! `pacer-operator`: parses arguments and hands over to the library.
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
    /// Reconcile QuotaPools and ModelChains into Redis until SIGTERM.
    Run(pacer_operator::RunArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let command = Args::parse().command;
    pacer_core::process::init_tracing();
    match command {
        Command::Crd => print!("{}", pacer_crds::crd_yaml()?),
        Command::Run(args) => {
            pacer_operator::run(args, pacer_operator::shutdown_on_signal()).await?
        }
    }
    Ok(())
}
