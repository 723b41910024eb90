//! The chain walk for one image: the steps in order, each a small loop of book, wait,
//! re-check, call, and a decision over the call's result.
//!
//! Every booking a delivery makes is named after the delivery's claim token and a counter,
//! so no two calls ever share a booking: a redelivered message books afresh (a replay of
//! its first delivery's booking would call the provider uncounted), and so does a retry.
use std::{sync::Arc, time::Duration};

use pacer_core::{
    config::{CompiledChain, CompiledPool, CompiledStep},
    limiter::{Blocker, Check, Decision, Limiter, PenaltyScope},
    models::model_info,
    provider::{Disposition, ImageProvider, ImageRequest, ProviderError},
};
use tokio::time::Instant;

use super::{
    Generated, Handler, Miss,
    costs::{backoff, booking_costs, next_pacific_midnight, ticket_tag},
};
use crate::{message::GenerationRequest, metrics::CallLabels, outcome::DeferReason};

/// One delivery of a request, as the limiter sees it.
pub(super) struct Delivery {
    /// The delivery's claim token: unique per delivery.
    token: String,
    /// Bookings made so far (each acquire gets a new id).
    bookings: u32,
    /// Provider calls made so far, all images, steps and retries.
    pub(super) attempts: u32,
}

impl Delivery {
    pub(super) fn new(token: String) -> Delivery {
        Delivery {
            token,
            bookings: 0,
            attempts: 0,
        }
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
        _ => DeferReason::Capacity,
    }
}

/// The pool model a 429 is about: the one its `QuotaFailure` names when the pool has it
/// (the provider may name another model's quota), else the one requested.
fn quota_owner<'a>(pool: &CompiledPool, requested: &'a str, named: Option<&'a str>) -> &'a str {
    named
        .map(|m| m.strip_prefix("models/").unwrap_or(m))
        .filter(|m| *m != requested && pool.has_model(m))
        .unwrap_or(requested)
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
        };
        for step in &chain.steps {
            if let Some(generated) = self.run_step(&walk, step, delivery, &mut soonest).await? {
                return Ok(generated);
            }
        }
        Err(Miss::Defer(
            soonest.after.unwrap_or(self.options.default_defer),
            soonest.reason,
        ))
    }

    /// One step: `Some` with the image, `None` to fall through to the next step (having
    /// noted when this one could run again), or a miss that ends the walk.
    async fn run_step(
        &self,
        w: &Walk<'_>,
        step: &CompiledStep,
        delivery: &mut Delivery,
        soonest: &mut Soonest,
    ) -> Result<Option<Generated>, Miss> {
        let qkey = w.pool.key(&step.model);
        if let Some(until) = self.daily_spent_until(&qkey) {
            soonest.note(
                Some(until.saturating_duration_since(Instant::now())),
                DeferReason::RateLimited,
            );
            return Ok(None);
        }
        let Some(quota) = w.pool.model_quota(&step.model) else {
            tracing::warn!(model = %step.model, pool = %w.pool.name, "the chain's model is not in its pool; skipping");
            return Ok(None);
        };
        // The request's own options win; the step's defaults fill what it leaves out.
        let mut image_req = ImageRequest::new(&w.req.prompt);
        image_req.aspect_ratio = w
            .req
            .aspect_ratio
            .clone()
            .or_else(|| step.aspect_ratio.clone());
        image_req.image_size = w.req.image_size.or(step.image_size);
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
                return Ok(None);
            }
        }
        let estimate = booking_costs(w.pool, &step.model, &w.req.prompt, image_req.image_size);
        let started = Instant::now();
        let mut max_wait = Duration::from_millis(step.max_wait_ms);
        if let Some(deadline) = w.req.deadline {
            let left = deadline.duration_since(jiff::Timestamp::now());
            max_wait = max_wait.min(Duration::try_from(left).unwrap_or(Duration::ZERO));
        }
        let timeout = Duration::from_millis(w.chain.request_timeout_ms.max(1));
        let retry = &w.chain.retry;
        // Provider calls on this step.
        let mut attempt = 0u32;
        let mut rebooked = false;
        loop {
            let booking_id = delivery.booking_id(w.req, w.index, &step.model);
            let decision = match w
                .limiter
                .acquire(&qkey, &quota, &booking_id, estimate, max_wait)
                .await
            {
                Ok(d) => d,
                Err(e) => return Err(self.limiter_failed(&e, &step.model)),
            };
            let ticket = match decision {
                Decision::Admitted { ticket } => ticket,
                Decision::Booked { ticket, wait } => {
                    self.metrics.limiter_wait.observe(wait.as_secs_f64());
                    tokio::time::sleep(wait).await;
                    // A cooldown or day block set while it waited, or the booking lost
                    // with the limiter's state: the call must not go out on it.
                    match w.limiter.check(&ticket).await {
                        Ok(Check::Go) => ticket,
                        Ok(Check::Cancelled {
                            retry_after,
                            blocking: Blocker::Lost,
                        }) => {
                            let left = max_wait.saturating_sub(started.elapsed());
                            if !rebooked && !left.is_zero() {
                                tracing::info!(model = %step.model, "the booking was lost; booking afresh");
                                rebooked = true;
                                max_wait = left;
                                continue;
                            }
                            soonest.note(
                                Some(retry_after.unwrap_or(self.options.default_defer)),
                                DeferReason::Capacity,
                            );
                            return Ok(None);
                        }
                        Ok(Check::Cancelled {
                            retry_after,
                            blocking,
                        }) => {
                            tracing::info!(model = %step.model, ?blocking, "the booking was cancelled before its call");
                            soonest.note(retry_after, reason_for(blocking));
                            return Ok(None);
                        }
                        Err(e) => {
                            // Whether the booking still stands is unknown: give it back if
                            // the limiter answers again, and do not call on it.
                            let _ = w.limiter.release(&ticket).await;
                            return Err(self.limiter_failed(&e, &step.model));
                        }
                    }
                }
                Decision::Rejected {
                    retry_after,
                    blocking,
                } => {
                    if blocking == Blocker::NeverFits {
                        tracing::warn!(model = %step.model, "the request's costs exceed a limit of this model");
                    }
                    soonest.note(retry_after, reason_for(blocking));
                    return Ok(None);
                }
            };
            attempt += 1;
            delivery.attempts += 1;
            image_req.ticket = Some(ticket_tag(&ticket));
            let call =
                tokio::time::timeout(timeout, w.provider.generate(&step.model, &image_req)).await;
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
                            w.key,
                            &step.model,
                            resp,
                            &ticket,
                            w.limiter.as_ref(),
                            w.pool,
                            image_req.image_size,
                        )
                        .await
                        .map(Some);
                }
                Err(e) => e,
            };
            tracing::info!(model = %step.model, attempt, error = %err, "provider call failed");
            if let ProviderError::RateLimited {
                quota: dim,
                retry_delay,
                model: named,
                ..
            } = &err
            {
                let owner = quota_owner(w.pool, &step.model, named.as_deref());
                if owner != step.model {
                    tracing::info!(model = %step.model, quota_model = owner, "the 429 names another model's quota");
                }
                let owner_key = w.pool.key(owner);
                let (delay, scope) = if dim.is_per_day() {
                    let until = next_pacific_midnight();
                    self.mark_daily_spent(&owner_key, until);
                    (until, PenaltyScope::PerDay)
                } else {
                    (
                        retry_delay.unwrap_or(Duration::from_secs(10)),
                        PenaltyScope::PerMinute,
                    )
                };
                if let Err(e) = w.limiter.penalize(&owner_key, delay, scope).await {
                    tracing::warn!(error = %e, "sharing the cooldown failed");
                }
                soonest.note(Some(delay), DeferReason::RateLimited);
                return Ok(None);
            }
            match err.disposition() {
                Disposition::Retry { after } => {
                    if attempt >= retry.attempts {
                        soonest.note(Some(backoff(retry, attempt)), DeferReason::Upstream);
                        return Ok(None);
                    }
                    tokio::time::sleep(after.unwrap_or_else(|| backoff(retry, attempt))).await;
                }
                Disposition::NextModel => return Ok(None),
                Disposition::FailRequest | Disposition::FixConfig => {
                    return Err(Miss::Fail(format!(
                        "{} ({}): {err}; {}",
                        err.metric_label(),
                        step.model,
                        err.advice()
                    )));
                }
            }
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
            window_margin_ms: None,
            base_url: None,
        };
        assert_eq!(quota_owner(&pool, "a", Some("b")), "b");
        assert_eq!(quota_owner(&pool, "a", Some("models/b")), "b");
        // A model outside the pool has no limiter state here: the requested one cools.
        assert_eq!(quota_owner(&pool, "a", Some("c")), "a");
        assert_eq!(quota_owner(&pool, "a", None), "a");
    }
}
