//! What the chain executor sees of an image provider: one request shape, one response
//! shape, one error enum, whatever is on the other end (Gemini, or an OpenAI-compatible
//! gateway).
//!
//! The error enum is the contract: the executor decides retry, fall-through to the next
//! model, or failure from [`ProviderError::disposition`], never from message text.
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

impl fmt::Display for BlockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockReason::Prompt(r) => write!(f, "prompt blocked: {r}"),
            BlockReason::Finish(r) => write!(f, "no image: {r}"),
        }
    }
}

/// What the caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Same model again, after `after` if the provider said (else the caller's backoff).
    Retry { after: Option<Duration> },
    /// This model cannot serve the request now (per-day quota spent, model retired):
    /// fall through to the next model in the chain, or defer.
    NextModel,
    /// The request itself can never succeed (bad input, safety block): fail it, no retry.
    FailRequest,
    /// The project or its configuration is broken (bad key, prepaid credit spent): nothing
    /// routed to this provider will succeed until an operator acts. Defer and alert.
    FixConfig,
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
    /// 402: prepaid credit is spent. Fatal until someone pays.
    #[error("prepaid credit exhausted: {message}")]
    CreditExhausted { message: String },
    /// 400: the request is malformed or names an unsupported option.
    #[error("invalid request: {message}")]
    Invalid {
        message: String,
        violations: Vec<FieldViolation>,
    },
    /// 401/403, or 400 `API_KEY_INVALID`: the key is missing, wrong or not allowed.
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
    /// What the chain executor should do.
    pub fn disposition(&self) -> Disposition {
        match self {
            ProviderError::RateLimited {
                quota, retry_delay, ..
            } => {
                if quota.is_per_day() {
                    Disposition::NextModel
                } else {
                    Disposition::Retry {
                        after: *retry_delay,
                    }
                }
            }
            ProviderError::RateLimitedBare { retry_delay, .. } => Disposition::Retry {
                after: *retry_delay,
            },
            ProviderError::Overloaded { .. }
            | ProviderError::ServerError { .. }
            | ProviderError::Timeout { .. }
            | ProviderError::Transport { .. } => Disposition::Retry { after: None },
            ProviderError::ModelNotFound { .. } => Disposition::NextModel,
            ProviderError::Blocked { .. } | ProviderError::Invalid { .. } => {
                Disposition::FailRequest
            }
            ProviderError::CreditExhausted { .. } | ProviderError::Unauthorized { .. } => {
                Disposition::FixConfig
            }
        }
    }

    /// Worth another attempt on the same model (after [`Self::retry_delay`] if given).
    pub fn is_retryable(&self) -> bool {
        matches!(self.disposition(), Disposition::Retry { .. })
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
        match self.disposition() {
            Disposition::Retry { .. } => "transient: retried by the chain's retry policy",
            Disposition::NextModel => {
                "this model cannot serve now: the chain falls through to its next step"
            }
            Disposition::FailRequest => "change the request (prompt or options) and resubmit",
            Disposition::FixConfig => {
                "fix the provider account: check the API key, its project and billing/credit"
            }
        }
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
