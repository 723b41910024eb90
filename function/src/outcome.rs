//! What became of one delivery of a message, and so what the queue should do with it.
//!
//! Every entry point (the SQS worker, the Lambda handler, the in-memory queue of `pacer
//! demo` and `pacer loadtest`) maps an [`Outcome`] to the same queue action, so ack, defer
//! and dead-letter are decided in one place, from types, never from error text.
use std::time::Duration;

use async_trait::async_trait;

use crate::record::ResultRecord;

/// The result of processing one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Images stored and the record written: delete the message.
    Succeeded(ResultRecord),
    /// It can never succeed (bad input, safety block, unknown chain): the failed record
    /// is written; delete the message.
    Failed(ResultRecord),
    /// A redelivery of a request that is already finished: delete the message.
    AlreadyDone(ResultRecord),
    /// Not now: make the message visible again after `after` (the booked wait, a
    /// cooldown, or a backoff). The queue's receive limit dead-letters a message that is
    /// deferred forever.
    Defer {
        /// When to try again.
        after: Duration,
        /// Why (for logs and metrics).
        reason: DeferReason,
    },
}

/// Why a delivery was deferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeferReason {
    /// No capacity within the chain's budget.
    Capacity,
    /// The provider was rate limiting or cooling down.
    RateLimited,
    /// The provider was overloaded or failing after the retry policy's attempts.
    Upstream,
    /// Another replica is generating it right now.
    InProgress,
    /// Redis or the sink was unavailable.
    Infrastructure,
    /// No configuration is loaded yet (nothing applied, or Redis lost it), or the chain
    /// names only models the provider does not know: the request waits for `pacer apply`
    /// or the operator to fix it.
    Config,
    /// The replica is shutting down.
    Shutdown,
    /// The provider account is broken (bad key, spent credit): the request waits for an
    /// operator, who is alerted; it is never failed for it.
    Account,
}

impl DeferReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            DeferReason::Capacity => "capacity",
            DeferReason::RateLimited => "rate_limited",
            DeferReason::Upstream => "upstream",
            DeferReason::InProgress => "in_progress",
            DeferReason::Infrastructure => "infrastructure",
            DeferReason::Config => "config",
            DeferReason::Shutdown => "shutdown",
            DeferReason::Account => "account",
        }
    }
}

impl Outcome {
    /// Whether the queue should delete the message.
    pub fn is_final(&self) -> bool {
        !matches!(self, Outcome::Defer { .. })
    }

    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Succeeded(_) => "succeeded",
            Outcome::Failed(_) => "failed",
            Outcome::AlreadyDone(_) => "already_done",
            Outcome::Defer { .. } => "deferred",
        }
    }
}

/// SQS's largest visibility timeout: 12 hours.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(43_200);

/// A defer delay as an SQS visibility timeout in whole seconds: rounded up (never early),
/// at most 12 hours.
pub fn visibility_secs(after: Duration) -> i32 {
    let secs = after.min(MAX_VISIBILITY).as_secs_f64().ceil() as i32;
    secs.clamp(0, MAX_VISIBILITY.as_secs() as i32)
}

/// Processes one message body; implemented by the request handler (and by test doubles of
/// the queue plumbing).
#[async_trait]
pub trait Process: Send + Sync + 'static {
    /// Handles one delivery. `receive_count` is SQS's ApproximateReceiveCount (1 first).
    async fn process(&self, body: &str, receive_count: u32) -> Outcome;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility_rounds_up_and_caps() {
        assert_eq!(visibility_secs(Duration::from_millis(1)), 1);
        assert_eq!(visibility_secs(Duration::from_millis(2000)), 2);
        assert_eq!(visibility_secs(Duration::from_millis(2001)), 3);
        assert_eq!(visibility_secs(Duration::from_secs(100_000)), 43_200);
        assert_eq!(visibility_secs(Duration::ZERO), 0);
    }
}
