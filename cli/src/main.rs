use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = pacer::Cli::parse();
    // The demo draws a progress bar and a table: its log keeps to warnings.
    match cli.command {
        pacer::Command::Demo(_) => pacer_core::process::init_tracing_at("warn"),
        _ => pacer_core::process::init_tracing(),
    }
    pacer::run(cli).await
}
