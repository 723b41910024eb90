//! The result record: what became of a request, stored in Redis under its id (and
//! optionally sent to a result queue). It is the other half of idempotency: a request
//! whose record is final is acknowledged on redelivery without any work.
//!
//! Keys: `{pacer:<id>}:result` (JSON, kept [`RESULT_TTL`]) and `{pacer:<id>}:claim` (which
//! replica is generating it right now, with a lease so a crashed replica's claim expires).
//! The two share a hash tag, so the script that stores a record and drops its claim runs on
//! one Cluster slot (see `pacer_core::keys`). They may live in a Redis of their own
//! (`PACER_RECORDS_REDIS_URL`): at 2,000 requests a minute, 15 days of records are far
//! bigger than the limiter's state, and must not push the limiter's Redis toward eviction.
use pacer_core::connection::{RedisConnection, RedisOptions};
use pacer_core::keys::{claim as claim_key, result as result_key};
use pacer_core::sync::lock;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

// Tokio's clock, so tests with paused time can let a claim's lease run out.
use tokio::time::Instant;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

/// How long result records are kept: longer than SQS keeps a message at most (14 days,
/// in the queue or its dead-letter queue), so a late redrive finds its record and is not
/// generated (and charged) again.
pub const RESULT_TTL: Duration = Duration::from_secs(15 * 24 * 3600);

/// How a request ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Status {
    /// Every image is stored.
    Succeeded,
    /// It can never succeed; `error` says why.
    Failed,
}

/// The record of one request. Holds no secret: never the API key, never the prompt.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResultRecord {
    /// The request id.
    pub id: String,
    /// Succeeded or failed.
    pub status: Status,
    /// The model that produced the images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Provider calls made (all steps, all retries) by the delivery that finished it.
    pub attempts: u32,
    /// Input tokens charged.
    #[serde(default)]
    pub input_tokens: u64,
    /// Output tokens charged.
    #[serde(default)]
    pub output_tokens: u64,
    /// Estimated cost in micro-dollars.
    #[serde(default)]
    pub cost_micros: u64,
    /// Where the images are.
    #[serde(default)]
    pub images: Vec<String>,
    /// Why it failed (the failure's kind and message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it finished (RFC 3339).
    pub finished_at: String,
    /// Failed for the configuration (its chain, a model, a provider unknown here), before
    /// any provider call: a later delivery of this id runs again instead of answering
    /// "already done", so a request resubmitted once the config is fixed is not refused
    /// for 15 days.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub config_failure: bool,
}

impl ResultRecord {
    /// A failed record with a reason.
    pub fn failed(id: &str, attempts: u32, reason: impl Into<String>) -> Self {
        Self {
            id: id.to_owned(),
            status: Status::Failed,
            model: None,
            attempts,
            input_tokens: 0,
            output_tokens: 0,
            cost_micros: 0,
            images: Vec::new(),
            error: Some(reason.into()),
            finished_at: jiff::Timestamp::now().to_string(),
            config_failure: false,
        }
    }

    /// A failed record for a configuration problem (see [`ResultRecord::config_failure`]).
    pub fn config_failed(id: &str, reason: impl Into<String>) -> Self {
        Self {
            config_failure: true,
            ..Self::failed(id, 0, reason)
        }
    }
}

/// Result records and generation claims: in Redis for a fleet, in memory for one process.
#[derive(Clone)]
pub enum Records {
    /// Shared by every replica.
    Redis(RedisRecords),
    /// One process only (`pacer demo`, `pacer generate` without Redis).
    Memory(Arc<Mutex<MemoryRecords>>),
}

/// The fleet's records in Redis.
#[derive(Clone)]
pub struct RedisRecords {
    /// Result records and claims.
    records: RedisConnection,
    /// The limiter's Redis (the same connection unless records live apart), where account
    /// alerts go: the operator and every replica read them with the config.
    alerts: RedisConnection,
}

/// The in-memory store's contents.
#[derive(Default)]
pub struct MemoryRecords {
    results: HashMap<String, ResultRecord>,
    claims: HashMap<String, (String, Instant)>,
}

/// The result store could not be read or written (Redis; the in-memory store never fails).
#[derive(Debug, thiserror::Error)]
#[error("result store: {0}")]
pub struct RecordError(#[from] redis::RedisError);

impl Records {
    /// An empty in-memory store.
    pub fn memory() -> Self {
        Records::Memory(Arc::default())
    }

    /// The fleet's store in the Redis at `url` (standalone or any node of a Cluster; one
    /// reconnecting connection), with account alerts in the same Redis.
    pub async fn redis(url: &str) -> Result<Self, RecordError> {
        let conn = RedisConnection::open(url, Self::options()).await?;
        Ok(Self::redis_apart(conn.clone(), conn))
    }

    /// Records and claims on `records`, account alerts on `alerts` (the limiter's Redis).
    pub fn redis_apart(records: RedisConnection, alerts: RedisConnection) -> Self {
        Records::Redis(RedisRecords { records, alerts })
    }

    /// Settings for a records connection: a record is written once per request, so a
    /// slow answer is waited for longer than a limiter decision is.
    pub fn options() -> RedisOptions {
        RedisOptions {
            timeout: Duration::from_secs(2),
            ..RedisOptions::default()
        }
    }

    /// The final record of `id`, if there is one.
    pub async fn get(&self, id: &str) -> Result<Option<ResultRecord>, RecordError> {
        match self {
            Records::Redis(r) => {
                let raw: Option<String> = r.records.clone().get(result_key(id)).await?;
                // A record that does not parse is treated as absent: the request runs again
                // and overwrites it (the sink check still prevents a second generation).
                Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
            }
            Records::Memory(m) => Ok(lock(m).results.get(id).cloned()),
        }
    }

    /// Stores the final record and drops `owner`'s claim (only if it still holds it: a
    /// stale replica must not free a live one's claim), atomically. A succeeded record is
    /// never replaced by a failed one (a malformed duplicate of a finished request).
    pub async fn put(&self, record: &ResultRecord, owner: &str) -> Result<(), RecordError> {
        match self {
            Records::Redis(r) => {
                let script = redis::Script::new(
                    r#"local cur = redis.call('GET', KEYS[1])
                      local kept = cur and ARGV[3] ~= 'succeeded'
                        and string.find(cur, '"status":"succeeded"', 1, true)
                      if not kept then
                        redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
                      end
                      if redis.call('GET', KEYS[2]) == ARGV[4] then
                        redis.call('DEL', KEYS[2])
                      end
                      return 0"#,
                );
                let json = serde_json::to_string(record).unwrap_or_default();
                let status = match record.status {
                    Status::Succeeded => "succeeded",
                    Status::Failed => "failed",
                };
                script
                    .key(result_key(&record.id))
                    .key(claim_key(&record.id))
                    .arg(json)
                    .arg(RESULT_TTL.as_secs())
                    .arg(status)
                    .arg(owner)
                    .invoke_async::<i32>(&mut r.records.clone())
                    .await?;
                Ok(())
            }
            Records::Memory(m) => {
                let mut m = lock(m);
                if m.claims.get(&record.id).is_some_and(|(o, _)| o == owner) {
                    m.claims.remove(&record.id);
                }
                let kept = record.status != Status::Succeeded
                    && m.results
                        .get(&record.id)
                        .is_some_and(|r| r.status == Status::Succeeded);
                if !kept {
                    m.results.insert(record.id.clone(), record.clone());
                }
                Ok(())
            }
        }
    }

    /// Claims `id` for `owner` for `lease`; false when another owner holds it. Claiming
    /// again as the same owner extends the lease.
    pub async fn claim(&self, id: &str, owner: &str, lease: Duration) -> Result<bool, RecordError> {
        self.hold(id, owner, lease, true).await
    }

    /// Extends `owner`'s claim on `id` by `lease` if `owner` still holds it; false when it
    /// does not (another owner took it, or it expired: the request may be finished).
    pub async fn renew(&self, id: &str, owner: &str, lease: Duration) -> Result<bool, RecordError> {
        self.hold(id, owner, lease, false).await
    }

    /// Sets `owner`'s claim on `id` for `lease` if `owner` holds it, or (`if_free`) if
    /// nobody does; whether it did.
    async fn hold(
        &self,
        id: &str,
        owner: &str,
        lease: Duration,
        if_free: bool,
    ) -> Result<bool, RecordError> {
        match self {
            Records::Redis(r) => {
                let script = redis::Script::new(
                    r"local cur = redis.call('GET', KEYS[1])
                      if cur == ARGV[1] or (cur == false and ARGV[3] == '1') then
                        redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1
                      end
                      return 0",
                );
                let got: i32 = script
                    .key(claim_key(id))
                    .arg(owner)
                    .arg(lease.as_millis().max(1) as u64)
                    .arg(if if_free { "1" } else { "0" })
                    .invoke_async(&mut r.records.clone())
                    .await?;
                Ok(got == 1)
            }
            Records::Memory(m) => {
                let mut m = lock(m);
                let now = Instant::now();
                let held = match m.claims.get(id) {
                    Some((o, until)) if *until > now => o == owner,
                    _ => if_free,
                };
                if held {
                    m.claims
                        .insert(id.to_owned(), (owner.to_owned(), now + lease));
                }
                Ok(held)
            }
        }
    }

    /// Hands the claim on `id` to `owner` whoever holds it (tests: another replica taking
    /// over a claim whose lease ran out while its holder was stalled).
    #[cfg(test)]
    pub(crate) fn steal_claim(&self, id: &str, owner: &str, lease: Duration) {
        if let Records::Memory(m) = self {
            lock(m)
                .claims
                .insert(id.to_owned(), (owner.to_owned(), Instant::now() + lease));
        }
    }

    /// Raises `pool`'s account alert for `ttl` (see `pacer_core::config::account_alert_key`;
    /// nothing to raise without Redis: the log and the metric say it).
    pub async fn raise_account_alert(
        &self,
        pool: &str,
        message: &str,
        ttl: Duration,
    ) -> Result<(), RecordError> {
        if let Records::Redis(r) = self {
            let key = pacer_core::config::account_alert_key(pool);
            r.alerts
                .clone()
                .set_ex::<_, _, ()>(key, message, ttl.as_secs().max(1))
                .await?;
        }
        Ok(())
    }

    /// Gives up a claim (the request was deferred), if `owner` still holds it.
    pub async fn unclaim(&self, id: &str, owner: &str) -> Result<(), RecordError> {
        match self {
            Records::Redis(r) => {
                let script = redis::Script::new(
                    r"if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end return 0",
                );
                script
                    .key(claim_key(id))
                    .arg(owner)
                    .invoke_async::<i32>(&mut r.records.clone())
                    .await?;
                Ok(())
            }
            Records::Memory(m) => {
                let mut m = lock(m);
                if m.claims.get(id).is_some_and(|(o, _)| o == owner) {
                    m.claims.remove(id);
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn succeeded(id: &str) -> ResultRecord {
        ResultRecord {
            status: Status::Succeeded,
            error: None,
            ..ResultRecord::failed(id, 1, "")
        }
    }

    /// A replica that lost its claim (lease over) stores its result without freeing the
    /// claim the new holder has.
    #[tokio::test]
    async fn storing_a_result_drops_only_the_storers_claim() {
        let records = Records::memory();
        assert!(
            records
                .claim("r", "old", Duration::from_secs(30))
                .await
                .unwrap()
        );
        records.steal_claim("r", "new", Duration::from_secs(30));
        records.put(&succeeded("r"), "old").await.unwrap();
        assert!(
            !records
                .claim("r", "third", Duration::from_secs(30))
                .await
                .unwrap()
        );
        records.put(&succeeded("r"), "new").await.unwrap();
        assert!(
            records
                .claim("r", "third", Duration::from_secs(30))
                .await
                .unwrap()
        );
    }

    /// A malformed duplicate of a finished request fails, but never replaces its record.
    #[tokio::test]
    async fn a_failed_record_never_replaces_a_succeeded_one() {
        let records = Records::memory();
        records.put(&succeeded("r"), "").await.unwrap();
        records
            .put(&ResultRecord::failed("r", 0, "malformed"), "")
            .await
            .unwrap();
        assert_eq!(
            records.get("r").await.unwrap().map(|r| r.status),
            Some(Status::Succeeded)
        );
    }
}
