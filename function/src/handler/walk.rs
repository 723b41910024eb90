//! The chain walk for one image: the steps in order, each a small state machine (book,
//! wait, re-check, call) whose failed calls are decided by the one error policy,
//! [`ProviderError::disposition`].
//!
//! Every booking a delivery makes is named after the delivery's claim token and a counter,
//! so no two calls ever share a booking: a redelivered message books afresh (a replay of
//! its first delivery's booking would call the provider uncounted), and so does a retry.
use std::{sync::Arc, time::Duration};

use pacer_core::{
    config::{CompiledChain, CompiledPool, CompiledStep, ProviderKind},
    limiter::{Blocker, Check, Decision, Limiter, PenaltyScope, QuotaKey, Ticket},
    models::model_info,
    provider::{CallContext, Cause, Disposition, ImageProvider, ImageRequest, ProviderError},
    quota::{Costs, ModelQuota},
};
use tokio::time::Instant;

use super::{
    Generated, Handler, Miss,
    claim::Claim,
    costs::{backoff, booking_costs, ticket_tag},
};
use crate::{
    message::GenerationRequest,
    metrics::{AccountLabels, CallLabels},
    outcome::DeferReason,
};

/// One delivery of a request, as the limiter sees it.
pub(super) struct Delivery {
    /// The delivery's claim token: unique per delivery.
    token: String,
    /// Bookings made so far (each acquire gets a new id).
    bookings: u32,
    /// Provider calls made so far, all images, steps and retries.
    pub(super) attempts: u32,
    /// When the caller stops waiting for this delivery (a Lambda invocation's deadline).
    until: Option<Instant>,
    /// All the time the caller gave this delivery (the function timeout, less the
    /// reserve): no call can ever be given more.
    whole: Option<Duration>,
    /// The claim on the request: once lost (taken over, or not renewed within its lease)
    /// another replica may be generating the request, so no further call goes out.
    claim: Arc<Claim>,
    /// The tenant every booking of this delivery is made for.
    pub(super) tenant: String,
    /// Its priority class.
    pub(super) priority: i32,
}

impl Delivery {
    pub(super) fn new(token: String, until: Option<Instant>, claim: Arc<Claim>) -> Delivery {
        Delivery {
            token,
            bookings: 0,
            attempts: 0,
            until,
            whole: until.map(|u| u.saturating_duration_since(Instant::now())),
            claim,
            tenant: pacer_core::quota::DEFAULT_TENANT.to_owned(),
            priority: 0,
        }
    }

    /// The delivery's claim token.
    pub(super) fn token(&self) -> &str {
        &self.token
    }

    /// Whether the claim is still this delivery's, confirmed with the store unless
    /// recently renewed.
    async fn claim_held(&self) -> bool {
        self.claim.held().await
    }

    /// Time left before the caller's deadline, if it has one.
    pub(super) fn left(&self) -> Option<Duration> {
        self.until
            .map(|u| u.saturating_duration_since(Instant::now()))
    }

    /// A fresh booking id: `{id}:{image}:{model}:{claim token}:{n}`. Retrying the same
    /// acquire is the only reuse the limiter's replay is for; this handler never does it.
    fn booking_id(&mut self, req: &GenerationRequest, index: u32, model: &str) -> String {
        self.bookings += 1;
        format!(
            "{}:{index}:{model}:{}:{}",
            req.id, self.token, self.bookings
        )
    }
}

/// What one image's walk works with.
struct Walk<'a> {
    req: &'a GenerationRequest,
    index: u32,
    key: &'a str,
    chain: &'a CompiledChain,
    pool: &'a CompiledPool,
    provider: &'a dyn ImageProvider,
    limiter: Arc<dyn Limiter>,
}

/// The earliest time any step could run again, and why: what the message is deferred by
/// when no step serves it.
struct Soonest {
    after: Option<Duration>,
    reason: DeferReason,
    /// Steps whose limits the request's costs exceed outright.
    never_fits: usize,
    /// The last answer without an image, from a step that tried its calls for one.
    no_image: Option<String>,
}

impl Soonest {
    fn note(&mut self, after: Option<Duration>, why: DeferReason) {
        if let Some(a) = after
            && self.after.is_none_or(|s| a < s)
        {
            self.after = Some(a);
            self.reason = why;
        }
    }
}

/// Why a booking cannot run, as a deferral reason.
fn reason_for(blocking: Blocker) -> DeferReason {
    match blocking {
        Blocker::Cooldown | Blocker::Daily => DeferReason::RateLimited,
        Blocker::Budget => DeferReason::Budget,
        _ => DeferReason::Capacity,
    }
}

/// Why a step gave up, as a deferral reason.
fn reason_for_cause(cause: Cause) -> DeferReason {
    match cause {
        Cause::RateLimited => DeferReason::RateLimited,
        Cause::Upstream => DeferReason::Upstream,
        Cause::Config => DeferReason::Config,
        Cause::NoImage => DeferReason::Upstream,
    }
}

/// Where one step is. Each state does one thing and names the next.
enum State {
    /// Ask the limiter for a booking.
    Book,
    /// Booked ahead: sleep the wait, then re-check the booking.
    Wait { ticket: Ticket, wait: Duration },
    /// Call the provider on this booking.
    Call(Ticket),
    /// A call failed: ask the error policy.
    Failed(ProviderError),
    /// Wait, then book again for another call on this step.
    Retry(Duration),
    /// The step is over.
    Done(StepEnd),
}

/// How a step ended.
enum StepEnd {
    /// The image is stored.
    Served(Generated),
    /// This step cannot serve now (its reason noted): try the next one.
    NextStep,
    /// The walk ends here.
    Miss(Miss),
}

/// One step's working state.
struct StepRun<'s> {
    step: &'s CompiledStep,
    qkey: QuotaKey,
    quota: ModelQuota,
    image_req: ImageRequest,
    estimate: Costs,
    started: Instant,
    /// The step's max wait, bounded by the request's deadline.
    max_wait: Duration,
    /// Provider calls on this step.
    attempt: u32,
    /// A lost booking is booked afresh once.
    rebooked: bool,
}

/// The pool model a 429 is about: the one its `QuotaFailure` names when the pool has it
/// (the provider may name another model's quota), else the one requested.
fn quota_owner<'a>(pool: &CompiledPool, requested: &'a str, named: Option<&'a str>) -> &'a str {
    named
        .map(|m| m.strip_prefix("models/").unwrap_or(m))
        .filter(|m| *m != requested && pool.has_model(m))
        .unwrap_or(requested)
}

/// Time left before the request's deadline, if it has one (zero once it passed).
fn deadline_in(req: &GenerationRequest) -> Option<Duration> {
    let deadline = req.deadline?;
    let left = deadline.duration_since(jiff::Timestamp::now());
    Some(Duration::try_from(left).unwrap_or(Duration::ZERO))
}

impl Handler {
    /// Tries the chain's steps in order for image `index`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn walk_chain(
        &self,
        req: &GenerationRequest,
        index: u32,
        key: &str,
        chain: &CompiledChain,
        pool: &CompiledPool,
        provider: &dyn ImageProvider,
        delivery: &mut Delivery,
    ) -> Result<Generated, Miss> {
        let walk = Walk {
            req,
            index,
            key,
            chain,
            pool,
            provider,
            limiter: self.limiters.for_pool(pool),
        };
        let mut soonest = Soonest {
            after: None,
            reason: DeferReason::Capacity,
            never_fits: 0,
            no_image: None,
        };
        for step in &chain.steps {
            match self.run_step(&walk, step, delivery, &mut soonest).await {
                StepEnd::Served(generated) => return Ok(generated),
                StepEnd::NextStep => {}
                StepEnd::Miss(miss) => return Err(miss),
            }
        }
        if !chain.steps.is_empty() && soonest.never_fits >= chain.steps.len() {
            return Err(Miss::Fail(format!(
                "the request's costs exceed a limit of every model of chain {} (pool {}): \
                 shorten the prompt or raise the pool's limits",
                chain.name, pool.name
            )));
        }
        // Every step that could run answered without an image: the model will not draw
        // this prompt (deferring would only ask again and again).
        if let (None, Some(answer)) = (soonest.after, &soonest.no_image) {
            return Err(Miss::Fail(format!(
                "no step of chain {} produced an image ({answer}): rephrase the prompt and resubmit",
                chain.name
            )));
        }
        Err(Miss::Defer(
            soonest.after.unwrap_or(self.options.default_defer),
            soonest.reason,
        ))
    }

    /// One step, as a state machine from [`State::Book`] to [`State::Done`].
    async fn run_step(
        &self,
        w: &Walk<'_>,
        step: &CompiledStep,
        delivery: &mut Delivery,
        soonest: &mut Soonest,
    ) -> StepEnd {
        let Some(mut run) = self.start_step(w, step, delivery, soonest) else {
            return StepEnd::NextStep;
        };
        let mut state = State::Book;
        loop {
            state = match state {
                State::Book => self.book(w, &mut run, delivery, soonest).await,
                State::Wait { ticket, wait } => {
                    self.metrics.limiter_wait.observe(wait.as_secs_f64());
                    if self.wait_out(w, &run, wait).await {
                        // The model left its pool while this waited: its slot is given
                        // back and the step skipped. (A changed limit is left to the
                        // check at the slot: a cut that released this booking shows there
                        // as lost, and releasing and booking again here would only queue
                        // it behind every slot already handed out.)
                        let _ = w.limiter.release(&ticket).await;
                        tracing::warn!(model = %run.step.model, pool = %w.pool.name, "the model left its pool's configuration; skipping");
                        soonest.note(Some(self.options.default_defer), DeferReason::Config);
                        State::Done(StepEnd::NextStep)
                    } else {
                        self.recheck(w, &mut run, ticket, soonest).await
                    }
                }
                State::Call(ticket) => self.call(w, &mut run, ticket, delivery).await,
                State::Failed(err) => self.decide(w, &run, err, soonest).await,
                State::Retry(after) => {
                    if delivery
                        .left()
                        .is_some_and(|left| left < after + self.call_budget(w, delivery))
                    {
                        // No time for another call in this invocation: the next delivery
                        // tries again.
                        return StepEnd::Miss(Miss::Defer(after, DeferReason::Deadline));
                    }
                    tokio::time::sleep(after).await;
                    State::Book
                }
                State::Done(end) => return end,
            };
        }
    }

    /// What a step needs before its first booking; `None` when it cannot run at all (its
    /// model's day is spent, or the model is not in the pool).
    fn start_step<'s>(
        &self,
        w: &Walk<'_>,
        step: &'s CompiledStep,
        delivery: &Delivery,
        soonest: &mut Soonest,
    ) -> Option<StepRun<'s>> {
        let qkey = w.pool.key(&step.model);
        if let Some(until) = self.daily_spent_until(&qkey) {
            soonest.note(
                Some(until.saturating_duration_since(Instant::now())),
                DeferReason::RateLimited,
            );
            return None;
        }
        let Some(quota) = w.pool.model_quota(&step.model) else {
            tracing::warn!(model = %step.model, pool = %w.pool.name, "the chain's model is not in its pool; skipping");
            return None;
        };
        // The request's own options win; the step's defaults fill what it leaves out.
        let mut image_req = ImageRequest::new(&w.req.prompt);
        image_req.aspect_ratio = w
            .req
            .aspect_ratio
            .clone()
            .or_else(|| step.aspect_ratio.clone());
        image_req.image_size = w.req.image_size.or(step.image_size);
        image_req.service_tier = step.service_tier;
        // The request was checked against the chain: some step takes its options, maybe
        // not this one (only 3.1 flash takes 1:8), which the provider would refuse.
        if let Some(info) = model_info(&step.model) {
            let ratio_ok = image_req
                .aspect_ratio
                .as_deref()
                .is_none_or(|r| info.takes_ratio(r));
            let size_ok = image_req.image_size.is_none_or(|s| info.takes_size(s));
            if !(ratio_ok && size_ok) {
                tracing::info!(model = %step.model, "the model does not take the request's aspect ratio or size; skipping");
                return None;
            }
        }
        let mut estimate = booking_costs(w.pool, &step.model, &w.req.prompt, image_req.image_size);
        if let Some(tier) = step.service_tier {
            estimate.spend_micros = tier.price(estimate.spend_micros);
        }
        let mut max_wait = Duration::from_millis(step.max_wait_ms);
        if let Some(left) = deadline_in(w.req) {
            max_wait = max_wait.min(left);
        }
        // A booked start must leave room for the call before the caller's deadline.
        if let Some(left) = delivery.left() {
            let budget = self.call_budget(w, delivery);
            if left < budget {
                soonest.note(Some(Duration::ZERO), DeferReason::Deadline);
                return None;
            }
            max_wait = max_wait.min(left - budget);
        }
        Some(StepRun {
            step,
            qkey,
            quota,
            image_req,
            estimate,
            started: Instant::now(),
            max_wait,
            attempt: 0,
            rebooked: false,
        })
    }

    /// The step's model's limits as this replica's configuration has them now (`None`: the
    /// model or its pool was removed).
    fn current_quota(&self, w: &Walk<'_>, model: &str) -> Option<ModelQuota> {
        self.config
            .borrow()
            .pools
            .get(&w.pool.name)?
            .model_quota(model)
    }

    /// Sleeps a booked wait out; returns early with `true` when the configuration drops the
    /// step's model (or its pool) meanwhile.
    async fn wait_out(&self, w: &Walk<'_>, run: &StepRun<'_>, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        let mut config = self.config.clone();
        config.borrow_and_update();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return false,
                changed = config.changed() => {
                    if changed.is_err() {
                        // The configuration can no longer change.
                        tokio::time::sleep_until(until).await;
                        return false;
                    }
                    if self.current_quota(w, &run.step.model).is_none() {
                        return true;
                    }
                }
            }
        }
    }

    /// [`State::Book`]: admitted now, booked ahead, or rejected (the step is over).
    async fn book(
        &self,
        w: &Walk<'_>,
        run: &mut StepRun<'_>,
        delivery: &mut Delivery,
        soonest: &mut Soonest,
    ) -> State {
        let model = &run.step.model;
        // Always under the newest limits this replica knows: a rebooking after a limit
        // change must not record the old ones again.
        match self.current_quota(w, model) {
            Some(quota) => run.quota = quota,
            None => {
                tracing::warn!(model = %model, pool = %w.pool.name, "the model left its pool's configuration; skipping");
                soonest.note(Some(self.options.default_defer), DeferReason::Config);
                return State::Done(StepEnd::NextStep);
            }
        }
        let booking_id = delivery.booking_id(w.req, w.index, model);
        let decision = w
            .limiter
            .acquire_for(
                &run.qkey,
                &run.quota,
                pacer_core::limiter::Asker {
                    tenant: &delivery.tenant,
                    priority: delivery.priority,
                },
                &booking_id,
                run.estimate,
                run.max_wait,
            )
            .await;
        self.metrics.count_limiter_fallback(&decision);
        match decision {
            Err(e) => State::Done(StepEnd::Miss(self.limiter_failed(&e, model))),
            Ok(Decision::Admitted { ticket }) => State::Call(ticket),
            Ok(Decision::Booked { ticket, wait }) => State::Wait { ticket, wait },
            Ok(Decision::Rejected {
                retry_after,
                blocking,
            }) => {
                if blocking == Blocker::NeverFits {
                    tracing::warn!(model = %model, "the request's costs exceed a limit of this model");
                    soonest.never_fits += 1;
                }
                soonest.note(retry_after, reason_for(blocking));
                State::Done(StepEnd::NextStep)
            }
        }
    }

    /// After [`State::Wait`]: a cooldown or day block set while it waited, or the booking
    /// lost with the limiter's state, and the call must not go out on it.
    async fn recheck(
        &self,
        w: &Walk<'_>,
        run: &mut StepRun<'_>,
        ticket: Ticket,
        soonest: &mut Soonest,
    ) -> State {
        let model = &run.step.model;
        match w.limiter.check(&ticket).await {
            Ok(Check::Go) => State::Call(ticket),
            Ok(Check::Cancelled {
                retry_after,
                blocking: Blocker::Lost,
            }) => {
                let left = run.max_wait.saturating_sub(run.started.elapsed());
                if !run.rebooked && !left.is_zero() {
                    tracing::info!(model = %model, "the booking was lost; booking afresh");
                    run.rebooked = true;
                    run.max_wait = left;
                    return State::Book;
                }
                soonest.note(
                    Some(retry_after.unwrap_or(self.options.default_defer)),
                    DeferReason::Capacity,
                );
                State::Done(StepEnd::NextStep)
            }
            Ok(Check::Cancelled {
                retry_after,
                blocking,
            }) => {
                tracing::info!(model = %model, ?blocking, "the booking was cancelled before its call");
                soonest.note(retry_after, reason_for(blocking));
                State::Done(StepEnd::NextStep)
            }
            Err(e) => {
                // Whether the booking still stands is unknown: give it back if the limiter
                // answers again, and do not call on it.
                let _ = w.limiter.release(&ticket).await;
                State::Done(StepEnd::Miss(self.limiter_failed(&e, model)))
            }
        }
    }

    /// [`State::Call`]: one provider call on its own booking; an image is stored.
    async fn call(
        &self,
        w: &Walk<'_>,
        run: &mut StepRun<'_>,
        ticket: Ticket,
        delivery: &mut Delivery,
    ) -> State {
        let model = &run.step.model;
        if !delivery.claim_held().await {
            // Released, not reconciled: nothing was called on it.
            if let Err(e) = w.limiter.release(&ticket).await {
                tracing::debug!(error = %e, "releasing an unused booking failed");
            }
            let after = self.options.claim_lease / 2;
            return State::Done(StepEnd::Miss(Miss::Defer(after, DeferReason::InProgress)));
        }
        run.attempt += 1;
        delivery.attempts += 1;
        run.image_req.ticket = Some(ticket_tag(&ticket));
        let mut timeout = Duration::from_millis(w.chain.request_timeout_ms.max(1));
        if let Some(tier) = run.step.service_tier {
            timeout = timeout.max(tier.min_call_timeout());
        }
        if let Some(left) = delivery.left() {
            timeout = timeout.min(left);
        }
        let began = Instant::now();
        let call = tokio::time::timeout(timeout, w.provider.generate(model, &run.image_req)).await;
        let result = call.unwrap_or(Err(ProviderError::Timeout { after: timeout }));
        if result.is_ok() {
            self.limiters.note_call(&w.pool.name, began.elapsed());
        }
        let label = match &result {
            Ok(_) => "ok",
            Err(e) => e.metric_label(),
        };
        self.metrics
            .provider_calls
            .get_or_create(&CallLabels {
                model: model.clone(),
                result: label,
            })
            .inc();
        match result {
            Ok(resp) => {
                let stored = self
                    .store(
                        &w.req.id,
                        w.key,
                        model,
                        resp,
                        &ticket,
                        w.limiter.as_ref(),
                        w.pool,
                        run.step.service_tier,
                    )
                    .await;
                State::Done(match stored {
                    Ok(generated) => StepEnd::Served(generated),
                    Err(miss) => StepEnd::Miss(miss),
                })
            }
            Err(err) => {
                tracing::info!(model = %model, attempt = run.attempt, error = %err, "provider call failed");
                State::Failed(err)
            }
        }
    }

    /// [`State::Failed`]: carries out the error policy's decision.
    async fn decide(
        &self,
        w: &Walk<'_>,
        run: &StepRun<'_>,
        err: ProviderError,
        soonest: &mut Soonest,
    ) -> State {
        let model = &run.step.model;
        let retry = &w.chain.retry;
        let ctx = CallContext {
            attempt: run.attempt,
            attempts: retry.attempts,
            backoff: backoff(retry, run.attempt),
            deadline_in: deadline_in(w.req),
            day_resets_in: w.limiter.day_resets_in(),
        };
        // Vertex AI's shared quota publishes no limit and answers a bare 429 when the
        // region is busy: every replica's booked rate is cut (and given back after clean
        // windows) instead of each one retrying into it.
        if w.pool.provider == ProviderKind::Vertex
            && matches!(err, ProviderError::RateLimitedBare { .. })
        {
            let key = w.pool.key(model);
            if let Err(e) = w
                .limiter
                .penalize(&key, ctx.backoff, PenaltyScope::Unexplained)
                .await
            {
                tracing::warn!(error = %e, "sharing the learned rate failed");
            }
        }
        match err.disposition(&ctx) {
            Disposition::Retry { after } => State::Retry(after),
            Disposition::Penalize {
                model: named,
                cooldown,
                scope,
            } => {
                let owner = quota_owner(w.pool, model, named.as_deref());
                if owner != model.as_str() {
                    tracing::info!(model = %model, quota_model = owner, "the 429 names another model's quota");
                }
                let owner_key = w.pool.key(owner);
                if scope == PenaltyScope::PerDay {
                    self.mark_daily_spent(&owner_key, cooldown);
                }
                if let Err(e) = w.limiter.penalize(&owner_key, cooldown, scope).await {
                    tracing::warn!(error = %e, "sharing the cooldown failed");
                }
                soonest.note(Some(cooldown), DeferReason::RateLimited);
                State::Done(StepEnd::NextStep)
            }
            Disposition::NextStep {
                cause: Cause::NoImage,
                ..
            } => {
                tracing::info!(model = %model, error = %err, "no image after retries; trying the next step");
                soonest.no_image = Some(format!("{model}: {err}"));
                State::Done(StepEnd::NextStep)
            }
            Disposition::NextStep { after, cause } => {
                if cause == Cause::Config {
                    tracing::warn!(model = %model, pool = %w.pool.name, error = %err, "the provider does not know this model; fix the chain");
                }
                soonest.note(
                    Some(after.unwrap_or(self.options.default_defer)),
                    reason_for_cause(cause),
                );
                State::Done(StepEnd::NextStep)
            }
            Disposition::FailRequest => State::Done(StepEnd::Miss(Miss::Fail(format!(
                "{} ({model}): {err}; {}",
                err.metric_label(),
                err.advice()
            )))),
            Disposition::DeferAndAlert { after } => {
                tracing::warn!(
                    model = %model,
                    pool = %w.pool.name,
                    error = %err,
                    "provider account problem: deferring; {}",
                    err.advice()
                );
                self.metrics
                    .account_errors
                    .get_or_create(&AccountLabels {
                        pool: w.pool.name.clone(),
                        reason: err.metric_label(),
                    })
                    .inc();
                // The account is the pool's project: no model of it answers now. Every
                // replica skips the pool until then, and the operator shows the alert.
                for model in w.pool.models.keys() {
                    let key = w.pool.key(model);
                    if let Err(e) = w
                        .limiter
                        .penalize(&key, after, PenaltyScope::PerMinute)
                        .await
                    {
                        tracing::warn!(error = %e, "sharing the account pause failed");
                    }
                }
                let message = format!("{} ({model}): {err}; {}", err.metric_label(), err.advice());
                if let Err(e) = self
                    .records
                    .raise_account_alert(&w.pool.name, &message, after * 2)
                    .await
                {
                    tracing::warn!(error = %e, "raising the account alert failed");
                }
                State::Done(StepEnd::Miss(Miss::Defer(after, DeferReason::Account)))
            }
        }
    }

    /// What a provider call is given of a deadline-bound delivery's time: the chain's
    /// request timeout, at most the handler's call budget.
    /// A deadline whose whole time is shorter than that (a function timeout below the
    /// chain's request timeout plus the reserve) can never start a call: every delivery is
    /// deferred. That is a setting to fix, said once per process as an error.
    fn call_budget(&self, w: &Walk<'_>, delivery: &Delivery) -> Duration {
        let wanted =
            Duration::from_millis(w.chain.request_timeout_ms.max(1)).min(self.options.call_budget);
        match delivery.whole {
            Some(whole) if whole < wanted => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::error!(
                        chain = %w.chain.name,
                        available_ms = whole.as_millis() as u64,
                        wanted_ms = wanted.as_millis() as u64,
                        "the function's timeout leaves less than one call's time (the chain's request timeout, at most 30 s): every delivery is deferred and none can call; raise the function timeout (the template's FunctionTimeoutSeconds) to that plus 5 s or more, or lower the chain's requestTimeoutSeconds"
                    );
                });
                wanted
            }
            _ => wanted,
        }
    }

    /// The limiter could not be asked: defer the message (never call unbooked).
    fn limiter_failed(&self, e: &pacer_core::limiter::Error, model: &str) -> Miss {
        tracing::warn!(error = %e, model, "limiter unavailable");
        let after = match e {
            pacer_core::limiter::Error::Unavailable { retry_after } => *retry_after,
            _ => self.options.default_defer,
        };
        Miss::Defer(after, DeferReason::Infrastructure)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use pacer_core::config::{FailureMode, ModelLimits, ProviderKind};

    use super::*;

    #[test]
    fn a_429_is_charged_to_the_pool_model_it_names() {
        let limits = ModelLimits {
            rpm: Some(1),
            tpm: None,
            ipm: None,
            rpd: None,
            window_ms: 60_000,
            price_micros_per_image: None,
        };
        let pool = CompiledPool {
            name: "ns/p".into(),
            generation: 0,
            provider: ProviderKind::Gemini,
            project: "proj".into(),
            models: BTreeMap::from([("a".into(), limits.clone()), ("b".into(), limits)]),
            spend_micros_per_10_minutes: None,
            headroom_percent: 0,
            alert_threshold_percent: 80,
            failure_mode: FailureMode::Closed,
            expected_replicas: 1,
            api_key_ref: None,
            api_key_env: None,
            window_margin_ms: None,
            base_url: None,
            vertex: None,
            tenants: Vec::new(),
        };
        assert_eq!(quota_owner(&pool, "a", Some("b")), "b");
        assert_eq!(quota_owner(&pool, "a", Some("models/b")), "b");
        // A model outside the pool has no limiter state here: the requested one cools.
        assert_eq!(quota_owner(&pool, "a", Some("c")), "a");
        assert_eq!(quota_owner(&pool, "a", None), "a");
    }
}
