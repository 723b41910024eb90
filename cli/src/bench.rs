//! `pacer bench limiter`: drives the global limiter well above its limit and reports how
//! exact (`max_in_any_window`), how efficient (`utilization`) and how fast
//! (`decisions_per_sec`, latency percentiles) it is, optionally next to the usual advice:
//! one local limiter per replica (`--baseline per-replica`).
//!
//! Every client loops: acquire; if admitted or booked, a task sleeps the wait and records
//! the actual start; if rejected, ask again at once (demand stays well above the limit).
//!
//! With `--keys N` the clients share N (project, model) pairs (client i asks for pair
//! i mod N), each with the same limit: on a Redis Cluster the pairs spread over the
//! primaries. With Redis the report also gives what each decision cost Redis: the CPU
//! (`used_cpu_sys` + `used_cpu_user` of `INFO cpu`) every primary spent during the run,
//! per decision, and where the pairs landed. `--compare-redis-url` runs the same bench on a
//! second Redis right after (a single server next to a cluster) and gives the ratio. On a
//! machine with few cores the clients, not Redis, bound throughput: the CPU per decision,
//! not decisions per second, says what a cluster's primaries add (capacity = primaries ×
//! decisions per core-second).
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::{Args, Subcommand, ValueEnum};
use pacer_core::measure::{max_in_window, percentile};
use pacer_core::{
    connection::RedisConnection,
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
    /// How many (project, model) pairs the clients share (client i asks for pair i mod N).
    #[arg(long, env = "PACER_BENCH_KEYS", default_value_t = 1)]
    pub keys: usize,
    /// A second Redis to run the same bench on right after (e.g. a single server next to
    /// `--redis-url`'s cluster), to compare Redis CPU per decision.
    #[arg(long, env = "PACER_BENCH_COMPARE_REDIS_URL", hide_env_values = true)]
    pub compare_redis_url: Option<String>,
    /// Clients for the `--compare-redis-url` run (default: `--clients`). Redis's CPU per
    /// decision falls as its load rises (each pass of its event loop serves more requests),
    /// so a single server is compared with a cluster's primaries at the same load per
    /// server with `--clients` divided by the number of primaries.
    #[arg(long, env = "PACER_BENCH_COMPARE_CLIENTS")]
    pub compare_clients: Option<usize>,
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
    /// (project, model) pairs, each with the limit.
    pub keys: usize,
    /// Pairs with a window over the limit by booked start (limiter clock; 0: exact).
    pub keys_over_limit: usize,
    /// Pairs with a window over the limit by actual start: the client slept past its
    /// booked start by more than the margin (a loaded machine), not the limiter's doing.
    pub keys_over_limit_at_arrival: usize,
    /// What the decisions cost Redis (Redis runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisCost>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Box<Report>>,
    /// The same bench on `--compare-redis-url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compared: Option<Box<Report>>,
    /// This run's Redis CPU per decision over the compared run's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ratio: Option<f64>,
}

/// Redis's side of a run.
#[derive(Debug, Serialize)]
pub struct RedisCost {
    /// A Redis Cluster (detected from `INFO cluster`), or one server.
    pub cluster: bool,
    /// Each primary: its address (empty for one server), the CPU seconds it spent during
    /// the run, and how many of the run's pairs it holds.
    pub primaries: Vec<PrimaryCost>,
    /// Microseconds of one core, summed over the primaries, per decision answered.
    pub cpu_us_per_decision: f64,
}

/// One primary's share of a run.
#[derive(Debug, Serialize)]
pub struct PrimaryCost {
    pub node: String,
    pub cpu_s: f64,
    pub keys: usize,
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
/// binding dimension, the pair's index.
type Start = (i64, i64, u64, usize);

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
    (key, k): (QuotaKey, usize),
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
                    k,
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
                        k,
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
    keys: &[QuotaKey],
) -> Report {
    let quota = args.quota();
    let starts = Arc::new(Mutex::new(Vec::new()));
    let sleepers = Arc::new(Mutex::new(Vec::new()));
    let t0_us = now_us();
    let begin = Instant::now();
    let until = begin + Duration::from_secs_f64(args.duration);
    let tasks: Vec<_> = limiters
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let k = i % keys.len();
            tokio::spawn(client(
                l,
                (keys[k].clone(), k),
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
    let t0 = booked.iter().map(|b| b.0).min().unwrap_or(t0_us).min(t0_us);
    let end_us = t0_us + (args.duration * 1e6) as i64;
    let windows = ((end_us - t0) / w.max(1) - 1).max(0);
    let in_full: u64 = booked
        .iter()
        .filter(|(s, _)| *s >= t0 + w && *s < t0 + (windows + 1) * w)
        .map(|(_, c)| c)
        .sum();
    let utilization = if windows > 0 && limit > 0 {
        in_full as f64 / (limit as f64 * windows as f64 * keys.len() as f64)
    } else {
        0.0
    };
    // Each pair is judged on its own: the most in any window of any pair.
    let (mut max_booked, mut max_arrived) = (0, 0);
    let (mut keys_over_limit, mut keys_over_limit_at_arrival) = (0, 0);
    for k in 0..keys.len() {
        let of = |pick: fn(&Start) -> (i64, u64)| -> Vec<(i64, u64)> {
            starts.iter().filter(|s| s.3 == k).map(pick).collect()
        };
        let b = max_in_window(&of(|s| (s.0, s.2)), quota.effective_window_us(dim));
        let a = max_in_window(&of(|s| (s.1, s.2)), w);
        keys_over_limit += usize::from(b > limit);
        keys_over_limit_at_arrival += usize::from(a > limit);
        max_booked = max_booked.max(b);
        max_arrived = max_arrived.max(a);
    }
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
        max_in_any_window: max_booked,
        max_in_any_window_arrived: max_arrived,
        utilization: (utilization * 10_000.0).round() / 10_000.0,
        decisions_per_sec: (stats.decisions as f64 / elapsed).round(),
        acquire_p50_us: percentile(&stats.latencies_ns, 0.50) / 1_000.0,
        acquire_p99_us: percentile(&stats.latencies_ns, 0.99) / 1_000.0,
        keys: keys.len(),
        keys_over_limit,
        keys_over_limit_at_arrival,
        redis: None,
        baseline: None,
        compared: None,
        cpu_ratio: None,
    }
}

/// `n` fresh (project, model) pairs for one run.
fn bench_keys(n: usize) -> Vec<QuotaKey> {
    let run = now_us();
    (0..n.max(1))
        .map(|i| QuotaKey::new(format!("bench-{run}-{i}"), "gemini-3.1-flash-image"))
        .collect()
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
    anyhow::ensure!(args.keys > 0, "--keys must be at least 1");
    let mut report = match &args.redis_url {
        Some(url) => bench_redis(url, &args).await?,
        None => {
            let shared: Arc<dyn Limiter> = Arc::new(MemoryLimiter::default());
            let limiters = std::iter::repeat_n(shared, args.clients).collect();
            run_once("memory", &args, limiters, &bench_keys(args.keys)).await
        }
    };
    if args.baseline == Some(Baseline::PerReplica) {
        let own: Vec<Arc<dyn Limiter>> = (0..args.clients)
            .map(|_| Arc::new(MemoryLimiter::default()) as Arc<dyn Limiter>)
            .collect();
        let keys = bench_keys(args.keys);
        report.baseline = Some(Box::new(run_once("per-replica", &args, own, &keys).await));
    }
    if let Some(url) = &args.compare_redis_url {
        let compared = match args.compare_clients {
            Some(clients) => {
                anyhow::ensure!(clients > 0, "--compare-clients must be at least 1");
                let mut same = args.clone();
                same.clients = clients;
                bench_redis(url, &same).await?
            }
            None => bench_redis(url, &args).await?,
        };
        let cpu = |r: &Report| r.redis.as_ref().map(|c| c.cpu_us_per_decision);
        report.cpu_ratio = match (cpu(&report), cpu(&compared)) {
            (Some(a), Some(b)) if b > 0.0 => Some((a / b * 1000.0).round() / 1000.0),
            _ => None,
        };
        report.compared = Some(Box::new(compared));
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_human(&report);
        if let Some(b) = &report.baseline {
            print_human(b);
        }
        if let Some(c) = &report.compared {
            print_human(c);
        }
        if let Some(ratio) = report.cpu_ratio {
            println!(
                "Redis CPU per decision, {} over {}: {ratio:.3}",
                report.limiter,
                report.compared.as_ref().map_or("?", |c| c.limiter)
            );
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
        "{:<12} acquire p50 {:.2} µs, p99 {:.2} µs; {} pairs, {} with a window over the limit ({} at arrival)",
        "",
        r.acquire_p50_us,
        r.acquire_p99_us,
        r.keys,
        r.keys_over_limit,
        r.keys_over_limit_at_arrival
    );
    if let Some(c) = &r.redis {
        println!(
            "{:<12} Redis CPU {:.1} µs per decision over {} primar{}",
            "",
            c.cpu_us_per_decision,
            c.primaries.len(),
            if c.primaries.len() == 1 { "y" } else { "ies" }
        );
        for p in &c.primaries {
            let node = if p.node.is_empty() {
                "(one server)"
            } else {
                &p.node
            };
            println!(
                "{:<12}   {node}: {} pairs, {:.3} s CPU",
                "", p.keys, p.cpu_s
            );
        }
    }
}

/// The bench on the Redis at `url` (standalone or any node of a Cluster), with what it
/// cost Redis: `INFO cpu` of every primary before and after, and where the pairs landed.
async fn bench_redis(url: &str, args: &LimiterBenchArgs) -> anyhow::Result<Report> {
    let options = RedisOptions {
        timeout: Duration::from_secs(5),
        ..RedisOptions::default()
    };
    let probe = RedisConnection::open(url, options)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to the benchmark's Redis: {e}"))?;
    let mut limiters: Vec<Arc<dyn Limiter>> = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        let l = RedisLimiter::connect(url, RedisOptions::default())
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to the benchmark's Redis: {e}"))?;
        limiters.push(Arc::new(l));
    }
    let keys = bench_keys(args.keys);
    let name = if probe.is_cluster() {
        "redis-cluster"
    } else {
        "redis"
    };
    let before = cpu_seconds(&probe).await?;
    let mut report = run_once(name, args, limiters, &keys).await;
    let after = cpu_seconds(&probe).await?;
    let placed = primary_of_each(&probe, &keys).await?;
    let mut primaries: Vec<PrimaryCost> = after
        .iter()
        .map(|(node, t)| PrimaryCost {
            node: node.clone(),
            cpu_s: (t - before.iter().find(|b| &b.0 == node).map_or(*t, |b| b.1)).max(0.0),
            keys: placed.iter().filter(|p| *p == node).count(),
        })
        .collect();
    primaries.sort_by(|a, b| a.node.cmp(&b.node));
    let answered = report.decisions.saturating_sub(report.errors).max(1);
    let cpu: f64 = primaries.iter().map(|p| p.cpu_s).sum();
    report.redis = Some(RedisCost {
        cluster: probe.is_cluster(),
        cpu_us_per_decision: (cpu * 1e6 / answered as f64 * 100.0).round() / 100.0,
        primaries,
    });
    Ok(report)
}

/// CPU seconds (system + user) each primary has used since it started.
async fn cpu_seconds(conn: &RedisConnection) -> anyhow::Result<Vec<(String, f64)>> {
    let mut info = redis::cmd("INFO");
    info.arg("cpu");
    let mut out = Vec::new();
    for (node, answer) in conn.on_every_primary(&info).await? {
        let text: String = redis::from_redis_value(answer?)?;
        let field = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        out.push((node, field("used_cpu_sys") + field("used_cpu_user")));
    }
    Ok(out)
}

/// The primary holding each pair's state (its address as `INFO` on every primary names
/// it; empty for one server), from `CLUSTER KEYSLOT` and `CLUSTER SLOTS`.
async fn primary_of_each(conn: &RedisConnection, keys: &[QuotaKey]) -> anyhow::Result<Vec<String>> {
    if !conn.is_cluster() {
        return Ok(vec![String::new(); keys.len()]);
    }
    let mut c = conn.clone();
    let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut c)
        .await?;
    // Each entry: start, end, [host, port, id, ...] of the primary, then its replicas.
    let mut ranges = Vec::new();
    for entry in slots {
        let redis::Value::Array(parts) = entry else {
            continue;
        };
        let (Some(start), Some(end), Some(primary)) = (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        let start: u16 = redis::from_redis_value(start.clone())?;
        let end: u16 = redis::from_redis_value(end.clone())?;
        let (host, port): (String, u16) = match primary {
            redis::Value::Array(node) if node.len() >= 2 => (
                redis::from_redis_value(node[0].clone())?,
                redis::from_redis_value(node[1].clone())?,
            ),
            _ => continue,
        };
        ranges.push((start, end, format!("{host}:{port}")));
    }
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key.state_key())
            .query_async(&mut c)
            .await?;
        out.push(
            ranges
                .iter()
                .find(|(a, b, _)| (*a..=*b).contains(&slot))
                .map(|r| r.2.clone())
                .unwrap_or_default(),
        );
    }
    Ok(out)
}
