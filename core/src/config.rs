//! The compiled configuration every replica reads: pools (a provider project's limits per
//! model) and chains (the fallback order a workload uses), as the operator or `pacer apply`
//! wrote them into Redis.
//!
//! Layout in Redis (one hash tag, so a change is one `MULTI` on one Cluster slot; see
//! [`crate::keys`] for every key):
//!
//! | key | type | what |
//! |---|---|---|
//! | `{pacer:config}:pools` | hash | pool name (`namespace/name`) → JSON [`CompiledPool`] |
//! | `{pacer:config}:chains` | hash | chain name (`namespace/name`) → JSON [`CompiledChain`] |
//! | `{pacer:config}:version` | integer | bumped in the same transaction as every change |
//!
//! Replicas poll the version (one `GET`, twice a second by default) and reload both hashes
//! when it moves, so a `kubectl apply` reaches every replica within about a second, and
//! limits are never compiled into a replica. Unknown fields are ignored when reading, so
//! replicas keep working while a newer operator rolls out.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::models::ImageSize;

use crate::connection::{RedisConnection, RedisOptions};
pub use crate::keys::{CHAINS_KEY, POOLS_KEY, VERSION_KEY};

/// The provider API a pool's project lives on.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum ProviderKind {
    /// Google's Gemini API.
    #[default]
    Gemini,
    /// Gemini on Vertex AI.
    Vertex,
    /// An OpenAI-compatible images endpoint.
    OpenaiCompatible,
}

/// What replicas do when Redis cannot be reached.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum FailureMode {
    /// Defer work until Redis is back: never risks the quota.
    #[default]
    Closed,
    /// Send without a global limit: never delays work.
    Open,
    /// Each replica limits itself to limit / expected replicas.
    Local,
}

/// One model's limits as declared (headroom not yet applied: the limiter applies it once).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ModelLimits {
    /// Requests per window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Input tokens per window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Images per window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipm: Option<u64>,
    /// Requests per Pacific calendar day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpd: Option<u64>,
    /// The per-minute windows' length in milliseconds (60 000 in production).
    pub window_ms: u64,
    /// The price of one image in micro-dollars, when the pool sets one (required for a
    /// model the built-in table does not know; otherwise the table's price by size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_micros_per_image: Option<u64>,
}

/// A provider project's quota, compiled from a `QuotaPool`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CompiledPool {
    /// `namespace/name` of the pool.
    pub name: String,
    /// The resource generation this was compiled from (0 when written by `pacer apply`).
    #[serde(default)]
    pub generation: i64,
    /// The provider API.
    pub provider: ProviderKind,
    /// The provider's project id: the scope of every limit.
    pub project: String,
    /// Limits per model id.
    pub models: BTreeMap<String, ModelLimits>,
    /// Spend per rolling 10 minutes in micro-dollars, shared by all the pool's models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_micros_per_10_minutes: Option<u64>,
    /// Stay this many percent under every limit.
    pub headroom_percent: u8,
    /// Usage at or above this percent of a limit is "near the limit".
    pub alert_threshold_percent: u8,
    /// What replicas do when Redis cannot be reached.
    pub failure_mode: FailureMode,
    /// Replicas expected to share the pool (divides limits in failure mode `local`).
    pub expected_replicas: u32,
    /// Where the replicas find the API key (`namespace/secret#key` or an env var name):
    /// a reference only, never the key itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_ref: Option<String>,
    /// The environment variable holding this pool's API key in every replica: a name,
    /// never the key. None: the replica's default key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Extra length of every window (default: 1/60 of the window): absorbs the jitter
    /// between a booked start and the provider's arrival clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_margin_ms: Option<u64>,
    /// The provider's base URL when not the public endpoint (a proxy, a gateway, the
    /// simulator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Vertex AI's location and credentials (provider `vertex` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vertex: Option<VertexSettings>,
    /// The teams sharing the pool's quota, with their weights, floors and ceilings (empty:
    /// one team).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<crate::quota::TenantShare>,
}

/// Where a Vertex AI pool calls and with which credentials: a location and a file path,
/// never a key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct VertexSettings {
    /// `global` or a region.
    pub location: String,
    /// A service-account key file in every replica (None: Google's default credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<String>,
}

impl CompiledPool {
    /// Whether the pool declares `model`.
    pub fn has_model(&self, model: &str) -> bool {
        self.models.contains_key(model)
    }

    /// The limiter key of `model` in this pool's project.
    pub fn key(&self, model: &str) -> crate::limiter::QuotaKey {
        crate::limiter::QuotaKey::new(&self.project, model)
    }
}

/// One step of a chain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CompiledStep {
    /// The model id (one of the pool's models).
    pub model: String,
    /// The longest a request waits for capacity on this model before falling through.
    pub max_wait_ms: u64,
    /// The aspect ratio a request gets on this step when it names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aspect_ratio: Option<String>,
    /// The image size a request gets on this step when it names none (stored as Google
    /// spells it, `"512"`, `"1K"`, …; `"0.5K"` is still read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<ImageSize>,
    /// The service tier this step's calls ask for (None: the standard tier, unsaid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<crate::models::ServiceTier>,
}

/// Full-jitter exponential backoff for overloaded and server errors.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetryConfig {
    /// Attempts per step, the first included.
    pub attempts: u32,
    /// The first backoff's ceiling.
    pub base_delay_ms: u64,
    /// The largest backoff.
    pub max_delay_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: 3,
            base_delay_ms: 500,
            max_delay_ms: 20_000,
        }
    }
}

/// A workload's fallback chain, compiled from a `ModelChain`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CompiledChain {
    /// `namespace/name` of the chain.
    pub name: String,
    /// The resource generation this was compiled from.
    #[serde(default)]
    pub generation: i64,
    /// `namespace/name` of its pool.
    pub pool: String,
    /// The models, in order.
    pub steps: Vec<CompiledStep>,
    /// Retries within a step.
    pub retry: RetryConfig,
    /// Timeout of one provider call.
    pub request_timeout_ms: u64,
    /// Its requests' priority class when a message gives none: behind a queue, a request
    /// books ahead of the bookings of lower classes that have not started.
    #[serde(default)]
    pub priority: i32,
    /// Requests older than this (since they were sent) fail instead of running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// The tenant every request of this chain books as (absent: the message's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// Everything a replica needs, at one version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompiledConfig {
    /// The version it was read at (0: nothing written yet).
    pub version: u64,
    /// Pools by `namespace/name`.
    pub pools: BTreeMap<String, CompiledPool>,
    /// Chains by `namespace/name`.
    pub chains: BTreeMap<String, CompiledChain>,
}

impl CompiledConfig {
    /// Whether any configuration was loaded. Version 0 with no chains is what a replica
    /// reads before `pacer apply` or the operator wrote anything, or right after Redis lost
    /// its data: our own transient state, so requests wait for it rather than fail.
    pub fn is_loaded(&self) -> bool {
        self.version > 0 || !self.chains.is_empty()
    }

    /// A chain and its pool, or why they cannot be used.
    pub fn chain(&self, name: &str) -> Result<(&CompiledChain, &CompiledPool), ConfigError> {
        let chain = self
            .chains
            .get(name)
            .ok_or_else(|| ConfigError::UnknownChain {
                name: name.to_owned(),
                known: self.chains.keys().cloned().collect(),
            })?;
        let pool = self
            .pools
            .get(&chain.pool)
            .ok_or_else(|| ConfigError::UnknownPool {
                chain: name.to_owned(),
                pool: chain.pool.clone(),
            })?;
        Ok((chain, pool))
    }
}

/// What can go wrong reading or writing configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Redis could not be reached or refused the command (retryable).
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A stored entry is not valid JSON of its type (someone wrote it by hand?).
    #[error(
        "stored config {key} field {field} is invalid: {source}; rewrite it with `pacer apply`"
    )]
    Corrupt {
        key: &'static str,
        field: String,
        source: serde_json::Error,
    },
    /// A request names a chain that is not configured.
    #[error("unknown chain {name:?}; configured chains: {known:?}")]
    UnknownChain { name: String, known: Vec<String> },
    /// A chain names a pool that is not configured.
    #[error("chain {chain:?} uses pool {pool:?}, which is not configured")]
    UnknownPool { chain: String, pool: String },
}

impl ConfigError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ConfigError::Redis(_))
    }
}

/// Reads and writes the compiled configuration in Redis.
#[derive(Clone)]
pub struct ConfigStore {
    redis: RedisConnection,
}

/// The Redis key of a pool's account alert: raised by a replica whose provider answered
/// that the account is broken (bad key, spent credit), expiring unless raised again; the
/// operator shows it as the pool's `AccountProblem` condition.
pub fn account_alert_key(pool: &str) -> String {
    crate::keys::account_alert(pool)
}

impl ConfigStore {
    /// `pool`'s account alert, if one is raised.
    pub async fn account_alert(&self, pool: &str) -> Result<Option<String>, ConfigError> {
        Ok(self.redis.clone().get(account_alert_key(pool)).await?)
    }

    /// A store over an existing connection (share one per process).
    pub fn new(redis: RedisConnection) -> Self {
        Self { redis }
    }

    /// Connects to `url` (`redis://`, `rediss://`, with a password or ACL user; any node
    /// of a Redis Cluster).
    pub async fn connect(url: &str) -> Result<Self, ConfigError> {
        let options = RedisOptions {
            // Config reads are rare and not on a request's path: a slow answer is better
            // than a failed reload.
            timeout: Duration::from_secs(5),
            ..RedisOptions::default()
        };
        Ok(Self::new(RedisConnection::open(url, options).await?))
    }

    /// The connection this store uses (to share with a limiter).
    pub fn connection(&self) -> &RedisConnection {
        &self.redis
    }

    /// Writes (or replaces) a pool and bumps the version, atomically.
    pub async fn put_pool(&self, pool: &CompiledPool) -> Result<u64, ConfigError> {
        self.write(POOLS_KEY, &pool.name, Some(to_json(pool))).await
    }

    /// Writes (or replaces) a chain and bumps the version, atomically.
    pub async fn put_chain(&self, chain: &CompiledChain) -> Result<u64, ConfigError> {
        self.write(CHAINS_KEY, &chain.name, Some(to_json(chain)))
            .await
    }

    /// Removes a pool (its limiter state is left to expire) and bumps the version.
    pub async fn remove_pool(&self, name: &str) -> Result<u64, ConfigError> {
        self.write(POOLS_KEY, name, None).await
    }

    /// Removes a chain and bumps the version.
    pub async fn remove_chain(&self, name: &str) -> Result<u64, ConfigError> {
        self.write(CHAINS_KEY, name, None).await
    }

    async fn write(
        &self,
        key: &'static str,
        field: &str,
        value: Option<String>,
    ) -> Result<u64, ConfigError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        match value {
            Some(json) => pipe.hset(key, field, json).ignore(),
            None => pipe.hdel(key, field).ignore(),
        };
        pipe.incr(VERSION_KEY, 1u64);
        let (version,): (u64,) = pipe.query_async(&mut self.redis.clone()).await?;
        Ok(version)
    }

    /// The current version (0 when nothing was ever written, or Redis lost it).
    pub async fn version(&self) -> Result<u64, ConfigError> {
        let v: Option<u64> = self.redis.clone().get(VERSION_KEY).await?;
        Ok(v.unwrap_or(0))
    }

    /// The whole configuration at one version (read in one transaction).
    pub async fn load(&self) -> Result<CompiledConfig, ConfigError> {
        let (version, pools, chains): (
            Option<u64>,
            BTreeMap<String, String>,
            BTreeMap<String, String>,
        ) = redis::pipe()
            .atomic()
            .get(VERSION_KEY)
            .hgetall(POOLS_KEY)
            .hgetall(CHAINS_KEY)
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(CompiledConfig {
            version: version.unwrap_or(0),
            pools: parse_all(POOLS_KEY, pools)?,
            chains: parse_all(CHAINS_KEY, chains)?,
        })
    }

    /// Loads the configuration and keeps it current: every `every` the version is read and
    /// a new one loaded. The returned [`ConfigRefresh`] asks for a check now and waits
    /// for it (a Lambda sandbox thawed after a long freeze checks before its first
    /// request).
    pub async fn watch(
        self,
        every: Duration,
    ) -> Result<(watch::Receiver<Arc<CompiledConfig>>, ConfigRefresh), ConfigError> {
        let first = self.load().await?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let (ask, mut asked) = tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<()>>(16);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is immediate, and the configuration was just loaded.
            ticker.tick().await;
            loop {
                let reply = tokio::select! {
                    _ = ticker.tick() => None,
                    r = asked.recv() => r,
                };
                if tx.is_closed() {
                    break;
                }
                let current = tx.borrow().version;
                match self.version().await {
                    Ok(v) if v == current => {}
                    Ok(_) => match self.load().await {
                        Ok(cfg) => {
                            tracing::info!(version = cfg.version, "configuration changed");
                            let _ = tx.send(Arc::new(cfg));
                        }
                        Err(e) => tracing::warn!(error = %e, "reloading configuration failed"),
                    },
                    Err(e) => tracing::warn!(error = %e, "reading configuration version failed"),
                }
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
            }
        });
        Ok((rx, ConfigRefresh(Some(ask))))
    }
}

/// Asks a configuration watcher to check for a new version now.
#[derive(Clone, Debug, Default)]
pub struct ConfigRefresh(Option<tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<()>>>);

impl ConfigRefresh {
    /// Checks now and waits for the check (at most `within`); returns at once for a fixed
    /// configuration.
    pub async fn now(&self, within: Duration) {
        let Some(ask) = &self.0 else { return };
        let (reply, done) = tokio::sync::oneshot::channel();
        if ask.send(reply).await.is_ok() {
            let _ = tokio::time::timeout(within, done).await;
        }
    }
}

fn to_json<T: Serialize>(value: &T) -> String {
    // These types hold only strings, numbers and maps with string keys: always serialisable.
    serde_json::to_string(value).unwrap_or_default()
}

fn parse_all<T: for<'de> Deserialize<'de>>(
    key: &'static str,
    raw: BTreeMap<String, String>,
) -> Result<BTreeMap<String, T>, ConfigError> {
    raw.into_iter()
        .map(|(field, json)| match serde_json::from_str(&json) {
            Ok(v) => Ok((field, v)),
            Err(source) => Err(ConfigError::Corrupt { key, field, source }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_s_image_size_keeps_its_stored_spelling() {
        let step: CompiledStep = serde_json::from_str(
            r#"{"model":"gemini-3.1-flash-image","maxWaitMs":1000,"imageSize":"0.5K"}"#,
        )
        .expect("the older spelling still reads");
        assert_eq!(step.image_size, Some(ImageSize::Half));
        let json = serde_json::to_value(&step).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({"model":"gemini-3.1-flash-image","maxWaitMs":1000,"imageSize":"512"})
        );
        for (size, name) in [(ImageSize::K1, "1K"), (ImageSize::K4, "4K")] {
            let step = CompiledStep {
                image_size: Some(size),
                service_tier: None,
                ..step.clone()
            };
            let json = serde_json::to_string(&step).expect("serializes");
            assert!(json.contains(&format!(r#""imageSize":"{name}""#)), "{json}");
            assert_eq!(serde_json::from_str::<CompiledStep>(&json).ok(), Some(step));
        }
        let bare: CompiledStep =
            serde_json::from_str(r#"{"model":"m","maxWaitMs":0}"#).expect("no size");
        assert_eq!(bare.image_size, None);
        assert!(
            serde_json::from_str::<CompiledStep>(r#"{"model":"m","maxWaitMs":0,"imageSize":"8K"}"#)
                .is_err()
        );
    }
}
