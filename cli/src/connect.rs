//! The services a command can be pointed at, declared once and flattened into every
//! command that takes them, so each flag has one environment variable everywhere.
use clap::Args;

/// Redis, SQS and Gemini endpoints; each absent means the command's in-process default
/// (an in-memory limiter, an in-memory queue, the simulator).
#[derive(Args, Clone, Default)]
pub struct Connections {
    /// Redis for the global limiter, config and records (default: in memory).
    #[arg(long, env = "PACER_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// An SQS queue to go through (moto or AWS; default: an in-memory queue).
    #[arg(long, env = "PACER_QUEUE_URL")]
    pub queue_url: Option<String>,
    /// A Gemini endpoint (default: an in-process simulator, or Google with an API key).
    #[arg(long, env = "PACER_GEMINI_BASE_URL")]
    pub gemini_base_url: Option<String>,
    /// A Gemini API key (with Google's endpoint the calls are real: mind the cost).
    #[arg(long, env = "PACER_GEMINI_API_KEY", hide_env_values = true)]
    pub gemini_api_key: Option<String>,
}

/// Debug output never shows the Redis URL (it may hold a password) or the API key.
impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field(
                "redis_url",
                &pacer_function::runtime::redacted(&self.redis_url),
            )
            .field("queue_url", &self.queue_url)
            .field("gemini_base_url", &self.gemini_base_url)
            .field(
                "gemini_api_key",
                &pacer_function::runtime::redacted(&self.gemini_api_key),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_secrets() {
        let c = Connections {
            redis_url: Some("redis://:hunter2@cache:6379".into()),
            gemini_api_key: Some("AIzaSECRET".into()),
            ..Connections::default()
        };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("AIzaSECRET"),
            "{shown}"
        );
        assert!(shown.contains("<set>"), "{shown}");
    }
}
