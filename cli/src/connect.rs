//! The services a command can be pointed at, declared once and flattened into every
//! command that takes them, so each flag has one environment variable everywhere.
use clap::Args;

/// Redis, SQS and Gemini endpoints; each absent means the command's in-process default
/// (an in-memory limiter, an in-memory queue, the simulator).
#[derive(Args, Debug, Clone, Default)]
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
