//! What can go wrong while reconciling, and what each failure means for the loop.

/// An operator error. Every variant is retried by the controller with backoff; none
/// stops the loop or other objects from reconciling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a request.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Redis could not be reached or refused the write (the pool shows Degraded).
    #[error("configuration store: {0}")]
    Config(#[from] pacer_core::config::ConfigError),
    /// The limiter could not report usage.
    #[error("limiter: {0}")]
    Limiter(#[from] pacer_core::limiter::Error),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// An object without a namespace (the kinds are namespaced: should not happen).
    #[error("{0} has no namespace")]
    NoNamespace(String),
    /// Leader election failed.
    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    /// Another replica took the Lease: this one stops so it cannot write stale config.
    #[error("lost the leader Lease")]
    LostLease,
    /// The HTTP server could not bind or serve.
    #[error("metrics server: {0}")]
    Http(#[from] std::io::Error),
}

impl Error {
    /// A short label for the `pacer_operator_reconcile_errors_total` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Config(_) => "redis",
            Error::Limiter(_) => "limiter",
            Error::Finalizer(_) => "finalizer",
            Error::NoNamespace(_) => "no_namespace",
            Error::Lease(_) => "lease",
            Error::LostLease => "lost_lease",
            Error::Http(_) => "http",
        }
    }
}

/// The operator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
