//! `pacer worker`: the long-running SQS worker for Kubernetes pods (or any host).
use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::Args;
use tokio_util::sync::CancellationToken;

use pacer_function::{
    handler::HandlerOptions,
    outcome::RequeuePolicy,
    queue::SqsQueue,
    runtime::{self, RuntimeArgs},
    worker::{self, WorkerOptions},
};

/// Poll an SQS queue and generate what it asks, under the global limit.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The request queue's URL.
    #[arg(long, env = "PACER_QUEUE_URL")]
    pub queue_url: String,

    /// Messages processed at once by this replica.
    #[arg(long, env = "PACER_CONCURRENCY", default_value_t = 256)]
    pub concurrency: usize,

    /// Visibility timeout given on receive and renewed while a message runs, in seconds.
    #[arg(long, env = "PACER_VISIBILITY_SECONDS", default_value_t = 60)]
    pub visibility_seconds: u64,

    /// Long-poll wait per receive, in seconds (0 to 20).
    #[arg(long, env = "PACER_WAIT_SECONDS", default_value_t = 20)]
    pub wait_seconds: u64,

    /// On SIGTERM, how long in-flight messages may finish before they are released.
    #[arg(long, env = "PACER_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,

    /// A deferred message received this many times is sent again as a fresh message (its
    /// receive count restarts) instead of hidden: keep it under the queue's
    /// maxReceiveCount, so deferrals never dead-letter a request.
    #[arg(long, env = "PACER_RESEND_FROM_RECEIVE", default_value_t = 10)]
    pub resend_from_receive: u32,

    /// Where /metrics and /healthz are served.
    #[arg(long, env = "PACER_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    #[command(flatten)]
    pub runtime: RuntimeArgs,

    #[command(flatten)]
    pub local: crate::config::ConfigArgs,
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let replica = runtime::build(
        &args.runtime,
        args.local.local(None)?,
        HandlerOptions::default(),
    )
    .await?;
    let bound = replica.metrics.clone().serve(args.metrics_addr).await?;
    tracing::info!(metrics = %bound, queue = %args.queue_url, concurrency = args.concurrency, "worker started");
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let queue = Arc::new(SqsQueue::new(
        aws_sdk_sqs::Client::new(&aws),
        args.queue_url.clone(),
    ));
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    worker::run(
        queue,
        WorkerOptions {
            concurrency: args.concurrency,
            visibility: Duration::from_secs(args.visibility_seconds.max(1)),
            wait_time: Duration::from_secs(args.wait_seconds.min(20)),
            shutdown_grace: Duration::from_secs(args.shutdown_grace_seconds),
            requeue: RequeuePolicy {
                resend_from_receive: args.resend_from_receive.max(1),
                ..RequeuePolicy::default()
            },
        },
        replica.handler,
        replica.metrics,
        shutdown,
    )
    .await?;
    tracing::info!("worker stopped");
    Ok(())
}

/// Cancels `token` on SIGTERM or Ctrl-C.
pub async fn stop_on_signal(token: CancellationToken) {
    pacer_core::process::shutdown_signal().await;
    token.cancel();
}
