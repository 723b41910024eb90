use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pacer::init_tracing();
    pacer::run(pacer::Cli::parse()).await
}
