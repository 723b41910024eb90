//! The request handler: one function shared by the SQS worker, the Lambda handler, `pacer
//! generate`, `pacer demo` and `pacer loadtest`.
//!
//! For one delivery it parses the message, skips work already done (the result record, then
//! the sink), claims the request so no other replica generates it at the same time, and walks
//! the chain: estimate the costs (an upper bound), `acquire` with the step's max wait bounded
//! by the deadline, sleep exactly the booked wait, call the provider, `reconcile` with the
//! real usage, store the image, write the result. Provider errors are handled by their
//! type: a 429 with a quota `penalize`s the model for every replica and falls through; a
//! per-day 429 skips the model until Pacific midnight; overload and server errors back off
//! with full jitter within the retry policy; a blocked or invalid request fails; a request
//! that finds no capacity within its budget is deferred, never dropped.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use pacer_core::{
    config::FailureMode,
    config::{CompiledChain, CompiledConfig, CompiledPool, ProviderKind},
    limiter::{
        Blocker, Decision, Limiter, PenaltyScope, QuotaKey, SystemClock,
        failsafe::{BreakerConfig, FailsafeLimiter},
        memory::MemoryLimiter,
        redis::RedisLimiter,
    },
    provider::{Disposition, ImageProvider, ImageRequest, ImageResponse, ProviderError},
    quota::{Costs, ImageSize, model_info},
};
use rand::Rng;
use tokio::{sync::watch, time::Instant};
use tracing::Instrument;

use crate::{
    message::GenerationRequest,
    metrics::{CallLabels, Metrics},
    outcome::{DeferReason, Outcome, Process},
    queue::Queue,
    record::{Records, ResultRecord, Status},
    sink::Sink,
};

/// The providers a replica can reach, by the pool's provider kind.
#[derive(Clone, Default)]
pub struct Providers {
    /// Gemini (and Vertex, through a Gemini-compatible base URL).
    pub gemini: Option<Arc<dyn ImageProvider>>,
    /// An OpenAI-compatible gateway.
    pub openai: Option<Arc<dyn ImageProvider>>,
}

impl Providers {
    fn for_pool(&self, pool: &CompiledPool) -> Option<Arc<dyn ImageProvider>> {
        match pool.provider {
            ProviderKind::Gemini | ProviderKind::Vertex => self.gemini.clone(),
            ProviderKind::OpenaiCompatible => self.openai.clone(),
        }
    }
}

/// The limiter each pool uses: the shared one in Redis behind the pool's failure mode, or
/// the in-memory one when the process runs without Redis.
pub struct Limiters {
    shared: Option<RedisLimiter>,
    memory: Arc<MemoryLimiter>,
    per_mode: Mutex<HashMap<(FailureMode, u32), Arc<dyn Limiter>>>,
}

impl Limiters {
    /// Every pool shares Redis (each behind its failure mode and a circuit breaker).
    pub fn shared(redis: RedisLimiter) -> Self {
        Self {
            shared: Some(redis),
            ..Self::memory()
        }
    }

    /// One process, no Redis: the in-memory limiter (same semantics).
    pub fn memory() -> Self {
        Self {
            shared: None,
            memory: Arc::new(MemoryLimiter::new(Arc::new(SystemClock))),
            per_mode: Mutex::default(),
        }
    }

    /// The limiter for `pool`.
    pub fn for_pool(&self, pool: &CompiledPool) -> Arc<dyn Limiter> {
        let Some(shared) = &self.shared else {
            return self.memory.clone();
        };
        let key = (pool.failure_mode, pool.expected_replicas.max(1));
        let mut map = self.per_mode.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key)
            .or_insert_with(|| {
                Arc::new(FailsafeLimiter::new(
                    shared.clone(),
                    key.0,
                    key.1,
                    BreakerConfig::default(),
                    Arc::new(SystemClock),
                ))
            })
            .clone()
    }
}

/// Tunables of the handler.
#[derive(Debug, Clone)]
pub struct HandlerOptions {
    /// How long a claim on a request lasts unless renewed. The handler renews it every
    /// third of the lease while it works, so this bounds how long a crashed replica's
    /// claim keeps others from a request.
    pub claim_lease: Duration,
    /// The defer delay when nothing better is known.
    pub default_defer: Duration,
    /// Added to every defer, so a message returns just after capacity frees (SQS rounds
    /// to seconds anyway).
    pub defer_slack: Duration,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        Self {
            claim_lease: Duration::from_secs(30),
            default_defer: Duration::from_secs(5),
            defer_slack: Duration::from_millis(50),
        }
    }
}

/// Everything the handler needs, built once per process.
pub struct Handler {
    config: watch::Receiver<Arc<CompiledConfig>>,
    limiters: Arc<Limiters>,
    providers: Providers,
    sink: Arc<dyn Sink>,
    records: Records,
    metrics: Arc<Metrics>,
    owner: String,
    options: HandlerOptions,
    /// Models whose per-day quota is spent, until when (this replica's memo of what the
    /// limiter's per-day penalty also tells every replica).
    daily_spent: Mutex<HashMap<QuotaKey, Instant>>,
    /// Where final records are also sent, if anywhere.
    result_queue: Option<Arc<dyn Queue>>,
}

/// The successful generation of one image.
struct Generated {
    model: String,
    location: String,
    input_tokens: u64,
    output_tokens: u64,
    cost_micros: u64,
}

/// Why a chain walk ended without an image.
enum Miss {
    /// Defer the message.
    Defer(Duration, DeferReason),
    /// Fail the request with this reason.
    Fail(String),
}

impl Handler {
    /// A handler over its collaborators. `owner` names this replica in claims.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: watch::Receiver<Arc<CompiledConfig>>,
        limiters: Arc<Limiters>,
        providers: Providers,
        sink: Arc<dyn Sink>,
        records: Records,
        metrics: Arc<Metrics>,
        owner: impl Into<String>,
        options: HandlerOptions,
    ) -> Self {
        Self {
            config,
            limiters,
            providers,
            sink,
            records,
            metrics,
            owner: owner.into(),
            options,
            daily_spent: Mutex::default(),
            result_queue: None,
        }
    }

    /// Also sends every final result record (as JSON) to `queue`.
    pub fn with_result_queue(mut self, queue: Arc<dyn Queue>) -> Self {
        self.result_queue = Some(queue);
        self
    }

    /// Sends a final record to the result queue. A failure is logged, not retried: the
    /// record is already in Redis, and deferring would risk a second generation.
    async fn publish(&self, record: &ResultRecord) {
        if let Some(queue) = &self.result_queue {
            let body = serde_json::to_string(record).unwrap_or_default();
            if let Err(e) = queue.send(&body).await {
                tracing::warn!(error = %e, id = %record.id, "sending the result to the result queue failed");
            }
        }
    }

    /// The result records (for callers that report on them).
    pub fn records(&self) -> &Records {
        &self.records
    }

    fn defer(&self, after: Duration, reason: DeferReason) -> Outcome {
        Outcome::Defer {
            after: after + self.options.defer_slack,
            reason,
        }
    }

    async fn fail(&self, id: &str, attempts: u32, reason: String) -> Outcome {
        let record = ResultRecord::failed(id, attempts, reason);
        match self.records.put(&record).await {
            Ok(()) => {
                self.publish(&record).await;
                Outcome::Failed(record)
            }
            Err(e) => {
                tracing::warn!(error = %e, "storing a failed result failed; deferring");
                self.defer(self.options.default_defer, DeferReason::Infrastructure)
            }
        }
    }

    /// Handles one delivery (see the module docs).
    pub async fn handle(&self, body: &str) -> Outcome {
        let req = match GenerationRequest::parse(body) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "rejecting a malformed message");
                return match GenerationRequest::salvage_id(body) {
                    Some(id) => self.fail(&id, 0, e.to_string()).await,
                    None => Outcome::Failed(ResultRecord::failed("", 0, e.to_string())),
                };
            }
        };
        let span = tracing::info_span!("request", id = %req.id, chain = %req.chain_name());
        self.handle_request(req).instrument(span).await
    }

    async fn handle_request(&self, req: GenerationRequest) -> Outcome {
        match self.records.get(&req.id).await {
            Ok(Some(done)) => return Outcome::AlreadyDone(done),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "reading the result record failed");
                return self.defer(self.options.default_defer, DeferReason::Infrastructure);
            }
        }
        if req.deadline.is_some_and(|d| d <= jiff::Timestamp::now()) {
            return self
                .fail(
                    &req.id,
                    0,
                    "deadline passed before the request could run".into(),
                )
                .await;
        }
        let config = self.config.borrow().clone();
        let (chain, pool) = match config.chain(&req.chain_name()) {
            Ok(found) => found,
            Err(e) => return self.fail(&req.id, 0, e.to_string()).await,
        };
        let Some(provider) = self.providers.for_pool(pool) else {
            return self
                .fail(
                    &req.id,
                    0,
                    format!(
                        "no provider of kind {:?} is configured in this replica",
                        pool.provider
                    ),
                )
                .await;
        };
        // One token per delivery: a duplicate delivery to this same replica must not pass.
        let token = format!("{}:{:016x}", self.owner, rand::rng().random::<u64>());
        let lease = self.options.claim_lease;
        match self.records.claim(&req.id, &token, lease).await {
            Ok(true) => {}
            Ok(false) => return self.defer(lease / 2, DeferReason::InProgress),
            Err(e) => {
                tracing::warn!(error = %e, "claiming the request failed");
                return self.defer(self.options.default_defer, DeferReason::Infrastructure);
            }
        }
        let renew = {
            let (records, id, token) = (self.records.clone(), req.id.clone(), token.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    if let Err(e) = records.claim(&id, &token, lease).await {
                        tracing::warn!(error = %e, "renewing the claim failed");
                    }
                }
            })
        };
        let outcome = self
            .generate_all(&req, chain, pool, provider.as_ref())
            .await;
        renew.abort();
        if let Outcome::Defer { .. } = outcome {
            let _ = self.records.unclaim(&req.id, &token).await;
        }
        outcome
    }

    async fn generate_all(
        &self,
        req: &GenerationRequest,
        chain: &CompiledChain,
        pool: &CompiledPool,
        provider: &dyn ImageProvider,
    ) -> Outcome {
        let mut record = ResultRecord {
            id: req.id.clone(),
            status: Status::Succeeded,
            model: None,
            attempts: 0,
            input_tokens: 0,
            output_tokens: 0,
            cost_micros: 0,
            images: Vec::new(),
            error: None,
            finished_at: String::new(),
        };
        for index in 0..req.images {
            let key = req.output_key(index);
            // Stored by an earlier delivery that crashed before writing the record.
            match self.sink.existing(&key).await {
                Ok(Some(location)) => {
                    record.images.push(location);
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "checking the sink failed");
                    return self.defer(self.options.default_defer, DeferReason::Infrastructure);
                }
            }
            match self
                .walk_chain(
                    req,
                    index,
                    &key,
                    chain,
                    pool,
                    provider,
                    &mut record.attempts,
                )
                .await
            {
                Ok(g) => {
                    record.model = Some(g.model);
                    record.images.push(g.location);
                    record.input_tokens += g.input_tokens;
                    record.output_tokens += g.output_tokens;
                    record.cost_micros += g.cost_micros;
                }
                Err(Miss::Defer(after, reason)) => return self.defer(after, reason),
                Err(Miss::Fail(reason)) => {
                    return self.fail(&req.id, record.attempts, reason).await;
                }
            }
        }
        record.finished_at = jiff::Timestamp::now().to_string();
        match self.records.put(&record).await {
            Ok(()) => {
                self.publish(&record).await;
                Outcome::Succeeded(record)
            }
            Err(e) => {
                // The images are stored: the redelivery finds them and writes the record.
                tracing::warn!(error = %e, "storing the result failed");
                self.defer(Duration::from_secs(1), DeferReason::Infrastructure)
            }
        }
    }

    /// Tries the chain's steps in order for image `index`.
    #[allow(clippy::too_many_arguments)]
    async fn walk_chain(
        &self,
        req: &GenerationRequest,
        index: u32,
        key: &str,
        chain: &CompiledChain,
        pool: &CompiledPool,
        provider: &dyn ImageProvider,
        attempts: &mut u32,
    ) -> Result<Generated, Miss> {
        let mut image_req = ImageRequest::new(&req.prompt);
        // The earliest time any step could run again, to defer by.
        let mut soonest: Option<Duration> = None;
        let mut reason = DeferReason::Capacity;
        let mut note = |after: Option<Duration>, why: DeferReason, reason: &mut DeferReason| {
            if let Some(a) = after
                && soonest.is_none_or(|s| a < s)
            {
                soonest = Some(a);
                *reason = why;
            }
        };
        let timeout = Duration::from_millis(chain.request_timeout_ms.max(1));
        let limiter = self.limiters.for_pool(pool);
        for step in &chain.steps {
            let qkey = pool.key(&step.model);
            if let Some(until) = self.daily_spent_until(&qkey) {
                note(
                    Some(until.saturating_duration_since(Instant::now())),
                    DeferReason::RateLimited,
                    &mut reason,
                );
                continue;
            }
            let Some(quota) = pool.model_quota(&step.model) else {
                tracing::warn!(model = %step.model, pool = %pool.name, "the chain's model is not in its pool; skipping");
                continue;
            };
            // The request's own options win; the step's defaults fill what it leaves out.
            image_req.aspect_ratio = req
                .aspect_ratio
                .clone()
                .or_else(|| step.aspect_ratio.clone());
            image_req.image_size = req.image_size.clone().or_else(|| step.image_size.clone());
            let estimate =
                estimate_costs(&step.model, &req.prompt, image_req.image_size.as_deref());
            let mut max_wait = Duration::from_millis(step.max_wait_ms);
            if let Some(deadline) = req.deadline {
                let left = deadline.duration_since(jiff::Timestamp::now());
                max_wait = max_wait.min(Duration::try_from(left).unwrap_or(Duration::ZERO));
            }
            let retry = &chain.retry;
            let mut attempt = 0u32;
            'attempts: loop {
                attempt += 1;
                let booking_id =
                    format!("{}:{index}:{}:{}:{attempt}", req.id, step.model, *attempts);
                let decision = match limiter
                    .acquire(&qkey, &quota, &booking_id, estimate, max_wait)
                    .await
                {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(error = %e, model = %step.model, "limiter unavailable");
                        let after = match &e {
                            pacer_core::limiter::Error::Unavailable { retry_after } => *retry_after,
                            _ => self.options.default_defer,
                        };
                        return Err(Miss::Defer(after, DeferReason::Infrastructure));
                    }
                };
                let ticket = match decision {
                    Decision::Admitted { ticket } => ticket,
                    Decision::Booked { ticket, wait } => {
                        self.metrics.limiter_wait.observe(wait.as_secs_f64());
                        tokio::time::sleep(wait).await;
                        ticket
                    }
                    Decision::Rejected {
                        retry_after,
                        blocking,
                    } => {
                        let why = match blocking {
                            Blocker::Cooldown | Blocker::Daily => DeferReason::RateLimited,
                            _ => DeferReason::Capacity,
                        };
                        if blocking == Blocker::NeverFits {
                            tracing::warn!(model = %step.model, "the request's costs exceed a limit of this model");
                        }
                        note(retry_after, why, &mut reason);
                        break 'attempts;
                    }
                };
                *attempts += 1;
                let call =
                    tokio::time::timeout(timeout, provider.generate(&step.model, &image_req)).await;
                let result = call.unwrap_or(Err(ProviderError::Timeout { after: timeout }));
                let label = match &result {
                    Ok(_) => "ok",
                    Err(e) => e.metric_label(),
                };
                self.metrics
                    .provider_calls
                    .get_or_create(&CallLabels {
                        model: step.model.clone(),
                        result: label,
                    })
                    .inc();
                let err = match result {
                    Ok(resp) => {
                        return self
                            .store(
                                key,
                                &step.model,
                                resp,
                                &ticket,
                                limiter.as_ref(),
                                image_req.image_size.as_deref(),
                            )
                            .await;
                    }
                    Err(e) => e,
                };
                tracing::info!(model = %step.model, attempt, error = %err, "provider call failed");
                match &err {
                    ProviderError::RateLimited {
                        quota: dim,
                        retry_delay,
                        ..
                    } => {
                        let (delay, scope) = if dim.is_per_day() {
                            let until = next_pacific_midnight();
                            self.mark_daily_spent(&qkey, until);
                            (until, PenaltyScope::PerDay)
                        } else {
                            (
                                retry_delay.unwrap_or(Duration::from_secs(10)),
                                PenaltyScope::PerMinute,
                            )
                        };
                        if let Err(e) = limiter.penalize(&qkey, delay, scope).await {
                            tracing::warn!(error = %e, "sharing the cooldown failed");
                        }
                        note(Some(delay), DeferReason::RateLimited, &mut reason);
                        break 'attempts;
                    }
                    _ => match err.disposition() {
                        Disposition::Retry { after } => {
                            if attempt >= retry.attempts {
                                note(
                                    Some(backoff(retry, attempt)),
                                    DeferReason::Upstream,
                                    &mut reason,
                                );
                                break 'attempts;
                            }
                            tokio::time::sleep(after.unwrap_or_else(|| backoff(retry, attempt)))
                                .await;
                        }
                        Disposition::NextModel => break 'attempts,
                        Disposition::FailRequest | Disposition::FixConfig => {
                            return Err(Miss::Fail(format!(
                                "{} ({}): {err}; {}",
                                err.metric_label(),
                                step.model,
                                err.advice()
                            )));
                        }
                    },
                }
            }
        }
        Err(Miss::Defer(
            soonest.unwrap_or(self.options.default_defer),
            reason,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    async fn store(
        &self,
        key: &str,
        model: &str,
        resp: ImageResponse,
        ticket: &pacer_core::limiter::Ticket,
        limiter: &dyn Limiter,
        image_size: Option<&str>,
    ) -> Result<Generated, Miss> {
        let usage = resp.usage.unwrap_or_default();
        let price = image_price(model, image_size);
        let actual = Costs::new(1, usage.prompt_tokens, resp.images.len() as u64, price);
        if let Err(e) = limiter.reconcile(ticket, actual).await {
            tracing::warn!(error = %e, "reconciling the booking failed (it ages out with the window)");
        }
        let Some(image) = resp.images.into_iter().next() else {
            return Err(Miss::Fail(format!("{model} answered without an image")));
        };
        match self.sink.put(key, &image.data, &image.mime_type).await {
            Ok(location) => Ok(Generated {
                model: model.to_owned(),
                location,
                input_tokens: usage.prompt_tokens,
                output_tokens: usage.candidate_tokens,
                cost_micros: price,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "storing the image failed");
                Err(Miss::Defer(
                    self.options.default_defer,
                    DeferReason::Infrastructure,
                ))
            }
        }
    }

    fn daily_spent_until(&self, key: &QuotaKey) -> Option<Instant> {
        let mut map = self.daily_spent.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some(until) if *until > Instant::now() => Some(*until),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    fn mark_daily_spent(&self, key: &QuotaKey, for_: Duration) {
        let mut map = self.daily_spent.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(key.clone(), Instant::now() + for_);
    }
}

#[async_trait]
impl Process for Handler {
    async fn process(&self, body: &str, _receive_count: u32) -> Outcome {
        self.handle(body).await
    }
}

/// An upper bound of what one image request costs, booked before the call; `reconcile`
/// corrects it afterwards, so estimates only ever free capacity.
pub fn estimate_costs(model: &str, prompt: &str, image_size: Option<&str>) -> Costs {
    // Gemini tokenises at about 4 characters a token; 2 is a safe upper bound for any
    // script, plus a fixed allowance for the request's framing.
    let input_tokens = (prompt.chars().count() as u64).div_ceil(2) + 64;
    Costs::new(1, input_tokens, 1, image_price(model, image_size))
}

/// The price of one image in micro-dollars (the largest known when the size is unknown).
pub fn image_price(model: &str, size: Option<&str>) -> u64 {
    let Some(info) = model_info(model) else {
        return 0;
    };
    let size = match size {
        Some("0.5K") => Some(ImageSize::Half),
        Some("1K") | None => Some(ImageSize::K1),
        Some("2K") => Some(ImageSize::K2),
        Some("4K") => Some(ImageSize::K4),
        Some(_) => None,
    };
    size.and_then(|s| info.image_cost(s))
        .map(|c| c.price_micros)
        .unwrap_or_else(|| {
            [ImageSize::Half, ImageSize::K1, ImageSize::K2, ImageSize::K4]
                .iter()
                .filter_map(|s| info.image_cost(*s))
                .map(|c| c.price_micros)
                .max()
                .unwrap_or(0)
        })
}

/// Full-jitter exponential backoff: uniform in [0, min(max, base * 2^(attempt-1))].
pub fn backoff(retry: &pacer_core::config::RetryConfig, attempt: u32) -> Duration {
    let ceiling = retry
        .base_delay_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(30))
        .min(retry.max_delay_ms);
    Duration::from_millis(rand::rng().random_range(0..=ceiling))
}

fn next_pacific_midnight() -> Duration {
    let now = jiff::Timestamp::now();
    let next = pacer_core::pacific::next_midnights(now, 1);
    next.first()
        .map(|m| Duration::try_from(m.duration_since(now)).unwrap_or(Duration::from_secs(3600)))
        .unwrap_or(Duration::from_secs(3600))
}
