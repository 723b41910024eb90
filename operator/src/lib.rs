//! Pacer's Kubernetes operator: turns `QuotaPool` and `ModelChain` resources into the
//! compiled configuration every replica reads from Redis, and reports live usage and
//! health where platform teams look (`kubectl get`, `describe`, Events, Prometheus).
//!
//! - [`args`]: the settings ([`RunArgs`]), every flag also an environment variable.
//! - `pool`, `chain`: the two reconcilers (compile with [`pacer_crds::compile`], write with
//!   [`pacer_core::config::ConfigStore`], status by server-side apply, a finalizer that
//!   removes an object's config from Redis on delete).
//! - `conditions`: conditions that keep their transition time, and Events on transitions.
//! - [`metrics`]: Prometheus metrics; `http`: `/metrics`, `/healthz`, `/readyz`.
//! - [`Operator`]: connects, serves HTTP, takes the leader Lease, runs both controllers
//!   until shutdown.
//!
//! The shape follows kube-rs/controller-rs: `reconcile` + `error_policy` per kind, errors
//! requeue with backoff per object and never stop the loop.
pub mod args;
mod chain;
mod conditions;
mod context;
pub mod error;
mod http;
pub mod metrics;
mod pool;
pub mod scale;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, ResourceExt,
    runtime::{
        Controller,
        events::{Recorder, Reporter},
        reflector::ObjectRef,
        watcher,
    },
};
use kube_lease_manager::LeaseManagerBuilder;
use pacer_core::{
    config::ConfigStore,
    limiter::redis::{RedisLimiter, RedisOptions},
};
use pacer_crds::{ModelChain, QuotaPool};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use args::RunArgs;
pub use error::{Error, Result};
pub use tokio_util::sync::CancellationToken as Shutdown;

/// A [`Shutdown`] cancelled on SIGTERM or Ctrl-C.
pub fn shutdown_on_signal() -> Shutdown {
    let shutdown = Shutdown::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        pacer_core::process::shutdown_signal().await;
        tracing::info!("shutting down");
        stop.cancel();
    });
    shutdown
}

use crate::{context::Context, http::Health, metrics::Metrics};

/// A started operator: Redis connected, HTTP serving; [`Operator::run`] does the work.
pub struct Operator {
    ctx: Arc<Context>,
    args: RunArgs,
    metrics_addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Operator {
    /// Connects to Redis (retrying until it answers or `shutdown`) and starts the HTTP server.
    pub async fn start(
        client: kube::Client,
        args: RunArgs,
        shutdown: CancellationToken,
    ) -> Result<Operator> {
        let metrics = Arc::new(Metrics::default());
        let health = Arc::new(Health::default());
        let scale = Arc::new(scale::ScaleBoard::new(
            args.scale_call_seconds,
            args.scale_replica_concurrency,
        ));
        let metrics_addr = http::serve(
            args.metrics_addr,
            metrics.clone(),
            health.clone(),
            scale.clone(),
            shutdown.clone(),
        )
        .await?;
        tracing::info!(%metrics_addr, "serving /metrics, /healthz, /readyz and /scale");

        let redis = connect_redis(&args.redis_url, &shutdown).await?;
        health
            .redis_ok
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let identity = args.identity.clone().unwrap_or_else(default_identity);
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "pacer-operator".into(),
                instance: Some(identity),
            },
        );
        scale.connect(
            ConfigStore::new(redis.clone()),
            RedisLimiter::from_connection(redis.clone(), RedisOptions::default()),
        );
        let ctx = Arc::new(Context::new(
            client,
            ConfigStore::new(redis.clone()),
            RedisLimiter::from_connection(redis, RedisOptions::default()),
            recorder,
            metrics,
            health,
            args.resync(),
            args.usage_refresh(),
            Duration::from_secs(args.removal_patience_seconds),
        ));
        Ok(Operator {
            ctx,
            args,
            metrics_addr,
            shutdown,
        })
    }

    /// Where `/metrics` and the health endpoints are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Runs until `shutdown` (Ok) or until the leader Lease is lost (Err: exit and restart,
    /// so a stale leader never writes).
    pub async fn run(self) -> Result<()> {
        if !self.args.leader_elect {
            // Alone by configuration: this replica leads (the leader gauge is what alerts
            // read to know that something reconciles).
            self.ctx.metrics.leader.set(1);
            self.controllers(self.shutdown.clone()).await;
            self.ctx.metrics.leader.set(0);
            return Ok(());
        }
        let client = self.ctx.client.clone();
        let namespace = self
            .args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let identity = self.args.identity.clone().unwrap_or_else(default_identity);
        let duration = self.args.lease_duration_seconds.max(3);
        let manager = LeaseManagerBuilder::new(client, &self.args.lease_name)
            .with_namespace(&namespace)
            .with_identity(&identity)
            .with_duration(duration)
            .with_grace((duration / 3).max(1))
            .build()
            .await?;
        let (mut leading, task) = manager.watch().await;
        let lease_api: Api<Lease> = Api::namespaced(self.ctx.client.clone(), &namespace);
        tracing::info!(lease = %self.args.lease_name, %namespace, %identity, "waiting for the leader Lease");
        loop {
            if *leading.borrow_and_update() {
                break;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    drop(leading);
                    release(task).await;
                    return Ok(());
                }
                changed = leading.changed() => if changed.is_err() {
                    return Err(Error::LostLease);
                }
            }
        }
        tracing::info!("leading: starting the controllers");
        self.ctx.metrics.leader.set(1);
        let stop = self.shutdown.child_token();
        let controllers = self.controllers(stop.clone());
        tokio::pin!(controllers);
        let outcome = tokio::select! {
            _ = &mut controllers => Ok(()),
            _ = async {
                while leading.changed().await.is_ok() {
                    if !*leading.borrow_and_update() { break; }
                }
            } => {
                tracing::error!("lost the leader Lease; stopping");
                stop.cancel();
                controllers.await;
                Err(Error::LostLease)
            }
            why = lease_watchdog(&lease_api, &self.args.lease_name, &identity, Duration::from_secs(duration)) => {
                tracing::error!(why, "no longer sure to hold the leader Lease; stopping");
                stop.cancel();
                controllers.await;
                Err(Error::LostLease)
            }
        };
        self.ctx.metrics.leader.set(0);
        drop(leading);
        release(task).await;
        outcome
    }

    /// Both controllers, until `stop`; in-flight reconciles finish first.
    async fn controllers(&self, stop: CancellationToken) {
        let client = self.ctx.client.clone();
        let (pools, chains): (Api<QuotaPool>, Api<ModelChain>) = match &self.args.watch_namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client, ns),
            ),
            None => (Api::all(client.clone()), Api::all(client)),
        };
        let wc = watcher::Config::default().any_semantic();
        let pool_loop = Controller::new(pools.clone(), wc.clone())
            .graceful_shutdown_on(stop.clone().cancelled_owned())
            .run(pool::reconcile, pool::error_policy, self.ctx.clone())
            .for_each(log_outcome);

        let chain_controller = Controller::new(chains, wc.clone());
        let chain_store = chain_controller.store();
        // A pool's change (or appearance) re-checks the chains that name it.
        let chain_loop = chain_controller
            .watches(pools, wc, move |pool: QuotaPool| {
                let ns = pool.namespace();
                let name = pool.name_any();
                chain_store
                    .state()
                    .into_iter()
                    .filter(|c| c.namespace() == ns && c.spec.pool == name)
                    .map(|c| ObjectRef::from_obj(&*c))
                    .collect::<Vec<_>>()
            })
            .graceful_shutdown_on(stop.cancelled_owned())
            .run(chain::reconcile, chain::error_policy, self.ctx.clone())
            .for_each(log_outcome);
        tokio::join!(pool_loop, chain_loop);
        tracing::info!("controllers stopped");
    }
}

/// Builds a client from kube's usual inference and runs the operator until `shutdown`.
pub async fn run(args: RunArgs, shutdown: CancellationToken) -> Result<()> {
    let client = kube::Client::try_default().await?;
    Operator::start(client, args, shutdown).await?.run().await
}

async fn log_outcome<K, E: std::fmt::Display>(r: Result<K, E>) {
    if let Err(e) = r {
        // Object errors were logged by the error policy; this adds the queue's view.
        tracing::debug!(error = %e, "reconcile outcome");
    }
}

/// Returns once this replica can no longer be sure it holds the Lease: the Lease names
/// another holder or is gone, or its last renewal seen here plus the lease duration has
/// passed (the apiserver unreachable: the renewals fail, and a standby takes the Lease
/// once it expires, so this replica must stop writing by then). The lease manager only
/// retries a failed renewal; it never says it stopped leading.
pub async fn lease_watchdog(
    api: &Api<Lease>,
    name: &str,
    identity: &str,
    duration: Duration,
) -> &'static str {
    let mut valid_until = Instant::now() + duration;
    loop {
        tokio::time::sleep((duration / 4).max(Duration::from_millis(250))).await;
        let asked = Instant::now();
        match tokio::time::timeout(duration / 2, api.get_opt(name)).await {
            Ok(Ok(Some(lease))) => {
                let spec = lease.spec.unwrap_or_default();
                if spec.holder_identity.as_deref() != Some(identity) {
                    return "the Lease names another holder";
                }
                if let Some(renewed) = spec.renew_time {
                    // Renewed by this process's own clock: how long ago, on it.
                    let age = k8s_openapi::jiff::Timestamp::now()
                        .duration_since(renewed.0)
                        .unsigned_abs();
                    let until = asked.checked_sub(age).unwrap_or(asked) + duration;
                    valid_until = valid_until.max(until);
                }
            }
            Ok(Ok(None)) => return "the Lease is gone",
            Ok(Err(e)) => tracing::warn!(error = %e, "reading the leader Lease failed"),
            Err(_) => tracing::warn!("reading the leader Lease timed out"),
        }
        if Instant::now() >= valid_until {
            return "the Lease was not renewed within its duration";
        }
    }
}

async fn release(
    task: tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
) {
    // Handing the Lease back lets a standby take over at once instead of after expiry.
    match task.await {
        Ok(Ok(manager)) => {
            if let Err(e) = manager.release().await {
                tracing::warn!(error = %e, "releasing the leader Lease failed");
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "leader election ended with an error"),
        Err(e) => tracing::warn!(error = %e, "leader election task failed"),
    }
}

/// Connects to Redis (standalone or any node of a Cluster), retrying until it answers or
/// the operator is asked to stop.
async fn connect_redis(
    url: &str,
    shutdown: &CancellationToken,
) -> Result<pacer_core::connection::RedisConnection> {
    let options = RedisOptions {
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
    };
    let mut delay = Duration::from_millis(250);
    loop {
        match pacer_core::connection::RedisConnection::open(url, options).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "Redis unreachable; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        return Err(Error::Config(pacer_core::config::ConfigError::Redis(e)));
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn default_identity() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("pacer-operator-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An apiserver that stopped answering: the Lease cannot be renewed, so the leader
    /// steps down once its duration has passed (a standby may hold it by then).
    #[tokio::test]
    async fn a_leader_that_cannot_reach_the_apiserver_steps_down() {
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
        let client = kube::Client::try_from(config).expect("client");
        let api: Api<Lease> = Api::namespaced(client, "default");
        // A bound on the test, not a measurement.
        let why = tokio::time::timeout(
            Duration::from_secs(30),
            lease_watchdog(&api, "pacer-operator", "me", Duration::from_secs(2)),
        )
        .await
        .expect("the watchdog gives up");
        assert_eq!(why, "the Lease was not renewed within its duration");
    }
}
