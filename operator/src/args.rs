//! The operator's settings: one clap struct, every flag also an environment variable.
use std::{net::SocketAddr, time::Duration};

/// `pacer-operator run`: reconcile QuotaPools and ModelChains into Redis.
///
/// The Kubernetes connection comes from kube's usual inference: `KUBECONFIG` or
/// `~/.kube/config` out of cluster, the pod's ServiceAccount in cluster.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// Redis holding the compiled configuration and the limiter state
    /// (`redis://`, `rediss://`, with `user:password@` for ACL users).
    #[arg(long, env = "PACER_REDIS_URL", hide_env_values = true)]
    pub redis_url: String,

    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "PACER_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Re-check every object this often (seconds): rewrites config Redis lost, re-checks
    /// referenced Secrets, refreshes usage of idle pools.
    #[arg(long, env = "PACER_RESYNC_SECONDS", default_value_t = 30)]
    pub resync_seconds: u64,

    /// Refresh a busy pool's live usage in its status this often (seconds).
    #[arg(long, env = "PACER_USAGE_REFRESH_SECONDS", default_value_t = 5)]
    pub usage_refresh_seconds: u64,

    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "PACER_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Run the controllers only while holding a Lease, so several replicas can run.
    #[arg(long, env = "PACER_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// Name of the Lease used for leader election.
    #[arg(long, env = "PACER_LEASE_NAME", default_value = "pacer-operator")]
    pub lease_name: String,

    /// Namespace of the Lease (default: the kubeconfig's or the pod's namespace).
    #[arg(long, env = "PACER_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// How long a held Lease stays valid without renewal (seconds).
    #[arg(long, env = "PACER_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,

    /// This replica's identity in the Lease and in Events (the pod name in cluster).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// A deleted object whose config cannot be removed from Redis (Redis down) keeps its
    /// finalizer this long (seconds); then the deletion finishes (a namespace deletion
    /// does not hang on Redis) and the removal is retried once Redis answers.
    #[arg(long, env = "PACER_REMOVAL_PATIENCE_SECONDS", default_value_t = 60)]
    pub removal_patience_seconds: u64,

    /// The typical length of one provider call, in seconds, for the replica count served
    /// at `/scale/{namespace}/{pool}` (image models answer in 5 to 40 s).
    #[arg(long, env = "PACER_SCALE_CALL_SECONDS", default_value_t = 20.0)]
    pub scale_call_seconds: f64,

    /// Messages one worker replica works on at once (its PACER_CONCURRENCY), for the same
    /// replica count.
    #[arg(long, env = "PACER_SCALE_REPLICA_CONCURRENCY", default_value_t = 64)]
    pub scale_replica_concurrency: u32,
}

impl RunArgs {
    /// Settings with defaults, for embedding the operator (tests).
    pub fn new(redis_url: impl Into<String>) -> RunArgs {
        RunArgs {
            redis_url: redis_url.into(),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            resync_seconds: 30,
            usage_refresh_seconds: 5,
            watch_namespace: None,
            leader_elect: false,
            lease_name: "pacer-operator".into(),
            lease_namespace: None,
            lease_duration_seconds: 15,
            identity: None,
            removal_patience_seconds: 60,
            scale_call_seconds: 20.0,
            scale_replica_concurrency: 64,
        }
    }

    pub(crate) fn resync(&self) -> Duration {
        Duration::from_secs(self.resync_seconds.max(1))
    }

    pub(crate) fn usage_refresh(&self) -> Duration {
        Duration::from_secs(self.usage_refresh_seconds.max(1))
    }
}
