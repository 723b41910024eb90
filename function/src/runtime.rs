//! Assembling a replica from its settings: where configuration comes from, which limiter,
//! which providers, which sink, where results go. Shared by `pacer worker`, the Lambda
//! binary, `pacer generate`, `pacer demo` and `pacer loadtest`.
use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Args;
use pacer_core::{
    config::{
        CompiledConfig, CompiledPool, ConfigRefresh, ConfigStore, ProviderKind, VertexSettings,
    },
    connection::RedisConnection,
    gemini::{GeminiClient, GeminiConfig, vertex::AccessTokens},
    limiter::redis::{RedisLimiter, RedisOptions},
    openai::{OpenAiClient, OpenAiConfig},
    provider::{ApiKey, ImageProvider},
};
use tokio::sync::watch;

use crate::{
    handler::{Handler, HandlerOptions, Limiters, PoolClients, Providers},
    metrics::Metrics,
    record::Records,
    sink,
};

/// Why a replica could not be assembled; each names the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A setting is missing or wrong.
    #[error("{0}")]
    Settings(String),
    /// Redis could not be reached or read.
    #[error("{what} (PACER_REDIS_URL): {source}")]
    Redis {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file named by a setting could not be read.
    #[error("reading {path} ({setting}): {source}")]
    File {
        path: PathBuf,
        setting: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A provider client could not be built.
    #[error("provider client: {0}")]
    Provider(#[from] pacer_core::provider::ProviderError),
}

fn redis_error(
    what: &'static str,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> SetupError {
    move |source| SetupError::Redis { what, source }
}

/// A secret setting as Debug output shows it: whether it is set, never its value.
pub fn redacted(value: &Option<String>) -> &'static str {
    match value {
        Some(_) => "<set>",
        None => "<unset>",
    }
}

/// Settings every processing mode shares (flags and environment variables).
#[derive(Args, Clone)]
pub struct RuntimeArgs {
    /// Redis with the compiled config, the limiter, result records and claims. Without it
    /// the process runs alone: in-memory limiter, the configuration it was given.
    #[arg(long, env = "PACER_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// A Redis of its own for result records and claims (standalone or any node of a
    /// Cluster); default: the one at PACER_REDIS_URL. Records are kept 15 days and
    /// outgrow the limiter's state by far: apart, they cannot push it toward eviction.
    #[arg(long, env = "PACER_RECORDS_REDIS_URL", hide_env_values = true)]
    pub records_redis_url: Option<String>,

    /// Gemini's base URL (a proxy, a gateway's Gemini route, or `pacer simulate`).
    #[arg(long, env = "PACER_GEMINI_BASE_URL", default_value = pacer_core::gemini::client::DEFAULT_BASE_URL)]
    pub gemini_base_url: String,

    /// The Gemini API key (prefer --gemini-api-key-file or the environment: flags show in `ps`).
    #[arg(long, env = "PACER_GEMINI_API_KEY", hide_env_values = true)]
    pub gemini_api_key: Option<String>,

    /// A file holding the Gemini API key (a mounted Secret).
    #[arg(long, env = "PACER_GEMINI_API_KEY_FILE")]
    pub gemini_api_key_file: Option<PathBuf>,

    /// An OpenAI-compatible gateway's base URL, for pools with provider openaiCompatible.
    #[arg(long, env = "PACER_OPENAI_BASE_URL")]
    pub openai_base_url: Option<String>,

    /// The OpenAI-compatible gateway's API key.
    #[arg(long, env = "PACER_OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,

    /// Where images go: `s3://bucket/prefix` or a folder.
    #[arg(long, env = "PACER_SINK", default_value = "./pacer-images")]
    pub sink: String,

    /// An SQS queue that also receives every final result record (JSON).
    #[arg(long, env = "PACER_RESULT_QUEUE_URL")]
    pub result_queue_url: Option<String>,

    /// How often the replica checks Redis for a new config version, in milliseconds.
    #[arg(long, env = "PACER_CONFIG_REFRESH_MS", default_value_t = 500)]
    pub config_refresh_ms: u64,

    /// Timeout of one limiter decision in Redis, in milliseconds.
    #[arg(long, env = "PACER_LIMITER_TIMEOUT_MS", default_value_t = 500)]
    pub limiter_timeout_ms: u64,

    /// How long a request's claim lasts unless renewed, in seconds (bounds how long a
    /// crashed replica keeps others from its requests).
    #[arg(long, env = "PACER_CLAIM_LEASE_SECONDS", default_value_t = 30)]
    pub claim_lease_seconds: u64,

    /// This replica's name in claims and logs (default: host name and pid).
    #[arg(long, env = "PACER_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Rehearsal only: days this many seconds long (from multiples of it since the Unix
    /// epoch) instead of Pacific days, for per-day limits; the simulator's `--day-seconds`
    /// must match.
    #[arg(long, env = "PACER_DAY_SECONDS", hide = true)]
    pub day_seconds: Option<u64>,
    /// Pools' keys read from elsewhere than the environment (the Lambda function reads
    /// `<NAME>_SECRET_ARN` secrets at start), by the variable name a pool's `apiKeyEnv`
    /// gives; the environment variable wins when both are set.
    #[arg(skip)]
    pub pool_keys: std::collections::BTreeMap<String, String>,
}

/// Debug output never shows the Redis URL (it may hold a password) or an API key.
impl std::fmt::Debug for RuntimeArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeArgs")
            .field("redis_url", &redacted(&self.redis_url))
            .field("records_redis_url", &redacted(&self.records_redis_url))
            .field("gemini_base_url", &self.gemini_base_url)
            .field("gemini_api_key", &redacted(&self.gemini_api_key))
            .field("gemini_api_key_file", &self.gemini_api_key_file)
            .field("openai_base_url", &self.openai_base_url)
            .field("openai_api_key", &redacted(&self.openai_api_key))
            .field("sink", &self.sink)
            .field("result_queue_url", &self.result_queue_url)
            .field("config_refresh_ms", &self.config_refresh_ms)
            .field("limiter_timeout_ms", &self.limiter_timeout_ms)
            .field("claim_lease_seconds", &self.claim_lease_seconds)
            .field("replica_id", &self.replica_id)
            .field("day_seconds", &self.day_seconds)
            .field("pool_keys", &self.pool_keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl RuntimeArgs {
    fn api_key(&self) -> Result<Option<ApiKey>, SetupError> {
        if let Some(k) = &self.gemini_api_key {
            return Ok(Some(ApiKey::new(k.trim())));
        }
        if let Some(path) = &self.gemini_api_key_file {
            let key = std::fs::read_to_string(path).map_err(|source| SetupError::File {
                path: path.clone(),
                setting: "PACER_GEMINI_API_KEY_FILE",
                source,
            })?;
            return Ok(Some(ApiKey::new(key.trim())));
        }
        Ok(None)
    }

    /// The replica id.
    pub fn replica(&self) -> String {
        self.replica_id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// A replica's collaborators.
pub struct Replica {
    /// The request handler.
    pub handler: Arc<Handler>,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// The configuration it runs with (kept current from Redis).
    pub config: watch::Receiver<Arc<CompiledConfig>>,
    /// Asks for a configuration check now.
    pub refresh: ConfigRefresh,
}

/// The state a replica shares with the rest of the fleet: the compiled configuration, the
/// limiter and the result records. In Redis for a fleet; in memory for one process (and
/// then shared by cloning, as the load test's in-process replicas do).
#[derive(Clone)]
pub struct SharedState {
    /// The configuration (kept current from Redis, or fixed).
    pub config: watch::Receiver<Arc<CompiledConfig>>,
    /// The limiter.
    pub limiters: Arc<Limiters>,
    /// Result records and claims.
    pub records: Records,
    /// Asks for a configuration check now (a no-op for a fixed configuration).
    pub refresh: ConfigRefresh,
}

impl SharedState {
    /// Connects to Redis: watches the compiled config (polled every `refresh`), opens the
    /// limiter (each decision bounded by `limiter_timeout`) and the result store.
    pub async fn redis(
        url: &str,
        refresh: Duration,
        limiter_timeout: Duration,
    ) -> Result<Self, SetupError> {
        Self::redis_with_days(url, refresh, limiter_timeout, None, None).await
    }

    /// [`SharedState::redis`], with days `day_seconds` long (from multiples of it since the
    /// Unix epoch) instead of Pacific days: rehearsing a per-day limit in minutes. Every
    /// replica and the simulator (`pacer simulate --day-seconds`) must use the same length.
    /// Records and claims go to `records_url` when given (`PACER_RECORDS_REDIS_URL`).
    pub async fn redis_with_days(
        url: &str,
        refresh: Duration,
        limiter_timeout: Duration,
        day_seconds: Option<u64>,
        records_url: Option<&str>,
    ) -> Result<Self, SetupError> {
        let store = ConfigStore::connect(url)
            .await
            .map_err(|e| redis_error("connecting to Redis")(e.into()))?;
        let (config, refresh) = store
            .watch(refresh.max(Duration::from_millis(50)))
            .await
            .map_err(|e| redis_error("reading the compiled config from Redis")(e.into()))?;
        let options = RedisOptions {
            timeout: limiter_timeout.max(Duration::from_millis(1)),
            ..RedisOptions::default()
        };
        let mut limiter = RedisLimiter::connect(url, options)
            .await
            .map_err(|e| redis_error("connecting the limiter to Redis")(e.into()))?;
        if let Some(secs) = day_seconds.filter(|s| *s > 0) {
            tracing::warn!(
                day_seconds = secs,
                "rehearsal days: a day is {secs} s, not a Pacific day"
            );
            limiter = limiter.with_calendar(Arc::new(pacer_core::limiter::FixedDays {
                origin_us: 0,
                day_us: i64::try_from(secs).unwrap_or(i64::MAX / 1_000_000) * 1_000_000,
            }));
        }
        warn_if_evictable(&limiter).await;
        let records = match records_url {
            None => Records::redis(url)
                .await
                .map_err(|e| redis_error("connecting the result store to Redis")(e.into()))?,
            Some(records_url) => {
                let records = RedisConnection::open(records_url, Records::options())
                    .await
                    .map_err(|e| {
                        redis_error("connecting to the records' Redis (PACER_RECORDS_REDIS_URL)")(
                            e.into(),
                        )
                    })?;
                let alerts = RedisConnection::open(url, Records::options())
                    .await
                    .map_err(|e| {
                        redis_error("connecting the result store to the limiter's Redis")(e.into())
                    })?;
                Records::redis_apart(records, alerts)
            }
        };
        Ok(Self {
            config,
            refresh,
            limiters: Arc::new(Limiters::shared(limiter)),
            records,
        })
    }

    /// One process alone: a fixed configuration, an in-memory limiter and records.
    #[must_use]
    pub fn local(config: CompiledConfig) -> Self {
        let (tx, rx) = watch::channel(Arc::new(config));
        // Keep the sender alive for the process: the configuration never changes.
        std::mem::forget(tx);
        Self {
            config: rx,
            limiters: Arc::new(Limiters::memory()),
            records: Records::memory(),
            refresh: ConfigRefresh::default(),
        }
    }
}

/// A Gemini client for `base_url`. Without a key, Google's own endpoint is refused (the
/// simulator and most gateways accept any key).
pub fn gemini_provider(
    base_url: &str,
    key: Option<ApiKey>,
) -> Result<Arc<dyn ImageProvider>, SetupError> {
    let key = match key {
        Some(k) => k,
        None if base_url.contains("googleapis.com") => {
            return Err(SetupError::Settings(
                "no Gemini API key: set PACER_GEMINI_API_KEY or PACER_GEMINI_API_KEY_FILE (or \
                 point PACER_GEMINI_BASE_URL at `pacer simulate`)"
                    .into(),
            ));
        }
        None => ApiKey::new("pacer-local"),
    };
    Ok(Arc::new(GeminiClient::new(
        GeminiConfig::new(key).base_url(base_url.trim_end_matches('/')),
    )?))
}

/// The client of a Vertex AI pool: its project's route at its location (or its
/// `spec.baseUrl`, such as the simulator), with OAuth access tokens from its service-account
/// key file or Google's default credentials.
pub fn vertex_provider(pool: &CompiledPool) -> Result<Arc<dyn ImageProvider>, SetupError> {
    let settings = pool.vertex.clone().unwrap_or(VertexSettings {
        location: pacer_core::gemini::vertex::DEFAULT_LOCATION.to_owned(),
        credentials_file: None,
    });
    let tokens = match &settings.credentials_file {
        Some(path) => AccessTokens::from_key_file(path),
        None => AccessTokens::from_environment(),
    };
    let mut config = GeminiConfig::vertex(&pool.project, &settings.location, Arc::new(tokens));
    if let Some(url) = &pool.base_url {
        config = config.base_url(url.trim_end_matches('/'));
    }
    Ok(Arc::new(GeminiClient::new(config)?))
}

/// An OpenAI-compatible client for `base_url`.
fn openai_provider(base_url: &str, key: ApiKey) -> Result<Arc<dyn ImageProvider>, SetupError> {
    Ok(Arc::new(OpenAiClient::new(OpenAiConfig {
        base_url: base_url.trim_end_matches('/').to_owned(),
        api_key: key,
        timeout: Duration::from_secs(120),
    })?))
}

/// Builds a replica. `local_config` is what it runs with when there is no Redis (the
/// command line compiles `--config` YAML, or passes its embedded pool and chain).
pub async fn build(
    args: &RuntimeArgs,
    local_config: Option<CompiledConfig>,
    options: HandlerOptions,
) -> Result<Replica, SetupError> {
    let metrics = Arc::new(Metrics::default());
    let state = match &args.redis_url {
        Some(url) => {
            let state = SharedState::redis_with_days(
                url,
                Duration::from_millis(args.config_refresh_ms),
                Duration::from_millis(args.limiter_timeout_ms),
                args.day_seconds,
                args.records_redis_url.as_deref(),
            )
            .await?;
            if state.config.borrow().chains.is_empty() {
                tracing::warn!(
                    "Redis holds no chains yet: apply some with `pacer apply -f` or the operator"
                );
            }
            state
        }
        None => {
            let Some(cfg) = local_config else {
                return Err(SetupError::Settings(
                    "no configuration: set PACER_REDIS_URL (config written by the operator or \
                     `pacer apply`), or run `pacer worker --config FILE` with QuotaPool and \
                     ModelChain YAML"
                        .into(),
                ));
            };
            SharedState::local(cfg)
        }
    };
    let default_key = args.api_key()?;
    let gemini = gemini_provider(&args.gemini_base_url, default_key.clone())?;
    let openai = match &args.openai_base_url {
        Some(url) => Some(openai_provider(
            url,
            ApiKey::new(args.openai_api_key.clone().unwrap_or_default()),
        )?),
        None => None,
    };
    // Pools naming their own key (spec.apiKeyEnv) or endpoint (spec.baseUrl) get clients
    // of their own, made on first use: each pool bills its own project.
    let per_pool = {
        let gemini_url = args.gemini_base_url.clone();
        let openai = (args.openai_base_url.clone(), args.openai_api_key.clone());
        PoolClients::with_keys(
            args.pool_keys.clone(),
            Box::new(move |pool, key| {
                let url = pool.base_url.as_deref();
                let made = match pool.provider {
                    ProviderKind::Vertex => vertex_provider(pool),
                    ProviderKind::Gemini => gemini_provider(
                        url.unwrap_or(&gemini_url),
                        key.or_else(|| default_key.clone()),
                    ),
                    ProviderKind::OpenaiCompatible => {
                        let Some(url) = url.or(openai.0.as_deref()) else {
                            return Err("no OpenAI-compatible endpoint: set spec.baseUrl or PACER_OPENAI_BASE_URL".into());
                        };
                        let key = key
                            .unwrap_or_else(|| ApiKey::new(openai.1.clone().unwrap_or_default()));
                        openai_provider(url, key)
                    }
                };
                made.map_err(|e| e.to_string())
            }),
        )
    };
    let sink = sink::from_url(&args.sink)
        .await
        .map_err(|e| SetupError::Settings(format!("PACER_SINK: {e}")))?;
    let options = HandlerOptions {
        claim_lease: Duration::from_secs(args.claim_lease_seconds.max(1)),
        ..options
    };
    let config = state.config.clone();
    let refresh = state.refresh.clone();
    let mut handler = Handler::new(
        state.config,
        state.limiters,
        Providers {
            gemini: Some(gemini),
            openai,
            per_pool: Some(Arc::new(per_pool)),
        },
        Arc::from(sink),
        state.records,
        metrics.clone(),
        args.replica(),
        options,
    );
    if let Some(url) = &args.result_queue_url {
        let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let queue = crate::queue::SqsQueue::new(aws_sdk_sqs::Client::new(&aws), url.clone());
        handler = handler.with_result_queue(Arc::new(queue));
    }
    Ok(Replica {
        handler: Arc::new(handler),
        metrics,
        config,
        refresh,
    })
}

/// Limiter state must not be evicted piecemeal: its keys carry no TTL, so `noeviction` and
/// the `volatile-*` policies keep them; an `allkeys-*` policy can take one key of a pair
/// under memory pressure and the limiter then fences (safe, but it pauses the model for a
/// window). Managed services that refuse `CONFIG` are not judged.
async fn warn_if_evictable(limiter: &RedisLimiter) {
    match limiter.eviction_policy().await {
        Ok(Some(policy)) if !pacer_core::limiter::redis::eviction_policy_is_safe(&policy) => {
            tracing::warn!(
                %policy,
                "Redis may evict limiter state (maxmemory-policy {policy}); set \
                 maxmemory-policy to noeviction or a volatile-* policy"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "could not read Redis's eviction policy"),
    }
}
