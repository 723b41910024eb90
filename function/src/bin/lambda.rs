//! The Lambda entry point (`cargo lambda build --bin pacer-lambda`). Settings come from the
//! environment (the `PACER_*` variables of `pacer worker`).
use clap::Parser;
use pacer_function::{lambda, runtime::RuntimeArgs};

#[derive(Parser, Debug)]
struct Settings {
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    pacer_core::process::init_tracing();
    lambda::serve(&Settings::parse().runtime).await
}
