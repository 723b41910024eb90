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
//!
//! The verdict comes from the provider, not from the fleet: the simulator counts every
//! arrival on its own clock ([`judge`]), the report carries its figures (upstream 429s,
//! most arrivals in any window, calls without a limiter entry) next to the fleet's own, and
//! a run whose own log disagrees with the simulator fails. `--fault` ([`fault`]) injects
//! Redis restarts, sink failures, killed replicas and provider errors into a run.
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
    limiter::{Decision, Limiter, SystemClock, memory::MemoryLimiter},
    provider::{ApiKey, ImageProvider, ImageRequest, ImageResponse, ProviderError},
};
use pacer_simulator::{Faults, KeySpec, LimitSpec, SimConfig, Simulator};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt as _;
use tokio_util::sync::CancellationToken;

use crate::plot;

mod calls;
mod child;
pub mod fault;
pub mod judge;
mod naive;
pub mod tenants;

use calls::{CUT_OFF, CallLog, Counting, KILLED, Recorded, lock, now_ms};
use child::{ChildLine, ChildProc, aws_env, child, read_child};
use fault::{FailingSink, Fault};
use naive::Naive;
use pacer_core::measure::{max_count_in_window, percentile};
use pacer_function::{
    handler::{Handler, HandlerOptions, PoolClients, Providers, backoff, estimate_costs},
    message::GenerationRequest,
    metrics::Metrics,
    outcome::{Attempt, DeferReason, Outcome, Process},
    queue::{MemoryQueue, Queue, SqsQueue},
    record::{Records, ResultRecord, Status},
    runtime::{self, SharedState},
    sink::{self, Sink, Stored},
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
    // Redis (absent: one in-memory limiter shared by in-process replicas), an empty SQS
    // queue (absent: in memory), the provider (absent: an in-process simulator enforcing
    // --limit).
    #[command(flatten)]
    pub conn: crate::connect::Connections,
    /// QuotaPool YAML (with --chain) instead of --limit.
    #[arg(env = "PACER_LOADTEST_POOL", long, requires = "chain")]
    pub pool: Option<PathBuf>,
    /// ModelChain YAML. Requests go round-robin to every chain it holds (the first one's
    /// first model is the binding limit of the summary); pools with `spec.apiKeyEnv` call
    /// with a key of their own (the variable's value, or a made-up key when it is unset),
    /// the simulator keeps each pool's project apart by its key, and the report says per
    /// project what the simulator counted (`projects`).
    #[arg(env = "PACER_LOADTEST_CHAIN", long, requires = "pool")]
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
    #[arg(env = "PACER_LOADTEST_GHOST_429", long, default_value_t = 0.0)]
    pub ghost_429: f64,
    /// Simulated 503 overloads, probability per request.
    #[arg(env = "PACER_LOADTEST_OVERLOAD", long, default_value_t = 0.0)]
    pub overload: f64,
    /// Simulated base latency and uniform jitter, in ms.
    #[arg(env = "PACER_LOADTEST_LATENCY_MS", long, default_value_t = 300)]
    pub latency_ms: u64,
    #[arg(env = "PACER_LOADTEST_LATENCY_JITTER_MS", long, default_value_t = 500)]
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
    /// A fault to inject (repeatable, or comma-separated):
    /// `redis-restart@SECS` FLUSHALL on --redis-url at SECS into the run (limiter state,
    /// config and records gone), then the run's config written again as `pacer apply` does;
    /// `sink-fail=N` the first N image writes fail (split across --processes children);
    /// `kill-replica@SECS` one replica dies at SECS (--processes: SIGKILL of a child;
    /// otherwise its worker task is aborted, in-flight calls cut off);
    /// `limit@SECS=N` at SECS the binding limit becomes N, written to --redis-url as
    /// `pacer apply` writes it (the run fails if a window starting 2 s later holds more
    /// than N arrivals at the simulator);
    /// `503=P` the simulator answers a fraction P of calls 503 overloaded; `500=P` 500;
    /// `504=P` 504; `429=P` bare ghost 429s under quota; `reset=P` the connection breaks
    /// after the call was counted; `slow=P:MS` a fraction P of answers MS ms late;
    /// `503-burst=EVERY:LENGTH` 503 for LENGTH s every EVERY s.
    #[arg(long = "fault", env = "PACER_LOADTEST_FAULTS", value_delimiter = ',')]
    pub faults: Vec<Fault>,
    /// How long a received message stays invisible, in s: a killed replica's messages
    /// come back after it.
    #[arg(long, env = "PACER_LOADTEST_VISIBILITY", default_value_t = 60)]
    pub visibility_seconds: u64,
    /// Teams sharing the pool, `NAME:weight=N,floor=P,ceiling=P,requests=N,after=SECS,...`
    /// (a token with `:` starts a tenant; settings optional): every pool of the run gets
    /// them as its `spec.tenants`, each tenant sends its `requests` (else an equal part of
    /// --requests) from `after` seconds on, and the report says what each got (`tenants`).
    #[arg(long, env = "PACER_LOADTEST_TENANTS")]
    pub tenants: Option<tenants::Tenants>,
    /// Priority classes, `CLASS=FRACTION,...`: that part of the requests (spread evenly
    /// through the send order) carry that class, the rest class 0; the report says per
    /// class what was accepted and its p99 wait from send to call (`priorities`).
    #[arg(long, env = "PACER_LOADTEST_PRIORITIES")]
    pub priorities: Option<tenants::Priorities>,
    /// Days (and budget months, 30 of them) this many seconds long, from multiples of it
    /// since the Unix epoch, instead of Pacific ones: rehearses per-day quotas and budgets
    /// in minutes (needs --redis-url; not with --processes).
    #[arg(long, env = "PACER_LOADTEST_DAY_SECONDS")]
    pub day_seconds: Option<u64>,
    /// Print one JSON object.
    #[arg(env = "PACER_LOADTEST_JSON", long)]
    pub json: bool,
    /// Internal: run as one replica process of a parent loadtest (its index).
    #[arg(long, hide = true)]
    pub child: Option<usize>,
    /// Internal: the chain a child replica serves.
    #[arg(long, hide = true)]
    pub child_chain: Option<String>,
    /// Internal: image writes a child replica fails first (its share of `sink-fail`).
    #[arg(long, hide = true, default_value_t = 0)]
    pub child_sink_failures: u64,
    /// The `pacer` executable to start replica processes from (default: this one; tests
    /// that drive the engine in process name the built binary).
    #[arg(long, env = "PACER_LOADTEST_EXE", hide = true)]
    pub child_exe: Option<PathBuf>,
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
    /// Deliveries the replicas handled (each one a receive from the queue), per request;
    /// absent with --processes (the children do not report it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receives_per_request: Option<f64>,
    /// Requests with no final record (and no stored image).
    pub lost: usize,
    /// Requests whose image was stored more than once (sink writes per request, beyond one).
    pub duplicates: usize,
    /// Requests the provider generated an image for more than once (the fleet's log): a
    /// regeneration after a failed sink write is one, a replayed delivery another.
    pub regenerated: usize,
    /// Calls the provider answered 429 (quota refusals and ghost 429s), counted by the
    /// simulator; the fleet's own count when the provider is not the in-process simulator.
    pub upstream_429: usize,
    /// 429s as the replicas read them (with quota details or bare).
    pub own_upstream_429: usize,
    /// Of those, bare ("ghost") 429s.
    pub upstream_429_bare: usize,
    /// Faults the simulator injected, by kind.
    pub injected: BTreeMap<String, u64>,
    /// Provider calls the replicas made, in all and by result (`cut_off`: the answer was
    /// never read; `killed`: the replica process died mid-call).
    pub provider_calls: usize,
    pub calls_by_result: BTreeMap<String, usize>,
    /// What the simulator counted (absent with an external provider).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulator: Option<judge::SimFigures>,
    /// The most arrivals the simulator saw in any window of the binding dimension, refused
    /// ones included (absent when the simulator does not count arrivals).
    pub max_arrivals_in_any_window: Option<u64>,
    /// Arrivals whose trailing window held more than the binding limit (from the calls'
    /// times, whose count is checked against the simulator's arrivals); at least 1 when
    /// the simulator saw any dimension over its limit.
    pub over_limit_windows: Option<u64>,
    /// Provider calls without their own limiter entry (no ticket or a ticket used before),
    /// counted by the simulator.
    pub uncounted_calls: Option<u64>,
    /// A `limit@SECS=N` fault's verdict, from the simulator's arrival times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_change: Option<LimitChange>,
    /// Where the fleet's log and the simulator disagree: a run with any fails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disagreements: Vec<String>,
    /// Faults injected by `--fault`, and when the timed ones fired.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<String>,
    /// Image writes failed by `sink-fail`.
    pub sink_failures: u64,
    /// The binding limit: model, dimension, limit per window, window (after a raise by a
    /// `limit@` fault, the new limit: what no window may exceed over the whole run).
    pub binding: String,
    pub limit: u64,
    pub window_s: f64,
    /// The most accepted calls in any window of the binding dimension (the simulator only
    /// accepts under its limit, so this shows use, not safety: see
    /// `max_arrivals_in_any_window`).
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
    /// Per provider project, when pools call with keys of their own: what the simulator
    /// counted for it (requests sent to its pools' chains, calls it accepted, the most
    /// that arrived in any window per `model/dimension` against its limit).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub projects: BTreeMap<String, ProjectFigures>,
    /// Per tenant, with `--tenants`: what it sent and got, its share of the calls accepted
    /// while every tenant had work waiting against the share it should get, its p99 wait.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tenants: BTreeMap<String, tenants::TenantFigures>,
    /// Per priority class, with `--priorities`: requests, accepted calls, and the p99 wait
    /// from send to accepted call.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub priorities: BTreeMap<String, tenants::ClassFigures>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Box<Report>>,
}

/// One provider project's figures, as the simulator counted them.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct ProjectFigures {
    /// Requests sent to the chains of this project's pools.
    pub requests: usize,
    /// Calls the simulator accepted for this project.
    pub accepted: u64,
    /// The most arrivals in any window, refused ones included, per `model/dimension`.
    pub max_arrivals_in_any_window: BTreeMap<String, u64>,
    /// The project's limits, per `model/dimension`.
    pub limits: BTreeMap<String, u64>,
    /// Where arrivals went over a limit, by how much.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub over_limit: BTreeMap<String, u64>,
}

/// Per project, what the simulator counted (`stats["projects"]`), for runs whose pools
/// call with keys of their own; `requests` is how many requests went to each chain.
fn project_figures(
    stats: &serde_json::Value,
    config: &CompiledConfig,
    requests: &BTreeMap<String, usize>,
) -> BTreeMap<String, ProjectFigures> {
    let mut out: BTreeMap<String, ProjectFigures> = BTreeMap::new();
    for (chain, n) in requests {
        if let Ok((_, pool)) = config.chain(chain) {
            out.entry(pool.project.clone()).or_default().requests += n;
        }
    }
    for pool in config.pools.values() {
        let f = out.entry(pool.project.clone()).or_default();
        for model in pool.models.keys() {
            let m = &stats["projects"][&pool.project][model];
            f.accepted += m["accepted"].as_u64().unwrap_or(0);
            let counts = |v: &serde_json::Value| -> BTreeMap<String, u64> {
                v.as_object()
                    .map(|o| {
                        o.iter()
                            .filter_map(|(k, v)| Some((format!("{model}/{k}"), v.as_u64()?)))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            f.max_arrivals_in_any_window
                .extend(counts(&m["max_arrivals_in_any_window"]));
            f.limits.extend(counts(&m["limits"]));
        }
        let over: BTreeMap<String, u64> = f
            .limits
            .iter()
            .filter_map(|(k, limit)| {
                let n = *f.max_arrivals_in_any_window.get(k)?;
                (n > *limit).then(|| (k.clone(), n - limit))
            })
            .collect();
        f.over_limit = over;
    }
    out
}

/// How the fleet followed a `limit@SECS=N` fault, judged by the simulator's arrival times
/// (refused calls included) in windows of the binding dimension's length.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct LimitChange {
    /// Seconds into the run when the new limit was written.
    pub at_s: f64,
    pub from: u64,
    pub to: u64,
    /// Arrivals from the change on.
    pub arrivals_after: u64,
    /// The most arrivals in a window starting at or after the change.
    pub most_from_change: u64,
    /// The most arrivals in a window starting 2 s or more after the change: at most `to`,
    /// or the run fails.
    pub most_from_2s_after: u64,
    /// The first window start, in 0.5 s steps after the change, from which no window holds
    /// more than `to` (`None`: not within 30 s).
    pub obeyed_after_s: Option<f64>,
    /// When `to` arrivals first fell within one window, in seconds after the change.
    pub reached_after_s: Option<f64>,
}

impl LimitChange {
    /// The figures from sorted arrival times (unix ms).
    pub fn judge(times: &[i64], change_ms: i64, window_ms: i64, from: u64, to: u64) -> Self {
        // The most arrivals in a window [t, t + window) over the windows starting at an
        // arrival at or after `start`.
        let most = |start: i64| -> u64 {
            let after = &times[times.partition_point(|t| *t < start)..];
            let mut hi = 0;
            let mut best = 0;
            for lo in 0..after.len() {
                while hi < after.len() && after[hi] < after[lo] + window_ms {
                    hi += 1;
                }
                best = best.max(hi - lo);
            }
            best as u64
        };
        let later = &times[times.partition_point(|t| *t < change_ms)..];
        let need = usize::try_from(to).unwrap_or(usize::MAX).max(1);
        let reached = (need..=later.len())
            .find(|&k| later[k - 1] - later[k - need] < window_ms)
            .map(|k| (later[k - 1] - change_ms) as f64 / 1000.0);
        LimitChange {
            at_s: 0.0,
            from,
            to,
            arrivals_after: later.len() as u64,
            most_from_change: most(change_ms),
            most_from_2s_after: most(change_ms + 2_000),
            obeyed_after_s: (0..=60)
                .map(|k| k * 500)
                .find(|d| most(change_ms + d) <= to)
                .map(|d| d as f64 / 1000.0),
            reached_after_s: reached,
        }
    }
}

/// The limits and chain a run uses.
struct Plan {
    config: CompiledConfig,
    /// The first chain: its first model is the binding limit.
    chain: String,
    /// Every chain, in name order: requests go to them round-robin.
    chains: Vec<String>,
    /// Pools' own keys by variable name (`spec.apiKeyEnv`): with any, the simulator keeps
    /// the pools' projects apart by key.
    pool_keys: BTreeMap<String, String>,
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
                price_micros_per_image: None,
            },
        );
        steps.push(CompiledStep {
            model: l.model.clone(),
            max_wait_ms: max_wait.as_millis() as u64,
            aspect_ratio: None,
            image_size: None,
            service_tier: None,
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
        api_key_env: None,
        window_margin_ms: margin_ms,
        base_url: None,
        vertex: None,
        tenants: Vec::new(),
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
        tenant: None,
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

/// The simulator's limits for `pool`'s models, as declared (no headroom), under `project`
/// (`None`: whichever project calls). The project's spend is counted over ten of the
/// model's windows (the pool's spend window, as the limiter scales it), charged by the
/// simulator from usage.
fn sim_limits_of(pool: &CompiledPool, project: Option<&str>) -> Vec<LimitSpec> {
    pool.models
        .iter()
        .map(|(model, l)| {
            let mut spec = LimitSpec::new(model);
            spec.project = project.map(str::to_owned);
            (spec.rpm, spec.tpm, spec.ipm, spec.rpd) = (l.rpm, l.tpm, l.ipm, l.rpd);
            spec.window = Duration::from_millis(l.window_ms);
            spec.spend = pool.spend_micros_per_10_minutes;
            spec.spend_window = spec.window * 10;
            spec
        })
        .collect()
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
            let config = crate::config::from_yaml(&yaml)?;
            let name = config
                .chains
                .keys()
                .next()
                .cloned()
                .context("--chain holds no ModelChain")?;
            anyhow::ensure!(
                !args.processes
                    || (config.chains.len() == 1
                        && config.pools.values().all(|p| p.api_key_env.is_none())),
                "--processes serves one chain on the replicas' key: give --chain with one \
                 ModelChain and pools without spec.apiKeyEnv"
            );
            (config, name)
        }
        _ => {
            let config =
                plan_from_limits(&args.limits, run, args.headroom, max_wait, args.margin_ms)?;
            let name = format!("loadtest/{run}");
            (config, name)
        }
    };
    let mut config = config;
    if let Some(t) = &args.tenants {
        for pool in config.pools.values_mut() {
            pool.tenants = t.shares();
        }
    }
    let binding = binding_of(&config, &chain)?;
    let chains: Vec<String> = config.chains.keys().cloned().collect();
    // A pool's own key: the variable's value, else one made up for the run.
    let pool_keys: BTreeMap<String, String> = config
        .pools
        .values()
        .filter_map(|p| p.api_key_env.as_ref().map(|name| (name, p)))
        .map(|(name, p)| {
            let key = std::env::var(name)
                .ok()
                .filter(|k| !k.trim().is_empty())
                .unwrap_or_else(|| format!("loadtest-key-{}", p.project));
            (name.clone(), key)
        })
        .collect();
    // The simulator enforces the pools' limits as declared (no headroom): with pools' own
    // keys, every pool's under its project; else the first chain's pool's.
    let sim_limits = if !pool_keys.is_empty() {
        config
            .pools
            .values()
            .flat_map(|pool| sim_limits_of(pool, Some(&pool.project)))
            .collect()
    } else if args.limits.is_empty() {
        let (_, pool) = config.chain(&chain)?;
        sim_limits_of(pool, None)
    } else {
        args.limits.clone()
    };
    Ok(Plan {
        config,
        chain,
        chains,
        pool_keys,
        sim_limits,
        binding,
    })
}

/// Where a replica's shared state lives: one state shared by every in-process replica, or
/// Redis, to which each replica opens its own connections as separate processes would.
#[derive(Clone)]
enum Backend {
    Shared(SharedState),
    Redis {
        url: String,
        day_seconds: Option<u64>,
    },
}

impl Backend {
    async fn state(&self) -> anyhow::Result<SharedState> {
        Ok(match self {
            Backend::Shared(state) => state.clone(),
            Backend::Redis { url, day_seconds } => {
                SharedState::redis_with_days(
                    url,
                    Duration::from_millis(500),
                    Duration::from_millis(500),
                    *day_seconds,
                    None,
                )
                .await?
            }
        })
    }
}

fn gemini(base_url: &str, key: Option<&str>) -> anyhow::Result<Arc<dyn ImageProvider>> {
    Ok(runtime::gemini_provider(base_url, key.map(ApiKey::new))?)
}

/// One replica: its handler, with its own connections.
async fn replica(
    index: usize,
    backend: &Backend,
    base_url: &str,
    api_key: Option<&str>,
    pool_keys: &BTreeMap<String, String>,
    sink: Arc<dyn Sink>,
    log: CallLog,
) -> anyhow::Result<Arc<Handler>> {
    let provider = Arc::new(Recorded {
        inner: gemini(base_url, api_key)?,
        replica: index,
        log: log.clone(),
    });
    // Pools with a key of their own call with it (every pool, whatever its baseUrl, calls
    // the run's provider).
    let per_pool = (!pool_keys.is_empty()).then(|| {
        let (url, default_key) = (base_url.to_owned(), api_key.map(str::to_owned));
        Arc::new(PoolClients::with_keys(
            pool_keys.clone(),
            Box::new(move |_pool, key| {
                let key = key.map(|k| k.expose().to_owned()).or(default_key.clone());
                let inner = gemini(&url, key.as_deref()).map_err(|e| e.to_string())?;
                Ok(Arc::new(Recorded {
                    inner,
                    replica: index,
                    log: log.clone(),
                }) as Arc<dyn ImageProvider>)
            }),
        ))
    });
    let state = backend.state().await?;
    Ok(Arc::new(Handler::new(
        state.config,
        state.limiters,
        Providers {
            gemini: Some(provider),
            openai: None,
            per_pool,
        },
        sink,
        state.records,
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

fn worker_options(concurrency: usize, visibility_seconds: u64) -> WorkerOptions {
    WorkerOptions {
        concurrency,
        visibility: Duration::from_secs(visibility_seconds.max(1)),
        wait_time: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(5),
        ..WorkerOptions::default()
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

/// Writes a run's pools and chains to Redis, as `pacer apply` does.
async fn write_config(url: &str, config: &CompiledConfig) -> anyhow::Result<()> {
    let store = ConfigStore::connect(url)
        .await
        .context("connecting to Redis")?;
    for pool in config.pools.values() {
        store.put_pool(pool).await?;
    }
    for chain in config.chains.values() {
        store.put_chain(chain).await?;
    }
    Ok(())
}

/// `limit@SECS=N`: the run's pool with the binding limit set to N, written to Redis and
/// applied to the limiter as `pacer apply` does.
async fn apply_limit(url: &str, plan: &Plan, to: u64) -> anyhow::Result<()> {
    let (_, pool) = plan.config.chain(&plan.chain)?;
    let mut pool = pool.clone();
    let (model, dim, ..) = &plan.binding;
    let limits = pool
        .models
        .get_mut(model)
        .context("the binding model is not in its pool")?;
    if *dim == "ipm" {
        limits.ipm = Some(to);
    } else {
        limits.rpm = Some(to);
    }
    let store = ConfigStore::connect(url)
        .await
        .context("connecting to Redis")?;
    crate::apply::put_pool(&store, url, &pool).await?;
    Ok(())
}

/// `redis-restart`: everything in the limiter's Redis gone at once, then the config back.
async fn restart_redis(url: &str, config: &CompiledConfig) -> anyhow::Result<()> {
    // On a cluster FLUSHALL goes to every primary.
    let mut conn = pacer_core::connection::RedisConnection::open(url, Default::default())
        .await
        .context("connecting to Redis for redis-restart")?;
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .context("FLUSHALL")?;
    write_config(url, config).await
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
    // Timed faults and sink failures are Pacer's run's; the baseline shares the provider's.
    let mut timed: Vec<(Duration, Fault)> = if naive {
        Vec::new()
    } else {
        args.faults
            .iter()
            .filter_map(|f| match f {
                Fault::RedisRestart { at }
                | Fault::KillReplica { at }
                | Fault::Limit { at, .. } => Some((*at, f.clone())),
                _ => None,
            })
            .collect()
    };
    timed.sort_by_key(|(at, _)| *at);
    if timed
        .iter()
        .any(|(_, f)| matches!(f, Fault::RedisRestart { .. }))
    {
        anyhow::ensure!(
            args.conn.redis_url.is_some(),
            "--fault redis-restart needs --redis-url (the in-memory limiter has no Redis to restart)"
        );
    }
    if args.day_seconds.is_some() && !naive {
        anyhow::ensure!(
            args.conn.redis_url.is_some() && !args.processes,
            "--day-seconds needs --redis-url (the replicas' limiter in Redis keeps the days) and no --processes"
        );
    }
    if timed.iter().any(|(_, f)| matches!(f, Fault::Limit { .. })) {
        anyhow::ensure!(
            args.conn.redis_url.is_some(),
            "--fault limit@SECS=N needs --redis-url (replicas learn a new limit from the config in Redis)"
        );
    }
    // A limit change: the simulator's own limit is the higher of the two all run long (it
    // counts arrivals; the new limit is judged from their times).
    let to_limit = timed.iter().find_map(|(_, f)| match f {
        Fault::Limit { to, .. } => Some(*to),
        _ => None,
    });
    let mut sim_limits = plan.sim_limits.clone();
    if let Some(to) = to_limit {
        for l in sim_limits.iter_mut().filter(|l| l.model == plan.binding.0) {
            let dim = if plan.binding.1 == "ipm" {
                &mut l.ipm
            } else {
                &mut l.rpm
            };
            *dim = dim.map(|v| v.max(to));
        }
    }
    let sink_failures = if naive {
        0
    } else {
        fault::sink_failures(&args.faults)
    };

    // The replicas' own key; with pools' own keys the simulator knows every key, so one is
    // made up when none is given.
    let default_key = match (&args.conn.gemini_api_key, plan.pool_keys.is_empty()) {
        (Some(k), _) => Some(k.clone()),
        (None, true) => None,
        (None, false) => Some("loadtest-default-key".to_owned()),
    };
    // With pools' own keys: one project per pool's project, told apart by key (pools
    // without a key of their own bill the first).
    let (projects, keys) = if plan.pool_keys.is_empty() {
        (SimConfig::default().projects, Vec::new())
    } else {
        let mut pools: Vec<&CompiledPool> = plan.config.pools.values().collect();
        pools.sort_by_key(|p| p.api_key_env.is_some());
        let mut projects: Vec<String> = Vec::new();
        for p in &pools {
            if !projects.contains(&p.project) {
                projects.push(p.project.clone());
            }
        }
        let mut keys: Vec<KeySpec> = default_key
            .iter()
            .map(|k| KeySpec {
                project: None,
                key: k.clone(),
            })
            .collect();
        for p in pools {
            if let Some(key) = p.api_key_env.as_ref().and_then(|n| plan.pool_keys.get(n)) {
                keys.push(KeySpec {
                    project: Some(p.project.clone()),
                    key: key.clone(),
                });
            }
        }
        (projects, keys)
    };
    // The provider.
    let sim = match (&args.conn.gemini_base_url, naive) {
        (Some(_), false) => None,
        _ => Some(
            Simulator::new(SimConfig {
                projects,
                keys,
                limits: sim_limits,
                latency: Duration::from_millis(args.latency_ms),
                latency_jitter: Duration::from_millis(args.latency_jitter_ms),
                faults: fault::simulator_faults(
                    Faults {
                        ghost_429: args.ghost_429,
                        overload: args.overload,
                        ..Faults::default()
                    },
                    &args.faults,
                ),
                ..SimConfig::default()
            })
            .spawn()
            .await?,
        ),
    };
    let base_url = match (&sim, &args.conn.gemini_base_url) {
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
    let store: Arc<dyn Sink> = Arc::from(
        sink::from_url(&images)
            .await
            .map_err(|e| anyhow::anyhow!("--out: {e}"))?,
    );
    let processes = args.processes && !naive;
    // In process, one sink for all replicas fails the first writes and counts the rest;
    // replica processes each fail their share and report their counts.
    let counted = Arc::new(FailingSink::new(
        store.clone(),
        if processes { 0 } else { sink_failures },
    ));
    let sink: Arc<dyn Sink> = counted.clone();
    // The config where replicas find it.
    let (backend, limiter_kind) = match (&args.conn.redis_url, naive) {
        (Some(url), false) => {
            write_config(url, &plan.config).await?;
            (
                Backend::Redis {
                    url: url.clone(),
                    day_seconds: args.day_seconds,
                },
                "redis",
            )
        }
        _ => (
            Backend::Shared(SharedState::local(plan.config.clone())),
            if naive { "local per replica" } else { "memory" },
        ),
    };
    let use_sqs = args.conn.queue_url.is_some() && !naive;
    let queue: Arc<dyn Queue> = match (&args.conn.queue_url, use_sqs) {
        (Some(url), true) => sqs_queue(url, aws).await,
        _ => Arc::new(MemoryQueue::new()),
    };
    let records = match &backend {
        Backend::Shared(state) => state.records.clone(),
        Backend::Redis { url, .. } => Records::redis(url).await?,
    };
    let log = CallLog::default();
    let deferred = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let shutdown = CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    let mut replica_tasks = Vec::new();
    let mut children: Vec<ChildProc> = Vec::new();
    if processes {
        let (Some(redis), Some(queue_url)) = (&args.conn.redis_url, &args.conn.queue_url) else {
            anyhow::bail!(
                "--processes needs --redis-url and --queue-url (replicas share only those)"
            );
        };
        let exe = match &args.child_exe {
            Some(exe) => exe.clone(),
            None => std::env::current_exe().context("finding this executable")?,
        };
        let n = args.replicas.max(1) as u64;
        let env = aws_env(aws).await?;
        for i in 0..args.replicas {
            let share = sink_failures / n + u64::from((i as u64) < sink_failures % n);
            let mut child = tokio::process::Command::new(&exe)
                .args(["loadtest", "--child", &i.to_string()])
                .args(["--child-chain", &plan.chain])
                .args(["--child-sink-failures", &share.to_string()])
                .args(["--redis-url", redis, "--queue-url", queue_url])
                .args(["--gemini-base-url", &base_url, "--out", &images])
                .args(["--concurrency", &args.concurrency.to_string()])
                .args(["--visibility-seconds", &args.visibility_seconds.to_string()])
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("starting a replica process")?;
            let stdout = child.stdout.take().context("a replica process's stdout")?;
            children.push(ChildProc {
                child,
                output: tokio::spawn(read_child(i, stdout)),
                killed: false,
            });
        }
    } else {
        for i in 0..args.replicas {
            let processor: Arc<dyn Process> = if naive {
                let provider = Arc::new(Recorded {
                    inner: gemini(&base_url, default_key.as_deref())?,
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
                    default_key.as_deref(),
                    &plan.pool_keys,
                    sink.clone(),
                    log.clone(),
                )
                .await?
            };
            let processor = Arc::new(Counting {
                inner: processor,
                deferred: deferred.clone(),
                received: received.clone(),
                stream: false,
            });
            let queue = match (&args.conn.queue_url, use_sqs) {
                (Some(url), true) => sqs_queue(url, aws).await,
                _ => queue.clone(),
            };
            replica_tasks.push(workers.spawn(worker::run(
                queue,
                worker_options(args.concurrency, args.visibility_seconds),
                processor,
                Arc::new(Metrics::default()),
                shutdown.clone(),
            )));
        }
    }

    // Send at the demanded pace.
    let (model, _, limit, window_s) = plan.binding.clone();
    let started = now_ms();
    let t0 = tokio::time::Instant::now();
    let pace = (args.demand > 0.0)
        .then(|| Duration::from_secs_f64(window_s / (limit as f64 * args.demand)));
    // Who sends each request and when (one tenant, at the pace, without --tenants).
    let schedule: Vec<(usize, Duration)> = match &args.tenants {
        Some(t) => t.schedule(args.requests, pace),
        None => (0..args.requests)
            .map(|n| (0, pace.map_or(Duration::ZERO, |p| p * n as u32)))
            .collect(),
    };
    let tenant_names: Vec<String> = args
        .tenants
        .as_ref()
        .map(|t| t.0.iter().map(|t| t.share.name.clone()).collect())
        .unwrap_or_default();
    let ids: Vec<String> = (0..schedule.len())
        .map(|i| format!("{run}-{i:05}"))
        .collect();
    let classes: Vec<i32> = args
        .priorities
        .as_ref()
        .map_or_else(|| vec![0; ids.len()], |p| p.classes(ids.len()));
    let sent_at: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let sender = {
        let (queue, ids, sent_at, chains, schedule, tenant_names, classes) = (
            queue.clone(),
            ids.clone(),
            sent_at.clone(),
            plan.chains.clone(),
            schedule.clone(),
            tenant_names.clone(),
            classes.clone(),
        );
        tokio::spawn(async move {
            let t0 = tokio::time::Instant::now();
            for (n, id) in ids.iter().enumerate() {
                let (tenant, at) = schedule[n];
                tokio::time::sleep_until(t0 + at).await;
                let mut body = serde_json::json!({
                    "id": id,
                    "chain": chains[n % chains.len()],
                    "prompt": format!("{id} {}", PROMPTS[n % PROMPTS.len()]),
                    "aspectRatio": "1:1",
                });
                if let Some(name) = tenant_names.get(tenant) {
                    body["tenant"] = serde_json::Value::from(name.as_str());
                }
                if classes[n] != 0 {
                    body["priority"] = serde_json::Value::from(classes[n]);
                }
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

    // Wait for every request to end, firing the timed faults on the way.
    let deadline = t0 + Duration::from_secs(args.timeout_seconds);
    let mut done: HashMap<String, ResultRecord> = HashMap::new();
    let mut finished_ms: HashMap<String, i64> = HashMap::new();
    // Requests whose image is stored but whose record a Redis restart took.
    let mut stored_without_record: std::collections::HashSet<String> = Default::default();
    let mut fault_log: Vec<String> = args
        .faults
        .iter()
        .filter(|f| {
            !naive
                || !matches!(
                    f,
                    Fault::RedisRestart { .. }
                        | Fault::KillReplica { .. }
                        | Fault::SinkFail { .. }
                        | Fault::Limit { .. }
                )
        })
        .map(ToString::to_string)
        .collect();
    let mut flushed = false;
    // When a limit fault changed the binding limit (unix ms), and to what.
    let mut limit_changed: Option<(i64, u64)> = None;
    let mut polls = 0u64;
    let pending = |done: &HashMap<String, ResultRecord>,
                   stored: &std::collections::HashSet<String>| {
        ids.iter()
            .filter(|id| !done.contains_key(*id) && !stored.contains(*id))
            .cloned()
            .collect::<Vec<String>>()
    };
    loop {
        // Poll the records (also right before a fault that would wipe them).
        for id in pending(&done, &stored_without_record) {
            if let Ok(Some(r)) = records.get(&id).await {
                let at = r
                    .finished_at
                    .parse::<jiff::Timestamp>()
                    .map(|t| t.as_millisecond())
                    .unwrap_or_else(|_| now_ms());
                finished_ms.insert(id.clone(), at);
                done.insert(id, r);
            }
        }
        polls += 1;
        if flushed && polls.is_multiple_of(8) {
            for id in pending(&done, &stored_without_record) {
                if matches!(
                    store.existing(&format!("{id}.png"), &id).await,
                    Ok(Stored::Ours(_))
                ) {
                    finished_ms.insert(id.clone(), now_ms());
                    stored_without_record.insert(id);
                }
            }
        }
        if let Some(p) = &progress {
            p(done.len() + stored_without_record.len(), ids.len());
        }
        if done.len() + stored_without_record.len() >= ids.len()
            || tokio::time::Instant::now() >= deadline
        {
            break;
        }
        while let Some((at, _)) = timed.first()
            && t0.elapsed() >= *at
        {
            let (_, f) = timed.remove(0);
            let when = t0.elapsed().as_secs_f64();
            match &f {
                Fault::RedisRestart { .. } => {
                    let url = args.conn.redis_url.as_deref().unwrap_or_default();
                    restart_redis(url, &plan.config).await?;
                    flushed = true;
                    fault_log.push(format!(
                        "redis-restart: FLUSHALL at {when:.1} s, config written again"
                    ));
                }
                Fault::Limit { to, .. } => {
                    let url = args.conn.redis_url.as_deref().unwrap_or_default();
                    let (model, dim, from, _) = &plan.binding;
                    apply_limit(url, plan, *to).await?;
                    limit_changed = Some((now_ms(), *to));
                    fault_log.push(format!(
                        "limit: {model} {dim} {from} -> {to} at {when:.1} s, written as `pacer apply` writes it"
                    ));
                }
                Fault::KillReplica { .. } => {
                    if let Some(c) = children.iter_mut().find(|c| !c.killed) {
                        c.child.start_kill().context("SIGKILL a replica process")?;
                        c.killed = true;
                        fault_log.push(format!(
                            "kill-replica: SIGKILL a replica process at {when:.1} s"
                        ));
                    } else if let Some(task) = replica_tasks.first() {
                        task.abort();
                        fault_log.push(format!("kill-replica: replica 0 aborted at {when:.1} s"));
                    }
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
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
    let mut calls = log.take();
    let mut sink_writes: HashMap<String, u64> = lock(&counted.writes).clone();
    let mut sink_failed = counted.failed.load(Ordering::Relaxed);
    for (i, mut c) in children.into_iter().enumerate() {
        drop(c.child.stdin.take());
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            let status = c.child.wait().await?;
            let output = (&mut c.output).await??;
            anyhow::Ok((status, output))
        })
        .await;
        let Ok(ended) = ended else {
            anyhow::bail!("replica process {i} did not stop within 30 s of its stdin closing");
        };
        let (status, output) = ended?;
        calls.extend(output.calls);
        // A killed process's calls that never ended: the provider may have counted them.
        calls.extend(output.open.into_iter().map(|mut call| {
            call.result = KILLED.to_owned();
            call
        }));
        anyhow::ensure!(
            output.done || c.killed,
            "replica process {i} ended ({status}) without finishing its report: its calls cannot be counted"
        );
        deferred.fetch_add(output.deferred, Ordering::Relaxed);
        sink_failed += output.sink_failed;
        for (k, n) in output.sink_writes {
            *sink_writes.entry(k).or_default() += n;
        }
    }

    // Tally: the fleet's own figures.
    let mut report = Report {
        mode: if naive { "naive" } else { "pacer" }.into(),
        replicas: args.replicas,
        processes,
        queue: if use_sqs { "sqs" } else { "memory" }.into(),
        limiter: limiter_kind.into(),
        requests: ids.len(),
        deferred: deferred.load(Ordering::Relaxed),
        receives_per_request: (!processes && !ids.is_empty())
            .then(|| received.load(Ordering::Relaxed) as f64 / ids.len() as f64),
        provider_calls: calls.len(),
        binding: format!("{model} {}", plan.binding.1),
        limit,
        window_s,
        completion_s,
        images: images.clone(),
        plot: plot_path(args, naive).display().to_string(),
        faults: fault_log,
        sink_failures: sink_failed,
        ..Report::default()
    };
    let mut ok_per_request: HashMap<&str, usize> = HashMap::new();
    let mut own = judge::Own {
        calls: calls.len() as u64,
        ..judge::Own::default()
    };
    for c in &calls {
        *report.calls_by_result.entry(c.result.clone()).or_default() += 1;
        match c.result.as_str() {
            "ok" => {
                *ok_per_request.entry(&c.request).or_default() += 1;
                own.ok += 1;
            }
            // A safety block is a 200 the provider counted.
            "blocked" => own.ok += 1,
            CUT_OFF | KILLED | "timeout" | "transport" => own.unanswered += 1,
            r if r.starts_with("rate_limited") => {
                report.own_upstream_429 += 1;
                if r == "rate_limited_bare" {
                    report.upstream_429_bare += 1;
                }
            }
            _ => {}
        }
    }
    own.upstream_429 = report.own_upstream_429 as u64;
    report.upstream_429 = report.own_upstream_429;
    report.regenerated = ok_per_request.values().map(|n| n.saturating_sub(1)).sum();
    report.duplicates = sink_writes
        .values()
        .map(|n| n.saturating_sub(1) as usize)
        .sum();
    let mut latencies = Vec::new();
    for id in &ids {
        match done.get(id) {
            Some(r) if r.status == Status::Succeeded => {
                let stored = match r.images.first() {
                    Some(_) => matches!(
                        store.existing(&format!("{id}.png"), id).await,
                        Ok(Stored::Ours(_))
                    ),
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
            None if stored_without_record.contains(id) => report.succeeded += 1,
            None => report.lost += 1,
        }
        if let (Some(s), Some(f)) = (lock(&sent_at).get(id), finished_ms.get(id)) {
            latencies.push((f - s).max(0) as f64 / 1000.0);
        }
    }
    if let Some(t) = &args.tenants {
        // The limiter's window (margin included): the one its shares are made in.
        let limiter_window_ms = plan
            .config
            .chain(&plan.chain)
            .ok()
            .and_then(|(_, pool)| pool.model_quota(&model))
            .map_or((window_s * 1000.0) as i64, |q| {
                q.effective_window_us(pacer_core::quota::Dim::Requests) / 1000
            });
        let n = t.0.len();
        let tenant_of: HashMap<&str, usize> = ids
            .iter()
            .zip(&schedule)
            .map(|(id, (tenant, _))| (id.as_str(), *tenant))
            .collect();
        let mut first_sent: Vec<Option<i64>> = vec![None; n];
        let mut requests = vec![0usize; n];
        let mut waits: Vec<Vec<f64>> = vec![Vec::new(); n];
        let sent = lock(&sent_at).clone();
        for (id, (tenant, _)) in ids.iter().zip(&schedule) {
            requests[*tenant] += 1;
            if let Some(s) = sent.get(id) {
                let first = &mut first_sent[*tenant];
                *first = Some(first.map_or(*s, |f: i64| f.min(*s)));
                if let Some(f) = finished_ms.get(id) {
                    waits[*tenant].push((f - s).max(0) as f64 / 1000.0);
                }
            }
        }
        let accepted: Vec<(i64, usize)> = calls
            .iter()
            .filter(|c| c.model == model && c.result == "ok")
            .filter_map(|c| Some((c.start_ms, *tenant_of.get(c.request.as_str())?)))
            .collect();
        report.tenants = tenants::figures(
            t,
            &accepted,
            &first_sent,
            &requests,
            &waits,
            limit,
            limiter_window_ms,
        );
        // What each tenant's calls cost per day of the run's calendar (its requests'
        // records: the provider's reported usage, priced), by the day its first accepted
        // call left in.
        if let Some(day_ms) = args.day_seconds.map(|d| (d * 1000) as i64) {
            let mut first_call: HashMap<&str, i64> = HashMap::new();
            for c in calls.iter().filter(|c| c.result == "ok") {
                let at = first_call.entry(c.request.as_str()).or_insert(c.start_ms);
                *at = (*at).min(c.start_ms);
            }
            let day0 = first_call
                .values()
                .min()
                .map_or(0, |t| t.div_euclid(day_ms));
            for (id, (tenant, _)) in ids.iter().zip(&schedule) {
                let (Some(at), Some(r)) = (first_call.get(id.as_str()), done.get(id)) else {
                    continue;
                };
                let name = &t.0[*tenant].share.name;
                let Some(f) = report.tenants.get_mut(name) else {
                    continue;
                };
                let day = usize::try_from(at.div_euclid(day_ms) - day0).unwrap_or(0);
                if f.spend_usd_by_day.len() <= day {
                    f.spend_usd_by_day.resize(day + 1, 0.0);
                }
                f.spend_usd_by_day[day] += r.cost_micros as f64 / 1e6;
            }
            for tl in &t.0 {
                if let Some(f) = report.tenants.get_mut(&tl.share.name) {
                    f.daily_budget_usd = tl.share.daily_budget_micros.map(|b| b as f64 / 1e6);
                }
            }
        }
    }
    if args.priorities.is_some() {
        let sent = lock(&sent_at).clone();
        let mut called: HashMap<&str, i64> = HashMap::new();
        for c in calls.iter().filter(|c| c.result == "ok") {
            let at = called.entry(c.request.as_str()).or_insert(c.start_ms);
            *at = (*at).min(c.start_ms);
        }
        let sent_ms: Vec<Option<i64>> = ids.iter().map(|id| sent.get(id).copied()).collect();
        let called_ms: Vec<Option<i64>> = ids
            .iter()
            .map(|id| called.get(id.as_str()).copied())
            .collect();
        report.priorities = tenants::class_figures(&classes, &sent_ms, &called_ms);
    }
    latencies.sort_by(f64::total_cmp);
    report.latency_p50_s = percentile(&latencies, 0.50);
    report.latency_p99_s = percentile(&latencies, 0.99);
    let mut took: Vec<f64> = calls.iter().map(|c| c.took_ms as f64).collect();
    took.sort_by(f64::total_cmp);
    report.call_p50_ms = percentile(&took, 0.50);
    report.call_p99_ms = percentile(&took, 0.99);

    // Against the binding limit, counted at the provider.
    let window_ms = (window_s * 1000.0) as i64;
    let accepted: Vec<&Call> = calls
        .iter()
        .filter(|c| c.model == model && c.result == "ok")
        .collect();
    let mut starts: Vec<i64> = accepted.iter().map(|c| c.start_ms).collect();
    starts.sort_unstable();
    report.max_in_any_window = max_count_in_window(&starts, window_ms);
    // Every call of the binding model that may have arrived, refused ones included.
    let mut arrivals: Vec<i64> = calls
        .iter()
        .filter(|c| c.model == model)
        .map(|c| c.start_ms)
        .collect();
    arrivals.sort_unstable();
    // A raised limit: the higher one is what no window may exceed over the whole run.
    let safe_limit = limit.max(limit_changed.map_or(0, |(_, to)| to));
    let mut over = pacer_core::measure::over_limit_windows(&arrivals, window_ms, safe_limit);
    report.limit = safe_limit;
    if let Some(sim) = &sim {
        let stats = sim.stats();
        if !plan.pool_keys.is_empty() {
            let mut per_chain: BTreeMap<String, usize> = BTreeMap::new();
            for n in 0..ids.len() {
                *per_chain
                    .entry(plan.chains[n % plan.chains.len()].clone())
                    .or_default() += 1;
            }
            report.projects = project_figures(&stats, &plan.config, &per_chain);
            for (project, f) in &report.projects {
                for (k, by) in &f.over_limit {
                    report
                        .disagreements
                        .push(format!("project {project}: {k} over its limit by {by}"));
                }
            }
        }
        let models: Vec<String> = plan
            .config
            .chain(&plan.chain)
            .map(|(_, pool)| pool.models.keys().cloned().collect())
            .unwrap_or_else(|_| vec![model.clone()]);
        let figures = judge::read(&stats, &models, &model);
        if let Some(m) = stats["models"][&model]["max_in_any_window"][plan.binding.1].as_u64() {
            report.max_in_any_window = m;
        }
        if let Some(at) = &figures.accepted_at_ms {
            starts.clone_from(at);
        }
        report.injected = figures.faults.clone();
        report.upstream_429 = figures.upstream_429 as usize;
        report.max_arrivals_in_any_window = figures
            .max_arrivals_in_any_window
            .as_ref()
            .and_then(|m| m.get(plan.binding.1).copied());
        if !figures.over_limit.is_empty() {
            over = over.max(1);
        }
        report.over_limit_windows = Some(over);
        report.uncounted_calls = figures.uncounted_calls;
        if let Some((change_ms, to)) = limit_changed {
            let mut times: Vec<i64> = ["accepted_at_ms", "rejected_at_ms"]
                .iter()
                .flat_map(|k| {
                    stats["models"][&model][*k]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .filter_map(|v| v.as_i64())
                .collect();
            times.sort_unstable();
            report.limit_change = Some(LimitChange {
                at_s: (change_ms - started) as f64 / 1000.0,
                ..LimitChange::judge(&times, change_ms, window_ms, limit, to)
            });
        }
        report.disagreements = judge::disagreements(&own, &figures);
        report.simulator = Some(figures);
    }
    if let (Some(first), Some(last)) = (starts.first(), starts.last()) {
        let windows = 1.0 + (last - first) as f64 / 1000.0 / window_s;
        report.utilization_whole_run = starts.len() as f64 / (safe_limit as f64 * windows);
        report.utilization = steady_utilization(&starts, window_ms, safe_limit)
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
    if let (Some(url), false) = (&args.conn.redis_url, naive)
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
    let opt = |v: Option<u64>| v.map_or_else(|| "n/a".to_owned(), |v| v.to_string());
    for r in std::iter::once(r).chain(r.baseline.as_deref()) {
        println!(
            "{}: fleet's own log: {} provider calls {:?}, {} 429s, {} regenerated, {} stored twice",
            r.mode,
            r.provider_calls,
            r.calls_by_result,
            r.own_upstream_429,
            r.regenerated,
            r.duplicates
        );
        if let Some(s) = &r.simulator {
            println!(
                "{}: simulator: {} arrivals, {} accepted, {} upstream 429s (refused {:?}, faults {:?}), \
                 most arrivals in a window {} of {}, over-limit windows {}, uncounted calls {}",
                r.mode,
                opt(s.arrivals),
                s.accepted,
                s.upstream_429,
                s.rejected,
                s.faults,
                opt(r.max_arrivals_in_any_window),
                r.limit,
                opt(r.over_limit_windows),
                opt(r.uncounted_calls)
            );
        }
        for f in &r.faults {
            println!("{}: fault: {f}", r.mode);
        }
        if let Some(c) = &r.limit_change {
            let secs =
                |v: Option<f64>| v.map_or_else(|| "never".to_owned(), |v| format!("{v:.1} s"));
            println!(
                "{}: limit change {} -> {} at {:.1} s (simulator, at arrival): {} arrivals after it; \
                 most in a window from the change {}, from 2 s after {}; no window holds more than \
                 {} from {} after; {} within one window first {} after",
                r.mode,
                c.from,
                c.to,
                c.at_s,
                c.arrivals_after,
                c.most_from_change,
                c.most_from_2s_after,
                c.to,
                secs(c.obeyed_after_s),
                c.to,
                secs(c.reached_after_s)
            );
        }
        for d in &r.disagreements {
            println!("{}: DISAGREEMENT: {d}", r.mode);
        }
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
    let disagreements: Vec<&String> = std::iter::once(&report)
        .chain(report.baseline.as_deref())
        .flat_map(|r| &r.disagreements)
        .collect();
    if let Some(c) = &report.limit_change {
        anyhow::ensure!(
            c.most_from_2s_after <= c.to,
            "after the limit went from {} to {}, a window starting 2 s after the change held {} arrivals at the simulator",
            c.from,
            c.to,
            c.most_from_2s_after
        );
    }
    anyhow::ensure!(
        disagreements.is_empty(),
        "the fleet's own log and the simulator disagree, so this run's figures cannot be trusted: {}",
        disagreements
            .iter()
            .map(|d| d.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    );
    Ok(())
}

/// The limit when none is given: a Tier 1 flash-image-like project on 10 s windows.
pub const DEFAULT_LIMIT: &str = "gemini-3.1-flash-image:rpm=100,ipm=100,window=10";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_change_is_judged_from_arrival_times() {
        // 20 per 10 s until 15 s, then arrivals every second (10 per window) from 16.5 s.
        let mut times: Vec<i64> = (0..30).map(|i| i * 500).collect();
        times.extend((0..20).map(|i| 16_500 + i * 1_000));
        let c = LimitChange::judge(&times, 15_000, 10_000, 20, 10);
        assert_eq!(c.arrivals_after, 20);
        assert_eq!(c.most_from_change, 10);
        assert_eq!(c.most_from_2s_after, 10);
        assert_eq!(c.obeyed_after_s, Some(0.0));
        // The 10th arrival after the change, at 25.5 s, closes the first window of 10.
        assert_eq!(c.reached_after_s, Some(10.5));
        // Late: the old pace runs on until 19 s.
        let mut late: Vec<i64> = (0..38).map(|i| i * 500).collect();
        late.extend((0..20).map(|i| 19_500 + i * 1_000));
        let c = LimitChange::judge(&late, 15_000, 10_000, 20, 10);
        assert!(c.most_from_change > 10, "{c:?}");
        assert_eq!(c.obeyed_after_s, Some(3.5), "{c:?}");
    }

    #[tokio::test]
    async fn in_memory_fleet_stays_under_the_limit_and_loses_nothing() {
        let args = LoadtestArgs {
            replicas: 4,
            requests: 40,
            demand: 0.0,
            limits: vec!["m-test:rpm=20,window=2".parse().expect("limit")],
            // A margin wide enough for a loaded test machine's scheduling delays between a
            // booked start and the call's arrival.
            margin_ms: Some(250),
            latency_ms: 10,
            latency_jitter_ms: 20,
            plot: std::env::temp_dir().join(format!("pacer-lt-test-{}.png", std::process::id())),
            ..LoadtestArgs::default()
        };
        let r = execute(&args, None, None).await.expect("runs");
        let report = serde_json::to_string_pretty(&r).unwrap_or_default();
        assert_eq!(
            (r.succeeded, r.lost, r.duplicates, r.upstream_429),
            (40, 0, 0, 0),
            "{report}"
        );
        assert!(r.disagreements.is_empty(), "{report}");
        let sim = r
            .simulator
            .as_ref()
            .expect("the in-process simulator's figures");
        // Exactly one call per request reached the provider.
        assert_eq!((sim.arrivals, sim.accepted), (Some(40), 40), "{report}");
        // 40 requests at once against 20 per window: the fleet books 20 now and 20 one
        // window (plus margin) later, so the busiest window holds exactly the limit, at
        // arrival, refused calls included.
        assert_eq!(r.max_arrivals_in_any_window, Some(20), "{report}");
        assert_eq!(r.max_in_any_window, 20, "{report}");
        assert_eq!(r.over_limit_windows, Some(0), "{report}");
        assert_eq!(r.uncounted_calls, Some(0), "{report}");
        let _ = std::fs::remove_file(&args.plot);
        let _ = std::fs::remove_dir_all(&r.images);
    }
}
