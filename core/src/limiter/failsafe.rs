//! What a replica does when the shared limiter is unreachable.
//!
//! The failure mode is per-pool configuration: `closed` defers work (safe, stops the
//! fleet), `open` admits unchecked (keeps going, may exceed the provider's limits and
//! collect 429s), `local` falls back to a per-replica in-memory limiter at the limit divided
//! by the expected replica count (keeps going at a fraction of the budget). A circuit
//! breaker stops a dead Redis from adding its timeout to every request: after a few
//! consecutive failures the shared limiter is skipped for a while, then one call probes it.
//! One breaker per failure domain: on a Redis Cluster each project's (one slot, one
//! primary), so a dead primary stops only the projects it held.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;

use super::{
    Check, Clock, Decision, Error, Limiter, Origin, PenaltyScope, QuotaKey, Result, Ticket, Usage,
    dur_us, memory::MemoryLimiter, us_dur,
};
pub use crate::config::FailureMode;
use crate::quota::{Costs, ModelQuota};

/// When the breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failures_to_open: u32,
    /// How long it stays open before one call probes the shared limiter again.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures_to_open: 3,
            open_for: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Default)]
struct Breaker {
    consecutive: u32,
    open_until: i64,
}

/// The shared limiter behind a circuit breaker, with a failure mode.
#[derive(Debug)]
pub struct FailsafeLimiter<L> {
    shared: L,
    mode: FailureMode,
    expected_replicas: u32,
    local: MemoryLimiter,
    clock: Arc<dyn Clock>,
    config: BreakerConfig,
    /// One breaker per failure domain of the shared limiter ([`Limiter::failure_domain`]):
    /// one for a standalone Redis, one per project on a cluster, so a dead primary does not
    /// stop the pairs on the others.
    breakers: Mutex<HashMap<String, Breaker>>,
}

impl<L: Limiter> FailsafeLimiter<L> {
    /// Wraps `shared`; in mode `local` each replica takes `1 / expected_replicas` of every
    /// limit; `clock` drives the breaker and the local fallback.
    pub fn new(
        shared: L,
        mode: FailureMode,
        expected_replicas: u32,
        config: BreakerConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        FailsafeLimiter {
            shared,
            mode,
            expected_replicas,
            local: MemoryLimiter::new(clock.clone()).with_origin(Origin::Local),
            clock,
            config,
            breakers: Mutex::default(),
        }
    }

    /// `key`'s breaker.
    fn breaker<T>(&self, key: &QuotaKey, f: impl FnOnce(&mut Breaker) -> T) -> T {
        let domain = self.shared.failure_domain(key);
        let mut breakers = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        f(breakers.entry(domain).or_default())
    }

    /// Whether `key`'s breaker currently skips the shared limiter.
    pub fn is_open(&self, key: &QuotaKey) -> bool {
        let now = self.clock.now_us();
        self.breaker(key, |b| {
            b.consecutive >= self.config.failures_to_open && now < b.open_until
        })
    }

    /// Whether to call the shared limiter now. When the open period has passed, the caller
    /// that gets `true` is the probe; others keep falling back until it answers.
    fn try_shared(&self, key: &QuotaKey) -> bool {
        let now = self.clock.now_us();
        self.breaker(key, |b| self.probe(b, now))
    }

    fn probe(&self, b: &mut Breaker, now: i64) -> bool {
        if b.consecutive < self.config.failures_to_open {
            return true;
        }
        if now < b.open_until {
            return false;
        }
        b.open_until = now + dur_us(self.config.open_for);
        true
    }

    fn record(&self, key: &QuotaKey, ok: bool) {
        let now = self.clock.now_us();
        self.breaker(key, |b| {
            if ok {
                *b = Breaker::default();
            } else {
                b.consecutive = b.consecutive.saturating_add(1);
                if b.consecutive >= self.config.failures_to_open {
                    b.open_until = now + dur_us(self.config.open_for);
                    tracing::warn!(
                        failures = b.consecutive,
                        %key,
                        "shared limiter unreachable; breaker open"
                    );
                }
            }
        })
    }

    fn retry_after(&self, key: &QuotaKey) -> Duration {
        let open_until = self.breaker(key, |b| b.open_until);
        let left = us_dur(open_until - self.clock.now_us());
        if left.is_zero() {
            self.config.open_for.min(Duration::from_secs(1))
        } else {
            left
        }
    }

    fn fallback(
        &self,
        key: &QuotaKey,
        quota: &ModelQuota,
        asker: super::Asker<'_>,
        request_id: &str,
        costs: Costs,
        max_wait: Duration,
    ) -> Result<Decision> {
        match self.mode {
            FailureMode::Closed => Err(Error::Unavailable {
                retry_after: self.retry_after(key),
            }),
            FailureMode::Open => Ok(Decision::Admitted {
                ticket: Ticket {
                    key: key.clone(),
                    request_id: request_id.to_owned(),
                    start_us: self.clock.now_us(),
                    costs,
                    origin: Origin::Unchecked,
                    project_spend: false,
                    tenant: None,
                },
            }),
            FailureMode::Local => self.local.acquire_for_now(
                key,
                &quota.divided(self.expected_replicas),
                asker,
                request_id,
                costs,
                max_wait,
            ),
        }
    }
}

#[async_trait]
impl<L: Limiter> Limiter for FailsafeLimiter<L> {
    async fn acquire_for(
        &self,
        key: &QuotaKey,
        quota: &ModelQuota,
        asker: super::Asker<'_>,
        request_id: &str,
        costs: Costs,
        max_wait: Duration,
    ) -> Result<Decision> {
        if self.try_shared(key) {
            match self
                .shared
                .acquire_for(key, quota, asker, request_id, costs, max_wait)
                .await
            {
                Ok(d) => {
                    self.record(key, true);
                    return Ok(d);
                }
                Err(e) if e.is_retryable() => {
                    tracing::debug!(error = %e, %key, "shared limiter failed");
                    self.record(key, false);
                }
                Err(e) => return Err(e),
            }
        }
        self.fallback(key, quota, asker, request_id, costs, max_wait)
    }

    async fn check(&self, ticket: &Ticket) -> Result<Check> {
        match ticket.origin {
            Origin::Shared => self.shared.check(ticket).await,
            Origin::Local => self.local.check(ticket).await,
            Origin::Unchecked => Ok(Check::Go),
        }
    }

    async fn reconcile(&self, ticket: &Ticket, actual: Costs) -> Result<()> {
        match ticket.origin {
            Origin::Shared => self.shared.reconcile(ticket, actual).await,
            Origin::Local => self.local.reconcile(ticket, actual).await,
            Origin::Unchecked => Ok(()),
        }
    }

    async fn release(&self, ticket: &Ticket) -> Result<()> {
        match ticket.origin {
            Origin::Shared => self.shared.release(ticket).await,
            Origin::Local => self.local.release(ticket).await,
            Origin::Unchecked => Ok(()),
        }
    }

    async fn penalize(&self, key: &QuotaKey, delay: Duration, scope: PenaltyScope) -> Result<()> {
        // The local fallback must also honour the provider's word.
        self.local.penalize(key, delay, scope).await?;
        if self.is_open(key) {
            return Ok(());
        }
        let r = self.shared.penalize(key, delay, scope).await;
        self.record(key, r.is_ok());
        r
    }

    async fn tenant_usage(
        &self,
        key: &QuotaKey,
        quota: &ModelQuota,
    ) -> Result<Vec<super::TenantUsage>> {
        if !self.is_open(key)
            && let Ok(u) = self.shared.tenant_usage(key, quota).await
        {
            return Ok(u);
        }
        self.local
            .tenant_usage(key, &quota.divided(self.expected_replicas))
            .await
    }

    async fn usage(&self, key: &QuotaKey, quota: &ModelQuota) -> Result<Usage> {
        if !self.is_open(key)
            && let Ok(u) = self.shared.usage(key, quota).await
        {
            return Ok(u);
        }
        // The local limiter books under the divided quota: reading it under the whole one
        // would look like a limit change to it.
        self.local
            .usage(key, &quota.divided(self.expected_replicas))
            .await
    }

    fn failure_domain(&self, key: &QuotaKey) -> String {
        self.shared.failure_domain(key)
    }

    fn day_resets_in(&self) -> Duration {
        self.shared.day_resets_in()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::ManualClock;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A shared limiter that is down, counting how often it was asked.
    #[derive(Debug, Default)]
    struct Down(AtomicU32);

    #[async_trait]
    impl Limiter for Down {
        async fn acquire_for(
            &self,
            _: &QuotaKey,
            _: &ModelQuota,
            _: super::super::Asker<'_>,
            _: &str,
            _: Costs,
            _: Duration,
        ) -> Result<Decision> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err(Error::Timeout(Duration::from_millis(1)))
        }
        async fn check(&self, _: &Ticket) -> Result<Check> {
            Err(Error::Timeout(Duration::from_millis(1)))
        }
        async fn reconcile(&self, _: &Ticket, _: Costs) -> Result<()> {
            Ok(())
        }
        async fn release(&self, _: &Ticket) -> Result<()> {
            Ok(())
        }
        async fn penalize(&self, _: &QuotaKey, _: Duration, _: PenaltyScope) -> Result<()> {
            Ok(())
        }
        async fn usage(&self, _: &QuotaKey, _: &ModelQuota) -> Result<Usage> {
            Err(Error::Timeout(Duration::from_millis(1)))
        }
    }

    fn quota() -> ModelQuota {
        let mut q = ModelQuota::unlimited();
        q.requests.limit = Some(10);
        q
    }

    /// One request of cost 1 for `key`, waiting for nothing.
    async fn ask<L: Limiter>(f: &FailsafeLimiter<L>, key: &QuotaKey, id: &str) -> Result<Decision> {
        f.acquire(key, &quota(), id, Costs::new(1, 0, 0, 0), Duration::ZERO)
            .await
    }

    #[tokio::test]
    async fn closed_defers_and_breaker_skips_dead_redis() {
        let clock = ManualClock::new(1_000_000_000);
        let f = FailsafeLimiter::new(
            Down::default(),
            FailureMode::Closed,
            1,
            BreakerConfig::default(),
            Arc::new(clock.clone()),
        );
        let k = QuotaKey::new("p", "m");
        for i in 0..10 {
            let r = ask(&f, &k, &format!("r{i}")).await;
            assert!(matches!(r, Err(Error::Unavailable { .. })), "{r:?}");
        }
        assert_eq!(
            f.shared.0.load(Ordering::SeqCst),
            3,
            "breaker opened after 3 failures"
        );
        clock.advance(Duration::from_secs(5));
        let _ = ask(&f, &k, "probe").await;
        assert_eq!(
            f.shared.0.load(Ordering::SeqCst),
            4,
            "one probe after the open period"
        );
    }

    /// A cluster with one primary down: the projects on it fail, the others answer.
    #[derive(Debug, Default)]
    struct PrimaryDown {
        down: Down,
        calls_up: AtomicU32,
    }

    #[async_trait]
    impl Limiter for PrimaryDown {
        async fn acquire_for(
            &self,
            key: &QuotaKey,
            _: &ModelQuota,
            _: super::super::Asker<'_>,
            request_id: &str,
            costs: Costs,
            _: Duration,
        ) -> Result<Decision> {
            if key.project == "down" {
                return self
                    .down
                    .acquire(key, &quota(), request_id, costs, Duration::ZERO)
                    .await;
            }
            self.calls_up.fetch_add(1, Ordering::SeqCst);
            Ok(Decision::Admitted {
                ticket: Ticket {
                    key: key.clone(),
                    request_id: request_id.to_owned(),
                    start_us: 0,
                    costs,
                    origin: Origin::Shared,
                    project_spend: false,
                    tenant: None,
                },
            })
        }
        async fn check(&self, _: &Ticket) -> Result<Check> {
            Ok(Check::Go)
        }
        async fn reconcile(&self, _: &Ticket, _: Costs) -> Result<()> {
            Ok(())
        }
        async fn release(&self, _: &Ticket) -> Result<()> {
            Ok(())
        }
        async fn penalize(&self, _: &QuotaKey, _: Duration, _: PenaltyScope) -> Result<()> {
            Ok(())
        }
        async fn usage(&self, _: &QuotaKey, _: &ModelQuota) -> Result<Usage> {
            Err(Error::Timeout(Duration::from_millis(1)))
        }
        fn failure_domain(&self, key: &QuotaKey) -> String {
            key.project.clone()
        }
    }

    /// One breaker per failure domain: the projects on a dead primary defer, the others
    /// keep booking on the shared limiter (with one process-wide breaker, a dead primary
    /// stopped every project for the open period).
    #[tokio::test]
    async fn a_dead_primary_opens_only_its_projects_breaker() {
        let clock = ManualClock::new(1_000_000_000);
        let f = FailsafeLimiter::new(
            PrimaryDown::default(),
            FailureMode::Closed,
            1,
            BreakerConfig::default(),
            Arc::new(clock.clone()),
        );
        let (down, up) = (QuotaKey::new("down", "m"), QuotaKey::new("up", "m"));
        for i in 0..10 {
            let r = ask(&f, &down, &format!("d{i}")).await;
            assert!(matches!(r, Err(Error::Unavailable { .. })), "{r:?}");
            let d = ask(&f, &up, &format!("u{i}"))
                .await
                .expect("the other primary answers");
            assert_eq!(d.ticket().map(|t| t.origin), Some(Origin::Shared));
        }
        assert_eq!(f.shared.down.0.load(Ordering::SeqCst), 3);
        assert_eq!(f.shared.calls_up.load(Ordering::SeqCst), 10);
        assert!(f.is_open(&down) && !f.is_open(&up));
    }

    #[tokio::test]
    async fn local_divides_the_limit_and_open_admits() {
        let clock = Arc::new(ManualClock::new(1_000_000_000));
        let k = QuotaKey::new("p", "m");
        let f = FailsafeLimiter::new(
            Down::default(),
            FailureMode::Local,
            5,
            BreakerConfig::default(),
            clock.clone(),
        );
        let mut admitted = 0;
        for i in 0..10 {
            let d = ask(&f, &k, &format!("r{i}")).await.expect("local");
            if let Decision::Admitted { ticket } = d {
                assert_eq!(ticket.origin, Origin::Local);
                admitted += 1;
            }
        }
        assert_eq!(admitted, 2);
        let f = FailsafeLimiter::new(
            Down::default(),
            FailureMode::Open,
            1,
            BreakerConfig::default(),
            clock,
        );
        let d = ask(&f, &k, "x").await.expect("open");
        assert_eq!(d.ticket().map(|t| t.origin), Some(Origin::Unchecked));
    }
}
