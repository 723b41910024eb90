//! The naive baseline (`--baseline`): the usual advice, each replica its own local limiter
//! at the full limit and exponential backoff with full jitter.
use super::*;

/// The naive processor: one local limiter per replica at the full limit, the provider's
/// answers handled with exponential backoff and full jitter (RetryInfo ignored, as
/// generic clients do), back to the queue after the attempts run out.
pub(super) struct Naive {
    pub(super) limiter: MemoryLimiter,
    pub(super) config: Arc<CompiledConfig>,
    pub(super) provider: Arc<dyn ImageProvider>,
    pub(super) sink: Arc<dyn Sink>,
    pub(super) records: Records,
}

pub(super) const NAIVE_ATTEMPTS: u32 = 6;

#[async_trait]
impl Process for Naive {
    async fn process(&self, body: &str, _attempt: Attempt) -> Outcome {
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
        let Some(mut quota) = pool.model_quota(&step.model) else {
            return Outcome::Failed(ResultRecord::failed(&req.id, 0, "unknown model"));
        };
        // The usual advice knows no teams: one limiter per process, first come first served.
        quota.tenants.clear();
        let key = pool.key(&step.model);
        let retry = RetryConfig {
            attempts: NAIVE_ATTEMPTS,
            base_delay_ms: 1_000,
            max_delay_ms: 32_000,
        };
        let image_req = ImageRequest::new(&req.prompt);
        for attempt in 1..=NAIVE_ATTEMPTS {
            let booking = format!("{}:{attempt}:{}", req.id, rand::random::<u32>());
            let costs = estimate_costs(&step.model, &req.prompt, req.image_size);
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
                        .put(&req.output_key(0), &image.data, &image.mime_type, &req.id)
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
                    let _ = self.records.put(&record, "").await;
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
                    let _ = self.records.put(&record, "").await;
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
