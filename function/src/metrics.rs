//! Prometheus metrics of the function, under the prefix `pacer_function_`, and the HTTP
//! server that exposes them with a health endpoint.
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `pacer_function_messages_total` | `outcome` | deliveries by outcome: succeeded, failed, already_done, deferred |
//! | `pacer_function_deferred_total` | `reason` | deferrals by reason |
//! | `pacer_function_provider_calls_total` | `model`, `result` | provider calls by model and result (ok or the error's label) |
//! | `pacer_function_account_errors_total` | `pool`, `reason` | provider answers that blame the account (`unauthorized`, `credit_exhausted`): the request is deferred; alert on any |
//! | `pacer_function_resent_total` | | deferrals sent again as a fresh message (late receives, so the receive count restarts) |
//! | `pacer_function_in_flight` | | messages being processed now |
//! | `pacer_function_limiter_wait_seconds` | | booked waits returned by the limiter |
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountLabels {
    pub pool: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub model: String,
    pub result: &'static str,
}

/// The function's metrics.
pub struct Metrics {
    registry: Registry,
    pub messages: Family<OutcomeLabels, Counter>,
    pub deferred: Family<ReasonLabels, Counter>,
    pub provider_calls: Family<CallLabels, Counter>,
    pub account_errors: Family<AccountLabels, Counter>,
    pub resent: Counter,
    pub in_flight: Gauge,
    pub limiter_wait: Histogram,
    /// False once the replica is shutting down (health turns 503 so it gets no new work).
    pub healthy: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pacer_function");
        let messages = Family::<OutcomeLabels, Counter>::default();
        registry.register("messages", "Deliveries by outcome", messages.clone());
        let deferred = Family::<ReasonLabels, Counter>::default();
        registry.register("deferred", "Deferrals by reason", deferred.clone());
        let provider_calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "provider_calls",
            "Provider calls by model and result",
            provider_calls.clone(),
        );
        let account_errors = Family::<AccountLabels, Counter>::default();
        registry.register(
            "account_errors",
            "Provider answers that blame the account (key, credit), by pool and reason",
            account_errors.clone(),
        );
        let resent = Counter::default();
        registry.register(
            "resent",
            "Deferrals sent again as a fresh message, so the receive count restarts",
            resent.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("in_flight", "Messages being processed", in_flight.clone());
        let limiter_wait = Histogram::new([0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]);
        registry.register(
            "limiter_wait_seconds",
            "Booked waits from the limiter",
            limiter_wait.clone(),
        );
        Self {
            registry,
            messages,
            deferred,
            provider_calls,
            account_errors,
            resent,
            in_flight,
            limiter_wait,
            healthy: AtomicBool::new(true),
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Serves `/metrics` and `/healthz` on `addr` until the process ends; returns the bound
    /// address (port 0 picks a free one).
    pub async fn serve(self: Arc<Self>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        use axum::{Router, http::StatusCode, routing::get};
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let m = self.clone();
        let h = self.clone();
        let app = Router::new()
            .route("/metrics", get(move || async move { m.render() }))
            .route(
                "/healthz",
                get(move || async move {
                    if h.healthy.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
                    }
                }),
            );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
        Ok(bound)
    }
}
