//! The `pacer` command line: one clap struct, every flag also readable from the environment.
//! Each subcommand is a module; the request path they drive is `pacer-function`'s.
use clap::{Parser, Subcommand};

pub mod apply;
pub mod bench;
pub mod bench_worker;
pub mod config;
pub mod connect;
pub mod demo;
pub mod generate;
pub mod loadtest;
pub mod plot;
pub mod simulate;
pub mod top;
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
    /// A live terminal view of every pool and model (`--once`: one frame as text).
    Top(top::TopArgs),
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
        Command::Top(args) => top::run(args).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every flag of every subcommand reads an environment variable (the README promises
    /// it): lists the ones that do not.
    fn flags_without_env(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            // Positionals are the command's subject; hidden flags are the load test's own
            // wiring to its child processes.
            if matches!(id, "help" | "version")
                || arg.get_env().is_some()
                || arg.is_positional()
                || arg.is_hide_set()
            {
                continue;
            }
            out.push(format!("{path} --{}", arg.get_long().unwrap_or(id)));
        }
        for sub in cmd.get_subcommands() {
            flags_without_env(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_flag_of_every_subcommand_has_an_environment_variable() {
        let mut missing = Vec::new();
        flags_without_env(&Cli::command(), "pacer", &mut missing);
        assert!(missing.is_empty(), "flags without env: {missing:#?}");
    }

    #[test]
    fn one_environment_variable_means_one_thing() {
        // The same variable on two flags must be the same setting (same long name).
        let mut seen = std::collections::BTreeMap::<String, String>::new();
        let mut clashes = Vec::new();
        fn walk(
            cmd: &clap::Command,
            seen: &mut std::collections::BTreeMap<String, String>,
            clashes: &mut Vec<String>,
        ) {
            for arg in cmd.get_arguments() {
                let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) else {
                    continue;
                };
                let env = env.to_string_lossy().into_owned();
                if let Some(prev) = seen.insert(env.clone(), long.to_owned())
                    && prev != long
                {
                    clashes.push(format!("{env}: --{prev} and --{long}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, seen, clashes);
            }
        }
        walk(&Cli::command(), &mut seen, &mut clashes);
        assert!(clashes.is_empty(), "{clashes:#?}");
    }
}
