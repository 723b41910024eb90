//! How many worker replicas a pool's quota can keep busy, served for KEDA's `metrics-api`
//! trigger at `GET /scale/{namespace}/{name}`.
//!
//! A replica holds up to `concurrency` messages; each call takes about `call_seconds`; the
//! quota admits `rate` calls per second. So the calls in flight at full pace are `rate *
//! call_seconds`, and
//!
//! ```text
//! replicas = ceil(rate * call_seconds / concurrency)
//! rate     = sum over the pool's models of min(rpm, ipm) / window * (learned share)
//! ```
//!
//! with a model counted as 0 while it cools down after a 429 or its day is spent (no replica
//! could call it before then). `call_seconds` is observed: every replica adds each call's
//! duration to the pool's totals in Redis, and the mean of the calls since the previous
//! read is used (the configured typical length until a call was seen). A backlog of 10,000 under 20 per 10 s with 1 s calls needs
//! ceil(2 * 1 / 64) = 1 replica, not 200: the chart's ScaledObject takes the smaller of this
//! and the queue's own count.
use pacer_core::{
    config::{CompiledPool, ConfigStore},
    limiter::{Limiter, Usage, redis::RedisLimiter},
};
use serde::Serialize;

/// The advice for one pool.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Advice {
    /// `namespace/name`.
    pub pool: String,
    /// The replicas the quota can keep busy now (0: none could call).
    pub replicas: u32,
    /// The calls per second the quota admits now.
    pub calls_per_second: f64,
    /// The length of one call: observed, or the configured typical length.
    pub call_seconds: f64,
    /// Whether `call_seconds` was observed (the mean of the pool's recent calls).
    pub call_seconds_observed: bool,
    /// Messages one replica works on at once.
    pub concurrency: u32,
    /// Why it is 0, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_because: Option<String>,
}

/// The sizing every advice uses, and where usage is read: computed on each request from
/// Redis, so every operator replica answers alike (the leader and a standby).
pub struct ScaleBoard {
    call_seconds: f64,
    concurrency: u32,
    source: std::sync::OnceLock<(ConfigStore, RedisLimiter)>,
    /// Per pool: the call totals at the previous read and the mean observed then.
    calls: std::sync::Mutex<std::collections::HashMap<String, CallTimes>>,
}

/// A pool's call totals as last read, and the mean call length they gave.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CallTimes {
    pub ms: u64,
    pub n: u64,
    pub mean_seconds: Option<f64>,
}

impl CallTimes {
    /// The totals read now, against the previous read: the mean of the calls in between,
    /// else the previous mean (no call since), else the mean of everything (first read).
    pub fn next(self, ms: u64, n: u64) -> CallTimes {
        let mean_seconds = if n > self.n && ms >= self.ms {
            Some((ms - self.ms) as f64 / (n - self.n) as f64 / 1000.0)
        } else if n < self.n || self.mean_seconds.is_none() {
            // Totals reset (a flushed Redis) or never read: what is there.
            (n > 0).then(|| ms as f64 / n as f64 / 1000.0)
        } else {
            self.mean_seconds
        };
        CallTimes {
            ms,
            n,
            mean_seconds,
        }
    }
}

impl ScaleBoard {
    pub fn new(call_seconds: f64, concurrency: u32) -> ScaleBoard {
        ScaleBoard {
            call_seconds: call_seconds.max(0.001),
            concurrency: concurrency.max(1),
            source: std::sync::OnceLock::new(),
            calls: std::sync::Mutex::default(),
        }
    }

    /// Where config and usage are read, once Redis is connected.
    pub fn connect(&self, store: ConfigStore, limiter: RedisLimiter) {
        let _ = self.source.set((store, limiter));
    }

    /// The advice for `pool` (`namespace/name`) from its config and usage now; `None` when
    /// no such pool is configured.
    pub async fn advice(&self, pool: &str) -> Result<Option<Advice>, String> {
        let Some((store, limiter)) = self.source.get() else {
            return Err("not connected to Redis yet".into());
        };
        let config = store.load().await.map_err(|e| e.to_string())?;
        let Some(compiled) = config.pools.get(pool) else {
            return Ok(None);
        };
        let mut usage = Vec::with_capacity(compiled.models.len());
        for model in compiled.models.keys() {
            let Some(quota) = compiled.model_quota(model) else {
                continue;
            };
            let u = limiter
                .usage(&compiled.key(model), &quota)
                .await
                .map_err(|e| e.to_string())?;
            usage.push((model.clone(), u));
        }
        let (ms, n) = limiter.call_totals(pool).await.map_err(|e| e.to_string())?;
        let observed = {
            let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
            let entry = calls.entry(pool.to_owned()).or_default();
            *entry = entry.next(ms, n);
            entry.mean_seconds.filter(|s| *s > 0.0)
        };
        let mut advice = advise(
            compiled,
            &usage,
            observed.unwrap_or(self.call_seconds),
            self.concurrency,
        );
        advice.call_seconds_observed = observed.is_some();
        Ok(Some(advice))
    }
}

/// The advice for `pool` given each model's usage.
pub fn advise(
    pool: &CompiledPool,
    usage: &[(String, Usage)],
    call_seconds: f64,
    concurrency: u32,
) -> Advice {
    let mut rate = 0.0;
    let mut idle = Vec::new();
    for (model, u) in usage {
        let Some(quota) = pool.model_quota(model) else {
            continue;
        };
        if !u.cooldown_remaining.is_zero() {
            idle.push(format!("{model} cools down"));
            continue;
        }
        let day_spent = u.daily_limit.is_some_and(|l| u.daily_used >= l);
        if !u.daily_blocked_remaining.is_zero() || day_spent {
            idle.push(format!("{model}'s day is spent"));
            continue;
        }
        let per_second = |limit: Option<u64>, window: std::time::Duration| {
            limit.map(|l| l as f64 / window.as_secs_f64().max(0.001))
        };
        // A call is one request and one image: the tighter of the two paces it.
        let model_rate = [
            per_second(quota.requests.limit, quota.requests.window),
            per_second(quota.images.limit, quota.images.window),
        ]
        .into_iter()
        .flatten()
        .reduce(f64::min);
        let Some(model_rate) = model_rate else {
            // Unlimited: the quota caps nothing; one replica per concurrency's worth is the
            // queue trigger's business.
            rate += f64::from(concurrency) / call_seconds;
            continue;
        };
        let share = 1.0 - f64::from(u.rate_cut_permille.min(1000)) / 1000.0;
        rate += model_rate * share;
    }
    let replicas = (rate * call_seconds / f64::from(concurrency)).ceil() as u32;
    Advice {
        pool: pool.name.clone(),
        replicas,
        calls_per_second: rate,
        call_seconds,
        call_seconds_observed: false,
        concurrency,
        idle_because: (replicas == 0).then(|| {
            if idle.is_empty() {
                "no model has capacity".to_owned()
            } else {
                idle.join("; ")
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pacer_core::{
        limiter::{DimensionUsage, Usage},
        quota::Dim,
    };

    use super::*;

    fn pool() -> CompiledPool {
        let yaml = "apiVersion: pacer.dev/v1alpha1\nkind: QuotaPool\nmetadata: {name: images, namespace: team}\n\
                    spec:\n  project: p\n  tier: Tier2\n  models:\n  - {name: gemini-3-pro-image, rpm: 20, windowSeconds: 10}\n";
        pacer_crds::compile::compile_documents(yaml, "default", &Default::default())
            .expect("compiles")
            .pools
            .remove(0)
    }

    fn usage() -> Usage {
        Usage {
            dimensions: vec![DimensionUsage {
                dim: Dim::Requests,
                used: 20,
                limit: Some(20),
                window: Duration::from_secs(10),
            }],
            cooldown_remaining: Duration::ZERO,
            daily_used: 100,
            daily_limit: Some(10_000),
            daily_blocked_remaining: Duration::ZERO,
            queue: Duration::from_secs(500),
            rate_cut_permille: 0,
        }
    }

    /// The call length is the mean of the calls since the previous read.
    #[test]
    fn the_call_length_is_the_mean_of_the_latest_calls() {
        let first = CallTimes::default().next(30_000, 3);
        assert_eq!(
            first.mean_seconds,
            Some(10.0),
            "everything on the first read"
        );
        let next = first.next(32_000, 5);
        assert_eq!(next.mean_seconds, Some(1.0), "two calls of 1 s since");
        assert_eq!(
            next.next(32_000, 5).mean_seconds,
            Some(1.0),
            "no call since: kept"
        );
        assert_eq!(next.next(4_000, 2).mean_seconds, Some(2.0), "totals reset");
        assert_eq!(CallTimes::default().next(0, 0).mean_seconds, None);
    }

    /// Issue 16: a backlog under 20 per 10 s with 1 s calls needs one replica of 64 slots,
    /// however deep the queue; none while the model cools down or its day is spent.
    #[test]
    fn replicas_follow_the_quota_not_the_backlog() {
        let pool = pool();
        let model = "gemini-3-pro-image".to_owned();
        let a = advise(&pool, &[(model.clone(), usage())], 1.0, 64);
        assert_eq!(a.replicas, 1, "{a:?}");
        assert!((a.calls_per_second - 2.0).abs() < 1e-9, "{a:?}");
        // 30 s calls at 2 per second: 60 in flight, still one replica of 64.
        assert_eq!(
            advise(&pool, &[(model.clone(), usage())], 30.0, 64).replicas,
            1
        );
        // Four slots per replica: 60 in flight need 15.
        assert_eq!(
            advise(&pool, &[(model.clone(), usage())], 30.0, 4).replicas,
            15
        );
        let cooling = Usage {
            cooldown_remaining: Duration::from_secs(20),
            ..usage()
        };
        let a = advise(&pool, &[(model.clone(), cooling)], 1.0, 64);
        assert_eq!(a.replicas, 0);
        assert!(
            a.idle_because
                .as_deref()
                .is_some_and(|r| r.contains("cools down"))
        );
        let spent = Usage {
            daily_used: 10_000,
            ..usage()
        };
        assert_eq!(
            advise(&pool, &[(model.clone(), spent)], 1.0, 64).replicas,
            0
        );
        // A learned cut lowers the pace the replicas are sized for.
        let cut = Usage {
            rate_cut_permille: 500,
            ..usage()
        };
        let a = advise(&pool, &[(model, cut)], 30.0, 4);
        assert_eq!(a.replicas, 8, "1 call/s * 30 s / 4 = 7.5: {a:?}");
    }
}
