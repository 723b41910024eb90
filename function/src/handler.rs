//! The request handler: one function shared by the SQS worker, the Lambda handler, `pacer
//! generate`, `pacer demo` and `pacer loadtest`.
//!
//! For one delivery it parses the message, skips work already done (the result record, then
//! the sink), claims the request so no other replica generates it at the same time, and walks
//! the chain (`walk`): estimate the costs (an upper bound, `costs`), `acquire` with the
//! step's max wait bounded by the deadline, sleep exactly the booked wait, re-`check` the
//! booking, call the provider, `reconcile` with the real usage, store the image, write the
//! result. Every booking carries the delivery's claim token, so a redelivered message books
//! afresh instead of replaying a booking its first delivery already spent.
//!
//! Provider errors are decided by one policy, core's `ProviderError::disposition`: a 429
//! with a quota `penalize`s the model it names for every replica and falls through; a
//! per-day 429 skips the model until Pacific midnight; a bare 429, overload, server errors,
//! timeouts and broken connections are retried with full-jitter backoff within the retry
//! policy (never past the deadline), then fall through; an unknown model falls through; a
//! blocked or invalid request fails; an account problem (bad key, spent credit) defers and
//! alerts, never fails. A request that finds no capacity within its budget is deferred,
//! never dropped, and so is one that arrives before any configuration is loaded.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use pacer_core::{
    config::FailureMode,
    config::{CompiledChain, CompiledConfig, CompiledPool, ProviderKind, VertexSettings},
    limiter::{
        Limiter, QuotaKey, SystemClock, Ticket,
        failsafe::{BreakerConfig, FailsafeLimiter},
        memory::MemoryLimiter,
        redis::RedisLimiter,
    },
    models::ServiceTier,
    provider::{ApiKey, ImageProvider, ImageResponse},
};
use rand::Rng;
use tokio::{sync::watch, time::Instant};
use tracing::Instrument;

mod claim;
mod costs;
#[cfg(test)]
mod tests;
mod walk;

use claim::Claim;
pub use costs::{
    actual_costs, backoff, booking_costs, estimate_costs, image_price, input_token_bound,
    ticket_tag,
};
use walk::Delivery;

use crate::{
    message::GenerationRequest,
    metrics::Metrics,
    outcome::{Attempt, DeferReason, Outcome, Process},
    queue::Queue,
    record::{Records, ResultRecord, Status},
    sink::{Sink, Stored},
};

/// The providers a replica can reach, by the pool's provider kind.
#[derive(Clone, Default)]
pub struct Providers {
    /// Gemini (and Vertex pools, which get clients of their own through `per_pool`).
    pub gemini: Option<Arc<dyn ImageProvider>>,
    /// An OpenAI-compatible gateway.
    pub openai: Option<Arc<dyn ImageProvider>>,
    /// Makes the clients of pools with a key or an endpoint of their own (none: every
    /// pool uses the clients above).
    pub per_pool: Option<Arc<PoolClients>>,
}

impl Providers {
    /// The client `pool` calls with: its own key and endpoint when it names them (each
    /// pool bills its own project), else the replica's.
    fn for_pool(&self, pool: &CompiledPool) -> Result<Arc<dyn ImageProvider>, String> {
        if let Some(per_pool) = &self.per_pool
            && (pool.api_key_env.is_some() || pool.base_url.is_some() || pool.vertex.is_some())
        {
            return per_pool.for_pool(pool);
        }
        match pool.provider {
            ProviderKind::Gemini | ProviderKind::Vertex => self.gemini.clone(),
            ProviderKind::OpenaiCompatible => self.openai.clone(),
        }
        .ok_or_else(|| {
            format!(
                "no provider of kind {:?} is configured in this replica",
                pool.provider
            )
        })
    }
}

/// Builds a client per (provider kind, endpoint, key variable) on first use and keeps it.
pub struct PoolClients {
    make: Box<MakeClient>,
    /// Keys by variable name from elsewhere than the environment (Secrets Manager).
    keys: std::collections::BTreeMap<String, String>,
    made: Mutex<HashMap<ClientId, Arc<dyn ImageProvider>>>,
}

/// What tells pools' clients apart: provider kind, endpoint, key variable, and on Vertex
/// AI the project (in the route) with its location and credentials.
type ClientId = (
    ProviderKind,
    Option<String>,
    Option<String>,
    Option<(String, VertexSettings)>,
);

/// Makes the client `pool` calls with: its endpoint (none: the replica's), `key` (none: the
/// replica's), and on Vertex AI its project, location and credentials.
pub type MakeClient =
    dyn Fn(&CompiledPool, Option<ApiKey>) -> Result<Arc<dyn ImageProvider>, String> + Send + Sync;

impl PoolClients {
    /// Per-pool clients made by `make`.
    pub fn new(make: Box<MakeClient>) -> Self {
        Self::with_keys(Default::default(), make)
    }

    /// Per-pool clients made by `make`, with keys read elsewhere than the environment
    /// (by variable name; the environment wins).
    pub fn with_keys(
        keys: std::collections::BTreeMap<String, String>,
        make: Box<MakeClient>,
    ) -> Self {
        Self {
            make,
            keys,
            made: Mutex::default(),
        }
    }

    fn for_pool(&self, pool: &CompiledPool) -> Result<Arc<dyn ImageProvider>, String> {
        let id = (
            pool.provider,
            pool.base_url.clone(),
            pool.api_key_env.clone(),
            pool.vertex.clone().map(|v| (pool.project.clone(), v)),
        );
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = made.get(&id) {
            return Ok(client.clone());
        }
        let key = match &pool.api_key_env {
            Some(name) => match std::env::var(name)
                .ok()
                .or_else(|| self.keys.get(name).cloned())
            {
                Some(value) if !value.trim().is_empty() => Some(ApiKey::new(value.trim())),
                _ => {
                    return Err(format!(
                        "pool {} takes its API key from the environment variable {name} \
                         (spec.apiKeyEnv), which this replica does not set: set it on every \
                         replica (in Kubernetes, from the project's Secret; in Lambda, or \
                         {name}_SECRET_ARN naming a Secrets Manager secret)",
                        pool.name
                    ));
                }
            },
            None => None,
        };
        let client = (self.make)(pool, key).map_err(|e| format!("pool {}: {e}", pool.name))?;
        made.insert(id, client.clone());
        Ok(client)
    }
}

/// The limiter each pool uses: the shared one in Redis behind the pool's failure mode, or
/// the in-memory one when the process runs without Redis.
pub struct Limiters {
    shared: Option<RedisLimiter>,
    /// The limiter of every pool when there is no Redis.
    local: Arc<dyn Limiter>,
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
        Self::with_memory(Arc::new(MemoryLimiter::new(Arc::new(SystemClock))))
    }

    /// One process, no Redis, with this in-memory limiter (tests: one on a manual clock).
    pub fn with_memory(limiter: Arc<MemoryLimiter>) -> Self {
        Self::single(limiter)
    }

    /// Every pool uses `limiter` as it is (tests: a limiter with injected faults).
    pub fn single(limiter: Arc<dyn Limiter>) -> Self {
        Self {
            shared: None,
            local: limiter,
            per_mode: Mutex::default(),
        }
    }

    /// The limiter for `pool`.
    /// Adds a provider call's duration to the pool's totals in Redis, in the background
    /// (the operator sizes the fleet from them); nothing without Redis.
    pub fn note_call(&self, pool: &str, took: Duration) {
        if let Some(redis) = self.shared.clone() {
            let pool = pool.to_owned();
            tokio::spawn(async move {
                if let Err(e) = redis.note_call(&pool, took).await {
                    tracing::debug!(error = %e, "noting a call's duration failed");
                }
            });
        }
    }

    pub fn for_pool(&self, pool: &CompiledPool) -> Arc<dyn Limiter> {
        let Some(shared) = &self.shared else {
            return self.local.clone();
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
    /// Under a caller's deadline (a Lambda invocation), the time kept for one provider
    /// call: a booking must start, and a retry must begin, at least this long before it.
    pub call_budget: Duration,
    /// A chain the loaded configuration does not know is deferred (the config may be
    /// being applied or restored right now) until the message's receive count reaches
    /// this; then the request fails with the known chains in its reason.
    pub unknown_chain_receives: u32,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        Self {
            claim_lease: Duration::from_secs(30),
            default_defer: Duration::from_secs(5),
            defer_slack: Duration::from_millis(50),
            call_budget: Duration::from_secs(30),
            unknown_chain_receives: 3,
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

    /// Fails the request: its record says why. `owner` is the claim to drop ("" when the
    /// request was not claimed).
    async fn fail(&self, id: &str, attempts: u32, reason: String, owner: &str) -> Outcome {
        self.fail_with(ResultRecord::failed(id, attempts, reason), owner)
            .await
    }

    /// Fails the request for the configuration, before any call: a later delivery of the
    /// id runs again (the config may be fixed by then).
    async fn fail_config(&self, id: &str, reason: String) -> Outcome {
        self.fail_with(ResultRecord::config_failed(id, reason), "")
            .await
    }

    async fn fail_with(&self, record: ResultRecord, owner: &str) -> Outcome {
        match self.records.put(&record, owner).await {
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
    pub async fn handle(&self, body: &str, attempt: Attempt) -> Outcome {
        let req = match GenerationRequest::parse(body) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "rejecting a malformed message");
                return match GenerationRequest::salvage_id(body) {
                    Some(id) => self.fail(&id, 0, e.to_string(), "").await,
                    // No id to record a failure under: only the dead-letter queue keeps it.
                    None => Outcome::DeadLetter {
                        reason: e.to_string(),
                    },
                };
            }
        };
        let span = tracing::info_span!("request", id = %req.id, chain = %req.chain_name());
        self.handle_request(req, attempt).instrument(span).await
    }

    async fn handle_request(&self, req: GenerationRequest, attempt: Attempt) -> Outcome {
        match self.records.get(&req.id).await {
            // A failure for the configuration runs again: it may have been fixed.
            Ok(Some(done)) if !done.config_failure => return Outcome::AlreadyDone(done),
            Ok(Some(_)) => {}
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
                    "",
                )
                .await;
        }
        let config = self.config.borrow().clone();
        if !config.is_loaded() {
            tracing::warn!(
                "no configuration is loaded (nothing applied yet, or Redis lost it): deferring; \
                 restore it with `pacer apply -f` or the operator"
            );
            return self.defer(self.options.default_defer, DeferReason::Config);
        }
        let (chain, pool) = match config.chain(&req.chain_name()) {
            Ok(found) => found,
            // Applied a moment ago, or being restored: the watcher has it by the next
            // delivery.
            Err(e) if attempt.receive_count < self.options.unknown_chain_receives => {
                tracing::warn!(error = %e, receive_count = attempt.receive_count, "deferring: the chain may still be being applied");
                return self.defer(self.options.default_defer, DeferReason::Config);
            }
            Err(e) => return self.fail_config(&req.id, e.to_string()).await,
        };
        if let Err(e) = req.check_models(chain.steps.iter().map(|s| s.model.as_str())) {
            return self.fail(&req.id, 0, e.to_string(), "").await;
        }
        let tenant = match req.tenant_on(chain, pool) {
            Ok(tenant) => tenant,
            Err(e) => return self.fail(&req.id, 0, e.to_string(), "").await,
        };
        let provider = match self.providers.for_pool(pool) {
            Ok(provider) => provider,
            Err(reason) => return self.fail_config(&req.id, reason).await,
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
        // Finished by another replica between the first read and the claim.
        match self.records.get(&req.id).await {
            Ok(None) => {}
            Ok(Some(done)) if done.config_failure => {}
            Ok(Some(done)) => {
                let _ = self.records.unclaim(&req.id, &token).await;
                return Outcome::AlreadyDone(done);
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the result record failed");
                let _ = self.records.unclaim(&req.id, &token).await;
                return self.defer(self.options.default_defer, DeferReason::Infrastructure);
            }
        }
        let claim = Claim::granted(self.records.clone(), &req.id, &token, lease);
        let renew = claim.keep_renewed();
        let mut delivery = Delivery::new(token.clone(), attempt.deadline, claim);
        delivery.tenant = tenant;
        delivery.priority = req.priority.unwrap_or(chain.priority);
        let outcome = self
            .generate_all(&req, chain, pool, provider.as_ref(), &mut delivery)
            .await;
        renew.abort();
        if !pool.tenants.is_empty() {
            self.metrics
                .tenant_messages
                .get_or_create(&crate::metrics::TenantOutcomeLabels {
                    pool: pool.name.clone(),
                    tenant: delivery.tenant.clone(),
                    outcome: outcome.label(),
                })
                .inc();
        }
        // A spent budget resets after the request's deadline: fail it now, not at the
        // reset.
        if let Outcome::Defer {
            after,
            reason: DeferReason::Budget,
        } = outcome
            && let Some(deadline) = req.deadline
            && jiff::Timestamp::now()
                .checked_add(jiff::SignedDuration::try_from(after).unwrap_or_default())
                .is_ok_and(|back| back > deadline)
        {
            return self
                .fail(
                    &req.id,
                    delivery.attempts,
                    format!(
                        "tenant {:?}'s budget is spent until its reset in {} s, after the request's deadline",
                        delivery.tenant,
                        after.as_secs()
                    ),
                    &token,
                )
                .await;
        }
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
        delivery: &mut Delivery,
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
            config_failure: false,
        };
        for index in 0..req.images {
            let key = req.output_key(index);
            // Stored by an earlier delivery that crashed before writing the record.
            match self.sink.existing(&key, &req.id).await {
                Ok(Stored::Ours(location)) => {
                    record.images.push(location);
                    continue;
                }
                // A default key is only ever this request's (an older version stored it
                // without an owner).
                Ok(Stored::Other(None)) if req.output_key.is_none() => {
                    record.images.push(key.clone());
                    continue;
                }
                Ok(Stored::Nothing) => {}
                Ok(Stored::Other(owner)) => {
                    let whose = owner.map_or_else(
                        || "an object Pacer did not store".to_owned(),
                        |o| format!("the image of request {o:?}"),
                    );
                    let reason = format!(
                        "sink key {key:?} already holds {whose}: give this request its own outputKey"
                    );
                    return self
                        .fail(&req.id, record.attempts, reason, delivery.token())
                        .await;
                }
                Err(e) if e.permanent => {
                    let reason = format!("checking the sink failed for good: {e}");
                    return self
                        .fail(&req.id, record.attempts, reason, delivery.token())
                        .await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "checking the sink failed");
                    return self.defer(self.options.default_defer, DeferReason::Infrastructure);
                }
            }
            let walked = self
                .walk_chain(req, index, &key, chain, pool, provider, delivery)
                .await;
            record.attempts = delivery.attempts;
            match walked {
                Ok(g) => {
                    record.model = Some(g.model);
                    record.images.push(g.location);
                    record.input_tokens += g.input_tokens;
                    record.output_tokens += g.output_tokens;
                    record.cost_micros += g.cost_micros;
                }
                Err(Miss::Defer(after, reason)) => return self.defer(after, reason),
                Err(Miss::Fail(reason)) => {
                    return self
                        .fail(&req.id, record.attempts, reason, delivery.token())
                        .await;
                }
            }
        }
        record.finished_at = jiff::Timestamp::now().to_string();
        match self.records.put(&record, delivery.token()).await {
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

    /// Reconciles the booking with what the call cost and stores the image.
    #[allow(clippy::too_many_arguments)]
    async fn store(
        &self,
        id: &str,
        key: &str,
        model: &str,
        resp: ImageResponse,
        ticket: &Ticket,
        limiter: &dyn Limiter,
        pool: &CompiledPool,
        tier: Option<ServiceTier>,
    ) -> Result<Generated, Miss> {
        let images = u64::try_from(resp.images.len()).unwrap_or(u64::MAX);
        let spent = pool
            .spent_micros(model, resp.usage.as_ref(), images)
            .map(|micros| tier.map_or(micros, |t| t.price(micros)));
        let actual = actual_costs(&ticket.costs, resp.usage.as_ref(), images, spent);
        if actual.input_tokens > ticket.costs.input_tokens {
            tracing::warn!(
                booked = ticket.costs.input_tokens,
                actual = actual.input_tokens,
                "input tokens above the estimate; the overrun is charged"
            );
        }
        if let Err(e) = limiter.reconcile(ticket, actual).await {
            tracing::warn!(error = %e, "reconciling the booking failed (it ages out with the window)");
        }
        let usage = resp.usage.unwrap_or_default();
        let Some(image) = resp.images.into_iter().next() else {
            return Err(Miss::Fail(format!("{model} answered without an image")));
        };
        match self.sink.put(key, &image.data, &image.mime_type, id).await {
            Ok(location) => Ok(Generated {
                model: model.to_owned(),
                location,
                input_tokens: usage.prompt_tokens,
                output_tokens: usage.candidate_tokens,
                cost_micros: actual.spend_micros,
            }),
            // Paid for and lost: generating it again on every delivery would not help.
            Err(e) if e.permanent => Err(Miss::Fail(format!(
                "storing the image failed for good (fix the sink's permissions, then resubmit): {e}"
            ))),
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
    async fn process(&self, body: &str, attempt: Attempt) -> Outcome {
        self.handle(body, attempt).await
    }
}
