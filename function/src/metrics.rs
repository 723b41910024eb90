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
//! | `pacer_function_limiter_unavailable_total` | `mode` | bookings decided without the shared limiter (Redis unreachable or its breaker open), by the pool's failure mode: `closed` (deferred), `open` (admitted unchecked), `local` (booked on the replica's own share); alert on any |
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use pacer_core::limiter::{Decision, Error as LimiterError, Origin};
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
pub struct TenantOutcomeLabels {
    pub pool: String,
    pub tenant: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    pub mode: &'static str,
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
    pub tenant_messages: Family<TenantOutcomeLabels, Counter>,
    pub deferred: Family<ReasonLabels, Counter>,
    pub provider_calls: Family<CallLabels, Counter>,
    pub account_errors: Family<AccountLabels, Counter>,
    pub resent: Counter,
    pub in_flight: Gauge,
    pub limiter_wait: Histogram,
    pub limiter_unavailable: Family<ModeLabels, Counter>,
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
        let tenant_messages = Family::<TenantOutcomeLabels, Counter>::default();
        registry.register(
            "tenant_messages",
            "Deliveries of pools that declare tenants, by pool, tenant and outcome",
            tenant_messages.clone(),
        );
        let limiter_wait = Histogram::new([0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]);
        registry.register(
            "limiter_wait_seconds",
            "Booked waits from the limiter",
            limiter_wait.clone(),
        );
        let limiter_unavailable = Family::<ModeLabels, Counter>::default();
        registry.register(
            "limiter_unavailable",
            "Bookings decided without the shared limiter (Redis unreachable), by failure mode",
            limiter_unavailable.clone(),
        );
        Self {
            registry,
            messages,
            tenant_messages,
            deferred,
            provider_calls,
            account_errors,
            resent,
            in_flight,
            limiter_wait,
            limiter_unavailable,
            healthy: AtomicBool::new(true),
        }
    }
}

impl Metrics {
    /// Counts a booking the shared limiter did not decide: the failsafe limiter refused it
    /// (`closed`: only it answers `Unavailable`) or issued the ticket itself (`open`,
    /// `local`). A `local` fallback that rejects leaves no ticket and is not counted; the
    /// replica's next booking is.
    pub fn count_limiter_fallback(&self, decision: &Result<Decision, LimiterError>) {
        let mode = match decision {
            Err(LimiterError::Unavailable { .. }) => "closed",
            Ok(Decision::Admitted { ticket } | Decision::Booked { ticket, .. }) => {
                match ticket.origin {
                    Origin::Shared => return,
                    Origin::Local => "local",
                    Origin::Unchecked => "open",
                }
            }
            _ => return,
        };
        self.limiter_unavailable
            .get_or_create(&ModeLabels { mode })
            .inc();
    }

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pacer_core::{
        limiter::{QuotaKey, Ticket},
        quota::Costs,
    };

    use super::*;

    fn ticket(origin: Origin) -> Ticket {
        Ticket {
            key: QuotaKey::new("p", "m"),
            request_id: "r".into(),
            start_us: 0,
            costs: Costs::default(),
            origin,
            project_spend: false,
            tenant: None,
        }
    }

    #[test]
    fn bookings_without_the_shared_limiter_are_counted_by_mode() {
        let m = Metrics::default();
        let admitted = |origin| {
            Ok(Decision::Admitted {
                ticket: ticket(origin),
            })
        };
        m.count_limiter_fallback(&admitted(Origin::Shared));
        m.count_limiter_fallback(&Ok(Decision::Booked {
            ticket: ticket(Origin::Shared),
            wait: Duration::from_secs(1),
        }));
        m.count_limiter_fallback(&Err(LimiterError::Timeout(Duration::from_millis(1))));
        assert!(
            !m.render()
                .contains("pacer_function_limiter_unavailable_total{"),
            "{}",
            m.render()
        );
        m.count_limiter_fallback(&Err(LimiterError::Unavailable {
            retry_after: Duration::from_secs(1),
        }));
        m.count_limiter_fallback(&admitted(Origin::Unchecked));
        m.count_limiter_fallback(&Ok(Decision::Booked {
            ticket: ticket(Origin::Local),
            wait: Duration::from_secs(1),
        }));
        m.count_limiter_fallback(&admitted(Origin::Local));
        let text = m.render();
        for line in [
            "pacer_function_limiter_unavailable_total{mode=\"closed\"} 1",
            "pacer_function_limiter_unavailable_total{mode=\"open\"} 1",
            "pacer_function_limiter_unavailable_total{mode=\"local\"} 2",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
    }
}
