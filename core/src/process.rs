//! What every Pacer binary does the same way at start and at stop: one tracing set-up and
//! one shutdown signal (`pacer`, `pacer-lambda` and `pacer-operator` all use these).

/// Initialises tracing to stderr: `RUST_LOG` filters (default `info`); JSON lines when
/// `AWS_LAMBDA_LOG_FORMAT=JSON` (Lambda) or `PACER_LOG_FORMAT=json`; colours only on a
/// terminal.
pub fn init_tracing() {
    init_tracing_at("info");
}

/// [`init_tracing`] with another default level when `RUST_LOG` is unset (an interactive
/// command that draws its own progress keeps the log to warnings).
pub fn init_tracing_at(default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let json = ["AWS_LAMBDA_LOG_FORMAT", "PACER_LOG_FORMAT"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|f| f.eq_ignore_ascii_case("json")));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM (how Kubernetes and Lambda stop a process) or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
