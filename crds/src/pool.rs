use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One provider project's shared quota: the limits every replica of every workload that
/// uses this project stays under together.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
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
    printcolumn = r#"{"name":"Requests","type":"string","description":"Requests used against the limit in the current window, busiest model","jsonPath":".status.requests"}"#,
    printcolumn = r#"{"name":"Busiest Tenant","type":"string","description":"The tenant with the largest part of the current window's requests, and that part","jsonPath":".status.busiestTenant"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = kube::core::Rule::new(
    "self.failureMode != 'local' || has(self.expectedReplicas)"
).message("failureMode local divides every limit by expectedReplicas: set spec.expectedReplicas").field_path(".expectedReplicas"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.vertex) || self.provider == 'vertex'"
).message("spec.vertex applies to provider vertex only: set provider: vertex or remove spec.vertex").field_path(".vertex"))]
#[serde(rename_all = "camelCase")]
pub struct QuotaPoolSpec {
    /// The API that enforces these quotas: `gemini` (the Gemini API), `vertex` (Gemini on
    /// Vertex AI) or `openaiCompatible` (an OpenAI-compatible images endpoint).
    #[serde(default)]
    pub provider: Provider,
    /// The provider's project id (a Google Cloud project id for Gemini): quotas are per
    /// project, shared by all its API keys. Immutable: a different project is a different pool.
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("project is immutable: create a new QuotaPool for another project"))]
    pub project: String,
    /// The billing tier; fills every limit not given per model from the built-in table
    /// (`Free` has no image models, `Tier1` needs billing linked, `Tier2` $100 paid and 3
    /// days, `Tier3` $1,000 paid and 30 days).
    #[serde(default)]
    pub tier: Tier,
    /// Per-model limits, one entry per model id (names unique). A limit left out takes
    /// the tier's default for that model.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = kube::core::Rule::new("self.all(m, self.exists_one(n, n.name == m.name))").message("model names must be unique within a pool"))]
    pub models: Vec<ModelLimits>,
    /// Spend limit per rolling 10 minutes, in US dollars, shared by all the pool's models
    /// (the tier's default when left out: Tier 1 $10, Tier 2 $50, Tier 3 $200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1000000.0))]
    pub spend_per_10_minutes_usd: Option<f64>,
    /// Stay this many percent under every limit (0 to 90), to leave room for traffic that
    /// does not go through Pacer.
    #[serde(default)]
    #[schemars(range(min = 0, max = 90))]
    pub headroom_percent: u8,
    /// Usage at or above this percent of a limit sets the NearLimit condition (1 to 100).
    #[serde(default = "default_alert")]
    #[schemars(range(min = 1, max = 100))]
    pub alert_threshold_percent: u8,
    /// What replicas do when Redis cannot be reached: `closed` defers work (never risks
    /// the quota), `open` sends without a global limit, `local` limits each replica to
    /// limit / expectedReplicas.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// Replicas expected to share the pool; failureMode `local` divides every limit by it.
    /// Required when failureMode is `local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub expected_replicas: Option<u32>,
    /// Extra length added to every window, in milliseconds, so a request booked one window
    /// after another still arrives outside that window at the provider despite latency
    /// jitter. Default: 1/60 of the window (1 s on 60 s). Raise it if upstream 429s appear
    /// while usage stays under the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 60000))]
    pub window_margin_ms: Option<u32>,
    /// The Secret key (in the pool's namespace) holding the provider API key. The operator
    /// only checks it exists; the key is never copied into Redis, status or logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeyRef>,
    /// The environment variable holding this pool's API key in every replica (`pacer
    /// apply`, Lambda, `pacer loadtest`; in Kubernetes, set it on the workers from the
    /// Secret). Each pool calls with its own project's key: without one, the replica's
    /// default key (`PACER_GEMINI_API_KEY`) is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub api_key_env: Option<String>,
    /// The provider's base URL for this pool, when not the replicas' default (a regional
    /// proxy, a gateway, the simulator); `http://` or `https://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 8, max = 512), regex(pattern = r"^https?://[^\s]+$"))]
    pub base_url: Option<String>,
    /// Vertex AI settings (provider `vertex` only): the location and the service account
    /// the replicas call with. Without it: location `global`, credentials from Google's
    /// default search (workload identity, `GOOGLE_APPLICATION_CREDENTIALS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vertex: Option<VertexSettings>,
    /// The teams sharing this quota (names unique; left out: one team). When tenants
    /// contend, each window goes to them in proportion to their weights; an idle tenant's
    /// share goes to the others; a floor is always available to its tenant, a ceiling caps
    /// it even while the pool has room. A message names its tenant (`tenant`, default
    /// `default`), or its chain does; a tenant not listed here is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = kube::core::Rule::new("self.all(t, self.exists_one(u, u.name == t.name))").message("tenant names must be unique within a pool"))]
    #[x_kube(validation = kube::core::Rule::new("self.map(t, has(t.floorPercent) ? t.floorPercent : 0).sum() <= 100").message("the tenants' floorPercent add up to more than 100: lower them so every floor can be met at once"))]
    pub tenants: Vec<Tenant>,
}

/// One team sharing a pool's quota.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.floorPercent) || !has(self.ceilingPercent) || self.floorPercent <= self.ceilingPercent"
).message("a tenant's floorPercent cannot be above its ceilingPercent").field_path(".floorPercent"))]
#[serde(rename_all = "camelCase")]
pub struct Tenant {
    /// The tenant's name, as messages and chains give it.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Its weight (1 to 1000, default 1): contending tenants share each window in
    /// proportion to their weights.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: u32,
    /// The percent of every limit always available to it within a window of its arrival,
    /// however busy the others are (0 to 100, default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub floor_percent: Option<u32>,
    /// The most of every limit it may use, in percent, even while the pool has room (1 to
    /// 100, default 100: no ceiling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub ceiling_percent: Option<u32>,
    /// Its spend per Pacific day, in US dollars (reset at midnight America/Los_Angeles):
    /// each call is booked at its estimated price and charged what it cost; once spent,
    /// its requests wait for the reset (or fail if their deadline comes first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 10000000.0))]
    pub daily_budget_usd: Option<f64>,
    /// Its spend per calendar month (Pacific), in US dollars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100000000.0))]
    pub monthly_budget_usd: Option<f64>,
}

fn default_weight() -> u32 {
    1
}

/// How replicas reach Gemini on Vertex AI for this pool's project.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VertexSettings {
    /// `global` (the default, where the Gemini image models are served first) or a region
    /// such as `us-central1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9-]+$"))]
    pub location: Option<String>,
    /// A service-account key file (JSON) at this path in every replica, for example a
    /// Secret mounted as a file. Left out: Google's default credentials (workload identity
    /// on GKE, `GOOGLE_APPLICATION_CREDENTIALS`, the metadata server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub credentials_file: Option<String>,
}

fn default_alert() -> u8 {
    80
}

/// The limits of one model in the pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.rpd) || !has(self.rpm) || self.rpd >= self.rpm"
).message("the per-day limit (rpd) cannot be below the per-minute one (rpm)").field_path(".rpd"))]
#[serde(rename_all = "camelCase")]
pub struct ModelLimits {
    /// The model id, as in the API path (for example `gemini-3.1-flash-image`).
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[a-zA-Z0-9][a-zA-Z0-9._/-]*$")
    )]
    pub name: String,
    /// Requests per minute (per window). 0 makes the model unavailable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000000))]
    pub rpm: Option<u64>,
    /// Input tokens per minute (per window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000_000))]
    pub tpm: Option<u64>,
    /// Images per minute (per window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000000))]
    pub ipm: Option<u64>,
    /// Requests per day, reset at midnight America/Los_Angeles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000_000))]
    pub rpd: Option<u64>,
    /// The length of the per-minute windows, in seconds (60 in production; shorter for
    /// rehearsals against the simulator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub window_seconds: Option<u32>,
    /// The price of one image on this model, in US dollars: what the spend limit charges
    /// per image. Required (with `rpm`) for a model Pacer's built-in table does not know;
    /// for a known model it replaces the table's price at every size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub price_usd_per_image: Option<f64>,
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
    /// The Secret's name (in the pool's namespace).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key within the Secret.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
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
    /// Requests used against the limit in the current window, of the busiest model
    /// (for example `12/20`), for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<String>,
    /// The configuration version the operator last wrote to Redis for this pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<u64>,
    /// Live usage per model, read from the global limiter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelUsage>,
    /// The tenant with the largest part of the current window's requests (for example
    /// `web 60%`), for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busiest_tenant: Option<String>,
    /// Live use per tenant (over every model), read from the global limiter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<TenantStatus>,
    /// Ready, NearLimit, Throttled, Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// Live use of one tenant, over the pool's models.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// The tenant.
    pub name: String,
    /// Requests it started in the current window.
    pub requests: u64,
    /// Its percent of every tenant's requests in the current window.
    pub share_percent: u32,
    /// The percent its weight, floor and ceiling give it among the tenants active now.
    pub expected_share_percent: u32,
    /// Requests it has booked ahead.
    pub booked_ahead: u64,
    /// How far ahead its latest booking starts, in seconds: its wait.
    pub wait_seconds: u64,
    /// What its calls cost today (Pacific day), in US dollars.
    pub spent_today_usd: f64,
    /// Its daily budget left, in US dollars (absent: no daily budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_left_today_usd: Option<f64>,
    /// Its monthly budget left, in US dollars (absent: no monthly budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_left_this_month_usd: Option<f64>,
    /// `day` or `month` while that budget is spent (under 2 % of it left): its requests
    /// wait for the reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_spent: Option<String>,
}

/// Live usage of one model.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelUsage {
    /// The model id.
    pub name: String,
    /// Use per windowed dimension.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dimensions: Vec<DimensionUsage>,
    /// Requests counted in the current Pacific day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_used: Option<u64>,
    /// The requests-per-day limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_limit: Option<u64>,
    /// Seconds left on a cooldown set by an upstream 429 (0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_seconds: Option<u64>,
    /// On a shared quota that answers bare 429s (Vertex AI): the percent of the declared
    /// request, token and image limits the replicas book now, as learned from those 429s
    /// (lowered by each burst, raised a tenth per clean window). Absent: the declared rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned_rate_percent: Option<u32>,
}

/// Use of one dimension in the current window.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DimensionUsage {
    /// `requests`, `input_tokens`, `images` or `spend_micros`.
    pub dimension: String,
    /// Booked in the window ending now.
    pub used: u64,
    /// The limit (absent: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// used / limit in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
}
