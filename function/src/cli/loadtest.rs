//! `pacer loadtest`: a fleet of replicas against one provider project, measured the way an
//! operator asks: did anything get lost or generated twice, did the provider ever answer
//! 429, how close to the limit did the fleet get, and how long did requests take.
//!
//! Replicas are separate [`Handler`]s (each with its own Redis and HTTP connections) running
//! [`worker::run`] on one queue: the in-memory queue or SQS (`--queue-url`); with
//! `--processes` each replica is a child process (this executable in its hidden child role)
//! sharing only Redis and the queue. The provider is an in-process simulator unless
//! `--gemini-base-url` names one; its arrival-time counts give `max_in_any_window`.
//! `--baseline` runs the same load through the usual advice (each replica its own local
//! limiter at the full limit, exponential backoff with full jitter on 429 and 5xx) next to
//! it. `pacer demo` is this engine with embedded defaults.
use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use async_trait::async_trait;
use clap::Args;
use pacer_core::{
    config::{
        CompiledChain, CompiledConfig, CompiledPool, CompiledStep, ConfigStore, FailureMode,
        ModelLimits, ProviderKind, RetryConfig,
    },
    gemini::{GeminiClient, GeminiConfig},
    limiter::{Decision, Limiter, SystemClock, memory::MemoryLimiter, redis::RedisLimiter},
    provider::{ApiKey, ImageProvider, ImageRequest, ImageResponse, ProviderError},
};
use pacer_simulator::{Faults, LimitSpec, SimConfig, Simulator};
use serde::{Deserialize, Serialize};
use tokio::{io::AsyncBufReadExt as _, sync::watch};
use tokio_util::sync::CancellationToken;

use super::plot;
use crate::{
    handler::{Handler, HandlerOptions, Limiters, Providers, backoff, estimate_costs},
    message::GenerationRequest,
    metrics::Metrics,
    outcome::{DeferReason, Outcome, Process},
    queue::{MemoryQueue, Queue, SqsQueue},
    record::{Records, ResultRecord, Status},
    sink::{self, Sink},
    worker::{self, WorkerOptions},
};

/// `pacer loadtest` flags.
#[derive(Args, Debug, Clone)]
pub struct LoadtestArgs {
    /// Replicas (separate handlers, each with its own connections).
    #[arg(long, env = "PACER_LOADTEST_REPLICAS", default_value_t = 8)]
    pub replicas: usize,
    /// Run each replica as a separate OS process (needs --redis-url and --queue-url).
    #[arg(long, env = "PACER_LOADTEST_PROCESSES")]
    pub processes: bool,
    /// Requests to send.
    #[arg(long, env = "PACER_LOADTEST_REQUESTS", default_value_t = 300)]
    pub requests: usize,
    /// Demand as a multiple of the binding limit's rate (requests are sent at that pace);
    /// 0 sends them all at once.
    #[arg(long, env = "PACER_LOADTEST_DEMAND", default_value_t = 3.0)]
    pub demand: f64,
    /// Redis for the global limiter, config and records; absent: one in-memory limiter
    /// shared by in-process replicas.
    #[arg(long, env = "PACER_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// An (empty) SQS queue to go through (moto or AWS); absent: an in-memory queue.
    #[arg(long, env = "PACER_QUEUE_URL")]
    pub queue_url: Option<String>,
    /// The provider's base URL; absent: an in-process simulator enforcing --limit.
    #[arg(long, env = "PACER_LOADTEST_GEMINI_BASE_URL")]
    pub gemini_base_url: Option<String>,
    /// The Gemini API key, when --gemini-base-url is Google.
    #[arg(long, env = "PACER_GEMINI_API_KEY", hide_env_values = true)]
    pub gemini_api_key: Option<String>,
    /// QuotaPool YAML (with --chain) instead of --limit.
    #[arg(long, requires = "chain")]
    pub pool: Option<PathBuf>,
    /// ModelChain YAML (its first chain is used).
    #[arg(long, requires = "pool")]
    pub chain: Option<PathBuf>,
    /// A limit, `MODEL:rpm=N,tpm=N,ipm=N,rpd=N,window=SECONDS` (repeatable, the syntax of
    /// `pacer simulate`): builds a pool with these limits and a chain over the models in
    /// the order given.
    #[arg(long = "limit", env = "PACER_LOADTEST_LIMITS", value_delimiter = ';')]
    pub limits: Vec<LimitSpec>,
    /// Stay this many percent under every limit (default 0).
    #[arg(long, env = "PACER_LOADTEST_HEADROOM", default_value_t = 0)]
    pub headroom: u8,
    /// Extra length of every window in milliseconds (default 1/60 of the window): absorbs
    /// the jitter between a booked start and the provider's arrival clock.
    #[arg(long, env = "PACER_LOADTEST_MARGIN_MS")]
    pub margin_ms: Option<u64>,
    /// How long a request waits for capacity on a chain step before it is deferred, in s.
    #[arg(long, env = "PACER_LOADTEST_MAX_WAIT", default_value_t = 60)]
    pub max_wait_seconds: u64,
    /// Simulated ghost 429s (bare, under quota), probability per request.
    #[arg(long, default_value_t = 0.0)]
    pub ghost_429: f64,
    /// Simulated 503 overloads, probability per request.
    #[arg(long, default_value_t = 0.0)]
    pub overload: f64,
    /// Simulated base latency and uniform jitter, in ms.
    #[arg(long, default_value_t = 300)]
    pub latency_ms: u64,
    #[arg(long, default_value_t = 500)]
    pub latency_jitter_ms: u64,
    /// Messages each replica works on at once.
    #[arg(long, env = "PACER_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// Also run the naive baseline (in process, in-memory queue) with the same load.
    #[arg(long, env = "PACER_LOADTEST_BASELINE")]
    pub baseline: bool,
    /// Where images go (a folder or s3://bucket/prefix); default: a temporary folder.
    #[arg(long, env = "PACER_LOADTEST_OUT")]
    pub out: Option<String>,
    /// The plot to write (the baseline's gets `-naive` before the extension).
    #[arg(
        long,
        env = "PACER_LOADTEST_PLOT",
        default_value = "pacer-loadtest.png"
    )]
    pub plot: PathBuf,
    /// Give up waiting after this many seconds (unfinished requests count as lost).
    #[arg(long, env = "PACER_LOADTEST_TIMEOUT", default_value_t = 600)]
    pub timeout_seconds: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Internal: run as one replica process of a parent loadtest (its index).
    #[arg(long, hide = true)]
    pub child: Option<usize>,
    /// Internal: the chain a child replica serves.
    #[arg(long, hide = true)]
    pub child_chain: Option<String>,
}

impl Default for LoadtestArgs {
    fn default() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: LoadtestArgs,
        }
        Wrap::parse_from(["loadtest"]).args
    }
}

/// Accepted calls in the full windows after the first, over limit x those windows; `None`
/// when the calls span fewer than three windows.
fn steady_utilization(sorted_starts: &[i64], window_ms: i64, limit: u64) -> Option<f64> {
    let (first, last) = (*sorted_starts.first()?, *sorted_starts.last()?);
    let full = (last - first) / window_ms.max(1);
    if full < 3 || limit == 0 {
        return None;
    }
    let (from, to) = (first + window_ms, first + full * window_ms);
    let n = sorted_starts
        .iter()
        .filter(|&&t| t >= from && t < to)
        .count();
    Some(n as f64 / (limit as f64 * (full - 1) as f64))
}

/// One provider call as a replica saw it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Call {
    pub replica: usize,
    pub model: String,
    pub request: String,
    /// Unix ms when the call left.
    pub start_ms: i64,
    pub took_ms: u64,
    /// `ok` or the error's metric label.
    pub result: String,
}

type CallLog = Arc<Mutex<Vec<Call>>>;

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A provider that records every call (the request id is the prompt's first word).
struct Recorded {
    inner: Arc<dyn ImageProvider>,
    replica: usize,
    log: CallLog,
}

#[async_trait]
impl ImageProvider for Recorded {
    async fn generate(
        &self,
        model: &str,
        req: &ImageRequest,
    ) -> pacer_core::provider::Result<ImageResponse> {
        let start = now_ms();
        let result = self.inner.generate(model, req).await;
        let call = Call {
            replica: self.replica,
            model: model.to_owned(),
            request: req
                .prompt
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
            start_ms: start,
            took_ms: (now_ms() - start).max(0) as u64,
            result: match &result {
                Ok(_) => "ok".to_owned(),
                Err(e) => e.metric_label().to_owned(),
            },
        };
        lock(&self.log).push(call);
        result
    }
}

/// Counts deferrals and notes when each request finished.
struct Counting {
    inner: Arc<dyn Process>,
    deferred: Arc<AtomicU64>,
}

#[async_trait]
impl Process for Counting {
    async fn process(&self, body: &str, receive_count: u32) -> Outcome {
        let outcome = self.inner.process(body, receive_count).await;
        if !outcome.is_final() {
            self.deferred.fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }
}

/// What one run measured.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Report {
    /// `pacer` or `naive`.
    pub mode: String,
    pub replicas: usize,
    pub processes: bool,
    pub queue: String,
    pub limiter: String,
    pub requests: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Deliveries deferred back to the queue (a request may be deferred several times).
    pub deferred: u64,
    /// Requests with neither a stored image nor a failed result.
    pub lost: usize,
    /// Provider calls that produced an image beyond one per request.
    pub duplicates: usize,
    /// Provider answers 429 (with quota details or bare).
    pub upstream_429: usize,
    /// Of those, bare ("ghost") 429s.
    pub upstream_429_bare: usize,
    /// Faults the simulator injected, by kind.
    pub injected: BTreeMap<String, u64>,
    /// Provider calls in all, and by result.
    pub provider_calls: usize,
    pub calls_by_result: BTreeMap<String, usize>,
    /// The binding limit: model, dimension, limit per window, window.
    pub binding: String,
    pub limit: u64,
    pub window_s: f64,
    /// The most the provider counted in any window (at arrival), binding dimension.
    pub max_in_any_window: u64,
    /// Steady-state use of the binding limit, as `pacer bench limiter` measures it: accepted
    /// calls in the full windows after the first (the first only ramps up at the demand's
    /// pace), divided by limit x those windows. Runs shorter than three windows fall back to
    /// `utilization_whole_run`.
    pub utilization: f64,
    /// Accepted calls / (limit x (windows from the first to the last call + 1)): counts the
    /// first window's ramp and the last window's tail against the fleet.
    pub utilization_whole_run: f64,
    /// From the first send to the last result.
    pub completion_s: f64,
    /// Request latency, send to result.
    pub latency_p50_s: f64,
    pub latency_p99_s: f64,
    /// Provider call latency.
    pub call_p50_ms: f64,
    pub call_p99_ms: f64,
    /// Failed requests by reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failures: BTreeMap<String, usize>,
    pub images: String,
    pub plot: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Box<Report>>,
}

/// The limits and chain a run uses.
struct Plan {
    config: CompiledConfig,
    chain: String,
    sim_limits: Vec<LimitSpec>,
    /// First model, dimension label, limit, window.
    binding: (String, &'static str, u64, f64),
}

/// A pool and chain from `--limit` specs: no tier defaults, the limits exactly as given.
pub fn plan_from_limits(
    limits: &[LimitSpec],
    run: &str,
    headroom: u8,
    max_wait: Duration,
    margin_ms: Option<u64>,
) -> anyhow::Result<CompiledConfig> {
    anyhow::ensure!(
        !limits.is_empty(),
        "give at least one --limit MODEL:rpm=N,... (or --pool and --chain)"
    );
    let window = limits[0].window;
    let mut models = BTreeMap::new();
    let mut steps = Vec::new();
    for l in limits {
        anyhow::ensure!(
            l.window == window,
            "every --limit needs the same window (one pool has one window length)"
        );
        models.insert(
            l.model.clone(),
            ModelLimits {
                rpm: l.rpm,
                tpm: l.tpm,
                ipm: l.ipm,
                rpd: l.rpd,
                window_ms: window.as_millis() as u64,
            },
        );
        steps.push(CompiledStep {
            model: l.model.clone(),
            max_wait_ms: max_wait.as_millis() as u64,
            aspect_ratio: None,
            image_size: None,
        });
    }
    let name = format!("loadtest/{run}");
    let pool = CompiledPool {
        name: name.clone(),
        generation: 0,
        provider: ProviderKind::Gemini,
        project: run.to_owned(),
        models,
        spend_micros_per_10_minutes: limits.iter().find_map(|l| l.spend),
        headroom_percent: headroom,
        alert_threshold_percent: 80,
        failure_mode: FailureMode::Closed,
        expected_replicas: 1,
        api_key_ref: None,
        window_margin_ms: margin_ms,
        base_url: None,
    };
    let chain = CompiledChain {
        name: name.clone(),
        generation: 0,
        pool: name.clone(),
        steps,
        retry: RetryConfig::default(),
        request_timeout_ms: 120_000,
        priority: 0,
        deadline_ms: None,
    };
    Ok(CompiledConfig {
        version: 1,
        pools: [(name.clone(), pool)].into(),
        chains: [(name, chain)].into(),
    })
}

fn binding_of(
    config: &CompiledConfig,
    chain: &str,
) -> anyhow::Result<(String, &'static str, u64, f64)> {
    let (chain, pool) = config.chain(chain)?;
    let step = chain.steps.first().context("the chain has no steps")?;
    let limits = pool
        .models
        .get(&step.model)
        .context("the chain's first model is not in its pool")?;
    let (dim, limit) = [("rpm", limits.rpm), ("ipm", limits.ipm)]
        .into_iter()
        .filter_map(|(d, l)| l.map(|l| (d, l)))
        .min_by_key(|(_, l)| *l)
        .context("the chain's first model has neither rpm nor ipm: nothing to measure against")?;
    Ok((
        step.model.clone(),
        dim,
        limit,
        limits.window_ms as f64 / 1000.0,
    ))
}

fn plan(args: &LoadtestArgs, run: &str) -> anyhow::Result<Plan> {
    let max_wait = Duration::from_secs(args.max_wait_seconds);
    let (config, chain) = match (&args.pool, &args.chain) {
        (Some(pool), Some(chain)) => {
            let mut yaml = std::fs::read_to_string(pool)
                .with_context(|| format!("reading --pool {}", pool.display()))?;
            yaml.push_str("\n---\n");
            yaml.push_str(
                &std::fs::read_to_string(chain)
                    .with_context(|| format!("reading --chain {}", chain.display()))?,
            );
            let config = crate::runtime::config_from_yaml(&yaml)?;
            let name = config
                .chains
                .keys()
                .next()
                .cloned()
                .context("--chain holds no ModelChain")?;
            (config, name)
        }
        _ => {
            let config =
                plan_from_limits(&args.limits, run, args.headroom, max_wait, args.margin_ms)?;
            let name = format!("loadtest/{run}");
            (config, name)
        }
    };
    let binding = binding_of(&config, &chain)?;
    // The simulator enforces the pool's limits as declared (no headroom).
    let sim_limits = if args.limits.is_empty() {
        let (_, pool) = config.chain(&chain)?;
        pool.models
            .iter()
            .map(|(model, l)| {
                let mut spec = LimitSpec::new(model);
                (spec.rpm, spec.tpm, spec.ipm, spec.rpd) = (l.rpm, l.tpm, l.ipm, l.rpd);
                spec.window = Duration::from_millis(l.window_ms);
                spec
            })
            .collect()
    } else {
        args.limits.clone()
    };
    Ok(Plan {
        config,
        chain,
        sim_limits,
        binding,
    })
}

/// Where a replica's shared state lives.
#[derive(Clone)]
enum Backend {
    Memory {
        config: watch::Receiver<Arc<CompiledConfig>>,
        limiters: Arc<Limiters>,
        records: Records,
    },
    Redis {
        url: String,
    },
}

async fn redis_records(url: &str) -> anyhow::Result<Records> {
    let conn = redis::aio::ConnectionManager::new(redis::Client::open(url)?)
        .await
        .context("connecting the result store to Redis")?;
    Ok(Records::Redis(conn))
}

async fn gemini(base_url: &str, key: Option<&str>) -> anyhow::Result<Arc<dyn ImageProvider>> {
    let key = ApiKey::new(key.unwrap_or("pacer-local"));
    Ok(Arc::new(GeminiClient::new(
        GeminiConfig::new(key).base_url(base_url.trim_end_matches('/')),
    )?))
}

/// One replica: its handler, with its own connections.
async fn replica(
    index: usize,
    backend: &Backend,
    base_url: &str,
    api_key: Option<&str>,
    sink: Arc<dyn Sink>,
    log: CallLog,
) -> anyhow::Result<Arc<Handler>> {
    let provider = Arc::new(Recorded {
        inner: gemini(base_url, api_key).await?,
        replica: index,
        log,
    });
    let (config, limiters, records) = match backend {
        Backend::Memory {
            config,
            limiters,
            records,
        } => (config.clone(), limiters.clone(), records.clone()),
        Backend::Redis { url } => {
            let store = ConfigStore::connect(url)
                .await
                .context("connecting to Redis")?;
            let config = store.watch(Duration::from_millis(500)).await?;
            let limiter = RedisLimiter::connect(url, Default::default()).await?;
            (
                config,
                Arc::new(Limiters::shared(limiter)),
                redis_records(url).await?,
            )
        }
    };
    Ok(Arc::new(Handler::new(
        config,
        limiters,
        Providers {
            gemini: Some(provider),
            openai: None,
        },
        sink,
        records,
        Arc::new(Metrics::default()),
        format!("replica-{index}-{}", std::process::id()),
        HandlerOptions::default(),
    )))
}

async fn sqs_queue(url: &str, aws: Option<&aws_config::SdkConfig>) -> Arc<dyn Queue> {
    let conf = match aws {
        Some(c) => c.clone(),
        None => aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await,
    };
    Arc::new(SqsQueue::new(aws_sdk_sqs::Client::new(&conf), url))
}

fn worker_options(concurrency: usize) -> WorkerOptions {
    WorkerOptions {
        concurrency,
        visibility: Duration::from_secs(60),
        wait_time: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(5),
    }
}

/// The naive processor: one local limiter per replica at the full limit, the provider's
/// answers handled with exponential backoff and full jitter (RetryInfo ignored, as
/// generic clients do), back to the queue after the attempts run out.
struct Naive {
    limiter: MemoryLimiter,
    config: Arc<CompiledConfig>,
    provider: Arc<dyn ImageProvider>,
    sink: Arc<dyn Sink>,
    records: Records,
}

const NAIVE_ATTEMPTS: u32 = 6;

#[async_trait]
impl Process for Naive {
    async fn process(&self, body: &str, _receive_count: u32) -> Outcome {
        let Ok(req) = GenerationRequest::parse(body) else {
            return Outcome::Failed(ResultRecord::failed("", 0, "malformed"));
        };
        if let Ok(Some(done)) = self.records.get(&req.id).await {
            return Outcome::AlreadyDone(done);
        }
        let Ok((chain, pool)) = self.config.chain(&req.chain_name()) else {
            return Outcome::Failed(ResultRecord::failed(&req.id, 0, "unknown chain"));
        };
        let Some(step) = chain.steps.first() else {
            return Outcome::Failed(ResultRecord::failed(&req.id, 0, "empty chain"));
        };
        let Some(quota) = pool.model_quota(&step.model) else {
            return Outcome::Failed(ResultRecord::failed(&req.id, 0, "unknown model"));
        };
        let key = pool.key(&step.model);
        let retry = RetryConfig {
            attempts: NAIVE_ATTEMPTS,
            base_delay_ms: 1_000,
            max_delay_ms: 32_000,
        };
        let image_req = ImageRequest::new(&req.prompt);
        for attempt in 1..=NAIVE_ATTEMPTS {
            let booking = format!("{}:{attempt}:{}", req.id, rand::random::<u32>());
            let costs = estimate_costs(&step.model, &req.prompt, req.image_size.as_deref());
            match self
                .limiter
                .acquire(&key, &quota, &booking, costs, Duration::from_secs(3600))
                .await
            {
                Ok(Decision::Admitted { .. }) => {}
                Ok(Decision::Booked { wait, .. }) => tokio::time::sleep(wait).await,
                Ok(Decision::Rejected { retry_after, .. }) => {
                    tokio::time::sleep(retry_after.unwrap_or(Duration::from_secs(1))).await;
                    continue;
                }
                Err(_) => {
                    return Outcome::Defer {
                        after: Duration::from_secs(1),
                        reason: DeferReason::Infrastructure,
                    };
                }
            }
            match self.provider.generate(&step.model, &image_req).await {
                Ok(resp) => {
                    let Some(image) = resp.images.into_iter().next() else {
                        return Outcome::Failed(ResultRecord::failed(&req.id, attempt, "no image"));
                    };
                    let location = match self
                        .sink
                        .put(&req.output_key(0), &image.data, &image.mime_type)
                        .await
                    {
                        Ok(l) => l,
                        Err(_) => {
                            return Outcome::Defer {
                                after: Duration::from_secs(1),
                                reason: DeferReason::Infrastructure,
                            };
                        }
                    };
                    let mut record = ResultRecord::failed(&req.id, attempt, "");
                    record.status = Status::Succeeded;
                    record.error = None;
                    record.model = Some(step.model.clone());
                    record.images = vec![location];
                    let _ = self.records.put(&record).await;
                    return Outcome::Succeeded(record);
                }
                Err(
                    e @ (ProviderError::RateLimited { .. }
                    | ProviderError::RateLimitedBare { .. }
                    | ProviderError::Overloaded { .. }
                    | ProviderError::ServerError { .. }
                    | ProviderError::Timeout { .. }
                    | ProviderError::Transport { .. }),
                ) => {
                    tracing::debug!(error = %e, attempt, "naive: backing off");
                    tokio::time::sleep(backoff(&retry, attempt)).await;
                }
                Err(e) => {
                    let record = ResultRecord::failed(&req.id, attempt, e.to_string());
                    let _ = self.records.put(&record).await;
                    return Outcome::Failed(record);
                }
            }
        }
        Outcome::Defer {
            after: Duration::from_secs(1),
            reason: DeferReason::RateLimited,
        }
    }
}

/// Progress of a run, for `pacer demo`'s progress line.
pub type Progress = Arc<dyn Fn(usize, usize) + Send + Sync>;

/// Runs the load test (and the baseline when asked) and writes the plots.
pub async fn execute(
    args: &LoadtestArgs,
    aws: Option<aws_config::SdkConfig>,
    progress: Option<Progress>,
) -> anyhow::Result<Report> {
    let run = format!(
        "lt-{}-{:06x}",
        jiff::Timestamp::now().as_second(),
        rand::random::<u32>() & 0xff_ffff
    );
    let plan = plan(args, &run)?;
    let mut report = run_once(args, &plan, &run, false, aws.as_ref(), progress.clone()).await?;
    if args.baseline {
        let naive = run_once(args, &plan, &format!("{run}-naive"), true, None, progress).await?;
        report.baseline = Some(Box::new(naive));
    }
    Ok(report)
}

fn plot_path(args: &LoadtestArgs, naive: bool) -> PathBuf {
    if !naive {
        return args.plot.clone();
    }
    let stem = args
        .plot
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pacer-loadtest".into());
    args.plot.with_file_name(format!("{stem}-naive.png"))
}

#[allow(clippy::too_many_lines)]
async fn run_once(
    args: &LoadtestArgs,
    plan: &Plan,
    run: &str,
    naive: bool,
    aws: Option<&aws_config::SdkConfig>,
    progress: Option<Progress>,
) -> anyhow::Result<Report> {
    // The provider.
    let sim = match (&args.gemini_base_url, naive) {
        (Some(_), false) => None,
        _ => Some(
            Simulator::new(SimConfig {
                limits: plan.sim_limits.clone(),
                latency: Duration::from_millis(args.latency_ms),
                latency_jitter: Duration::from_millis(args.latency_jitter_ms),
                faults: Faults {
                    ghost_429: args.ghost_429,
                    overload: args.overload,
                    ..Faults::default()
                },
                ..SimConfig::default()
            })
            .spawn()
            .await?,
        ),
    };
    let base_url = match (&sim, &args.gemini_base_url) {
        (Some(s), _) => s.url(),
        (None, Some(u)) => u.clone(),
        (None, None) => unreachable!("a simulator runs when no base URL is given"),
    };
    let images = match &args.out {
        Some(o) if naive => format!("{}-naive", o.trim_end_matches('/')),
        Some(o) => o.clone(),
        None => std::env::temp_dir()
            .join(format!("pacer-{run}"))
            .display()
            .to_string(),
    };
    let sink: Arc<dyn Sink> = Arc::from(
        sink::from_url(&images)
            .await
            .map_err(|e| anyhow::anyhow!("--out: {e}"))?,
    );
    // The config where replicas find it.
    let (backend, queue_kind, limiter_kind) = match (&args.redis_url, naive) {
        (Some(url), false) => {
            let store = ConfigStore::connect(url)
                .await
                .context("connecting to Redis")?;
            for pool in plan.config.pools.values() {
                store.put_pool(pool).await?;
            }
            for chain in plan.config.chains.values() {
                store.put_chain(chain).await?;
            }
            (Backend::Redis { url: url.clone() }, "", "redis")
        }
        _ => {
            let (tx, rx) = watch::channel(Arc::new(plan.config.clone()));
            std::mem::forget(tx);
            (
                Backend::Memory {
                    config: rx,
                    limiters: Arc::new(Limiters::memory()),
                    records: Records::memory(),
                },
                "",
                if naive { "local per replica" } else { "memory" },
            )
        }
    };
    let _ = queue_kind;
    let use_sqs = args.queue_url.is_some() && !naive;
    let queue: Arc<dyn Queue> = match (&args.queue_url, use_sqs) {
        (Some(url), true) => sqs_queue(url, aws).await,
        _ => Arc::new(MemoryQueue::new()),
    };
    let records = match &backend {
        Backend::Memory { records, .. } => records.clone(),
        Backend::Redis { url } => redis_records(url).await?,
    };
    let log: CallLog = Arc::default();
    let deferred = Arc::new(AtomicU64::new(0));
    let shutdown = CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    let mut children = Vec::new();
    if args.processes && !naive {
        let (Some(redis), Some(queue_url)) = (&args.redis_url, &args.queue_url) else {
            anyhow::bail!(
                "--processes needs --redis-url and --queue-url (replicas share only those)"
            );
        };
        let exe = std::env::current_exe().context("finding this executable")?;
        for i in 0..args.replicas {
            let child = tokio::process::Command::new(&exe)
                .args(["loadtest", "--child", &i.to_string()])
                .args(["--child-chain", &plan.chain])
                .args(["--redis-url", redis, "--queue-url", queue_url])
                .args(["--gemini-base-url", &base_url, "--out", &images])
                .args(["--concurrency", &args.concurrency.to_string()])
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("starting a replica process")?;
            children.push(child);
        }
    } else {
        for i in 0..args.replicas {
            let processor: Arc<dyn Process> = if naive {
                let provider = Arc::new(Recorded {
                    inner: gemini(&base_url, args.gemini_api_key.as_deref()).await?,
                    replica: i,
                    log: log.clone(),
                });
                Arc::new(Naive {
                    limiter: MemoryLimiter::new(Arc::new(SystemClock)),
                    config: Arc::new(plan.config.clone()),
                    provider,
                    sink: sink.clone(),
                    records: records.clone(),
                })
            } else {
                replica(
                    i,
                    &backend,
                    &base_url,
                    args.gemini_api_key.as_deref(),
                    sink.clone(),
                    log.clone(),
                )
                .await?
            };
            let processor = Arc::new(Counting {
                inner: processor,
                deferred: deferred.clone(),
            });
            let queue = match (&args.queue_url, use_sqs) {
                (Some(url), true) => sqs_queue(url, aws).await,
                _ => queue.clone(),
            };
            workers.spawn(worker::run(
                queue,
                worker_options(args.concurrency),
                processor,
                Arc::new(Metrics::default()),
                shutdown.clone(),
            ));
        }
    }

    // Send at the demanded pace.
    let (model, _, limit, window_s) = plan.binding.clone();
    let started = now_ms();
    let pace = (args.demand > 0.0)
        .then(|| Duration::from_secs_f64(window_s / (limit as f64 * args.demand)));
    let ids: Vec<String> = (0..args.requests)
        .map(|i| format!("{run}-{i:05}"))
        .collect();
    let sent_at: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let sender = {
        let (queue, ids, sent_at, chain) = (
            queue.clone(),
            ids.clone(),
            sent_at.clone(),
            plan.chain.clone(),
        );
        tokio::spawn(async move {
            let t0 = tokio::time::Instant::now();
            for (n, id) in ids.iter().enumerate() {
                if let Some(p) = pace {
                    tokio::time::sleep_until(t0 + p * n as u32).await;
                }
                let body = serde_json::json!({
                    "id": id,
                    "chain": chain,
                    "prompt": format!("{id} {}", PROMPTS[n % PROMPTS.len()]),
                    "aspectRatio": "1:1",
                });
                lock(&sent_at).insert(id.clone(), now_ms());
                let mut tries = 0;
                while let Err(e) = queue.send(&body.to_string()).await {
                    tries += 1;
                    anyhow::ensure!(tries < 10, "sending {id}: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            anyhow::Ok(())
        })
    };

    // Wait for every request to end.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_seconds);
    let mut done: HashMap<String, ResultRecord> = HashMap::new();
    let mut finished_ms: HashMap<String, i64> = HashMap::new();
    while done.len() < ids.len() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        for id in &ids {
            if done.contains_key(id) {
                continue;
            }
            if let Ok(Some(r)) = records.get(id).await {
                let at = r
                    .finished_at
                    .parse::<jiff::Timestamp>()
                    .map(|t| t.as_millisecond())
                    .unwrap_or_else(|_| now_ms());
                finished_ms.insert(id.clone(), at);
                done.insert(id.clone(), r);
            }
        }
        if let Some(p) = &progress {
            p(done.len(), ids.len());
        }
    }
    let completion_s = finished_ms
        .values()
        .max()
        .map_or(0.0, |m| (m - started) as f64 / 1000.0);
    sender.abort();
    shutdown.cancel();
    while let Some(r) = workers.join_next().await {
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "a replica stopped with an error");
        }
    }
    for mut child in children {
        drop(child.stdin.take());
        let out = tokio::time::timeout(Duration::from_secs(30), async {
            let mut buf = String::new();
            if let Some(mut stdout) = child.stdout.take() {
                tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut buf).await?;
            }
            child.wait().await?;
            anyhow::Ok(buf)
        })
        .await;
        match out {
            Ok(Ok(buf)) => {
                let line = buf.lines().last().unwrap_or_default();
                match serde_json::from_str::<ChildReport>(line) {
                    Ok(r) => {
                        lock(&log).extend(r.calls);
                        deferred.fetch_add(r.deferred, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(error = %e, "a replica process reported nothing"),
                }
            }
            _ => tracing::warn!("a replica process did not stop in time"),
        }
    }

    // Tally.
    let calls = std::mem::take(&mut *lock(&log));
    let mut report = Report {
        mode: if naive { "naive" } else { "pacer" }.into(),
        replicas: args.replicas,
        processes: args.processes && !naive,
        queue: if use_sqs { "sqs" } else { "memory" }.into(),
        limiter: limiter_kind.into(),
        requests: ids.len(),
        deferred: deferred.load(Ordering::Relaxed),
        provider_calls: calls.len(),
        binding: format!("{model} {}", plan.binding.1),
        limit,
        window_s,
        completion_s,
        images: images.clone(),
        plot: plot_path(args, naive).display().to_string(),
        ..Report::default()
    };
    let mut ok_per_request: HashMap<&str, usize> = HashMap::new();
    for c in &calls {
        *report.calls_by_result.entry(c.result.clone()).or_default() += 1;
        if c.result == "ok" {
            *ok_per_request.entry(&c.request).or_default() += 1;
        }
        if c.result.starts_with("rate_limited") {
            report.upstream_429 += 1;
            if c.result == "rate_limited_bare" {
                report.upstream_429_bare += 1;
            }
        }
    }
    report.duplicates = ok_per_request.values().map(|n| n.saturating_sub(1)).sum();
    let mut latencies = Vec::new();
    for id in &ids {
        match done.get(id) {
            Some(r) if r.status == Status::Succeeded => {
                let stored = match r.images.first() {
                    Some(_) => matches!(sink.existing(&format!("{id}.png")).await, Ok(Some(_))),
                    None => false,
                };
                if stored {
                    report.succeeded += 1;
                } else {
                    report.lost += 1;
                }
            }
            Some(r) => {
                report.failed += 1;
                let reason = r.error.clone().unwrap_or_default();
                let kind = reason.split(" (").next().unwrap_or_default().to_owned();
                *report.failures.entry(kind).or_default() += 1;
            }
            None => report.lost += 1,
        }
        if let (Some(s), Some(f)) = (lock(&sent_at).get(id), finished_ms.get(id)) {
            latencies.push((f - s).max(0) as f64 / 1000.0);
        }
    }
    latencies.sort_by(f64::total_cmp);
    report.latency_p50_s = percentile(&latencies, 0.50);
    report.latency_p99_s = percentile(&latencies, 0.99);
    let mut took: Vec<f64> = calls.iter().map(|c| c.took_ms as f64).collect();
    took.sort_by(f64::total_cmp);
    report.call_p50_ms = percentile(&took, 0.50);
    report.call_p99_ms = percentile(&took, 0.99);

    // Against the binding limit, counted at the provider.
    let accepted: Vec<&Call> = calls
        .iter()
        .filter(|c| c.model == model && c.result == "ok")
        .collect();
    let mut starts: Vec<i64> = accepted.iter().map(|c| c.start_ms).collect();
    starts.sort_unstable();
    report.max_in_any_window = max_in_window(&starts, (window_s * 1000.0) as i64);
    if let Some(sim) = &sim {
        let stats = sim.stats();
        if let Some(m) = stats["models"][&model]["max_in_any_window"][plan.binding.1].as_u64() {
            report.max_in_any_window = m;
        }
        if let Some(faults) = stats["models"][&model]["faults"].as_object() {
            for (k, v) in faults {
                report
                    .injected
                    .insert(k.clone(), v.as_u64().unwrap_or_default());
            }
        }
    }
    if let (Some(first), Some(last)) = (starts.first(), starts.last()) {
        let windows = 1.0 + (last - first) as f64 / 1000.0 / window_s;
        report.utilization_whole_run = starts.len() as f64 / (limit as f64 * windows);
        report.utilization = steady_utilization(&starts, (window_s * 1000.0) as i64, limit)
            .unwrap_or(report.utilization_whole_run);
    }

    // The picture.
    let secs = |ms: i64| (ms - started) as f64 / 1000.0;
    let plot = plot::Plot {
        title: &format!(
            "{}: {} replicas, {} requests, limit {limit} per {window_s} s",
            if naive {
                "Naive baseline (local limiter + backoff)"
            } else {
                "Pacer"
            },
            args.replicas,
            ids.len()
        ),
        replicas: (0..args.replicas)
            .map(|r| plot::Series {
                name: format!("replica {r}"),
                arrivals: accepted
                    .iter()
                    .filter(|c| c.replica == r)
                    .map(|c| secs(c.start_ms))
                    .collect(),
            })
            .collect(),
        sent: Some(plot::Series {
            name: "sent".into(),
            arrivals: calls
                .iter()
                .filter(|c| c.model == model)
                .map(|c| secs(c.start_ms))
                .collect(),
        }),
        limit,
        window_s,
    };
    if let Err(e) = plot::draw(&plot, &plot_path(args, naive)) {
        tracing::warn!(error = %e, "drawing the plot failed");
    }

    // Leave the shared Redis as we found it.
    if let (Some(url), false) = (&args.redis_url, naive)
        && let Ok(store) = ConfigStore::connect(url).await
    {
        for name in plan.config.chains.keys() {
            let _ = store.remove_chain(name).await;
        }
        for name in plan.config.pools.keys() {
            let _ = store.remove_pool(name).await;
        }
    }
    Ok(report)
}

/// What a replica process hands back on stdout when its stdin closes.
#[derive(Serialize, Deserialize)]
struct ChildReport {
    calls: Vec<Call>,
    deferred: u64,
}

/// A replica process: serves the queue until stdin closes, then reports its calls.
async fn child(args: &LoadtestArgs, index: usize) -> anyhow::Result<()> {
    let (Some(redis), Some(queue_url), Some(base_url), Some(out)) = (
        &args.redis_url,
        &args.queue_url,
        &args.gemini_base_url,
        &args.out,
    ) else {
        anyhow::bail!("a replica process needs --redis-url, --queue-url, --gemini-base-url, --out");
    };
    let sink: Arc<dyn Sink> = Arc::from(
        sink::from_url(out)
            .await
            .map_err(|e| anyhow::anyhow!("--out: {e}"))?,
    );
    let log: CallLog = Arc::default();
    let backend = Backend::Redis { url: redis.clone() };
    let handler = replica(
        index,
        &backend,
        base_url,
        args.gemini_api_key.as_deref(),
        sink,
        log.clone(),
    )
    .await?;
    let deferred = Arc::new(AtomicU64::new(0));
    let processor = Arc::new(Counting {
        inner: handler,
        deferred: deferred.clone(),
    });
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(_)) = lines.next_line().await {}
            shutdown.cancel();
        });
    }
    let _ = &args.child_chain;
    worker::run(
        sqs_queue(queue_url, None).await,
        worker_options(args.concurrency),
        processor,
        Arc::new(Metrics::default()),
        shutdown,
    )
    .await?;
    let report = ChildReport {
        calls: std::mem::take(&mut *lock(&log)),
        deferred: deferred.load(Ordering::Relaxed),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The most events in any window of `window_ms` (sorted input).
fn max_in_window(sorted: &[i64], window_ms: i64) -> u64 {
    let (mut lo, mut best) = (0usize, 0usize);
    for hi in 0..sorted.len() {
        while sorted[hi] - sorted[lo] >= window_ms {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best as u64
}

/// Prompts for generated requests.
pub const PROMPTS: &[&str] = &[
    "a lighthouse at dawn, watercolor",
    "a red fox in fresh snow, photograph",
    "an isometric city block at night",
    "a bowl of ramen, studio lighting",
    "a paper boat on a rainy street",
    "a hot air balloon over lavender fields",
    "a robot watering plants, children's book style",
    "a mountain cabin under the northern lights",
];

/// Prints the human summary of a report (and its baseline, side by side).
pub fn print_table(r: &Report) {
    let rows: Vec<&Report> = std::iter::once(r).chain(r.baseline.as_deref()).collect();
    println!(
        "{:<7} {:>8} {:>9} {:>7} {:>9} {:>5} {:>5} {:>6} {:>11} {:>7} {:>11} {:>8} {:>8}",
        "MODE",
        "REQUESTS",
        "SUCCEEDED",
        "FAILED",
        "DEFERRED",
        "LOST",
        "DUPS",
        "429S",
        "MAX/WINDOW",
        "UTIL",
        "COMPLETION",
        "P50",
        "P99"
    );
    for r in rows {
        println!(
            "{:<7} {:>8} {:>9} {:>7} {:>9} {:>5} {:>5} {:>6} {:>11} {:>6.1}% {:>10.1}s {:>7.1}s {:>7.1}s",
            r.mode,
            r.requests,
            r.succeeded,
            r.failed,
            r.deferred,
            r.lost,
            r.duplicates,
            r.upstream_429,
            format!("{}/{}", r.max_in_any_window, r.limit),
            r.utilization * 100.0,
            r.completion_s,
            r.latency_p50_s,
            r.latency_p99_s
        );
    }
    println!(
        "binding limit: {} ({} per {} s); images: {}; plot: {}",
        r.binding, r.limit, r.window_s, r.images, r.plot
    );
    if let Some(b) = &r.baseline {
        println!("baseline plot: {}", b.plot);
    }
}

pub async fn run(mut args: LoadtestArgs) -> anyhow::Result<()> {
    if let Some(index) = args.child {
        return child(&args, index).await;
    }
    if args.limits.is_empty() && args.pool.is_none() {
        args.limits = vec![DEFAULT_LIMIT.parse()?];
    }
    let report = execute(&args, None, None).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// The limit when none is given: a Tier 1 flash-image-like project on 10 s windows.
pub const DEFAULT_LIMIT: &str = "gemini-3.1-flash-image:rpm=100,ipm=100,window=10";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_count_at_most_what_fits() {
        assert_eq!(max_in_window(&[0, 10, 20, 1000, 1005], 1000), 4);
        assert_eq!(max_in_window(&[0, 10, 1010, 1020], 1000), 2);
        assert_eq!(max_in_window(&[], 1000), 0);
    }

    #[tokio::test]
    async fn in_memory_fleet_stays_under_the_limit_and_loses_nothing() {
        let args = LoadtestArgs {
            replicas: 4,
            requests: 40,
            demand: 0.0,
            limits: vec!["m-test:rpm=20,window=2".parse().expect("limit")],
            latency_ms: 10,
            latency_jitter_ms: 20,
            plot: std::env::temp_dir().join(format!("pacer-lt-test-{}.png", std::process::id())),
            ..LoadtestArgs::default()
        };
        let r = execute(&args, None, None).await.expect("runs");
        assert_eq!(
            (r.succeeded, r.lost, r.duplicates, r.upstream_429),
            (40, 0, 0, 0)
        );
        assert!(r.max_in_any_window <= 20, "{r:?}");
        assert!(r.utilization > 0.8, "{r:?}");
        let _ = std::fs::remove_file(&args.plot);
        let _ = std::fs::remove_dir_all(&r.images);
    }
}
