//! The `pacer` command line: one clap struct, every flag also readable from the environment.
//! Each subcommand is a module; the request path they drive is `pacer-function`'s.
use clap::{Parser, Subcommand};

pub mod apply;
pub mod bench;
pub mod bench_worker;
pub mod config;
pub mod demo;
pub mod generate;
pub mod loadtest;
pub mod plot;
pub mod simulate;
pub mod worker;

/// Pacer keeps a fleet of image generators under a provider's project-wide rate limits.
#[derive(Parser, Debug)]
#[command(name = "pacer", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the main job on embedded defaults (simulator, in-memory limiter and queue).
    Demo(demo::DemoArgs),
    /// Generate one image through the handler (in-process simulator without Redis or a key).
    Generate(generate::GenerateArgs),
    /// Drive a fleet of replicas against the limit and report losses, 429s and utilization.
    Loadtest(loadtest::LoadtestArgs),
    /// Serve a faithful Gemini API simulator (quotas, faults, real PNGs).
    Simulate(simulate::SimulateArgs),
    /// Benchmark a component (`pacer bench limiter`).
    Bench(bench::BenchArgs),
    /// Poll an SQS queue and generate images under the global limit.
    Worker(worker::WorkerArgs),
    /// Validate QuotaPool and ModelChain YAML and write it to Redis.
    Apply(apply::ApplyArgs),
    /// Print live usage per pool and model.
    Usage(apply::UsageArgs),
}

pub use pacer_core::process::init_tracing;

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::Generate(args) => generate::run(args).await,
        Command::Loadtest(args) => loadtest::run(args).await,
        Command::Simulate(args) => simulate::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Worker(args) => worker::run(args).await,
        Command::Apply(args) => apply::apply(args).await,
        Command::Usage(args) => apply::usage(args).await,
    }
}
