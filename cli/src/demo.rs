//! `pacer demo`: the main job on embedded defaults, with nothing installed. An in-process
//! Gemini simulator with a realistic (Tier 1-like, shortened) limit, several virtual
//! replicas sharing one limiter and one queue, a progress line, images in a folder, a
//! summary table and a plot of requests per second against the limit. With Redis, a queue
//! or a Gemini endpoint configured, the same command uses them.
use std::{io::Write as _, path::PathBuf, sync::Arc, time::Instant};

use clap::Args;

use crate::loadtest::{self, LoadtestArgs};

/// `pacer demo` flags (all optional).
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Virtual replicas.
    #[arg(long, env = "PACER_DEMO_REPLICAS", default_value_t = 4)]
    pub replicas: usize,
    /// Prompts to generate.
    #[arg(long, env = "PACER_DEMO_REQUESTS", default_value_t = 60)]
    pub requests: usize,
    /// The provider project's limit (the `pacer simulate` syntax): Tier 1's 20 requests
    /// per minute, on a 10 s window so the demo ends in well under a minute.
    #[arg(
        long,
        env = "PACER_DEMO_LIMIT",
        default_value = "gemini-3.1-flash-image:rpm=20,ipm=20,window=10"
    )]
    pub limit: String,
    /// Where the images, the summary and the plot go.
    #[arg(long, env = "PACER_DEMO_OUT", default_value = "pacer-demo")]
    pub out: PathBuf,
    /// Redis for the global limiter and records (default: in memory).
    #[arg(long, env = "PACER_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// An SQS queue to go through (default: in memory).
    #[arg(long, env = "PACER_QUEUE_URL")]
    pub queue_url: Option<String>,
    /// A Gemini endpoint (default: the in-process simulator, or Google with an API key).
    #[arg(long, env = "PACER_GEMINI_BASE_URL")]
    pub gemini_base_url: Option<String>,
    /// A Gemini API key: the demo then calls Google for real (mind the cost).
    #[arg(long, env = "PACER_GEMINI_API_KEY", hide_env_values = true)]
    pub gemini_api_key: Option<String>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let gemini_base_url = match (&args.gemini_base_url, &args.gemini_api_key) {
        (Some(url), _) => Some(url.clone()),
        (None, Some(_)) => Some(pacer_core::gemini::client::DEFAULT_BASE_URL.to_owned()),
        (None, None) => None,
    };
    let lt = LoadtestArgs {
        replicas: args.replicas,
        requests: args.requests,
        demand: 0.0,
        redis_url: args.redis_url.clone(),
        queue_url: args.queue_url.clone(),
        gemini_base_url,
        gemini_api_key: args.gemini_api_key.clone(),
        limits: vec![args.limit.parse()?],
        // Few messages per replica, so the batch spreads over every replica.
        concurrency: 8,
        out: Some(args.out.join("images").display().to_string()),
        plot: args.out.join("requests-per-second.png"),
        timeout_seconds: 300,
        ..LoadtestArgs::default()
    };
    eprintln!(
        "pacer demo: {} replicas, {} prompts, limit {} (simulated provider unless configured)",
        lt.replicas, lt.requests, args.limit
    );
    let last = std::sync::Mutex::new((usize::MAX, 0u64));
    let progress: loadtest::Progress = Arc::new(move |done, total| {
        // Redraw when something finished, or once a second.
        let secs = started.elapsed().as_secs();
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if *last == (done, secs) {
            return;
        }
        *last = (done, secs);
        let width = 30;
        let filled = (done * width).checked_div(total).unwrap_or(width);
        eprint!(
            "\r[{}{}] {done}/{total} requests done, {:.0} s",
            "#".repeat(filled),
            ".".repeat(width - filled),
            started.elapsed().as_secs_f64()
        );
        let _ = std::io::stderr().flush();
    });
    let report = loadtest::execute(&lt, None, Some(progress)).await?;
    eprintln!();
    loadtest::print_table(&report);
    let summary = args.out.join("summary.json");
    std::fs::write(&summary, serde_json::to_string_pretty(&report)?)?;
    println!(
        "done in {:.1} s: images in {}, summary in {}, plot in {}",
        started.elapsed().as_secs_f64(),
        report.images,
        summary.display(),
        report.plot
    );
    Ok(())
}
