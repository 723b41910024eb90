//! The Lambda entry point (`cargo lambda build --bin pacer-lambda`). Settings come from the
//! environment (the `PACER_*` variables of `pacer worker`).
use std::sync::Arc;

use clap::Parser;
use lambda_runtime::{LambdaEvent, service_fn};
use pacer::{handler::HandlerOptions, lambda::LambdaHandler, runtime};

#[derive(Parser, Debug)]
struct Settings {
    #[command(flatten)]
    runtime: runtime::RuntimeArgs,
}

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let started = std::time::Instant::now();
    pacer::cli::init_tracing();
    let settings = Settings::parse();
    let replica = runtime::build(&settings.runtime, None, HandlerOptions::default()).await?;
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let handler = Arc::new(LambdaHandler::new(
        replica.handler,
        aws_sdk_sqs::Client::new(&aws),
    ));
    // The cold start's own share (Lambda adds the runtime's start and the download).
    tracing::info!(
        init_ms = started.elapsed().as_millis() as u64,
        "pacer-lambda initialized"
    );
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<aws_lambda_events::event::sqs::SqsEvent>| {
            let handler = handler.clone();
            async move { Ok::<_, lambda_runtime::Error>(handler.handle(event.payload).await) }
        },
    ))
    .await
}
