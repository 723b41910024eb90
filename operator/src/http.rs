//! `/metrics`, `/healthz` (the process serves), `/readyz` (Redis answered the last
//! reconcile, and this replica either leads or stands by) and `/scale/{namespace}/{pool}`
//! (the replicas the pool's quota can keep busy, for KEDA's `metrics-api` trigger).
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use tokio_util::sync::CancellationToken;

use crate::{metrics::Metrics, scale::ScaleBoard};

/// What the health endpoints report.
#[derive(Default)]
pub struct Health {
    /// Redis answered the last write or read.
    pub redis_ok: AtomicBool,
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    scale: Arc<ScaleBoard>,
}

/// Binds `addr` and serves until `shutdown`; returns the bound address.
pub(crate) async fn serve(
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    scale: Arc<ScaleBoard>,
    shutdown: CancellationToken,
) -> crate::Result<std::net::SocketAddr> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/scale/{namespace}/{name}", get(scale_advice))
        .with_state(AppState {
            metrics,
            health,
            scale,
        });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok(bound)
}

async fn metrics_text(State(s): State<AppState>) -> ([(&'static str, &'static str); 1], String) {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// The pool's advice as JSON (`replicas` is what KEDA reads); 404 for a pool not in the
/// config, 503 while Redis cannot be read (KEDA then applies the ScaledObject's fallback).
async fn scale_advice(
    State(s): State<AppState>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let pool = format!("{namespace}/{name}");
    match s.scale.advice(&pool).await {
        Ok(Some(advice)) => Json(advice).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            format!("QuotaPool {pool} is not in the config"),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("reading {pool}'s usage failed: {e}"),
        )
            .into_response(),
    }
}

async fn ready(State(s): State<AppState>) -> (StatusCode, &'static str) {
    if s.health.redis_ok.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "redis unreachable")
    }
}
