//! The chain walk driven with fakes: the in-memory limiter on a clock that follows tokio's
//! paused time (so booked waits pass instantly), in-memory records, a temp-folder sink that
//! can be told to fail, and a scripted provider that records every call.
//!
//! Every test also checks what the simulator checks in the fault suite: each call carries
//! its own booking (`x-pacer-ticket`), never one another call already spent.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use pacer_core::{
    config::{
        CompiledChain, CompiledConfig, CompiledPool, CompiledStep, FailureMode, ModelLimits,
        ProviderKind, RetryConfig,
    },
    limiter::{
        Blocker, Check, Clock, Decision, FixedDays, Limiter, PenaltyScope, QuotaKey, Ticket,
        memory::MemoryLimiter,
    },
    models::ImageSize,
    provider::{
        Image, ImageProvider, ImageRequest, ImageResponse, ProviderError, QuotaDimension, Usage,
    },
    quota::Dim,
    quota::{Costs, ModelQuota},
};
use tokio::{sync::watch, time::Instant};

use super::*;
use crate::{
    metrics::Metrics,
    outcome::{Attempt, DeferReason, Outcome},
    record::{Records, Status},
    sink::{LocalSink, Sink, SinkError, Stored},
};

const A: &str = "model-a";
const B: &str = "model-b";

/// The limiter's clock, moving with tokio's (paused) time.
#[derive(Debug)]
struct TokioClock {
    base: Instant,
    base_us: i64,
}

impl TokioClock {
    fn new() -> Arc<TokioClock> {
        Arc::new(TokioClock {
            base: Instant::now(),
            base_us: 1_800_000_000_000_000,
        })
    }
}

impl Clock for TokioClock {
    fn now_us(&self) -> i64 {
        self.base_us + i64::try_from(self.base.elapsed().as_micros()).unwrap_or(i64::MAX / 4)
    }
}

/// One call the provider saw.
#[derive(Debug, Clone)]
struct Call {
    model: String,
    at: Duration,
    request: ImageRequest,
}

type Script = Box<dyn Fn(usize, &str) -> pacer_core::provider::Result<ImageResponse> + Send + Sync>;

/// A provider that answers from a script (call index, model) and records every call.
struct Scripted {
    base: Instant,
    script: Script,
    calls: Mutex<Vec<Call>>,
}

impl Scripted {
    fn new(script: Script) -> Arc<Scripted> {
        Arc::new(Scripted {
            base: Instant::now(),
            script,
            calls: Mutex::default(),
        })
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl ImageProvider for Scripted {
    async fn generate(
        &self,
        model: &str,
        req: &ImageRequest,
    ) -> pacer_core::provider::Result<ImageResponse> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Call {
                model: model.to_owned(),
                at: self.base.elapsed(),
                request: req.clone(),
            });
            calls.len() - 1
        };
        (self.script)(n, model)
    }
}

fn image(prompt_tokens: Option<u64>) -> pacer_core::provider::Result<ImageResponse> {
    Ok(ImageResponse {
        images: vec![Image {
            mime_type: "image/png".into(),
            data: b"png".to_vec(),
        }],
        texts: Vec::new(),
        finish_reason: Some("STOP".into()),
        usage: prompt_tokens.map(|p| Usage {
            prompt_tokens: p,
            candidate_tokens: 1290,
            image_tokens: 1290,
            thought_tokens: 0,
            total_tokens: p + 1290,
        }),
        model_version: None,
        response_id: None,
    })
}

fn rate_limited(named: &str, retry: Duration) -> ProviderError {
    ProviderError::RateLimited {
        quota: QuotaDimension::RequestsPerMinute,
        quota_id: "GenerateRequestsPerMinutePerProjectPerModel".into(),
        model: Some(named.to_owned()),
        retry_delay: Some(retry),
        violations: Vec::new(),
        message: "Resource has been exhausted".into(),
    }
}

/// A folder sink whose next `fail_puts` writes fail, and whose first write of `fail_key`
/// fails.
struct FlakySink {
    inner: LocalSink,
    fail_puts: AtomicU32,
    fail_key: Mutex<Option<String>>,
    /// Whether injected failures are permanent (no permission) rather than transient.
    permanent: AtomicBool,
}

#[async_trait]
impl Sink for FlakySink {
    async fn existing(&self, key: &str, id: &str) -> Result<Stored, SinkError> {
        self.inner.existing(key, id).await
    }

    async fn put(
        &self,
        key: &str,
        data: &[u8],
        mime_type: &str,
        id: &str,
    ) -> Result<String, SinkError> {
        let permanent = self.permanent.load(Ordering::SeqCst);
        let failing = {
            let mut fail_key = self.fail_key.lock().unwrap();
            let hit = fail_key.as_deref() == Some(key);
            if hit {
                *fail_key = None;
            }
            hit
        };
        if failing {
            return Err(SinkError {
                location: key.to_owned(),
                message: "injected failure".into(),
                permanent,
            });
        }
        let left = self.fail_puts.load(Ordering::SeqCst);
        if left > 0 {
            self.fail_puts.store(left - 1, Ordering::SeqCst);
            return Err(SinkError {
                location: key.to_owned(),
                message: "injected failure".into(),
                permanent,
            });
        }
        self.inner.put(key, data, mime_type, id).await
    }
}

fn limits(rpm: u64, window_ms: u64) -> ModelLimits {
    ModelLimits {
        rpm: Some(rpm),
        tpm: None,
        ipm: None,
        rpd: None,
        window_ms,
        price_micros_per_image: None,
    }
}

/// A loaded config: pool `default/pool` (project `proj`) with `models`, chain
/// `default/chain` with `steps` (model, max wait).
fn config(models: &[(&str, ModelLimits)], steps: &[(&str, Duration)]) -> CompiledConfig {
    let pool = CompiledPool {
        name: "default/pool".into(),
        generation: 1,
        provider: ProviderKind::Gemini,
        project: "proj".into(),
        models: models
            .iter()
            .map(|(m, l)| ((*m).to_owned(), l.clone()))
            .collect(),
        spend_micros_per_10_minutes: None,
        headroom_percent: 0,
        alert_threshold_percent: 80,
        failure_mode: FailureMode::Closed,
        expected_replicas: 1,
        api_key_ref: None,
        api_key_env: None,
        window_margin_ms: Some(0),
        base_url: None,
        vertex: None,
        tenants: Vec::new(),
    };
    let chain = CompiledChain {
        name: "default/chain".into(),
        generation: 1,
        pool: "default/pool".into(),
        steps: steps
            .iter()
            .map(|(m, wait)| CompiledStep {
                model: (*m).to_owned(),
                max_wait_ms: wait.as_millis() as u64,
                aspect_ratio: None,
                image_size: None,
                service_tier: None,
            })
            .collect(),
        retry: RetryConfig {
            attempts: 3,
            base_delay_ms: 10,
            max_delay_ms: 40,
        },
        request_timeout_ms: 5_000,
        priority: 0,
        deadline_ms: None,
        tenant: None,
    };
    CompiledConfig {
        version: 1,
        pools: BTreeMap::from([(pool.name.clone(), pool)]),
        chains: BTreeMap::from([(chain.name.clone(), chain)]),
    }
}

/// The in-memory limiter, except that the first `lose` checks find their booking gone (as
/// after a Redis restart, whose fence keeps the capacity blocked for a window: the entry
/// stays); counts acquires and checks.
struct Losing {
    inner: Arc<MemoryLimiter>,
    lose: AtomicU32,
    /// Checks that fail as if Redis did not answer.
    fail_checks: AtomicU32,
    acquires: AtomicU32,
    checks: AtomicU32,
}

#[async_trait]
impl Limiter for Losing {
    fn day_resets_in(&self) -> Duration {
        self.inner.day_resets_in()
    }

    async fn acquire_for(
        &self,
        key: &QuotaKey,
        quota: &ModelQuota,
        asker: pacer_core::limiter::Asker<'_>,
        request_id: &str,
        costs: Costs,
        max_wait: Duration,
    ) -> pacer_core::limiter::Result<Decision> {
        self.acquires.fetch_add(1, Ordering::SeqCst);
        self.inner
            .acquire_for(key, quota, asker, request_id, costs, max_wait)
            .await
    }

    async fn check(&self, ticket: &Ticket) -> pacer_core::limiter::Result<Check> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        let failing = self.fail_checks.load(Ordering::SeqCst);
        if failing > 0 {
            self.fail_checks.store(failing - 1, Ordering::SeqCst);
            return Err(pacer_core::limiter::Error::Timeout(Duration::from_millis(
                500,
            )));
        }
        let left = self.lose.load(Ordering::SeqCst);
        if left > 0 {
            self.lose.store(left - 1, Ordering::SeqCst);
            return Ok(Check::Cancelled {
                retry_after: None,
                blocking: Blocker::Lost,
            });
        }
        self.inner.check(ticket).await
    }

    async fn reconcile(&self, ticket: &Ticket, actual: Costs) -> pacer_core::limiter::Result<()> {
        self.inner.reconcile(ticket, actual).await
    }

    async fn release(&self, ticket: &Ticket) -> pacer_core::limiter::Result<()> {
        self.inner.release(ticket).await
    }

    async fn penalize(
        &self,
        key: &QuotaKey,
        delay: Duration,
        scope: PenaltyScope,
    ) -> pacer_core::limiter::Result<()> {
        self.inner.penalize(key, delay, scope).await
    }

    async fn usage(
        &self,
        key: &QuotaKey,
        quota: &ModelQuota,
    ) -> pacer_core::limiter::Result<pacer_core::limiter::Usage> {
        self.inner.usage(key, quota).await
    }
}

struct Rig {
    handler: Arc<Handler>,
    losing: Arc<Losing>,
    limiter: Arc<MemoryLimiter>,
    provider: Arc<Scripted>,
    sink: Arc<FlakySink>,
    dir: PathBuf,
    config: CompiledConfig,
    _config_tx: watch::Sender<Arc<CompiledConfig>>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static RIGS: AtomicUsize = AtomicUsize::new(0);

impl Rig {
    fn new(config: CompiledConfig, script: Script) -> Rig {
        Rig::with_lease(config, script, Duration::from_secs(30))
    }

    /// A rig whose claims last `claim_lease`.
    fn with_lease(config: CompiledConfig, script: Script, claim_lease: Duration) -> Rig {
        Rig::with_limiter(
            config,
            script,
            claim_lease,
            MemoryLimiter::new(TokioClock::new()),
        )
    }

    /// A rig on `limiter` (its clock and calendar).
    fn with_limiter(
        config: CompiledConfig,
        script: Script,
        claim_lease: Duration,
        limiter: MemoryLimiter,
    ) -> Rig {
        let limiter = Arc::new(limiter);
        let provider = Scripted::new(script);
        let dir = std::env::temp_dir().join(format!(
            "pacer-handler-{}-{}",
            std::process::id(),
            RIGS.fetch_add(1, Ordering::SeqCst)
        ));
        let sink = Arc::new(FlakySink {
            inner: LocalSink::new(&dir),
            fail_puts: AtomicU32::new(0),
            fail_key: Mutex::default(),
            permanent: AtomicBool::new(false),
        });
        let (tx, rx) = watch::channel(Arc::new(config.clone()));
        let losing = Arc::new(Losing {
            inner: limiter.clone(),
            lose: AtomicU32::new(0),
            fail_checks: AtomicU32::new(0),
            acquires: AtomicU32::new(0),
            checks: AtomicU32::new(0),
        });
        let limiters = Limiters::single(losing.clone());
        let handler = Handler::new(
            rx,
            Arc::new(limiters),
            Providers {
                gemini: Some(provider.clone()),
                openai: None,
                per_pool: None,
            },
            sink.clone(),
            Records::memory(),
            Arc::new(Metrics::default()),
            "replica-1",
            HandlerOptions {
                claim_lease,
                default_defer: Duration::from_secs(5),
                defer_slack: Duration::from_millis(50),
                ..HandlerOptions::default()
            },
        );
        Rig {
            handler: Arc::new(handler),
            losing,
            limiter,
            provider,
            sink,
            dir,
            config,
            _config_tx: tx,
        }
    }

    async fn handle(&self, body: &str) -> Outcome {
        self.handler.handle(body, Attempt::first()).await
    }

    async fn handle_attempt(&self, body: &str, attempt: Attempt) -> Outcome {
        self.handler.handle(body, attempt).await
    }

    fn key(&self, model: &str) -> QuotaKey {
        QuotaKey::new("proj", model)
    }

    /// Every call's ticket: present, of the form `{booking id}@{start}`, and never shared
    /// by two calls.
    fn tickets(&self) -> Vec<String> {
        let tickets: Vec<String> = self
            .provider
            .calls()
            .into_iter()
            .map(|c| c.request.ticket.expect("every call carries its ticket"))
            .collect();
        for t in &tickets {
            let (id, start) = t.rsplit_once('@').expect("{booking}@{start}");
            assert!(!id.is_empty() && start.parse::<i64>().is_ok(), "{t}");
        }
        let mut unique = tickets.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            tickets.len(),
            "two calls spent one booking: {tickets:?}"
        );
        tickets
    }

    async fn usage(&self, model: &str) -> pacer_core::limiter::Usage {
        let pool = &self.config.pools["default/pool"];
        let quota = pool.model_quota(model).expect("model in pool");
        self.limiter.usage(&self.key(model), &quota).await.unwrap()
    }
}

fn body(id: &str) -> String {
    format!(r#"{{"id":"{id}","chain":"chain","prompt":"a red fox in the snow"}}"#)
}

fn always_image() -> Script {
    Box::new(|_, _| image(Some(20)))
}

fn deferred(o: &Outcome) -> (Duration, DeferReason) {
    match o {
        Outcome::Defer { after, reason } => (*after, *reason),
        other => panic!("expected a deferral, got {other:?}"),
    }
}

/// Issue 10, defect 1: a redelivered message must not replay its first delivery's booking.
/// Limit 1 per window: the first delivery calls the provider and defers (the sink fails);
/// the redelivery's call needs its own booking, a window later.
#[tokio::test(start_paused = true)]
async fn redelivery_books_afresh_and_waits_a_window() {
    let window = Duration::from_secs(1);
    let rig = Rig::new(
        config(&[(A, limits(1, 1000))], &[(A, Duration::from_secs(5))]),
        always_image(),
    );
    rig.sink.fail_puts.store(1, Ordering::SeqCst);
    let first = rig.handle(&body("r1")).await;
    assert_eq!(deferred(&first).1, DeferReason::Infrastructure);
    let second = rig.handle(&body("r1")).await;
    assert!(
        matches!(second, Outcome::Succeeded(_)),
        "second delivery: {second:?}"
    );
    let calls = rig.provider.calls();
    assert_eq!(calls.len(), 2);
    assert!(
        calls[1].at - calls[0].at >= window,
        "the redelivery called {:?} after the first call, inside one window of a limit of 1",
        calls[1].at - calls[0].at
    );
    // Two calls, two bookings, from two deliveries.
    let tickets = rig.tickets();
    assert_eq!(tickets.len(), 2);
    let token = |t: &str| t.split(':').nth(4).map(str::to_owned);
    assert_ne!(token(&tickets[0]), token(&tickets[1]), "{tickets:?}");
}

/// The same with a max wait shorter than the window: the redelivery is deferred, it does
/// not call the provider.
#[tokio::test(start_paused = true)]
async fn redelivery_within_the_window_defers_without_a_call() {
    let rig = Rig::new(
        config(&[(A, limits(1, 1000))], &[(A, Duration::from_millis(100))]),
        always_image(),
    );
    rig.sink.fail_puts.store(1, Ordering::SeqCst);
    let first = rig.handle(&body("r1")).await;
    assert_eq!(deferred(&first).1, DeferReason::Infrastructure);
    let second = rig.handle(&body("r1")).await;
    let (after, reason) = deferred(&second);
    assert_eq!(reason, DeferReason::Capacity);
    assert!(after >= Duration::from_millis(900), "{after:?}");
    assert_eq!(
        rig.provider.calls().len(),
        1,
        "the redelivery called the provider"
    );
    tokio::time::sleep(after).await;
    let third = rig.handle(&body("r1")).await;
    assert!(matches!(third, Outcome::Succeeded(_)), "{third:?}");
    assert_eq!(rig.tickets().len(), 2);
}

/// Issue 10, defect 2: tickets booked before a 429 cooldown must not fire into it.
#[tokio::test(start_paused = true)]
async fn cooldown_set_after_booking_cancels_booked_tickets() {
    let rig = Rig::new(
        config(&[(A, limits(1, 1000))], &[(A, Duration::from_secs(10))]),
        always_image(),
    );
    let first = rig.handle(&body("r0")).await;
    assert!(matches!(first, Outcome::Succeeded(_)), "{first:?}");
    let started = Instant::now();
    let b = tokio::spawn({
        let h = rig.handler.clone();
        async move { h.handle(&body("r1"), Attempt::first()).await }
    });
    let c = tokio::spawn({
        let h = rig.handler.clone();
        async move { h.handle(&body("r2"), Attempt::first()).await }
    });
    // Both are booked (1 s and 2 s ahead) and asleep; a 429 elsewhere sets a cooldown.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let cooldown = Duration::from_secs(5);
    rig.limiter
        .penalize(&rig.key(A), cooldown, PenaltyScope::PerMinute)
        .await
        .unwrap();
    let cooldown_ends = started + Duration::from_millis(10) + cooldown;
    for task in [b, c] {
        let outcome = task.await.unwrap();
        let (after, reason) = deferred(&outcome);
        assert_eq!(reason, DeferReason::RateLimited);
        assert!(
            Instant::now() + after >= cooldown_ends,
            "deferred to {:?} before the cooldown ends",
            Instant::now() + after - started
        );
    }
    assert_eq!(
        rig.provider.calls().len(),
        1,
        "a booked ticket fired into the cooldown"
    );
    assert_eq!(rig.losing.checks.load(Ordering::SeqCst), 2);
}

/// A per-day 429 seen while tickets wait blocks them until Pacific midnight.
#[tokio::test(start_paused = true)]
async fn a_day_block_set_after_booking_cancels_booked_tickets() {
    let rig = Rig::new(
        config(&[(A, limits(1, 1000))], &[(A, Duration::from_secs(10))]),
        always_image(),
    );
    assert!(matches!(
        rig.handle(&body("r0")).await,
        Outcome::Succeeded(_)
    ));
    let waiting = tokio::spawn({
        let h = rig.handler.clone();
        async move { h.handle(&body("r1"), Attempt::first()).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    rig.limiter
        .penalize(&rig.key(A), Duration::ZERO, PenaltyScope::PerDay)
        .await
        .unwrap();
    let (after, reason) = deferred(&waiting.await.unwrap());
    assert_eq!(reason, DeferReason::RateLimited);
    assert!(after > Duration::from_secs(1), "{after:?}");
    assert_eq!(rig.provider.calls().len(), 1);
}

/// A check the limiter cannot answer sends nothing: the message is deferred and the
/// booking given back.
#[tokio::test(start_paused = true)]
async fn an_unanswered_check_defers_without_a_call() {
    let rig = Rig::new(
        config(&[(A, limits(1, 1000))], &[(A, Duration::from_secs(10))]),
        always_image(),
    );
    assert!(matches!(
        rig.handle(&body("r0")).await,
        Outcome::Succeeded(_)
    ));
    rig.losing.fail_checks.store(1, Ordering::SeqCst);
    let (_, reason) = deferred(&rig.handle(&body("r1")).await);
    assert_eq!(reason, DeferReason::Infrastructure);
    assert_eq!(rig.provider.calls().len(), 1);
    // Released: the next request books the slot it held, not the one after.
    let started = Instant::now();
    assert!(matches!(
        rig.handle(&body("r2")).await,
        Outcome::Succeeded(_)
    ));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// A booking lost while it waited (the limiter's state went away) is booked afresh once,
/// under a new id, within what is left of the max wait; the call holds the new booking.
#[tokio::test(start_paused = true)]
async fn a_lost_booking_is_booked_afresh_once() {
    let rig = Rig::new(
        config(&[(A, limits(1, 1000))], &[(A, Duration::from_secs(10))]),
        always_image(),
    );
    assert!(matches!(
        rig.handle(&body("r0")).await,
        Outcome::Succeeded(_)
    ));
    rig.losing.lose.store(1, Ordering::SeqCst);
    let out = rig.handle(&body("r1")).await;
    assert!(matches!(out, Outcome::Succeeded(_)), "{out:?}");
    assert_eq!(rig.losing.acquires.load(Ordering::SeqCst), 3);
    assert_eq!(rig.tickets().len(), 2);

    // Lost again on the fresh booking: defer, do not call.
    rig.losing.lose.store(2, Ordering::SeqCst);
    let (_, reason) = deferred(&rig.handle(&body("r2")).await);
    assert_eq!(reason, DeferReason::Capacity);
    assert_eq!(rig.losing.acquires.load(Ordering::SeqCst), 5);
    assert_eq!(rig.tickets().len(), 2);
}

/// Issue 10, defect 3: a response without usageMetadata keeps the input-token estimate.
#[tokio::test(start_paused = true)]
async fn unreported_usage_keeps_the_estimate() {
    let rig = Rig::new(
        config(&[(A, limits(100, 1000))], &[(A, Duration::from_secs(1))]),
        Box::new(|_, _| image(None)),
    );
    let out = rig.handle(&body("r1")).await;
    assert!(matches!(out, Outcome::Succeeded(_)), "{out:?}");
    let used = rig.usage(A).await.dimensions[Dim::InputTokens.index()].used;
    let prompt = "a red fox in the snow";
    assert!(
        used >= prompt.len() as u64,
        "input tokens reconciled to {used} for an unreported usage"
    );
}

/// An overrun is charged: a later booking sees it.
#[tokio::test(start_paused = true)]
async fn an_overrun_is_charged_to_later_bookings() {
    let mut l = limits(100, 1000);
    l.tpm = Some(1_000);
    let rig = Rig::new(
        config(&[(A, l)], &[(A, Duration::from_millis(100))]),
        Box::new(|_, _| image(Some(990))),
    );
    assert!(matches!(
        rig.handle(&body("r1")).await,
        Outcome::Succeeded(_)
    ));
    assert_eq!(
        rig.usage(A).await.dimensions[Dim::InputTokens.index()].used,
        990
    );
    let (_, reason) = deferred(&rig.handle(&body("r2")).await);
    assert_eq!(reason, DeferReason::Capacity);
    assert_eq!(rig.provider.calls().len(), 1);
}

/// A model outside the built-in table is booked and charged at its configured price, not 0.
#[tokio::test(start_paused = true)]
async fn a_configured_price_is_booked_and_charged() {
    let mut l = limits(100, 1000);
    l.price_micros_per_image = Some(40_000);
    let rig = Rig::new(
        config(&[(A, l)], &[(A, Duration::from_secs(1))]),
        always_image(),
    );
    let pool = &rig.config.pools["default/pool"];
    assert_eq!(image_price(pool, A, None), 40_000);
    assert_eq!(
        booking_costs(pool, A, "p", Some(ImageSize::K4)).spend_micros,
        40_000
    );
    let out = rig.handle(&body("r1")).await;
    let Outcome::Succeeded(record) = out else {
        panic!("{out:?}");
    };
    assert_eq!(record.cost_micros, 40_000);
    assert_eq!(
        rig.usage(A).await.dimensions[Dim::SpendMicros.index()].used,
        40_000
    );
}

/// The input-token estimate is an upper bound in every script: a byte-fallback tokenizer
/// never emits more tokens than bytes.
#[test]
fn the_token_estimate_bounds_any_script() {
    for prompt in [
        "a red fox".to_owned(),
        "雪の中の赤い狐".repeat(40),
        "🦊❄️🌲".repeat(50),
        "ㅋ".repeat(500),
    ] {
        let est = estimate_costs(A, &prompt, None).input_tokens;
        assert!(
            est >= prompt.len() as u64,
            "{est} tokens estimated for {} bytes",
            prompt.len()
        );
    }
}

/// Issue 10, defect 8: a 429 whose quota names another model of the pool cools that model.
#[tokio::test(start_paused = true)]
async fn a_429_naming_another_model_penalizes_that_model() {
    let rig = Rig::new(
        config(
            &[(A, limits(100, 1000)), (B, limits(100, 1000))],
            &[(A, Duration::from_secs(1))],
        ),
        Box::new(|_, _| Err(rate_limited(B, Duration::from_secs(7)))),
    );
    let (_, reason) = deferred(&rig.handle(&body("r1")).await);
    assert_eq!(reason, DeferReason::RateLimited);
    assert!(rig.usage(B).await.cooldown_remaining >= Duration::from_secs(6));
    assert_eq!(rig.usage(A).await.cooldown_remaining, Duration::ZERO);
}

/// A 429 on the first step falls through to the second, which serves the request.
#[tokio::test(start_paused = true)]
async fn a_two_step_chain_falls_through_on_a_429() {
    let rig = Rig::new(
        config(
            &[(A, limits(100, 1000)), (B, limits(100, 1000))],
            &[(A, Duration::from_secs(1)), (B, Duration::from_secs(1))],
        ),
        Box::new(|_, model| {
            if model == A {
                Err(rate_limited(A, Duration::from_secs(3)))
            } else {
                image(Some(20))
            }
        }),
    );
    let out = rig.handle(&body("r1")).await;
    let Outcome::Succeeded(record) = out else {
        panic!("{out:?}");
    };
    assert_eq!(record.model.as_deref(), Some(B));
    assert_eq!(record.attempts, 2);
    let models: Vec<String> = rig.provider.calls().into_iter().map(|c| c.model).collect();
    assert_eq!(models, [A, B]);
    assert_eq!(rig.tickets().len(), 2);
    assert!(rig.usage(A).await.cooldown_remaining >= Duration::from_secs(2));
}

/// Options the chain's models know: a ratio only 3.1 flash takes skips the Pro step (the
/// provider would refuse it) and the flash step serves it; on a chain of Pro alone the
/// request fails, naming the field and the ratios there are, without a call.
#[tokio::test(start_paused = true)]
async fn options_only_some_models_take_skip_the_others() {
    const PRO: &str = "gemini-3-pro-image";
    const FLASH: &str = "gemini-3.1-flash-image";
    let wide = |id: &str| {
        format!(
            r#"{{"id":"{id}","chain":"chain","prompt":"a fox","aspectRatio":"1:8","imageSize":"0.5K"}}"#
        )
    };
    let rig = Rig::new(
        config(
            &[(PRO, limits(100, 1000)), (FLASH, limits(100, 1000))],
            &[
                (PRO, Duration::from_secs(1)),
                (FLASH, Duration::from_secs(1)),
            ],
        ),
        always_image(),
    );
    let out = rig.handle(&wide("r1")).await;
    let Outcome::Succeeded(record) = out else {
        panic!("{out:?}");
    };
    assert_eq!(record.model.as_deref(), Some(FLASH));
    let calls = rig.provider.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].request.image_size, Some(ImageSize::Half));
    assert_eq!(calls[0].request.aspect_ratio.as_deref(), Some("1:8"));

    let rig = Rig::new(
        config(
            &[(PRO, limits(100, 1000))],
            &[(PRO, Duration::from_secs(1))],
        ),
        always_image(),
    );
    let out = rig.handle(&wide("r2")).await;
    let Outcome::Failed(record) = out else {
        panic!("{out:?}");
    };
    let error = record.error.unwrap_or_default();
    assert!(
        error.contains("`aspectRatio`") && error.contains(r#""21:9""#),
        "{error}"
    );
    assert!(rig.provider.calls().is_empty());
}

/// `images: 2` with a deferral between the images: the redelivery stores image 2 only.
#[tokio::test(start_paused = true)]
async fn two_images_with_a_deferral_between_them() {
    let rig = Rig::new(
        config(&[(A, limits(100, 1000))], &[(A, Duration::from_secs(1))]),
        always_image(),
    );
    let body = r#"{"id":"r2","chain":"chain","prompt":"two foxes","images":2}"#;
    // The first image stores; the second's write fails.
    *rig.sink.fail_key.lock().unwrap() = Some("r2~1.png".into());
    let first = rig.handle(body).await;
    assert_eq!(deferred(&first).1, DeferReason::Infrastructure);
    assert_eq!(rig.provider.calls().len(), 2);
    let second = rig.handle(body).await;
    let Outcome::Succeeded(record) = second else {
        panic!("{second:?}");
    };
    assert_eq!(
        rig.provider.calls().len(),
        3,
        "the redelivery regenerated image 1"
    );
    assert_eq!(record.images.len(), 2);
    assert_eq!(rig.tickets().len(), 3);
    assert!(record.images[0].ends_with("r2.png"), "{:?}", record.images);
    assert!(
        record.images[1].ends_with("r2~1.png"),
        "{:?}",
        record.images
    );
}

/// A request whose deadline passed fails without a call.
#[tokio::test(start_paused = true)]
async fn a_passed_deadline_fails_without_a_call() {
    let rig = Rig::new(
        config(&[(A, limits(100, 1000))], &[(A, Duration::from_secs(1))]),
        always_image(),
    );
    let out = rig
        .handle(r#"{"id":"r1","chain":"chain","prompt":"p","deadline":"2020-01-01T00:00:00Z"}"#)
        .await;
    let Outcome::Failed(record) = out else {
        panic!("{out:?}");
    };
    assert_eq!(record.status, Status::Failed);
    assert!(record.error.unwrap_or_default().contains("deadline"));
    assert!(rig.provider.calls().is_empty());
}

/// A deadline sooner than the capacity defers without a call, even with a long max wait.
#[tokio::test(start_paused = true)]
async fn a_near_deadline_bounds_the_wait() {
    let rig = Rig::new(
        config(&[(A, limits(1, 30_000))], &[(A, Duration::from_secs(60))]),
        always_image(),
    );
    assert!(matches!(
        rig.handle(&body("r0")).await,
        Outcome::Succeeded(_)
    ));
    let deadline = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(2);
    let out = rig
        .handle(&format!(
            r#"{{"id":"r1","chain":"chain","prompt":"p","deadline":"{deadline}"}}"#
        ))
        .await;
    assert_eq!(deferred(&out).1, DeferReason::Capacity);
    assert_eq!(rig.provider.calls().len(), 1);
}

/// 503s until the retry policy's attempts run out: the request is deferred, not failed.
#[tokio::test(start_paused = true)]
async fn retries_exhausted_on_503_defer() {
    let rig = Rig::new(
        config(&[(A, limits(100, 1000))], &[(A, Duration::from_secs(1))]),
        Box::new(|_, _| {
            Err(ProviderError::Overloaded {
                message: "The model is overloaded".into(),
            })
        }),
    );
    let (_, reason) = deferred(&rig.handle(&body("r1")).await);
    assert_eq!(reason, DeferReason::Upstream);
    assert_eq!(
        rig.tickets().len(),
        3,
        "one call per attempt, each on its own booking"
    );
}

/// With no config loaded (version 0: Redis flushed, nothing applied yet) the handler
/// defers; it does not fail the request for an unknown chain.
#[tokio::test(start_paused = true)]
async fn no_config_loaded_defers() {
    let rig = Rig::new(CompiledConfig::default(), always_image());
    let (_, reason) = deferred(&rig.handle(&body("r1")).await);
    assert_eq!(reason, DeferReason::Config);
    assert!(rig.handler.records().get("r1").await.unwrap().is_none());
    assert!(rig.provider.calls().is_empty());
}

/// A chain the loaded config does not know is deferred while it may still be being
/// applied (the first deliveries), then fails with the known chains named.
#[tokio::test(start_paused = true)]
async fn an_unknown_chain_defers_at_first_then_fails() {
    let rig = Rig::new(
        config(&[(A, limits(100, 1000))], &[(A, Duration::from_secs(1))]),
        always_image(),
    );
    let other = r#"{"id":"r1","chain":"other","prompt":"p"}"#;
    for receive_count in 1..HandlerOptions::default().unknown_chain_receives {
        let out = rig
            .handle_attempt(other, Attempt::received(receive_count))
            .await;
        assert_eq!(deferred(&out).1, DeferReason::Config, "{out:?}");
        assert!(rig.handler.records().get("r1").await.unwrap().is_none());
    }
    let last = HandlerOptions::default().unknown_chain_receives;
    let out = rig.handle_attempt(other, Attempt::received(last)).await;
    let Outcome::Failed(record) = out else {
        panic!("{out:?}")
    };
    let reason = record.error.unwrap_or_default();
    assert!(reason.contains("other"), "{reason}");
    assert!(record.config_failure);
    assert!(rig.provider.calls().is_empty());
    // Resubmitted (or redriven) after the config was fixed: it runs, not "already done".
    let out = rig.handle_attempt(&body("r1"), Attempt::received(1)).await;
    assert!(matches!(out, Outcome::Succeeded(_)), "{out:?}");
    assert_eq!(rig.provider.calls().len(), 1);
}

/// A malformed message with a readable id fails under that id (a person can see why); one
/// with no id has nothing to record a failure under and is left for the dead-letter queue.
#[tokio::test(start_paused = true)]
async fn a_malformed_message_fails_under_its_id_or_goes_to_the_dead_letter_queue() {
    let rig = Rig::new(
        config(&[(A, limits(100, 1000))], &[(A, Duration::from_secs(1))]),
        always_image(),
    );
    let out = rig.handle(r#"{"id":"r1","chain":"chain"}"#).await;
    let Outcome::Failed(record) = out else {
        panic!("{out:?}")
    };
    assert_eq!(record.id, "r1");
    assert!(rig.handler.records().get("r1").await.unwrap().is_some());
    let out = rig.handle("<xml>not a request</xml>").await;
    assert!(matches!(out, Outcome::DeadLetter { .. }), "{out:?}");
    assert!(!out.is_final());
    assert!(rig.provider.calls().is_empty());
}

// The error policy, driven through the walk: every `ProviderError` variant at the first and
// at the last step of a two-step chain (A then B), and the walk's own limits.

/// A cooldown that outlasts every step's max wait: a step that meets it is skipped.
const LONG_COOLDOWN: Duration = Duration::from_secs(30);

/// Builds the error a failing model answers with.
type MakeError = fn(&str) -> ProviderError;

fn per_minute_429(model: &str) -> ProviderError {
    rate_limited(model, Duration::from_secs(3))
}

fn per_day_429(model: &str) -> ProviderError {
    ProviderError::RateLimited {
        quota: QuotaDimension::RequestsPerDay,
        quota_id: "GenerateRequestsPerDayPerProjectPerModel-FreeTier".into(),
        model: Some(model.to_owned()),
        retry_delay: Some(Duration::from_secs(40)),
        violations: Vec::new(),
        message: "Resource has been exhausted".into(),
    }
}

fn bare_429(_: &str) -> ProviderError {
    ProviderError::RateLimitedBare {
        retry_delay: Some(Duration::from_millis(20)),
        message: "Resource has been exhausted".into(),
    }
}

fn overloaded(_: &str) -> ProviderError {
    ProviderError::Overloaded {
        message: "The model is overloaded".into(),
    }
}

fn server_error(_: &str) -> ProviderError {
    ProviderError::ServerError {
        status: 500,
        message: "Internal error".into(),
    }
}

fn timeout(_: &str) -> ProviderError {
    ProviderError::Timeout {
        after: Duration::from_secs(5),
    }
}

fn transport(_: &str) -> ProviderError {
    ProviderError::Transport {
        message: "connection reset".into(),
    }
}

fn blocked(_: &str) -> ProviderError {
    ProviderError::Blocked {
        reason: pacer_core::provider::BlockReason::Finish("IMAGE_SAFETY".into()),
        message: String::new(),
    }
}

fn invalid(_: &str) -> ProviderError {
    ProviderError::Invalid {
        message: "imageSize 0.5K is not supported".into(),
        violations: Vec::new(),
    }
}

fn credit_exhausted(_: &str) -> ProviderError {
    ProviderError::CreditExhausted {
        message: "Your prepaid credits are depleted".into(),
    }
}

fn unauthorized(_: &str) -> ProviderError {
    ProviderError::Unauthorized {
        status: 401,
        message: "API key not valid".into(),
    }
}

fn forbidden(_: &str) -> ProviderError {
    ProviderError::Unauthorized {
        status: 403,
        message: "PERMISSION_DENIED".into(),
    }
}

fn model_not_found(model: &str) -> ProviderError {
    ProviderError::ModelNotFound {
        model: model.to_owned(),
        message: "is not found for API version v1beta".into(),
    }
}

/// Chain A then B, both with room to spare.
fn two_steps() -> CompiledConfig {
    config(
        &[(A, limits(100, 1000)), (B, limits(100, 1000))],
        &[(A, Duration::from_secs(1)), (B, Duration::from_secs(1))],
    )
}

/// A rig on `config` where `failing` answers every call with `err` and any other model
/// with an image.
fn failing_on(config: CompiledConfig, failing: &'static str, err: MakeError) -> Rig {
    Rig::new(
        config,
        Box::new(move |_, model| {
            if model == failing {
                Err(err(model))
            } else {
                image(Some(20))
            }
        }),
    )
}

/// Request `r1` with the first step (A) answering `err`.
async fn at_first_step(err: MakeError) -> (Rig, Outcome) {
    let rig = failing_on(two_steps(), A, err);
    let out = rig.handle(&body("r1")).await;
    (rig, out)
}

/// Request `r1` with A cooling down (skipped without a call) and the last step (B)
/// answering `err`.
async fn at_last_step(err: MakeError) -> (Rig, Outcome) {
    let rig = failing_on(two_steps(), B, err);
    rig.limiter
        .penalize(&rig.key(A), LONG_COOLDOWN, PenaltyScope::PerMinute)
        .await
        .unwrap();
    let out = rig.handle(&body("r1")).await;
    (rig, out)
}

impl Rig {
    /// Whether another replica could claim `id` now (nobody holds it).
    async fn claimable(&self, id: &str) -> bool {
        self.handler
            .records()
            .claim(id, "a-probing-replica", Duration::from_secs(1))
            .await
            .unwrap()
    }

    fn models_called(&self) -> Vec<String> {
        self.provider.calls().into_iter().map(|c| c.model).collect()
    }

    fn account_errors(&self, reason: &'static str) -> u64 {
        self.handler
            .metrics
            .account_errors
            .get_or_create(&crate::metrics::AccountLabels {
                pool: "default/pool".into(),
                reason,
            })
            .get()
    }
}

fn served_by(out: &Outcome, model: &str, attempts: u32) {
    let Outcome::Succeeded(record) = out else {
        panic!("expected success, got {out:?}");
    };
    assert_eq!(record.model.as_deref(), Some(model));
    assert_eq!(record.attempts, attempts);
}

/// The request failed, and its reason says `text`.
fn failed_saying(out: &Outcome, text: &str) {
    let Outcome::Failed(record) = out else {
        panic!("expected a failure, got {out:?}");
    };
    let error = record.error.as_deref().unwrap_or("");
    assert!(error.contains(text), "{error}");
}

fn failed_with(out: &Outcome, label: &str) {
    let Outcome::Failed(record) = out else {
        panic!("expected a failure, got {out:?}");
    };
    let error = record.error.clone().unwrap_or_default();
    assert!(error.starts_with(label), "{error}");
}

const SLACK: Duration = Duration::from_millis(50);

// --- 429 with a named per-minute quota: penalize the model it names, fall through.

#[tokio::test(start_paused = true)]
async fn policy_per_minute_429_at_first_step_cools_it_and_falls_through() {
    let (rig, out) = at_first_step(per_minute_429).await;
    served_by(&out, B, 2);
    assert_eq!(rig.models_called(), [A, B]);
    let cooling = rig.usage(A).await.cooldown_remaining;
    assert!(cooling > Duration::from_secs(2) && cooling <= Duration::from_secs(3));
    assert_eq!(rig.usage(B).await.cooldown_remaining, Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn policy_per_minute_429_at_last_step_defers_by_its_delay() {
    let (rig, out) = at_last_step(per_minute_429).await;
    // B's 3 s cooldown is sooner than A's 30 s.
    assert_eq!(
        deferred(&out),
        (Duration::from_secs(3) + SLACK, DeferReason::RateLimited)
    );
    assert_eq!(rig.models_called(), [B]);
    assert!(rig.usage(B).await.cooldown_remaining > Duration::from_secs(2));
}

// --- 429 with a per-day quota: skip the model until Pacific midnight.

#[tokio::test(start_paused = true)]
async fn policy_per_day_429_at_first_step_skips_it_for_the_day() {
    let (rig, out) = at_first_step(per_day_429).await;
    served_by(&out, B, 2);
    // The next request does not call A at all.
    let next = rig.handle(&body("r2")).await;
    served_by(&next, B, 1);
    assert_eq!(rig.models_called(), [A, B, B]);
    assert!(rig.usage(A).await.daily_blocked_remaining > Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn policy_per_day_429_at_last_step_defers_to_the_soonest_step() {
    let (rig, out) = at_last_step(per_day_429).await;
    // B's day is spent; A's cooldown ends first.
    assert_eq!(
        deferred(&out),
        (LONG_COOLDOWN + SLACK, DeferReason::RateLimited)
    );
    assert_eq!(rig.models_called(), [B]);
}

/// A per-day 429 on a rehearsal's calendar (days of 20 s, as `PACER_DAY_SECONDS` gives the
/// limiter): the message waits for the limiter's next day, not the real Pacific midnight
/// (which parked a fault run's messages for hours).
#[tokio::test(start_paused = true)]
async fn policy_per_day_429_waits_for_the_limiters_next_day() {
    let limiter = MemoryLimiter::new(TokioClock::new()).with_calendar(Arc::new(FixedDays {
        origin_us: 0,
        day_us: 20_000_000,
    }));
    let rig = Rig::with_limiter(
        config(&[(A, limits(100, 1000))], &[(A, Duration::from_secs(1))]),
        Box::new(|_, model| Err(per_day_429(model))),
        Duration::from_secs(30),
        limiter,
    );
    let (after, reason) = deferred(&rig.handle(&body("r1")).await);
    assert_eq!(reason, DeferReason::RateLimited);
    assert!(
        after <= Duration::from_secs(20) + SLACK,
        "until the rehearsal day ends: {after:?}"
    );
    assert!(rig.usage(A).await.daily_blocked_remaining <= Duration::from_secs(20));
}

// --- 429 without details: retried on the same step at the provider's pace.

#[tokio::test(start_paused = true)]
async fn policy_bare_429_at_first_step_retries_then_falls_through() {
    let (rig, out) = at_first_step(bare_429).await;
    served_by(&out, B, 4);
    assert_eq!(rig.models_called(), [A, A, A, B]);
    // No quota named: nothing cools down.
    assert_eq!(rig.usage(A).await.cooldown_remaining, Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn policy_bare_429_at_last_step_retries_then_defers() {
    let (rig, out) = at_last_step(bare_429).await;
    assert_eq!(
        deferred(&out),
        (Duration::from_millis(20) + SLACK, DeferReason::RateLimited)
    );
    assert_eq!(rig.models_called(), [B, B, B]);
}

// --- 5xx, timeouts, broken connections: retried with backoff up to the attempts.

async fn upstream_at_first_step(err: MakeError) {
    let (rig, out) = at_first_step(err).await;
    served_by(&out, B, 4);
    assert_eq!(rig.models_called(), [A, A, A, B]);
    assert_eq!(rig.tickets().len(), 4);
}

async fn upstream_at_last_step(err: MakeError) {
    let (rig, out) = at_last_step(err).await;
    let (after, reason) = deferred(&out);
    assert_eq!(reason, DeferReason::Upstream);
    // The retry policy's backoff (at most 40 ms), not A's cooldown.
    assert!(after <= Duration::from_millis(40) + SLACK, "{after:?}");
    assert_eq!(rig.models_called(), [B, B, B]);
}

#[tokio::test(start_paused = true)]
async fn policy_overloaded_at_first_step_retries_then_falls_through() {
    upstream_at_first_step(overloaded).await;
}

#[tokio::test(start_paused = true)]
async fn policy_overloaded_at_last_step_retries_then_defers() {
    upstream_at_last_step(overloaded).await;
}

#[tokio::test(start_paused = true)]
async fn policy_server_error_at_first_step_retries_then_falls_through() {
    upstream_at_first_step(server_error).await;
}

#[tokio::test(start_paused = true)]
async fn policy_server_error_at_last_step_retries_then_defers() {
    upstream_at_last_step(server_error).await;
}

#[tokio::test(start_paused = true)]
async fn policy_timeout_at_first_step_retries_then_falls_through() {
    upstream_at_first_step(timeout).await;
}

#[tokio::test(start_paused = true)]
async fn policy_timeout_at_last_step_retries_then_defers() {
    upstream_at_last_step(timeout).await;
}

#[tokio::test(start_paused = true)]
async fn policy_transport_at_first_step_retries_then_falls_through() {
    upstream_at_first_step(transport).await;
}

#[tokio::test(start_paused = true)]
async fn policy_transport_at_last_step_retries_then_defers() {
    upstream_at_last_step(transport).await;
}

/// A call that never answers is cut at the chain's request timeout and retried like one
/// the provider reported as timed out.
#[tokio::test(start_paused = true)]
async fn policy_a_hung_call_times_out_and_is_retried() {
    struct Hangs(Arc<Scripted>);
    #[async_trait]
    impl ImageProvider for Hangs {
        async fn generate(
            &self,
            model: &str,
            req: &ImageRequest,
        ) -> pacer_core::provider::Result<ImageResponse> {
            let first = self.0.calls().is_empty();
            let answer = self.0.generate(model, req).await;
            if first {
                std::future::pending::<()>().await;
            }
            answer
        }
    }
    let rig = Rig::new(two_steps(), always_image());
    let (tx, rx) = watch::channel(Arc::new(two_steps()));
    let handler = Handler::new(
        rx,
        Arc::new(Limiters::with_memory(rig.limiter.clone())),
        Providers {
            gemini: Some(Arc::new(Hangs(rig.provider.clone()))),
            openai: None,
            per_pool: None,
        },
        rig.sink.clone(),
        Records::memory(),
        Arc::new(Metrics::default()),
        "replica-2",
        HandlerOptions::default(),
    );
    let out = handler.handle(&body("r1"), Attempt::first()).await;
    drop(tx);
    served_by(&out, A, 2);
    assert_eq!(rig.models_called(), [A, A]);
    let calls = rig.provider.calls();
    assert!(calls[1].at >= Duration::from_secs(5), "{:?}", calls[1].at);
}

// --- The request can never succeed: fail it, try nothing else.

#[tokio::test(start_paused = true)]
async fn policy_blocked_at_first_step_fails_the_request() {
    let (rig, out) = at_first_step(blocked).await;
    failed_with(&out, "blocked (model-a)");
    assert_eq!(rig.models_called(), [A]);
    let record = rig.handler.records().get("r1").await.unwrap().unwrap();
    assert_eq!(record.status, Status::Failed);
    assert_eq!(record.attempts, 1);
}

#[tokio::test(start_paused = true)]
async fn policy_blocked_at_last_step_fails_the_request() {
    let (rig, out) = at_last_step(blocked).await;
    failed_with(&out, "blocked (model-b)");
    assert_eq!(rig.models_called(), [B]);
}

#[tokio::test(start_paused = true)]
async fn policy_invalid_at_first_step_fails_the_request() {
    let (rig, out) = at_first_step(invalid).await;
    failed_with(&out, "invalid (model-a)");
    assert_eq!(rig.models_called(), [A]);
}

#[tokio::test(start_paused = true)]
async fn policy_invalid_at_last_step_fails_the_request() {
    let (rig, out) = at_last_step(invalid).await;
    failed_with(&out, "invalid (model-b)");
    assert_eq!(rig.models_called(), [B]);
}

// --- Account problems: defer and alert, never fail, never try the pool's other steps.

/// Each account error, at the first step and at the last: deferred for
/// [`pacer_core::provider::ACCOUNT_DEFER`] with the account reason and its metric, only the
/// failing step called, no failed record, the claim given back for the redelivery.
#[tokio::test(start_paused = true)]
async fn policy_account_errors_defer_and_alert_at_either_step() {
    let cases: [(&str, MakeError, &str); 3] = [
        ("credit exhausted", credit_exhausted, "credit_exhausted"),
        ("unauthorized", unauthorized, "unauthorized"),
        ("forbidden", forbidden, "unauthorized"),
    ];
    for (name, err, metric) in cases {
        for (step, (rig, out)) in [(A, at_first_step(err).await), (B, at_last_step(err).await)] {
            let case = format!("{name} at {step}");
            assert_eq!(
                deferred(&out),
                (
                    pacer_core::provider::ACCOUNT_DEFER + SLACK,
                    DeferReason::Account
                ),
                "{case}"
            );
            assert_eq!(rig.models_called(), [step], "{case}");
            assert_eq!(rig.account_errors(metric), 1, "{case}");
            assert!(
                rig.handler.records().get("r1").await.unwrap().is_none(),
                "{case}"
            );
            assert!(rig.claimable("r1").await, "{case}");
        }
    }
}

// --- Unknown or retired model: fall through; with no step left, defer as a config problem.

#[tokio::test(start_paused = true)]
async fn policy_model_not_found_at_first_step_falls_through() {
    let (rig, out) = at_first_step(model_not_found).await;
    served_by(&out, B, 2);
    assert_eq!(rig.models_called(), [A, B]);
}

#[tokio::test(start_paused = true)]
async fn policy_model_not_found_at_last_step_defers_for_config() {
    let (rig, out) = at_last_step(model_not_found).await;
    // The handler's default defer (5 s) is sooner than A's cooldown.
    assert_eq!(
        deferred(&out),
        (Duration::from_secs(5) + SLACK, DeferReason::Config)
    );
    assert_eq!(rig.models_called(), [B]);
}

// --- The walk's own limits.

/// A transient error followed by an image: the same step serves it.
#[tokio::test(start_paused = true)]
async fn policy_one_transient_error_is_retried_on_the_same_step() {
    let rig = Rig::new(
        two_steps(),
        Box::new(|n, model| {
            if n == 0 {
                Err(overloaded(model))
            } else {
                image(Some(20))
            }
        }),
    );
    let out = rig.handle(&body("r1")).await;
    served_by(&out, A, 2);
    assert_eq!(rig.models_called(), [A, A]);
    assert_eq!(rig.tickets().len(), 2);
}

/// Retries exhausted on every step: the message is deferred upstream, never failed.
#[tokio::test(start_paused = true)]
async fn policy_retries_exhausted_on_both_steps_defer() {
    let rig = Rig::new(two_steps(), Box::new(|_, model| Err(server_error(model))));
    let (_, reason) = deferred(&rig.handle(&body("r1")).await);
    assert_eq!(reason, DeferReason::Upstream);
    assert_eq!(rig.models_called(), [A, A, A, B, B, B]);
    assert!(rig.handler.records().get("r1").await.unwrap().is_none());
}

/// A retry that would start after the request's deadline is not made.
#[tokio::test(start_paused = true)]
async fn policy_no_retry_past_the_deadline() {
    let rig = Rig::new(
        config(&[(A, limits(100, 1000))], &[(A, Duration::from_secs(10))]),
        Box::new(|_, _| {
            Err(ProviderError::RateLimitedBare {
                retry_delay: Some(Duration::from_secs(60)),
                message: "Resource has been exhausted".into(),
            })
        }),
    );
    let deadline = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(30);
    let out = rig
        .handle(&format!(
            r#"{{"id":"r1","chain":"chain","prompt":"p","deadline":"{deadline}"}}"#
        ))
        .await;
    assert_eq!(
        deferred(&out),
        (Duration::from_secs(60) + SLACK, DeferReason::RateLimited)
    );
    assert_eq!(rig.models_called(), [A]);
}

/// A step whose capacity is further away than its max wait is skipped without a call.
#[tokio::test(start_paused = true)]
async fn policy_max_wait_exceeded_falls_through_without_a_call() {
    let rig = Rig::new(
        config(
            &[(A, limits(1, 30_000)), (B, limits(100, 1000))],
            &[(A, Duration::from_secs(1)), (B, Duration::from_secs(1))],
        ),
        always_image(),
    );
    served_by(&rig.handle(&body("r1")).await, A, 1);
    served_by(&rig.handle(&body("r2")).await, B, 1);
    assert_eq!(rig.models_called(), [A, B]);
    // One step only: the request is deferred until A has room.
    let rig = Rig::new(
        config(&[(A, limits(1, 30_000))], &[(A, Duration::from_secs(1))]),
        always_image(),
    );
    served_by(&rig.handle(&body("r1")).await, A, 1);
    let (after, reason) = deferred(&rig.handle(&body("r2")).await);
    assert_eq!(reason, DeferReason::Capacity);
    assert!(after > Duration::from_secs(29), "{after:?}");
    assert_eq!(rig.models_called(), [A]);
}

/// A model cooling down (another replica's 429) is skipped without a call.
#[tokio::test(start_paused = true)]
async fn policy_a_cooling_model_is_skipped_without_a_call() {
    let rig = Rig::new(
        config(&[(A, limits(100, 1000))], &[(A, Duration::from_secs(1))]),
        always_image(),
    );
    rig.limiter
        .penalize(&rig.key(A), LONG_COOLDOWN, PenaltyScope::PerMinute)
        .await
        .unwrap();
    let (after, reason) = deferred(&rig.handle(&body("r1")).await);
    assert_eq!(reason, DeferReason::RateLimited);
    assert_eq!(after, LONG_COOLDOWN + SLACK);
    assert!(rig.provider.calls().is_empty());
}

/// Per-day 429 on the only step: deferred until Pacific midnight, and later requests are
/// deferred from this replica's memo without asking the limiter.
#[tokio::test(start_paused = true)]
async fn policy_per_day_skip_on_the_only_step_defers_for_hours() {
    let rig = failing_on(
        config(&[(A, limits(100, 1000))], &[(A, Duration::from_secs(1))]),
        A,
        per_day_429,
    );
    let (after, reason) = deferred(&rig.handle(&body("r1")).await);
    assert_eq!(reason, DeferReason::RateLimited);
    assert!(after > Duration::from_secs(60), "{after:?}");
    let acquires = rig.losing.acquires.load(Ordering::SeqCst);
    let (again, reason) = deferred(&rig.handle(&body("r2")).await);
    assert_eq!(reason, DeferReason::RateLimited);
    assert!(again > Duration::from_secs(60), "{again:?}");
    assert_eq!(rig.losing.acquires.load(Ordering::SeqCst), acquires);
    assert_eq!(rig.models_called(), [A]);
}

// --- Issue 12: the message lifecycle.

/// A request whose input tokens exceed the per-window limit of every step's model can never
/// run: it fails with that reason instead of being deferred until the dead-letter queue.
#[tokio::test(start_paused = true)]
async fn a_request_that_fits_no_step_fails_with_the_reason() {
    let tight = ModelLimits {
        tpm: Some(3),
        ..limits(100, 1000)
    };
    let rig = Rig::new(
        config(
            &[(A, tight.clone()), (B, tight)],
            &[(A, Duration::from_secs(1)), (B, Duration::from_secs(1))],
        ),
        always_image(),
    );
    let out = rig.handle(&body("r1")).await;
    failed_saying(&out, "exceed a limit of every model");
    assert!(rig.provider.calls().is_empty());
}

/// Only one step too small: the other serves it.
#[tokio::test(start_paused = true)]
async fn a_request_that_fits_one_step_is_served_there() {
    let tight = ModelLimits {
        tpm: Some(3),
        ..limits(100, 1000)
    };
    let rig = Rig::new(
        config(
            &[(A, tight), (B, limits(100, 1000))],
            &[(A, Duration::from_secs(1)), (B, Duration::from_secs(1))],
        ),
        always_image(),
    );
    served_by(&rig.handle(&body("r1")).await, B, 1);
}

/// Under a caller's deadline (a Lambda invocation) a booking further out than the deadline
/// minus the call's budget (here the chain's 5 s request timeout) is not taken: the message
/// is deferred, nothing is called.
#[tokio::test(start_paused = true)]
async fn a_delivery_defers_what_its_deadline_cannot_fit() {
    // One per 10 s, steps may wait 60 s: r1 takes the window, r2 would wait 10 s.
    let rig = Rig::new(
        config(&[(A, limits(1, 10_000))], &[(A, Duration::from_secs(60))]),
        always_image(),
    );
    served_by(&rig.handle(&body("r1")).await, A, 1);
    let attempt = Attempt {
        receive_count: 1,
        deadline: Some(Instant::now() + Duration::from_secs(12)),
    };
    let out = rig.handle_attempt(&body("r2"), attempt).await;
    let (after, _) = deferred(&out);
    assert!(after >= Duration::from_secs(9), "{after:?}");
    assert_eq!(rig.provider.calls().len(), 1);
    // With time enough (the wait and the call), it waits its booking out and is served.
    let attempt = Attempt {
        receive_count: 2,
        deadline: Some(Instant::now() + Duration::from_secs(16)),
    };
    served_by(&rig.handle_attempt(&body("r2"), attempt).await, A, 1);
}

/// Less time left than one call needs: no booking at all, deferred for another delivery.
#[tokio::test(start_paused = true)]
async fn a_delivery_without_time_for_a_call_defers_at_once() {
    let rig = Rig::new(
        config(&[(A, limits(10, 10_000))], &[(A, Duration::from_secs(60))]),
        always_image(),
    );
    let attempt = Attempt {
        receive_count: 1,
        deadline: Some(Instant::now() + Duration::from_secs(1)),
    };
    let out = rig.handle_attempt(&body("r1"), attempt).await;
    assert_eq!(deferred(&out).1, DeferReason::Deadline);
    assert!(rig.provider.calls().is_empty());
    assert!(rig.tickets().is_empty());
}

/// A claim taken over while the request waits for its booking (its holder stalled past the
/// lease): the call does not go out, the booking is released, the message is deferred as
/// in progress, and the new holder's claim stays.
#[tokio::test(start_paused = true)]
async fn a_claim_lost_while_waiting_stops_the_call() {
    let rig = Rig::with_lease(
        config(&[(A, limits(1, 10_000))], &[(A, Duration::from_secs(60))]),
        always_image(),
        Duration::from_secs(6),
    );
    served_by(&rig.handle(&body("r1")).await, A, 1);
    let handler = rig.handler.clone();
    let waiting = tokio::spawn(async move { handler.handle(&body("r2"), Attempt::first()).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    rig.handler
        .records()
        .steal_claim("r2", "another-replica", Duration::from_secs(60));
    let out = waiting.await.expect("handler task");
    assert_eq!(deferred(&out).1, DeferReason::InProgress);
    assert_eq!(rig.provider.calls().len(), 1, "only r1 was called");
    assert!(!rig.claimable("r2").await, "the new holder keeps its claim");
}

/// A sink that refuses for good (no permission): the paid-for image is not generated
/// again on every delivery; the request fails once, with the sink's error.
#[tokio::test(start_paused = true)]
async fn a_permanent_sink_failure_fails_the_request_once() {
    let rig = Rig::new(two_steps(), always_image());
    rig.sink.permanent.store(true, Ordering::SeqCst);
    rig.sink.fail_puts.store(1, Ordering::SeqCst);
    let out = rig.handle(&body("r1")).await;
    failed_saying(&out, "for good");
    assert_eq!(rig.provider.calls().len(), 1);
    assert!(matches!(
        rig.handle(&body("r1")).await,
        Outcome::AlreadyDone(_)
    ));
    assert_eq!(rig.provider.calls().len(), 1, "not generated again");
}

/// Two requests naming the same outputKey: the second is not recorded as succeeded with
/// the first one's image; it fails and says whose image holds the key.
#[tokio::test(start_paused = true)]
async fn an_output_key_holding_another_request_s_image_fails() {
    let rig = Rig::new(two_steps(), always_image());
    let with_key = |id: &str| {
        format!(r#"{{"id":"{id}","chain":"chain","prompt":"a fox","outputKey":"shared/fox.png"}}"#)
    };
    served_by(&rig.handle(&with_key("a")).await, A, 1);
    let out = rig.handle(&with_key("b")).await;
    failed_saying(&out, r#"the image of request "a""#);
    assert_eq!(
        rig.provider.calls().len(),
        1,
        "b was not generated over a's image"
    );
}

/// An account error pauses every model of the pool for every replica (the account is the
/// pool's project): the next request calls nothing and is deferred until the pause ends.
#[tokio::test(start_paused = true)]
async fn an_account_error_pauses_every_model_of_the_pool() {
    let rig = failing_on(two_steps(), A, unauthorized);
    assert_eq!(
        deferred(&rig.handle(&body("r1")).await).1,
        DeferReason::Account
    );
    assert_eq!(rig.models_called(), [A]);
    let (after, _) = deferred(&rig.handle(&body("r2")).await);
    assert_eq!(
        rig.models_called(),
        [A],
        "B was not tried on a refused account"
    );
    assert!(
        after >= pacer_core::provider::ACCOUNT_DEFER - Duration::from_secs(1),
        "{after:?}"
    );
}

// --- Issue 18: a limit change reaches bookings already made.

/// A model removed from its pool while a request waits for it: the booking is given back
/// and the request deferred for the configuration, not called.
#[tokio::test(start_paused = true)]
async fn a_model_removed_while_waiting_is_not_called() {
    let rig = Rig::new(
        config(&[(A, limits(1, 10_000))], &[(A, Duration::from_secs(60))]),
        always_image(),
    );
    served_by(&rig.handle(&body("r1")).await, A, 1);
    let handler = rig.handler.clone();
    let waiting = tokio::spawn(async move { handler.handle(&body("r2"), Attempt::first()).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut without_a = config(&[(B, limits(1, 10_000))], &[(A, Duration::from_secs(60))]);
    without_a.version += 1;
    rig._config_tx
        .send(Arc::new(without_a))
        .expect("config receivers");
    let out = waiting.await.expect("handler task");
    assert_eq!(deferred(&out).1, DeferReason::Config, "{out:?}");
    assert_eq!(rig.provider.calls().len(), 1);
}

// --- Issue 13, finish reasons.

fn no_image(_: &str) -> ProviderError {
    ProviderError::Blocked {
        reason: pacer_core::provider::BlockReason::Finish("NO_IMAGE".into()),
        message: "I can describe it instead.".into(),
    }
}

/// A model that answers in words only is asked once more, then the chain falls through to
/// its next step, which draws the image.
#[tokio::test(start_paused = true)]
async fn an_answer_without_an_image_is_retried_then_the_next_step_serves() {
    let rig = failing_on(two_steps(), A, no_image);
    served_by(&rig.handle(&body("r1")).await, B, 3);
    assert_eq!(rig.models_called(), [A, A, B]);
}

/// No step draws the prompt: the request fails with the answer, after two calls per step,
/// instead of being deferred and asked again forever.
#[tokio::test(start_paused = true)]
async fn no_image_from_any_step_fails_the_request_with_the_answer() {
    let rig = Rig::new(two_steps(), Box::new(|_, model| Err(no_image(model))));
    let out = rig.handle(&body("r1")).await;
    failed_saying(&out, "no step of chain");
    failed_saying(&out, "NO_IMAGE");
    assert_eq!(rig.models_called(), [A, A, B, B]);
}

/// Issue 15: a message books as its tenant. One the pool does not declare fails without a
/// call, naming the field; a chain that pins a tenant refuses a message naming another;
/// a declared tenant books under its ceiling (25 % of 4 per window: one call, the next
/// deferred though the pool has room).
#[tokio::test(start_paused = true)]
async fn a_message_books_as_its_tenant() {
    let mut cfg = config(&[(A, limits(4, 10_000))], &[(A, Duration::from_secs(1))]);
    let pool = cfg.pools.get_mut("default/pool").expect("pool");
    pool.tenants = vec![
        pacer_core::quota::TenantShare {
            name: "web".into(),
            weight: 1,
            floor_permille: 0,
            ceiling_permille: 250,
            daily_budget_micros: None,
            monthly_budget_micros: None,
        },
        pacer_core::quota::TenantShare {
            name: "default".into(),
            weight: 1,
            floor_permille: 0,
            ceiling_permille: 1000,
            daily_budget_micros: None,
            monthly_budget_micros: None,
        },
    ];
    let mut pinned = cfg.chains["default/chain"].clone();
    pinned.name = "default/pinned".into();
    pinned.tenant = Some("web".into());
    cfg.chains.insert(pinned.name.clone(), pinned);
    let rig = Rig::new(cfg, always_image());
    let with = |id: &str, chain: &str, tenant: &str| {
        format!(r#"{{"id":"{id}","chain":"{chain}","prompt":"p","tenant":"{tenant}"}}"#)
    };
    for (body, says) in [
        (with("r1", "chain", "ops"), "\"ops\" is not one of pool"),
        (with("r2", "pinned", "default"), "books as tenant \"web\""),
        (with("r3", "chain", "Web"), "not a tenant name"),
    ] {
        let out = rig.handle(&body).await;
        let Outcome::Failed(record) = out else {
            panic!("{body}: {out:?}");
        };
        let error = record.error.unwrap_or_default();
        assert!(
            error.contains("`tenant`") && error.contains(says),
            "{error}"
        );
    }
    assert!(
        rig.provider.calls().is_empty(),
        "no call for a refused tenant"
    );
    let first = rig.handle(&with("r4", "pinned", "web")).await;
    assert!(matches!(first, Outcome::Succeeded(_)), "{first:?}");
    let capped = rig
        .handle(r#"{"id":"r5","chain":"pinned","prompt":"p"}"#)
        .await;
    assert!(
        deferred(&capped).0 > Duration::from_secs(5),
        "the ceiling defers it to the next window: {capped:?}"
    );
    let counted = |tenant: &str, outcome: &'static str| {
        rig.handler
            .metrics
            .tenant_messages
            .get_or_create(&crate::metrics::TenantOutcomeLabels {
                pool: "default/pool".into(),
                tenant: tenant.into(),
                outcome,
            })
            .get()
    };
    assert_eq!(
        (counted("web", "succeeded"), counted("web", "deferred")),
        (1, 1),
        "deliveries counted by tenant"
    );
    let other = rig.handle(&body("r6")).await;
    assert!(
        matches!(other, Outcome::Succeeded(_)),
        "the pool has room for the others: {other:?}"
    );
    assert_eq!(rig.provider.calls().len(), 2);
}

/// Issue 15: a tenant whose daily budget is spent has its request deferred to the reset
/// (reason `budget`), or failed at once when its deadline comes before the reset.
#[tokio::test(start_paused = true)]
async fn a_spent_budget_defers_to_the_reset_or_fails_before_a_deadline() {
    let priced = ModelLimits {
        price_micros_per_image: Some(100_000),
        ..limits(100, 1000)
    };
    let mut cfg = config(&[(A, priced)], &[(A, Duration::from_secs(1))]);
    cfg.pools.get_mut("default/pool").expect("pool").tenants =
        vec![pacer_core::quota::TenantShare {
            name: "web".into(),
            weight: 1,
            floor_permille: 0,
            ceiling_permille: 1000,
            daily_budget_micros: Some(150_000),
            monthly_budget_micros: None,
        }];
    let rig = Rig::new(cfg, always_image());
    let with = |id: &str, extra: &str| {
        format!(r#"{{"id":"{id}","chain":"chain","prompt":"p","tenant":"web"{extra}}}"#)
    };
    let first = rig.handle(&with("r1", "")).await;
    assert!(matches!(first, Outcome::Succeeded(_)), "{first:?}");
    let second = rig.handle(&with("r2", "")).await;
    assert_eq!(deferred(&second).1, DeferReason::Budget, "{second:?}");
    let soon = (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60)).to_string();
    let third = rig
        .handle(&with("r3", &format!(r#","deadline":"{soon}""#)))
        .await;
    let Outcome::Failed(record) = third else {
        panic!("{third:?}");
    };
    assert!(
        record.error.unwrap_or_default().contains("budget is spent"),
        "fails now, not at the reset"
    );
    assert_eq!(rig.provider.calls().len(), 1, "one call within the budget");
}
