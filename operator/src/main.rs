//! `pacer-operator`: parses arguments and hands over to the library.
use clap::{Parser, Subcommand};
use pacer_operator::{RunArgs, Shutdown};

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
    Run(RunArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Crd => print!("{}", pacer_crds::crd_yaml()?),
        Command::Run(args) => {
            pacer_core::process::init_tracing();
            let shutdown = Shutdown::new();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                pacer_core::process::shutdown_signal().await;
                stop.cancel();
            });
            pacer_operator::run(args, shutdown).await?;
        }
    }
    Ok(())
}
