//! `pacer bench worker`: how much memory one worker replica needs to hold many requests in
//! flight. Image calls take seconds, so a replica holds hundreds to thousands at once; this
//! fills it to `--in-flight` against a provider that answers after `--latency-ms`, and
//! reports the replica's peak resident memory.
//!
//! The simulator runs as a separate process (`pacer simulate`), so its memory is not
//! counted; the queue is in memory and the limiter is the in-memory one with no limit, so
//! nothing but the replica's own work is measured.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use pacer_function::{
    handler::HandlerOptions,
    queue::{MemoryQueue, Queue},
    runtime::{self, RuntimeArgs},
    worker::{self, WorkerOptions},
};

/// Arguments of `pacer bench worker`.
#[derive(Args, Debug, Clone)]
pub struct WorkerBenchArgs {
    /// Requests to hold in flight at once (the worker's concurrency).
    #[arg(long, env = "PACER_BENCH_IN_FLIGHT", default_value_t = 1000)]
    pub in_flight: usize,
    /// The simulated provider's latency, in milliseconds.
    #[arg(long, env = "PACER_BENCH_LATENCY_MS", default_value_t = 5000)]
    pub latency_ms: u64,
    /// Print one JSON object.
    #[arg(env = "PACER_BENCH_JSON", long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    in_flight_target: usize,
    in_flight_peak: i64,
    requests: usize,
    completed: usize,
    seconds: f64,
    rss_before_mb: f64,
    rss_peak_mb: f64,
}

/// Resident memory of this process now and at its peak, in MiB (Linux `/proc`).
fn rss_mb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub async fn run(args: WorkerBenchArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the pacer binary")?;
    let mut sim = Command::new(exe)
        .args([
            "simulate",
            "--listen",
            "127.0.0.1:0",
            "--latency-ms",
            &args.latency_ms.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting `pacer simulate`")?;
    let url = {
        let out = sim.stdout.take().context("simulator stdout")?;
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .context("reading the simulator's URL")?;
        line.trim().to_owned()
    };
    let result = bench(&args, &url).await;
    let _ = sim.kill();
    let _ = sim.wait();
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "in flight {} (target {}), {} of {} completed in {:.1} s; resident memory {:.1} MiB before, {:.1} MiB peak",
            report.in_flight_peak,
            report.in_flight_target,
            report.completed,
            report.requests,
            report.seconds,
            report.rss_before_mb,
            report.rss_peak_mb
        );
    }
    Ok(())
}

async fn bench(args: &WorkerBenchArgs, url: &str) -> anyhow::Result<Report> {
    let dir = std::env::temp_dir().join(format!("pacer-bench-worker-{}", std::process::id()));
    let yaml = "apiVersion: pacer.dev/v1alpha1\nkind: QuotaPool\nmetadata: {name: bench}\n\
                spec:\n  project: bench\n  tier: Tier3\n  models:\n  - {name: gemini-3.1-flash-image, rpm: 1000000, tpm: 1000000000, ipm: 1000000, rpd: 100000000}\n  spendPer10MinutesUsd: 1000000\n\
                ---\napiVersion: pacer.dev/v1alpha1\nkind: ModelChain\nmetadata: {name: bench}\n\
                spec:\n  pool: bench\n  steps:\n  - {model: gemini-3.1-flash-image}\n";
    let rt = RuntimeArgs {
        redis_url: None,
        records_redis_url: None,
        gemini_base_url: url.to_owned(),
        gemini_api_key: Some("bench".into()),
        gemini_api_key_file: None,
        openai_base_url: None,
        openai_api_key: None,
        sink: dir.display().to_string(),
        result_queue_url: None,
        config_refresh_ms: 500,
        limiter_timeout_ms: 500,
        claim_lease_seconds: 60,
        replica_id: Some("bench".into()),
        day_seconds: None,
        pool_keys: Default::default(),
    };
    let replica = runtime::build(
        &rt,
        Some(crate::config::from_yaml(yaml)?),
        HandlerOptions::default(),
    )
    .await?;
    let queue = Arc::new(MemoryQueue::new());
    let requests = args.in_flight;
    for i in 0..requests {
        let body = serde_json::json!({"id": format!("bench-{i}"), "chain": "bench", "prompt": format!("a wave {i}")});
        queue.send(&body.to_string()).await?;
    }
    let (rss_before, _) = rss_mb();
    let shutdown = CancellationToken::new();
    let metrics = replica.metrics.clone();
    let started = Instant::now();
    let task = tokio::spawn(worker::run(
        queue.clone(),
        WorkerOptions {
            concurrency: args.in_flight,
            visibility: Duration::from_secs(120),
            wait_time: Duration::from_millis(200),
            shutdown_grace: Duration::from_secs(5),
            ..WorkerOptions::default()
        },
        replica.handler.clone(),
        replica.metrics.clone(),
        shutdown.clone(),
    ));
    let mut peak = 0i64;
    let deadline = started + Duration::from_millis(args.latency_ms * 3 + 60_000);
    while !queue.is_empty() && Instant::now() < deadline {
        peak = peak.max(metrics.in_flight.get());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    shutdown.cancel();
    task.await??;
    let (_, rss_peak) = rss_mb();
    let completed = requests - queue.len();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Report {
        in_flight_target: args.in_flight,
        in_flight_peak: peak,
        requests,
        completed,
        seconds,
        rss_before_mb: rss_before,
        rss_peak_mb: rss_peak,
    })
}
