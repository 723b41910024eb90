use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An ordered fallback chain of models for one workload.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pacer.dev",
    version = "v1alpha1",
    kind = "ModelChain",
    namespaced,
    status = "ModelChainStatus",
    shortname = "mc",
    category = "pacer",
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.pool"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ModelChainSpec {
    /// The QuotaPool (in this namespace) whose quota the chain's models use.
    #[schemars(length(min = 1, max = 253))]
    pub pool: String,
    /// The models to try, in order.
    #[schemars(length(min = 1, max = 8))]
    pub steps: Vec<ChainStep>,
    /// Retries of overloaded and server errors within one step.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Timeout of one provider call, in seconds.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = 600))]
    pub request_timeout_seconds: u32,
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
}

fn default_max_wait() -> u32 {
    30
}

/// Full-jitter exponential backoff.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Attempts per step, the first included.
    #[schemars(range(min = 1, max = 10))]
    pub attempts: u32,
    /// The first backoff's ceiling, in milliseconds.
    #[schemars(range(min = 1))]
    pub base_delay_ms: u64,
    /// The largest backoff, in milliseconds.
    #[schemars(range(min = 1))]
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
    /// Ready (with a reason when the pool or a model is missing).
    #[serde(default)]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}
