//! `pacer bench limiter`: drives the global limiter well above its limit and reports how
//! exact (`max_in_any_window`), how efficient (`utilization`) and how fast
//! (`decisions_per_sec`, latency percentiles) it is, optionally next to the usual advice:
//! one local limiter per replica (`--baseline per-replica`).
//!
//! Every client loops: acquire; if admitted or booked, a task sleeps the wait and records
//! the actual start; if rejected, ask again at once (demand stays well above the limit).
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::{Args, Subcommand, ValueEnum};
use pacer_core::measure::{max_in_window, percentile};
use pacer_core::{
    limiter::{
        Decision, Limiter, QuotaKey,
        memory::MemoryLimiter,
        redis::{RedisLimiter, RedisOptions},
    },
    quota::{Costs, DimensionQuota, ModelQuota},
};
use serde::Serialize;

/// What to benchmark.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub target: BenchTarget,
}

/// Benchmark targets.
#[derive(Subcommand, Debug)]
pub enum BenchTarget {
    /// The global limiter: exactness, utilization and decisions per second.
    Limiter(LimiterBenchArgs),
    /// How much memory one worker replica needs for many requests in flight.
    Worker(crate::bench_worker::WorkerBenchArgs),
}

/// The naive alternative to compare with.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// Each client its own in-memory limiter at the full limit (one limiter per replica).
    PerReplica,
}

/// `pacer bench limiter` flags.
#[derive(Args, Debug, Clone)]
pub struct LimiterBenchArgs {
    /// Redis to benchmark (`redis://`, `rediss://`); absent: the in-memory limiter.
    #[arg(long, env = "PACER_BENCH_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Concurrent callers (with Redis, each its own connection).
    #[arg(long, env = "PACER_BENCH_CLIENTS", default_value_t = 64)]
    pub clients: usize,
    /// How long to drive demand, in seconds.
    #[arg(long, env = "PACER_BENCH_DURATION", default_value_t = 30.0)]
    pub duration: f64,
    /// The limit per window: requests (or, with `--cost-jitter`, that many requests' worth
    /// of input tokens, 1000 on average per request).
    #[arg(long, env = "PACER_BENCH_RPM", default_value_t = 600)]
    pub rpm: u64,
    /// The window length in seconds (60 in production; shorter for rehearsals).
    #[arg(long, env = "PACER_BENCH_WINDOW", default_value_t = 5.0)]
    pub window: f64,
    /// Lumpy token costs: each request's input tokens drawn from 1000 × [1 − J, 1 + J];
    /// the token limit then binds. Without a value, J = 0.9.
    #[arg(long, env = "PACER_BENCH_COST_JITTER", num_args = 0..=1, default_missing_value = "0.9")]
    pub cost_jitter: Option<f64>,
    /// The window margin in ms (default: proportional, window / 60).
    #[arg(long, env = "PACER_BENCH_MARGIN_MS")]
    pub margin_ms: Option<u64>,
    /// The longest booking a client accepts, in ms (default: one window).
    #[arg(long, env = "PACER_BENCH_MAX_WAIT_MS")]
    pub max_wait_ms: Option<u64>,
    /// Print one JSON object.
    #[arg(long, env = "PACER_BENCH_JSON")]
    pub json: bool,
    /// Also run a naive baseline with the same demand.
    #[arg(long, env = "PACER_BENCH_BASELINE", value_enum)]
    pub baseline: Option<Baseline>,
}

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub limiter: &'static str,
    pub clients: usize,
    pub duration_s: f64,
    pub decisions: u64,
    pub admitted: u64,
    pub errors: u64,
    /// The binding dimension: `requests`, or `input_tokens` with `--cost-jitter`.
    pub dimension: &'static str,
    pub limit: u64,
    pub window_s: f64,
    pub margin_ms: f64,
    /// The most admitted in any sliding window, by booked start (limiter clock).
    pub max_in_any_window: u64,
    /// The same by actual start (after sleeping the wait), as a provider counting at
    /// arrival sees it, in windows without the margin.
    pub max_in_any_window_arrived: u64,
    /// Admitted in full windows after the first, divided by limit × windows.
    pub utilization: f64,
    pub decisions_per_sec: f64,
    pub acquire_p50_us: f64,
    pub acquire_p99_us: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Box<Report>>,
}

const MEAN_TOKENS: u64 = 1_000;

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A tiny xorshift: lumpy costs need no cryptographic randomness.
struct Lumpy(u64);

impl Lumpy {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn tokens(&mut self, jitter: f64) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (MEAN_TOKENS as f64 * (1.0 - jitter + 2.0 * jitter * u))
            .round()
            .max(1.0) as u64
    }
}

impl LimiterBenchArgs {
    fn quota(&self) -> ModelQuota {
        let w = Duration::from_secs_f64(self.window);
        let mut q = ModelQuota::unlimited().with_windows(w);
        q.margin = self.margin_ms.map(Duration::from_millis);
        if self.cost_jitter.is_some() {
            q.input_tokens = DimensionQuota {
                limit: Some(self.rpm * MEAN_TOKENS),
                window: w,
            };
            q.requests = DimensionQuota {
                limit: Some(self.rpm * 2),
                window: w,
            };
        } else {
            q.requests = DimensionQuota {
                limit: Some(self.rpm),
                window: w,
            };
        }
        q
    }

    fn max_wait(&self) -> Duration {
        self.max_wait_ms
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs_f64(self.window))
    }
}

/// One admitted request: booked start (limiter clock), actual start (local), weight in the
/// binding dimension.
type Start = (i64, i64, u64);

/// Where clients record admitted starts, and the tasks sleeping until booked starts.
type Sinks = (
    Arc<Mutex<Vec<Start>>>,
    Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
);

#[derive(Default)]
struct ClientStats {
    decisions: u64,
    errors: u64,
    latencies_ns: Vec<u32>,
}

async fn client(
    limiter: Arc<dyn Limiter>,
    key: QuotaKey,
    args: LimiterBenchArgs,
    quota: ModelQuota,
    id: usize,
    until: Instant,
    (starts, sleepers): Sinks,
) -> ClientStats {
    let mut stats = ClientStats {
        latencies_ns: Vec::with_capacity(1 << 16),
        ..Default::default()
    };
    let mut rng =
        Lumpy(0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    let jitter = args.cost_jitter;
    let max_wait = args.max_wait();
    let mut n: u64 = 0;
    let mut id_buf = String::new();
    loop {
        // Checking the clock every decision costs a sixth of an in-memory decision.
        if n.is_multiple_of(8) && Instant::now() >= until {
            break;
        }
        n += 1;
        let tokens = jitter.map(|j| rng.tokens(j)).unwrap_or(MEAN_TOKENS);
        let costs = Costs::new(1, tokens, 1, 0);
        id_buf.clear();
        use std::fmt::Write;
        let _ = write!(id_buf, "c{id}-{n}");
        let t = Instant::now();
        let d = limiter
            .acquire(&key, &quota, &id_buf, costs, max_wait)
            .await;
        let lat = t.elapsed();
        stats.decisions += 1;
        stats
            .latencies_ns
            .push(u32::try_from(lat.as_nanos()).unwrap_or(u32::MAX));
        let weight = if jitter.is_some() { tokens } else { 1 };
        match d {
            Ok(Decision::Admitted { ticket }) => {
                starts.lock().unwrap_or_else(|p| p.into_inner()).push((
                    ticket.start_us,
                    now_us(),
                    weight,
                ));
            }
            Ok(Decision::Booked { ticket, wait }) => {
                let starts = starts.clone();
                let h = tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    starts.lock().unwrap_or_else(|p| p.into_inner()).push((
                        ticket.start_us,
                        now_us(),
                        weight,
                    ));
                });
                sleepers.lock().unwrap_or_else(|p| p.into_inner()).push(h);
            }
            Ok(Decision::Rejected { .. }) => {
                // In-memory decisions never yield; let the sleepers run now and then.
                if n.is_multiple_of(256) {
                    tokio::task::yield_now().await;
                }
            }
            Err(_) => {
                stats.errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    stats
}

/// Runs one benchmark with one limiter per client (`limiters` has one entry per client,
/// possibly the same limiter shared).
async fn run_once(
    name: &'static str,
    args: &LimiterBenchArgs,
    limiters: Vec<Arc<dyn Limiter>>,
) -> Report {
    let quota = args.quota();
    let key = QuotaKey::new(format!("bench-{}", now_us()), "gemini-3.1-flash-image");
    let starts = Arc::new(Mutex::new(Vec::new()));
    let sleepers = Arc::new(Mutex::new(Vec::new()));
    let t0_us = now_us();
    let begin = Instant::now();
    let until = begin + Duration::from_secs_f64(args.duration);
    let tasks: Vec<_> = limiters
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            tokio::spawn(client(
                l,
                key.clone(),
                args.clone(),
                quota.clone(),
                i,
                until,
                (starts.clone(), sleepers.clone()),
            ))
        })
        .collect();
    let mut stats = ClientStats::default();
    for t in tasks {
        if let Ok(s) = t.await {
            stats.decisions += s.decisions;
            stats.errors += s.errors;
            stats.latencies_ns.extend(s.latencies_ns);
        }
    }
    let elapsed = begin.elapsed().as_secs_f64();
    let handles = std::mem::take(&mut *sleepers.lock().unwrap_or_else(|p| p.into_inner()));
    for h in handles {
        let _ = h.await;
    }
    let starts = std::mem::take(&mut *starts.lock().unwrap_or_else(|p| p.into_inner()));
    stats.latencies_ns.sort_unstable();
    let dim = if args.cost_jitter.is_some() {
        pacer_core::quota::Dim::InputTokens
    } else {
        pacer_core::quota::Dim::Requests
    };
    let limit = quota.dim(dim).limit.unwrap_or(0);
    let w = (args.window * 1e6) as i64;
    let booked: Vec<(i64, u64)> = starts.iter().map(|s| (s.0, s.2)).collect();
    let arrived: Vec<(i64, u64)> = starts.iter().map(|s| (s.1, s.2)).collect();
    let t0 = booked.iter().map(|b| b.0).min().unwrap_or(t0_us).min(t0_us);
    let end_us = t0_us + (args.duration * 1e6) as i64;
    let windows = ((end_us - t0) / w.max(1) - 1).max(0);
    let in_full: u64 = booked
        .iter()
        .filter(|(s, _)| *s >= t0 + w && *s < t0 + (windows + 1) * w)
        .map(|(_, c)| c)
        .sum();
    let utilization = if windows > 0 && limit > 0 {
        in_full as f64 / (limit as f64 * windows as f64)
    } else {
        0.0
    };
    let margin = quota.margin_for(quota.dim(dim).window);
    Report {
        limiter: name,
        clients: args.clients,
        duration_s: elapsed,
        decisions: stats.decisions,
        admitted: starts.len() as u64,
        errors: stats.errors,
        dimension: dim.name(),
        limit,
        window_s: args.window,
        margin_ms: margin.as_secs_f64() * 1e3,
        max_in_any_window: max_in_window(&booked, quota.effective_window_us(dim)),
        max_in_any_window_arrived: max_in_window(&arrived, w),
        utilization: (utilization * 10_000.0).round() / 10_000.0,
        decisions_per_sec: (stats.decisions as f64 / elapsed).round(),
        acquire_p50_us: percentile(&stats.latencies_ns, 0.50) / 1_000.0,
        acquire_p99_us: percentile(&stats.latencies_ns, 0.99) / 1_000.0,
        baseline: None,
    }
}

/// Runs `pacer bench limiter`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let args = match args.target {
        BenchTarget::Worker(w) => return crate::bench_worker::run(w).await,
        BenchTarget::Limiter(args) => args,
    };
    anyhow::ensure!(args.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(
        args.window > 0.0 && args.duration > 0.0,
        "--window and --duration must be positive"
    );
    if let Some(j) = args.cost_jitter {
        anyhow::ensure!((0.0..1.0).contains(&j), "--cost-jitter must be in [0, 1)");
    }
    let mut limiters: Vec<Arc<dyn Limiter>> = Vec::with_capacity(args.clients);
    let name = match &args.redis_url {
        Some(url) => {
            for _ in 0..args.clients {
                let l = RedisLimiter::connect(url, RedisOptions::default())
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot connect to the benchmark's Redis: {e}"))?;
                limiters.push(Arc::new(l));
            }
            "redis"
        }
        None => {
            let shared: Arc<dyn Limiter> = Arc::new(MemoryLimiter::default());
            limiters.extend(std::iter::repeat_n(shared, args.clients));
            "memory"
        }
    };
    let mut report = run_once(name, &args, limiters).await;
    if args.baseline == Some(Baseline::PerReplica) {
        let own: Vec<Arc<dyn Limiter>> = (0..args.clients)
            .map(|_| Arc::new(MemoryLimiter::default()) as Arc<dyn Limiter>)
            .collect();
        report.baseline = Some(Box::new(run_once("per-replica", &args, own).await));
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_human(&report);
        if let Some(b) = &report.baseline {
            print_human(b);
        }
    }
    Ok(())
}

fn print_human(r: &Report) {
    println!(
        "{:<12} {} clients, {:.1} s: {} decisions ({:.0}/s), {} admitted, {} errors",
        r.limiter, r.clients, r.duration_s, r.decisions, r.decisions_per_sec, r.admitted, r.errors
    );
    println!(
        "{:<12} {} limit {} per {} s (+{:.0} ms margin): max in any window {} (at arrival {}), utilization {:.4}",
        "",
        r.dimension,
        r.limit,
        r.window_s,
        r.margin_ms,
        r.max_in_any_window,
        r.max_in_any_window_arrived,
        r.utilization
    );
    println!(
        "{:<12} acquire p50 {:.2} µs, p99 {:.2} µs",
        "", r.acquire_p50_us, r.acquire_p99_us
    );
}
