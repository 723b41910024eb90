use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pacer::cli::init_tracing();
    pacer::cli::run(pacer::cli::Cli::parse()).await
}
