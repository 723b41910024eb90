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
            init_tracing();
            let shutdown = Shutdown::new();
            tokio::spawn(signal(shutdown.clone()));
            pacer_operator::run(args, shutdown).await?;
        }
    }
    Ok(())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if std::env::var("PACER_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn signal(shutdown: Shutdown) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    shutdown.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
    shutdown.cancel();
}
