//! What became of one delivery of a message, and so what the queue should do with it.
//!
//! Every entry point (the SQS worker, the Lambda handler, the in-memory queue of `pacer
//! demo` and `pacer loadtest`) maps an [`Outcome`] to the same queue action, so ack, defer
//! and dead-letter are decided in one place, from types, never from error text.
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

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
    /// It cannot be processed at all, and has no id to record a result under (a body that
    /// is not a request): keep it for a person. The message is neither deleted nor re-sent:
    /// it is hidden for [`DEAD_LETTER_HIDE`] at each receive, so its receives run up to
    /// the queue's `maxReceiveCount` and SQS moves it to the dead-letter queue.
    DeadLetter {
        /// What is wrong with it (logged).
        reason: String,
    },
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
    /// The caller's deadline (a Lambda invocation's) leaves no time for the call.
    Deadline,
    /// The tenant's daily or monthly budget is spent: it waits for the reset.
    Budget,
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
            DeferReason::Deadline => "deadline",
            DeferReason::Budget => "budget",
        }
    }
}

impl Outcome {
    /// Whether the queue should delete the message.
    pub fn is_final(&self) -> bool {
        !matches!(self, Outcome::Defer { .. } | Outcome::DeadLetter { .. })
    }

    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Succeeded(_) => "succeeded",
            Outcome::Failed(_) => "failed",
            Outcome::AlreadyDone(_) => "already_done",
            Outcome::Defer { .. } => "deferred",
            Outcome::DeadLetter { .. } => "dead_letter",
        }
    }
}

/// How long a message left for the dead-letter queue stays hidden at each receive: with
/// the template's `maxReceiveCount` of 11 it reaches the dead-letter queue in about 5
/// minutes; on a queue without a redrive policy it costs one receive per 30 s until the
/// queue's retention drops it.
pub const DEAD_LETTER_HIDE: Duration = Duration::from_secs(30);

/// SQS's largest visibility timeout: 12 hours, counted from the receipt.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(43_200);

/// SQS's longest message delay (`DelaySeconds`): 15 minutes.
pub const MAX_DELAY: Duration = Duration::from_secs(900);

/// SQS's largest message: 256 KiB.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// A defer delay as an SQS visibility timeout in whole seconds: rounded up (never early),
/// at most 12 hours.
pub fn visibility_secs(after: Duration) -> i32 {
    let secs = after.min(MAX_VISIBILITY).as_secs_f64().ceil() as i32;
    secs.clamp(0, MAX_VISIBILITY.as_secs() as i32)
}

/// How a deferred delivery goes back to its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeue {
    /// Hide this delivery for this long: the same message returns, its receive count one
    /// higher.
    Hide(Duration),
    /// Send the body again as a new message delayed this long (at most [`MAX_DELAY`]) and
    /// delete this delivery: the new message starts at receive count 0, so deferrals never
    /// walk a message into the dead-letter queue. The request id makes the copy harmless.
    Resend(Duration),
}

/// When deferrals re-send instead of hiding.
#[derive(Debug, Clone, Copy)]
pub struct RequeuePolicy {
    /// A delivery received this many times or more is re-sent rather than hidden. Keep it
    /// well under the queue's `maxReceiveCount` (the chart's and template's is 20).
    pub resend_from_receive: u32,
    /// Kept free below SQS's 12 hours from receipt (the time spent since the receipt is
    /// not known exactly: a Lambda batching window adds to it).
    pub visibility_margin: Duration,
}

impl Default for RequeuePolicy {
    fn default() -> Self {
        Self {
            resend_from_receive: 10,
            visibility_margin: Duration::from_secs(300),
        }
    }
}

impl RequeuePolicy {
    /// How to defer by `after` a delivery received `receive_count` times and held for
    /// `held` since its receipt. A wait longer than SQS lets a delivery stay hidden is cut
    /// to what it allows: the message returns early, finds its limit still blocked and
    /// defers again, one receive per 12 hours at most.
    pub fn requeue(&self, after: Duration, receive_count: u32, held: Duration) -> Requeue {
        if receive_count >= self.resend_from_receive {
            return Requeue::Resend(after.min(MAX_DELAY));
        }
        Requeue::Hide(self.hide_for(after, held))
    }

    /// `after`, cut to what SQS lets a delivery held for `held` stay hidden.
    pub fn hide_for(&self, after: Duration, held: Duration) -> Duration {
        after.min(MAX_VISIBILITY.saturating_sub(held + self.visibility_margin))
    }
}

/// One delivery of a message, as the processor sees it.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// SQS's ApproximateReceiveCount (1 for the first delivery).
    pub receive_count: u32,
    /// When the caller stops waiting for this delivery (a Lambda invocation's deadline):
    /// what cannot finish before it is deferred.
    pub deadline: Option<Instant>,
}

impl Attempt {
    /// The first delivery, with no deadline of its own.
    pub fn first() -> Self {
        Self {
            receive_count: 1,
            deadline: None,
        }
    }

    /// A delivery received `receive_count` times, with no deadline of its own.
    pub fn received(receive_count: u32) -> Self {
        Self {
            receive_count,
            deadline: None,
        }
    }
}

/// Processes one message body; implemented by the request handler (and by test doubles of
/// the queue plumbing).
#[async_trait]
pub trait Process: Send + Sync + 'static {
    /// Handles one delivery.
    async fn process(&self, body: &str, attempt: Attempt) -> Outcome;
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

    #[test]
    fn long_waits_fit_sqs_caps_and_late_receives_resend() {
        let p = RequeuePolicy::default();
        let s = Duration::from_secs;
        assert_eq!(p.requeue(s(30), 1, s(2)), Requeue::Hide(s(30)));
        // A wait to Pacific midnight (20 h): hidden as long as SQS allows from the receipt.
        assert_eq!(
            p.requeue(s(72_000), 1, s(100)),
            Requeue::Hide(MAX_VISIBILITY - s(100) - p.visibility_margin)
        );
        // Held past the cap already (a slow delivery): visible at once, never refused.
        assert_eq!(
            p.requeue(s(60), 1, s(43_000)),
            Requeue::Hide(Duration::ZERO)
        );
        // Received often: a fresh copy, delayed at most 15 minutes.
        assert_eq!(p.requeue(s(30), 10, s(1)), Requeue::Resend(s(30)));
        assert_eq!(p.requeue(s(72_000), 12, s(1)), Requeue::Resend(MAX_DELAY));
    }
}
