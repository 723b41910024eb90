use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One provider project's shared quota: the limits every replica of every workload that
/// uses this project stays under together.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pacer.dev",
    version = "v1alpha1",
    kind = "QuotaPool",
    namespaced,
    status = "QuotaPoolStatus",
    shortname = "qp",
    category = "pacer",
    printcolumn = r#"{"name":"Tier","type":"string","jsonPath":".spec.tier"}"#,
    printcolumn = r#"{"name":"Models","type":"integer","jsonPath":".status.modelCount"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct QuotaPoolSpec {
    /// The API that enforces these quotas.
    #[serde(default)]
    pub provider: Provider,
    /// The provider's project id: quotas are per project, shared by all its API keys.
    #[schemars(length(min = 1, max = 128))]
    pub project: String,
    /// The billing tier; fills every limit not given per model from the built-in table.
    #[serde(default)]
    pub tier: Tier,
    /// Per-model limits. A field left out takes the tier's default for that model.
    #[schemars(length(min = 1, max = 32))]
    pub models: Vec<ModelLimits>,
    /// Spend limit per rolling 10 minutes, in US dollars (Tier 1 $10, Tier 2 $50, Tier 3 $200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub spend_per_10_minutes_usd: Option<f64>,
    /// Stay this many percent under every limit (0 to 90).
    #[serde(default)]
    #[schemars(range(min = 0, max = 90))]
    pub headroom_percent: u8,
    /// Usage at or above this percent of a limit sets the NearLimit condition.
    #[serde(default = "default_alert")]
    #[schemars(range(min = 1, max = 100))]
    pub alert_threshold_percent: u8,
    /// What replicas do when Redis cannot be reached.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// Replicas expected to share the pool, used by failureMode `local` to split limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub expected_replicas: Option<u32>,
    /// The Secret key holding the provider API key; never copied into Redis or status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeyRef>,
}

fn default_alert() -> u8 {
    80
}

/// The limits of one model in the pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelLimits {
    /// The model id, as in the API path (for example `gemini-3.1-flash-image`).
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub rpm: Option<u64>,
    /// Input tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub tpm: Option<u64>,
    /// Images per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ipm: Option<u64>,
    /// Requests per day, reset at midnight America/Los_Angeles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub rpd: Option<u64>,
    /// The length of the per-minute windows, in seconds (60 in production; shorter for rehearsals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub window_seconds: Option<u32>,
}

/// The provider API.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Provider {
    /// Google's Gemini API (generativelanguage).
    #[default]
    Gemini,
    /// Gemini on Vertex AI.
    Vertex,
    /// An OpenAI-compatible images endpoint.
    OpenaiCompatible,
}

/// Gemini API billing tiers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Tier {
    /// No billing: image models are not available.
    Free,
    /// Billing linked.
    #[default]
    Tier1,
    /// $100 paid and 3 days.
    Tier2,
    /// $1,000 paid and 30 days.
    Tier3,
}

/// What replicas do when Redis cannot be reached.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FailureMode {
    /// Defer work until Redis is back.
    #[default]
    Closed,
    /// Send without a global limit.
    Open,
    /// Each replica limits itself to limit / expectedReplicas.
    Local,
}

/// A key in a Secret in the pool's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    pub name: String,
    /// The key within the Secret.
    #[serde(default = "default_secret_key")]
    pub key: String,
}

fn default_secret_key() -> String {
    "api-key".to_owned()
}

/// What the operator last saw of the pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaPoolStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many models the pool declares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_count: Option<u32>,
    /// Ready, NearLimit, Throttled, Degraded.
    #[serde(default)]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}
