//! What every reconcile shares: clients, the config store, the limiter, metrics.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use kube::runtime::{
    controller::Action,
    events::{Event, Recorder},
};
use pacer_core::{config::ConfigStore, limiter::redis::RedisLimiter};

use crate::{conditions::Transition, http::Health, metrics::Metrics};

/// Field manager of the operator's server-side applies.
pub(crate) const MANAGER: &str = "pacer-operator";
/// The finalizer that removes an object's config from Redis before it goes.
pub(crate) const FINALIZER: &str = "pacer.dev/config";

pub(crate) struct Context {
    pub client: kube::Client,
    pub store: ConfigStore,
    pub limiter: RedisLimiter,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub resync: Duration,
    pub usage_refresh: Duration,
    /// Consecutive failures per object, for the error policy's backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// When each pool's usage was last read, so status patches (which trigger another
    /// reconcile) do not turn into a tight loop while usage keeps moving.
    usage_read: Mutex<HashMap<String, Instant>>,
    /// How long a deletion waits for Redis before it finishes without removing its config.
    removal_patience: Duration,
    /// Config removals deletions could not make (kind, key): retried at every reconcile.
    pending_removals: Mutex<std::collections::BTreeSet<(&'static str, String)>>,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: kube::Client,
        store: ConfigStore,
        limiter: RedisLimiter,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        resync: Duration,
        usage_refresh: Duration,
        removal_patience: Duration,
    ) -> Context {
        Context {
            client,
            store,
            limiter,
            recorder,
            metrics,
            health,
            resync,
            usage_refresh,
            failures: Mutex::default(),
            usage_read: Mutex::default(),
            removal_patience,
            pending_removals: Mutex::default(),
        }
    }

    async fn remove_now(&self, kind: &'static str, key: &str) -> crate::Result<()> {
        if kind == "quotapool" {
            self.store.remove_pool(key).await?;
        } else {
            self.store.remove_chain(key).await?;
        }
        self.metrics
            .config_writes
            .get_or_create(&crate::metrics::KindLabels { kind })
            .inc();
        Ok(())
    }

    /// Removes a deleted object's config from Redis. While Redis is down the deletion
    /// waits (the error retries it), but only for the removal patience since the object
    /// was deleted: then it finishes, so deleting a namespace never hangs on Redis, and
    /// the removal is made at a later reconcile, once Redis answers.
    pub async fn remove_config(
        &self,
        kind: &'static str,
        key: &str,
        deleted_at: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    ) -> crate::Result<()> {
        let Err(e) = self.remove_now(kind, key).await else {
            return Ok(());
        };
        let waited = deleted_at.map_or(Duration::ZERO, |t| {
            k8s_openapi::jiff::Timestamp::now()
                .duration_since(t.0)
                .unsigned_abs()
        });
        if waited < self.removal_patience {
            return Err(e);
        }
        tracing::error!(
            kind,
            object = key,
            error = %e,
            "Redis did not answer within the removal patience: the deletion finishes and its \
             config stays in Redis until this operator removes it once Redis answers"
        );
        if let Ok(mut p) = self.pending_removals.lock() {
            p.insert((kind, key.to_owned()));
        }
        Ok(())
    }

    /// Makes the config removals deletions left behind (see [`Context::remove_config`]).
    pub async fn retry_removals(&self) {
        let pending: Vec<(&'static str, String)> = match self.pending_removals.lock() {
            Ok(p) => p.iter().cloned().collect(),
            Err(_) => return,
        };
        for (kind, key) in pending {
            if self.remove_now(kind, &key).await.is_ok() {
                tracing::info!(kind, object = %key, "removed a deleted object's config left in Redis");
                if let Ok(mut p) = self.pending_removals.lock() {
                    p.remove(&(kind, key));
                }
            }
        }
    }

    pub fn redis_ok(&self, ok: bool) {
        self.health.redis_ok.store(ok, Ordering::Relaxed);
    }

    pub fn succeeded(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }

    /// Ends a reconcile run through the finalizer: success resets the object's backoff,
    /// the finalizer's own failures become the operator's error.
    pub fn finish(
        &self,
        key: &str,
        result: std::result::Result<Action, kube::runtime::finalizer::Error<crate::Error>>,
    ) -> crate::Result<Action> {
        use kube::runtime::finalizer::Error as F;
        match result {
            Ok(action) => {
                self.succeeded(key);
                Ok(action)
            }
            Err(F::ApplyFailed(e)) | Err(F::CleanupFailed(e)) => Err(e),
            Err(e) => Err(crate::Error::Finalizer(e.to_string())),
        }
    }

    /// The error policy of both controllers: log, count, back off per object.
    pub fn retry<K: kube::ResourceExt>(
        &self,
        kind: &'static str,
        object: &K,
        error: &crate::Error,
    ) -> Action {
        let key = format!(
            "{}/{}",
            object.namespace().unwrap_or_default(),
            object.name_any()
        );
        tracing::warn!(kind, object = %key, error = %error, "reconcile failed; retrying");
        self.metrics.failed(kind, error);
        self.backoff(&key)
    }

    /// Exponential backoff per object: 1 s, 2 s, 4 s … capped at 5 minutes.
    pub fn backoff(&self, key: &str) -> Action {
        let n = match self.failures.lock() {
            Ok(mut f) => {
                let n = f.entry(key.to_owned()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        };
        let secs = 1u64 << n.saturating_sub(1).min(9);
        Action::requeue(Duration::from_secs(secs.min(300)))
    }

    /// Whether it is time to read this pool's usage again (and note that it is read now).
    pub fn usage_due(&self, key: &str, force: bool) -> bool {
        let Ok(mut m) = self.usage_read.lock() else {
            return true;
        };
        let due = force
            || m.get(key)
                .is_none_or(|t| t.elapsed() + Duration::from_millis(200) >= self.usage_refresh);
        if due {
            m.insert(key.to_owned(), Instant::now());
        }
        due
    }

    pub fn forget(&self, key: &str) {
        if let Ok(mut m) = self.usage_read.lock() {
            m.remove(key);
        }
        self.succeeded(key);
    }

    /// One Event per condition transition. Failing to record one is logged, not fatal.
    pub async fn publish(
        &self,
        reference: &k8s_openapi::api::core::v1::ObjectReference,
        transitions: &[Transition],
    ) {
        for t in transitions {
            let event = Event {
                type_: t.event_type(),
                reason: t.reason.clone(),
                note: Some(format!(
                    "{} is {}: {}",
                    t.type_,
                    if t.status { "True" } else { "False" },
                    t.message
                )),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&event, reference).await {
                tracing::warn!(error = %e, reason = %t.reason, "recording an Event failed");
            }
        }
    }
}
