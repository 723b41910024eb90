use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An ordered fallback chain of models for one workload.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pacer.dev",
    version = "v1alpha1",
    kind = "ModelChain",
    namespaced,
    status = "ModelChainStatus",
    shortname = "mc",
    category = "pacer",
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.pool"}"#,
    printcolumn = r#"{"name":"Steps","type":"string","jsonPath":".status.resolved"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ModelChainSpec {
    /// The QuotaPool (in this namespace) whose quota the chain's models use.
    #[schemars(length(min = 1, max = 253))]
    pub pool: String,
    /// The models to try, in order (1 to 8 steps, each model at most once).
    #[schemars(length(min = 1, max = 8))]
    #[x_kube(validation = kube::core::Rule::new("self.all(s, self.exists_one(t, t.model == s.model))").message("a model appears at most once in a chain"))]
    pub steps: Vec<ChainStep>,
    /// Retries of overloaded and server errors within one step.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Timeout of one provider call, in seconds.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = 600))]
    pub request_timeout_seconds: u32,
    /// The priority class of its requests when a message gives none (-1000 to 1000):
    /// behind a queue, a request books ahead of the bookings of lower classes that have not
    /// started yet, which book afresh.
    #[serde(default)]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,
    /// Give up on a request this many seconds after it was enqueued (absent: no deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub deadline_seconds: Option<u32>,
    /// The tenant (one of the pool's `spec.tenants`) every request of this chain books as;
    /// a message naming another is refused. Absent: the message's own `tenant`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    )]
    pub tenant: Option<String>,
}

fn default_timeout() -> u32 {
    120
}

/// One model in a chain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChainStep {
    /// The model id; must be one of the pool's models.
    #[schemars(length(min = 1, max = 128))]
    pub model: String,
    /// The longest a request waits for this model's capacity before falling through, in seconds.
    #[serde(default = "default_max_wait")]
    #[schemars(range(min = 0, max = 3600))]
    pub max_wait_seconds: u32,
    /// The aspect ratio a request gets when it names none (for example `16:9`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,2}:[0-9]{1,2}$"))]
    pub aspect_ratio: Option<String>,
    /// The image size a request gets when it names none: `512` (gemini-3.1-flash-image
    /// only; `0.5K` is read as an alias), `1K`, `2K` or `4K`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<ImageSize>,
    /// Google's service tier for this step's calls: `flex` is billed at half the standard
    /// rates and answers in minutes, best effort (its calls wait up to 15 minutes, within
    /// the request's deadline); `standard` (the default) as usual.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<ServiceTier>,
}

/// Google's synchronous inference tiers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServiceTier {
    /// Standard rates and latency.
    Standard,
    /// Half the standard rates; answers in 1 to 15 minutes, best effort.
    Flex,
}

fn default_max_wait() -> u32 {
    30
}

/// Output image sizes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ImageSize {
    /// 512 px (gemini-3.1-flash-image only), spelled as Google's API spells it.
    #[serde(rename = "512", alias = "0.5K")]
    HalfK,
    /// 1024 px.
    #[serde(rename = "1K")]
    OneK,
    /// 2048 px.
    #[serde(rename = "2K")]
    TwoK,
    /// 4096 px.
    #[serde(rename = "4K")]
    FourK,
}

/// Full-jitter exponential backoff.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = kube::core::Rule::new("self.maxDelayMs >= self.baseDelayMs").message("retry.maxDelayMs cannot be below retry.baseDelayMs").field_path(".maxDelayMs"))]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Attempts per step, the first included (1 to 10).
    #[schemars(range(min = 1, max = 10))]
    pub attempts: u32,
    /// The first backoff's ceiling, in milliseconds.
    #[schemars(range(min = 1, max = 600000))]
    pub base_delay_ms: u64,
    /// The largest backoff, in milliseconds.
    #[schemars(range(min = 1, max = 3600000))]
    pub max_delay_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            base_delay_ms: 500,
            max_delay_ms: 20_000,
        }
    }
}

/// What the operator last saw of the chain.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelChainStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The steps as compiled, for `kubectl get` (for example `gemini-3.1-flash-image → gemini-3-pro-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<String>,
    /// The configuration version the operator last wrote to Redis for this chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<u64>,
    /// Ready (with a reason when the pool or a model is missing).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::ImageSize;

    #[test]
    fn half_size_is_spelled_512_and_reads_the_old_alias() {
        let half: ImageSize = serde_json::from_str("\"0.5K\"").expect("alias");
        assert_eq!(half, ImageSize::HalfK);
        assert_eq!(
            serde_json::from_str::<ImageSize>("\"512\"").expect("512"),
            half
        );
        assert_eq!(serde_json::to_string(&half).expect("json"), "\"512\"");
        assert!(serde_json::from_str::<ImageSize>("\"8K\"").is_err());
    }
}
