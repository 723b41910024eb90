//! Prometheus metrics, all under the `pacer_operator_` prefix.
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `pacer_operator_reconciles_total` | counter | `kind` | reconciles run |
//! | `pacer_operator_reconcile_errors_total` | counter | `kind`, `error` | reconciles that failed (retried with backoff) |
//! | `pacer_operator_reconcile_duration_seconds` | histogram | `kind` | time per reconcile |
//! | `pacer_operator_config_writes_total` | counter | `kind` | config entries written to (or removed from) Redis |
//! | `pacer_operator_usage_ratio` | gauge | `pool`, `model`, `dimension` | used / limit in the current window (0 to 1+) |
//! | `pacer_operator_leader` | gauge | | 1 while this replica runs the controllers: it holds the Lease, or runs without leader election |
use std::time::Instant;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels naming the kind of object reconciled.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `quotapool` or `modelchain`.
    pub kind: &'static str,
}

/// Labels of a failed reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `quotapool` or `modelchain`.
    pub kind: &'static str,
    /// The error's metric label.
    pub error: &'static str,
}

/// Labels of a usage gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UsageLabels {
    /// `namespace/name` of the pool.
    pub pool: String,
    /// The model id.
    pub model: String,
    /// `requests`, `input_tokens`, `images`, `spend_micros` or `requests_per_day`.
    pub dimension: String,
}

/// Labels of a tenant's gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    /// `namespace/name` of the pool.
    pub pool: String,
    /// The tenant.
    pub tenant: String,
}

/// The operator's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<KindLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<KindLabels, Histogram>,
    pub(crate) config_writes: Family<KindLabels, Counter>,
    pub(crate) usage: Family<UsageLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub(crate) tenant_share: Family<TenantLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub(crate) tenant_spent: Family<TenantLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub(crate) leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pacer_operator");
        let reconciles = Family::<KindLabels, Counter>::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed (retried with backoff)",
            errors.clone(),
        );
        let duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0])
        });
        registry.register(
            "reconcile_duration_seconds",
            "Time per reconcile",
            duration.clone(),
        );
        let config_writes = Family::<KindLabels, Counter>::default();
        registry.register(
            "config_writes",
            "Config entries written to or removed from Redis",
            config_writes.clone(),
        );
        let usage = Family::<UsageLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "usage_ratio",
            "Used / limit in the current window, per pool, model and dimension",
            usage.clone(),
        );
        let tenant_share =
            Family::<TenantLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "tenant_share_ratio",
            "A tenant's part of the requests its pool's models started in the current window",
            tenant_share.clone(),
        );
        let tenant_spent =
            Family::<TenantLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "tenant_spent_today_usd",
            "What a tenant's calls cost today (Pacific day), in US dollars",
            tenant_spent.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica runs the controllers (holds the leader Lease, or runs without leader election)",
            leader.clone(),
        );
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            config_writes,
            usage,
            tenant_share,
            tenant_spent,
            leader,
        }
    }
}

impl Metrics {
    /// Counts a reconcile and times it until the guard drops.
    pub(crate) fn reconcile(&self, kind: &'static str) -> ReconcileTimer<'_> {
        self.reconciles.get_or_create(&KindLabels { kind }).inc();
        ReconcileTimer {
            metrics: self,
            kind,
            start: Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub(crate) fn failed(&self, kind: &'static str, error: &crate::Error) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind,
                error: error.metric_label(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Records a reconcile's duration when dropped (also on early return and error).
pub(crate) struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    kind: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&KindLabels { kind: self.kind })
            .observe(self.start.elapsed().as_secs_f64());
    }
}
