//! What the chain executor sees of an image provider: one request shape, one response
//! shape, one error enum, whatever is on the other end (Gemini, or an OpenAI-compatible
//! gateway).
//!
//! The error enum is the contract, and [`ProviderError::disposition`] is the one error
//! policy: the chain walk decides retry, cool down and fall through, defer, fail, or defer
//! and alert from it (given a [`CallContext`]), never from message text.
use std::{fmt, time::Duration};

use async_trait::async_trait;

use crate::models::ImageSize;

/// An API key. It never prints: `Debug` shows a redaction, and there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> ApiKey {
        ApiKey(key.into())
    }

    /// The secret itself, for the one place that puts it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Which modalities the answer may carry. Image models take `["IMAGE"]` or
/// `["TEXT","IMAGE"]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Modalities {
    #[default]
    Image,
    TextAndImage,
}

/// The HTTP header that carries a call's booking ([`ImageRequest::ticket`]). Providers
/// ignore it; the simulator and proxies use it to match every call they count to one
/// limiter entry (two calls with one ticket: a call went out uncounted).
pub const TICKET_HEADER: &str = "x-pacer-ticket";

/// One image generation request: the model is chosen per call, by the chain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageRequest {
    pub prompt: String,
    pub modalities: Modalities,
    /// `"1:1"`, `"16:9"`, …; `None` lets the model choose.
    pub aspect_ratio: Option<String>,
    /// The image size (Gemini); `None` is the model's default.
    pub image_size: Option<ImageSize>,
    /// Google's service tier (`flex`: half price, answers in minutes); `None`: standard.
    pub service_tier: Option<crate::models::ServiceTier>,
    /// The limiter booking this call spends, `"{request_id}@{start_us}"`: unique per limiter
    /// log entry. Sent as [`TICKET_HEADER`]; never part of the body.
    pub ticket: Option<String>,
}

impl ImageRequest {
    pub fn new(prompt: impl Into<String>) -> ImageRequest {
        ImageRequest {
            prompt: prompt.into(),
            ..ImageRequest::default()
        }
    }

    pub fn aspect_ratio(mut self, ratio: impl Into<String>) -> ImageRequest {
        self.aspect_ratio = Some(ratio.into());
        self
    }

    pub fn image_size(mut self, size: ImageSize) -> ImageRequest {
        self.image_size = Some(size);
        self
    }

    pub fn ticket(mut self, ticket: impl Into<String>) -> ImageRequest {
        self.ticket = Some(ticket.into());
        self
    }

    /// The ticket as a header value, if it has one that HTTP can carry (visible ASCII).
    pub fn ticket_header(&self) -> Option<reqwest::header::HeaderValue> {
        let ticket = self.ticket.as_deref()?;
        match reqwest::header::HeaderValue::from_str(ticket) {
            Ok(v) => Some(v),
            Err(_) => {
                tracing::warn!(
                    ticket,
                    "a ticket that is not a valid header value is not sent"
                );
                None
            }
        }
    }
}

/// One generated image.
#[derive(Clone, PartialEq, Eq)]
pub struct Image {
    pub mime_type: String,
    pub data: Vec<u8>,
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("mime_type", &self.mime_type)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// Token usage as the provider reported it (what `reconcile` charges).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub candidate_tokens: u64,
    /// The part of `candidate_tokens` spent on image output.
    pub image_tokens: u64,
    pub thought_tokens: u64,
    pub total_tokens: u64,
}

/// A successful answer: at least one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageResponse {
    pub images: Vec<Image>,
    pub texts: Vec<String>,
    /// `STOP` on success; kept for logs.
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
    pub model_version: Option<String>,
    pub response_id: Option<String>,
}

/// The provider's quota dimension a 429 names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaDimension {
    RequestsPerMinute,
    InputTokensPerMinute,
    ImagesPerMinute,
    RequestsPerDay,
    /// Spend per rolling window (10 minutes at Google).
    Spend,
    /// A quota id this client does not recognise; treated as per-minute.
    Other,
}

impl QuotaDimension {
    /// Classifies a Gemini `quotaId` (falling back to its `quotaMetric`).
    pub fn from_quota_id(quota_id: &str, quota_metric: &str) -> QuotaDimension {
        let id = quota_id.to_ascii_lowercase();
        let metric = quota_metric.to_ascii_lowercase();
        let day = id.contains("perday") || metric.contains("per_day");
        if id.contains("spend") || metric.contains("spend") {
            QuotaDimension::Spend
        } else if day {
            QuotaDimension::RequestsPerDay
        } else if id.contains("token") || metric.contains("token") {
            QuotaDimension::InputTokensPerMinute
        } else if id.contains("image") || metric.contains("image") {
            QuotaDimension::ImagesPerMinute
        } else if id.contains("request") || metric.contains("request") {
            QuotaDimension::RequestsPerMinute
        } else {
            QuotaDimension::Other
        }
    }

    /// Per-day quotas reset at Pacific midnight: retrying before then is pointless.
    pub fn is_per_day(self) -> bool {
        self == QuotaDimension::RequestsPerDay
    }

    pub fn label(self) -> &'static str {
        match self {
            QuotaDimension::RequestsPerMinute => "rpm",
            QuotaDimension::InputTokensPerMinute => "tpm",
            QuotaDimension::ImagesPerMinute => "ipm",
            QuotaDimension::RequestsPerDay => "rpd",
            QuotaDimension::Spend => "spend",
            QuotaDimension::Other => "other",
        }
    }
}

/// One `QuotaFailure` violation, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaViolation {
    pub dimension: QuotaDimension,
    pub quota_id: String,
    pub quota_metric: String,
    /// The quota's model: it may differ from the model requested.
    pub model: Option<String>,
    /// The limit; absent when it is 0 (e.g. a free-tier project on an image model).
    pub limit: Option<u64>,
}

/// A `BadRequest` field violation from a 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// Why a prompt or an image was withheld.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockReason {
    /// `promptFeedback.blockReason` (`SAFETY`, `PROHIBITED_CONTENT`, …): no candidates.
    Prompt(String),
    /// A candidate's `finishReason` (`IMAGE_SAFETY`, `NO_IMAGE`, `IMAGE_RECITATION`,
    /// `IMAGE_PROHIBITED_CONTENT`, …) with no image.
    Finish(String),
}

/// Finish reasons that withheld an image this time but may not next time: worth another
/// call or two, then the next step. Safety and prohibited-content reasons are final.
const RETRIED_FINISH_REASONS: &[&str] = &[
    "NO_IMAGE",
    "IMAGE_RECITATION",
    "IMAGE_OTHER",
    "RECITATION",
    "OTHER",
    "NO_CANDIDATES",
];

/// Calls a step makes for an answer without an image (the first and one retry).
pub const NO_IMAGE_ATTEMPTS: u32 = 2;

impl BlockReason {
    /// Whether another call may well produce the image: `NO_IMAGE`, `IMAGE_RECITATION`,
    /// `IMAGE_OTHER` and the like (the list is `RETRIED_FINISH_REASONS`).
    pub fn is_retried(&self) -> bool {
        matches!(self, BlockReason::Finish(r) if RETRIED_FINISH_REASONS.contains(&r.as_str()))
    }
}

impl fmt::Display for BlockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockReason::Prompt(r) => write!(f, "prompt blocked: {r}"),
            BlockReason::Finish(r) => write!(f, "no image: {r}"),
        }
    }
}

/// A 429 that names a per-minute quota but carries no `RetryInfo` cools its model down
/// this long.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(10);

/// An account problem (bad key, spent credit) defers the message at least this long: it
/// lasts until an operator acts, so retrying at the retry policy's pace only burns calls.
pub const ACCOUNT_DEFER: Duration = Duration::from_secs(60);

/// What the chain walk knows about a failed call besides the error itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallContext {
    /// Calls made on this step so far, the failed one included.
    pub attempt: u32,
    /// The retry policy's budget: calls per step, the first included.
    pub attempts: u32,
    /// The retry policy's backoff before the next call (already jittered by the caller).
    pub backoff: Duration,
    /// Time left before the request's deadline, if it has one: a retry that would start
    /// after it is not made.
    pub deadline_in: Option<Duration>,
    /// Time until the next Pacific midnight, when per-day quotas reset.
    pub day_resets_in: Duration,
}

impl CallContext {
    /// The first call of a step with retries left, no deadline and no backoff: how an
    /// error reads on its own (for [`ProviderError::is_retryable`] and advice).
    pub fn first_call() -> CallContext {
        CallContext {
            attempt: 1,
            attempts: 2,
            backoff: Duration::ZERO,
            deadline_in: None,
            day_resets_in: Duration::from_secs(24 * 3600),
        }
    }
}

/// Why a step gave up for now: the deferral's reason when no later step serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The provider is rate limiting (a 429 without a quota, or with a delay past the
    /// deadline).
    RateLimited,
    /// The provider kept failing (5xx, timeouts, broken connections) through the retry
    /// policy's attempts.
    Upstream,
    /// The chain names a model the provider does not know (unknown or retired): the
    /// chain's configuration must change.
    Config,
    /// The model answered without an image, for a reason another try may not have
    /// (`NO_IMAGE`, `IMAGE_RECITATION`, `IMAGE_OTHER`, words only): after its retries the
    /// next step is tried, and when no step gives an image the request fails with it.
    NoImage,
}

/// What the chain walk does about one failed call: the whole error policy, decided by
/// [`ProviderError::disposition`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Call the same step again after `after`.
    Retry { after: Duration },
    /// A named quota is spent: cool its model down for every replica (`model` is the one
    /// the quota names, if it named one; else the one called) and try the next step. With
    /// no step left the message is deferred by the cooldown.
    Penalize {
        model: Option<String>,
        cooldown: Duration,
        scope: crate::limiter::PenaltyScope,
    },
    /// This step cannot serve the request now: try the next step. With no step left the
    /// message is deferred by `after` (`None`: the caller's default) for `cause`.
    NextStep {
        after: Option<Duration>,
        cause: Cause,
    },
    /// The request itself can never succeed (bad input, safety block): fail it.
    FailRequest,
    /// The account is broken (bad key, spent credit): nothing routed to this provider
    /// succeeds until an operator acts, and every step of a chain shares its pool. Defer
    /// the message by `after`, alert, and never fail the request for it.
    DeferAndAlert { after: Duration },
}

impl Disposition {
    /// What a user should do, for results and alerts.
    pub fn advice(&self) -> &'static str {
        match self {
            Disposition::Retry { .. } => "transient: retried by the chain's retry policy",
            Disposition::Penalize { .. } => {
                "a quota is spent: the model cools down and the chain falls through"
            }
            Disposition::NextStep { .. } => {
                "this model cannot serve now: the chain falls through to its next step"
            }
            Disposition::FailRequest => "change the request (prompt or options) and resubmit",
            Disposition::DeferAndAlert { .. } => {
                "fix the provider account: check the API key, its project and billing/credit"
            }
        }
    }
}

/// Every way a provider call can fail, with its operational meaning.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// 429 with a `QuotaFailure`: a named quota is spent.
    #[error("rate limited on {} ({quota_id}){}: {message}", quota.label(), model.as_deref().map(|m| format!(" for {m}")).unwrap_or_default())]
    RateLimited {
        /// The most binding dimension among the violations (per-day wins).
        quota: QuotaDimension,
        quota_id: String,
        /// The model the quota names (may differ from the one requested).
        model: Option<String>,
        /// From `RetryInfo.retryDelay` (Gemini) or `Retry-After` (OpenAI-compatible).
        retry_delay: Option<Duration>,
        violations: Vec<QuotaViolation>,
        message: String,
    },
    /// 429 without details: a "ghost" 429, seen even with quota unused.
    #[error("rate limited without details: {message}")]
    RateLimitedBare {
        retry_delay: Option<Duration>,
        message: String,
    },
    /// 503: the model is overloaded.
    #[error("model overloaded: {message}")]
    Overloaded { message: String },
    /// 500, 504 and other 5xx, or a 200 whose body could not be understood.
    #[error("server error {status}: {message}")]
    ServerError { status: u16, message: String },
    /// A safety block or no image produced (HTTP 200).
    #[error("blocked: {reason}")]
    Blocked {
        reason: BlockReason,
        message: String,
    },
    /// 402, or a 429 naming no quota whose message says so: prepaid credit is spent. No call
    /// succeeds until someone pays (deferred and alerted, never retried at a quota's pace).
    #[error("prepaid credit exhausted: {message}")]
    CreditExhausted { message: String },
    /// 400: the request is malformed or names an unsupported option.
    #[error("invalid request: {message}")]
    Invalid {
        message: String,
        violations: Vec<FieldViolation>,
    },
    /// 401/403, 400 `API_KEY_INVALID`, or 400 `FAILED_PRECONDITION` (billing not enabled,
    /// a region the API does not serve): the account cannot call, whatever the request.
    #[error("unauthorized ({status}): {message}")]
    Unauthorized { status: u16, message: String },
    /// 404: unknown or retired model.
    #[error("model not found: {model}: {message}")]
    ModelNotFound { model: String, message: String },
    /// No answer within the request timeout (the provider may still have counted it).
    #[error("timed out after {after:?}")]
    Timeout { after: Duration },
    /// The connection failed or broke mid-answer.
    #[error("transport error: {message}")]
    Transport { message: String },
}

/// Results of provider calls.
pub type Result<T, E = ProviderError> = std::result::Result<T, E>;

impl ProviderError {
    /// The error policy: what the chain walk does about this error, given where the walk
    /// is (`ctx`). The one place that decides retry, cool down and fall through, defer,
    /// fail, or defer and alert.
    pub fn disposition(&self, ctx: &CallContext) -> Disposition {
        use crate::limiter::PenaltyScope;
        // Transient: again on the same step while the budget and the deadline allow.
        let retry = |after: Duration, cause: Cause| {
            let past_deadline = ctx.deadline_in.is_some_and(|left| after >= left);
            if ctx.attempt >= ctx.attempts || past_deadline {
                Disposition::NextStep {
                    after: Some(after),
                    cause,
                }
            } else {
                Disposition::Retry { after }
            }
        };
        match self {
            ProviderError::RateLimited {
                quota,
                retry_delay,
                model,
                ..
            } => {
                let (cooldown, scope) = if quota.is_per_day() {
                    (ctx.day_resets_in, PenaltyScope::PerDay)
                } else {
                    (
                        retry_delay.unwrap_or(DEFAULT_COOLDOWN),
                        PenaltyScope::PerMinute,
                    )
                };
                Disposition::Penalize {
                    model: model.clone(),
                    cooldown,
                    scope,
                }
            }
            // A ghost 429 names no quota to cool down: it is retried like an overload, at
            // the provider's pace if it gave one.
            ProviderError::RateLimitedBare { retry_delay, .. } => {
                retry(retry_delay.unwrap_or(ctx.backoff), Cause::RateLimited)
            }
            ProviderError::Overloaded { .. }
            | ProviderError::ServerError { .. }
            | ProviderError::Timeout { .. }
            | ProviderError::Transport { .. } => retry(ctx.backoff, Cause::Upstream),
            ProviderError::ModelNotFound { .. } => Disposition::NextStep {
                after: None,
                cause: Cause::Config,
            },
            ProviderError::Blocked { reason, .. } if reason.is_retried() => {
                if ctx.attempt >= ctx.attempts.min(NO_IMAGE_ATTEMPTS) {
                    Disposition::NextStep {
                        after: None,
                        cause: Cause::NoImage,
                    }
                } else {
                    Disposition::Retry { after: ctx.backoff }
                }
            }
            ProviderError::Blocked { .. } | ProviderError::Invalid { .. } => {
                Disposition::FailRequest
            }
            ProviderError::CreditExhausted { .. } | ProviderError::Unauthorized { .. } => {
                Disposition::DeferAndAlert {
                    after: self
                        .retry_delay()
                        .map_or(ACCOUNT_DEFER, |d| d.max(ACCOUNT_DEFER)),
                }
            }
        }
    }

    /// Worth another call on the same model, on its own (the first call of a step).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.disposition(&CallContext::first_call()),
            Disposition::Retry { .. }
        )
    }

    /// The delay the provider asked for, if any.
    pub fn retry_delay(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_delay, .. }
            | ProviderError::RateLimitedBare { retry_delay, .. } => *retry_delay,
            _ => None,
        }
    }

    /// The `reason` label of the provider-error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ProviderError::RateLimited { quota, .. } => match quota {
                QuotaDimension::RequestsPerMinute => "rate_limited_rpm",
                QuotaDimension::InputTokensPerMinute => "rate_limited_tpm",
                QuotaDimension::ImagesPerMinute => "rate_limited_ipm",
                QuotaDimension::RequestsPerDay => "rate_limited_rpd",
                QuotaDimension::Spend => "rate_limited_spend",
                QuotaDimension::Other => "rate_limited_other",
            },
            ProviderError::RateLimitedBare { .. } => "rate_limited_bare",
            ProviderError::Overloaded { .. } => "overloaded",
            ProviderError::ServerError { .. } => "server_error",
            ProviderError::Blocked { .. } => "blocked",
            ProviderError::CreditExhausted { .. } => "credit_exhausted",
            ProviderError::Invalid { .. } => "invalid",
            ProviderError::Unauthorized { .. } => "unauthorized",
            ProviderError::ModelNotFound { .. } => "model_not_found",
            ProviderError::Timeout { .. } => "timeout",
            ProviderError::Transport { .. } => "transport",
        }
    }

    /// What a user should do, for results and alerts.
    pub fn advice(&self) -> &'static str {
        self.disposition(&CallContext::first_call()).advice()
    }
}

/// An image provider: Gemini, or an OpenAI-compatible gateway. No retries inside: retry
/// policy belongs to the chain executor.
#[async_trait]
pub trait ImageProvider: Send + Sync {
    async fn generate(&self, model: &str, req: &ImageRequest) -> Result<ImageResponse>;
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::limiter::PenaltyScope;

    fn ctx(attempt: u32) -> CallContext {
        CallContext {
            attempt,
            attempts: 3,
            backoff: Duration::from_millis(250),
            deadline_in: None,
            day_resets_in: Duration::from_secs(5 * 3600),
        }
    }

    fn rate_limited(quota_id: &str, retry_delay: Option<Duration>) -> ProviderError {
        ProviderError::RateLimited {
            quota: QuotaDimension::from_quota_id(quota_id, ""),
            quota_id: quota_id.into(),
            model: Some("models/other".into()),
            retry_delay,
            violations: Vec::new(),
            message: "Resource has been exhausted".into(),
        }
    }

    #[test]
    fn a_per_minute_429_cools_the_named_model_for_its_delay() {
        let e = rate_limited(
            "GenerateRequestsPerMinutePerProjectPerModel",
            Some(Duration::from_secs(40)),
        );
        let want = Disposition::Penalize {
            model: Some("models/other".into()),
            cooldown: Duration::from_secs(40),
            scope: PenaltyScope::PerMinute,
        };
        // Whatever the attempt: a spent quota is never retried on the same model.
        assert_eq!(e.disposition(&ctx(1)), want);
        assert_eq!(e.disposition(&ctx(3)), want);
        assert!(!e.is_retryable());
    }

    #[test]
    fn a_429_without_retry_info_cools_for_the_default() {
        let e = rate_limited("GenerateContentInputTokensPerModelPerMinute-FreeTier", None);
        assert!(matches!(
            e.disposition(&ctx(1)),
            Disposition::Penalize { cooldown, scope: PenaltyScope::PerMinute, .. }
                if cooldown == DEFAULT_COOLDOWN
        ));
    }

    #[test]
    fn a_per_day_429_cools_until_pacific_midnight() {
        let e = rate_limited(
            "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
            Some(Duration::from_secs(40)),
        );
        assert_eq!(
            e.disposition(&ctx(1)),
            Disposition::Penalize {
                model: Some("models/other".into()),
                cooldown: Duration::from_secs(5 * 3600),
                scope: PenaltyScope::PerDay,
            }
        );
    }

    #[test]
    fn transient_errors_retry_with_backoff_until_the_budget_is_spent() {
        let transient = [
            ProviderError::Overloaded {
                message: "overloaded".into(),
            },
            ProviderError::ServerError {
                status: 500,
                message: "internal".into(),
            },
            ProviderError::Timeout {
                after: Duration::from_secs(30),
            },
            ProviderError::Transport {
                message: "reset".into(),
            },
        ];
        for e in transient {
            assert!(e.is_retryable(), "{e:?}");
            let backoff = Duration::from_millis(250);
            assert_eq!(
                e.disposition(&ctx(2)),
                Disposition::Retry { after: backoff },
                "{e:?}"
            );
            assert_eq!(
                e.disposition(&ctx(3)),
                Disposition::NextStep {
                    after: Some(backoff),
                    cause: Cause::Upstream
                },
                "{e:?}"
            );
        }
    }

    #[test]
    fn a_bare_429_retries_at_the_providers_pace() {
        let e = ProviderError::RateLimitedBare {
            retry_delay: Some(Duration::from_secs(2)),
            message: "ghost".into(),
        };
        assert_eq!(
            e.disposition(&ctx(1)),
            Disposition::Retry {
                after: Duration::from_secs(2)
            }
        );
        assert_eq!(
            e.disposition(&ctx(3)),
            Disposition::NextStep {
                after: Some(Duration::from_secs(2)),
                cause: Cause::RateLimited
            }
        );
        let no_delay = ProviderError::RateLimitedBare {
            retry_delay: None,
            message: "ghost".into(),
        };
        assert_eq!(
            no_delay.disposition(&ctx(1)),
            Disposition::Retry {
                after: Duration::from_millis(250)
            }
        );
    }

    /// Issue 13, finish reasons: an answer without an image for a reason another call may
    /// not have is retried once, then the next step; safety blocks stay final.
    #[test]
    fn answers_without_an_image_are_retried_once_unless_blocked_for_safety() {
        let finish = |r: &str| ProviderError::Blocked {
            reason: BlockReason::Finish(r.into()),
            message: String::new(),
        };
        for r in ["NO_IMAGE", "IMAGE_RECITATION", "IMAGE_OTHER"] {
            assert_eq!(
                finish(r).disposition(&ctx(1)),
                Disposition::Retry {
                    after: Duration::from_millis(250)
                },
                "{r}"
            );
            assert_eq!(
                finish(r).disposition(&ctx(2)),
                Disposition::NextStep {
                    after: None,
                    cause: Cause::NoImage
                },
                "{r}"
            );
        }
        for r in [
            "IMAGE_SAFETY",
            "IMAGE_PROHIBITED_CONTENT",
            "PROHIBITED_CONTENT",
        ] {
            assert_eq!(
                finish(r).disposition(&ctx(1)),
                Disposition::FailRequest,
                "{r}"
            );
        }
        let prompt = ProviderError::Blocked {
            reason: BlockReason::Prompt("SAFETY".into()),
            message: String::new(),
        };
        assert_eq!(prompt.disposition(&ctx(1)), Disposition::FailRequest);
    }

    #[test]
    fn no_retry_starts_after_the_deadline() {
        let e = ProviderError::RateLimitedBare {
            retry_delay: Some(Duration::from_secs(2)),
            message: "ghost".into(),
        };
        let near = CallContext {
            deadline_in: Some(Duration::from_secs(1)),
            ..ctx(1)
        };
        assert_eq!(
            e.disposition(&near),
            Disposition::NextStep {
                after: Some(Duration::from_secs(2)),
                cause: Cause::RateLimited
            }
        );
        let far = CallContext {
            deadline_in: Some(Duration::from_secs(3)),
            ..ctx(1)
        };
        assert!(matches!(e.disposition(&far), Disposition::Retry { .. }));
    }

    #[test]
    fn an_unknown_model_falls_through_as_a_config_problem() {
        let e = ProviderError::ModelNotFound {
            model: "gone".into(),
            message: "not found".into(),
        };
        assert_eq!(
            e.disposition(&ctx(1)),
            Disposition::NextStep {
                after: None,
                cause: Cause::Config
            }
        );
    }

    #[test]
    fn bad_requests_fail_whatever_the_attempt() {
        let errors = [
            ProviderError::Blocked {
                reason: BlockReason::Finish("IMAGE_SAFETY".into()),
                message: String::new(),
            },
            ProviderError::Invalid {
                message: "bad size".into(),
                violations: Vec::new(),
            },
        ];
        for e in errors {
            assert_eq!(e.disposition(&ctx(1)), Disposition::FailRequest, "{e:?}");
            assert_eq!(e.disposition(&ctx(3)), Disposition::FailRequest, "{e:?}");
        }
    }

    #[test]
    fn account_problems_defer_and_alert_never_fail() {
        let errors = [
            ProviderError::CreditExhausted {
                message: "prepaid credits depleted".into(),
            },
            ProviderError::Unauthorized {
                status: 401,
                message: "API_KEY_INVALID".into(),
            },
            ProviderError::Unauthorized {
                status: 403,
                message: "PERMISSION_DENIED".into(),
            },
        ];
        for e in errors {
            for attempt in [1, 3] {
                assert_eq!(
                    e.disposition(&ctx(attempt)),
                    Disposition::DeferAndAlert {
                        after: ACCOUNT_DEFER
                    },
                    "{e:?}"
                );
            }
            assert!(e.advice().contains("account"), "{e:?}");
        }
    }

    #[test]
    fn api_key_never_prints() {
        let key = ApiKey::new("AIzaSecret");
        assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
        assert!(!format!("{:?}", Some(key)).contains("Secret"));
    }

    #[test]
    fn quota_ids_classify() {
        use QuotaDimension::*;
        let cases = [
            (
                "GenerateRequestsPerMinutePerProjectPerModel",
                RequestsPerMinute,
            ),
            (
                "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                RequestsPerMinute,
            ),
            (
                "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                RequestsPerDay,
            ),
            (
                "GenerateContentInputTokensPerModelPerMinute-FreeTier",
                InputTokensPerMinute,
            ),
            (
                "GenerateContentPaidTierInputTokensPerModelPerMinute-PaidTier2",
                InputTokensPerMinute,
            ),
            ("GenerateImagesPerMinutePerProjectPerModel", ImagesPerMinute),
            ("GenerateContentSpendPer10MinutesPerProject", Spend),
            ("Whatever", Other),
        ];
        for (id, want) in cases {
            assert_eq!(QuotaDimension::from_quota_id(id, ""), want, "{id}");
        }
    }
}
