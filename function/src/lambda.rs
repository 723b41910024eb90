//! The Lambda handler: an SQS batch in, `batchItemFailures` out.
//!
//! The event source mapping must have `ReportBatchItemFailures`: messages not reported are
//! deleted by Lambda, reported ones come back after their visibility timeout. A deferred
//! message's visibility is set to its booked wait before it is reported, so it returns
//! exactly when it can run (without that, it would return after the queue's whole timeout).
//! A message received often is instead sent again as a fresh message and not reported (so
//! Lambda deletes the old one): deferrals never walk it into the dead-letter queue.
//!
//! Every delivery works against the invocation's deadline (minus a reserve for these queue
//! calls): what cannot finish before it is deferred, never cut off by a timeout.
use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use tokio::sync::Mutex;

use pacer_core::config::ConfigRefresh;
use tokio::time::Instant;

use crate::{
    handler::HandlerOptions,
    outcome::{
        Attempt, DEAD_LETTER_HIDE, Outcome, Process, Requeue, RequeuePolicy, visibility_secs,
    },
    queue::{Queue as _, QueueError, SqsQueue},
    runtime::{self, RuntimeArgs},
};

/// What the handler asks of the queue a batch came from (SQS in production, a fake in
/// tests).
#[async_trait]
pub trait Requeuer: Send + Sync {
    /// Hides the message behind `receipt`, from the queue `arn`, for `seconds`.
    async fn hide(&self, arn: &str, receipt: &str, seconds: i32) -> Result<(), QueueError>;
    /// Sends `body` again to the queue `arn`, visible after `delay`.
    async fn resend(&self, arn: &str, body: &str, delay: Duration) -> Result<(), QueueError>;
}

/// Kept free before an invocation's deadline for the queue calls that defer what is left.
pub const DEADLINE_RESERVE: Duration = Duration::from_secs(5);

/// What the handler keeps between invocations (built once, at cold start).
pub struct LambdaHandler {
    processor: Arc<dyn Process>,
    requeuer: Arc<dyn Requeuer>,
    policy: RequeuePolicy,
    refresh: ConfigRefresh,
}

impl LambdaHandler {
    /// A handler over a processor and its queue.
    pub fn new(processor: Arc<dyn Process>, requeuer: Arc<dyn Requeuer>) -> Self {
        Self {
            processor,
            requeuer,
            policy: RequeuePolicy::default(),
            refresh: ConfigRefresh::default(),
        }
    }

    /// Checks for a new configuration before every batch: a sandbox thawed after a long
    /// freeze must not serve its first batch on the configuration it froze with.
    pub fn with_refresh(mut self, refresh: ConfigRefresh) -> Self {
        self.refresh = refresh;
        self
    }

    /// Processes one batch; messages are handled concurrently (one batch holds up to 10,
    /// or more with a batching window). `deadline` is when the invocation times out.
    pub async fn handle(&self, event: SqsEvent, deadline: Option<Instant>) -> SqsBatchResponse {
        let started = Instant::now();
        self.refresh.now(Duration::from_secs(1)).await;
        let deadline = deadline.map(|d| {
            d.checked_sub(DEADLINE_RESERVE)
                .unwrap_or(started)
                .max(started)
        });
        let results = futures::future::join_all(
            event
                .records
                .iter()
                .map(|record| self.handle_record(record, started, deadline)),
        )
        .await;
        let mut response = SqsBatchResponse::default();
        for failed in results.into_iter().flatten() {
            response.add_failure(failed);
        }
        response
    }

    /// Returns the message id to report as failed, if any.
    async fn handle_record(
        &self,
        record: &SqsMessage,
        started: Instant,
        deadline: Option<Instant>,
    ) -> Option<String> {
        let id = record.message_id.clone().unwrap_or_default();
        let body = record.body.as_deref().unwrap_or_default();
        let receive_count = record
            .attributes
            .get("ApproximateReceiveCount")
            .and_then(|c| c.parse().ok())
            .unwrap_or(1);
        let attempt = Attempt {
            receive_count,
            deadline,
        };
        let outcome = self.processor.process(body, attempt).await;
        tracing::info!(message_id = %id, outcome = outcome.label(), "processed");
        let after = match outcome {
            Outcome::Defer { after, .. } => after,
            Outcome::DeadLetter { reason } => {
                tracing::warn!(message_id = %id, reason, receive_count, "a message that is not a request, with no id: left for the dead-letter queue");
                if let (Some(arn), Some(receipt)) =
                    (&record.event_source_arn, &record.receipt_handle)
                {
                    let seconds = visibility_secs(DEAD_LETTER_HIDE);
                    if let Err(e) = self.requeuer.hide(arn, receipt, seconds).await {
                        tracing::warn!(error = %e, arn, "hiding a message for the dead-letter queue failed");
                    }
                }
                return Some(id);
            }
            _ => return None,
        };
        let Some(arn) = &record.event_source_arn else {
            return Some(id);
        };
        let held = started.elapsed();
        if let Requeue::Resend(delay) = self.policy.requeue(after, receive_count, held) {
            match self.requeuer.resend(arn, body, delay).await {
                // Not reported: Lambda deletes this delivery; the copy carries the request.
                Ok(()) => return None,
                Err(e) => {
                    tracing::warn!(error = %e, arn, "re-sending a deferred message failed; hiding it")
                }
            }
        }
        if let Some(receipt) = &record.receipt_handle {
            let seconds = visibility_secs(self.policy.hide_for(after, held));
            if let Err(e) = self.requeuer.hide(arn, receipt, seconds).await {
                tracing::warn!(error = %e, arn, "setting the deferred visibility failed; the queue's timeout applies");
            }
        }
        Some(id)
    }
}

/// The SQS queues batches come from; their URLs are resolved from event source ARNs once
/// each.
pub struct SqsRequeuer {
    sqs: aws_sdk_sqs::Client,
    queue_urls: Mutex<HashMap<String, String>>,
}

impl SqsRequeuer {
    pub fn new(sqs: aws_sdk_sqs::Client) -> Self {
        Self {
            sqs,
            queue_urls: Mutex::default(),
        }
    }

    async fn queue_url(&self, arn: &str) -> Result<String, QueueError> {
        if let Some(url) = self.queue_urls.lock().await.get(arn) {
            return Ok(url.clone());
        }
        // arn:aws:sqs:REGION:ACCOUNT:NAME
        let parts: Vec<&str> = arn.split(':').collect();
        let (Some(account), Some(name)) = (parts.get(4), parts.get(5)) else {
            return Err(QueueError::new(format!("not an SQS queue ARN: {arn}")));
        };
        let url = self
            .sqs
            .get_queue_url()
            .queue_name(*name)
            .queue_owner_aws_account_id(*account)
            .send()
            .await
            .map_err(QueueError::sqs)?
            .queue_url
            .ok_or_else(|| QueueError::new(format!("no URL for queue {name}")))?;
        self.queue_urls
            .lock()
            .await
            .insert(arn.to_owned(), url.clone());
        Ok(url)
    }
}

#[async_trait]
impl Requeuer for SqsRequeuer {
    async fn hide(&self, arn: &str, receipt: &str, seconds: i32) -> Result<(), QueueError> {
        let url = self.queue_url(arn).await?;
        self.sqs
            .change_message_visibility()
            .queue_url(url)
            .receipt_handle(receipt)
            .visibility_timeout(seconds)
            .send()
            .await
            .map_err(QueueError::sqs)?;
        Ok(())
    }

    async fn resend(&self, arn: &str, body: &str, delay: Duration) -> Result<(), QueueError> {
        let url = self.queue_url(arn).await?;
        SqsQueue::new(self.sqs.clone(), url)
            .send_delayed(body, delay)
            .await
    }
}

/// The Lambda binary's body: builds the replica once (the cold start) and serves batches.
pub async fn serve(args: &RuntimeArgs) -> Result<(), lambda_runtime::Error> {
    let started = std::time::Instant::now();
    let replica = runtime::build(args, None, HandlerOptions::default()).await?;
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let requeuer = Arc::new(SqsRequeuer::new(aws_sdk_sqs::Client::new(&aws)));
    let handler =
        Arc::new(LambdaHandler::new(replica.handler, requeuer).with_refresh(replica.refresh));
    // The cold start's own share (Lambda adds the runtime's start and the download).
    tracing::info!(
        init_ms = started.elapsed().as_millis() as u64,
        "pacer-lambda initialized"
    );
    lambda_runtime::run(lambda_runtime::service_fn(
        move |event: lambda_runtime::LambdaEvent<SqsEvent>| {
            let handler = handler.clone();
            async move {
                let deadline = invocation_deadline(&event.context);
                Ok::<_, lambda_runtime::Error>(handler.handle(event.payload, deadline).await)
            }
        },
    ))
    .await
}

/// The invocation's deadline (epoch milliseconds in the context) on this process's clock.
fn invocation_deadline(context: &lambda_runtime::Context) -> Option<Instant> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_millis() as u64;
    let left = context.deadline.checked_sub(now_ms)?;
    Some(Instant::now() + Duration::from_millis(left))
}

#[cfg(test)]
mod tests {
    use std::{sync::Mutex as StdMutex, time::Duration};

    use super::*;
    use crate::{outcome::DeferReason, record::ResultRecord};

    /// Answers by message body: `done`, `defer:<ms>`, anything else fails.
    struct Scripted;

    #[async_trait]
    impl Process for Scripted {
        async fn process(&self, body: &str, _attempt: Attempt) -> Outcome {
            match body.strip_prefix("defer:") {
                Some(ms) => Outcome::Defer {
                    after: Duration::from_millis(ms.parse().unwrap_or(0)),
                    reason: DeferReason::Capacity,
                },
                None if body == "done" => Outcome::AlreadyDone(ResultRecord::failed(body, 0, "")),
                None => Outcome::Failed(ResultRecord::failed(body, 1, "scripted")),
            }
        }
    }

    /// The queue calls made: hidden (arn, receipt, seconds) and re-sent (arn, body, delay).
    #[derive(Default)]
    struct Recorded {
        hidden: StdMutex<Vec<(String, String, i32)>>,
        resent: StdMutex<Vec<(String, String, Duration)>>,
    }

    #[async_trait]
    impl Requeuer for Recorded {
        async fn hide(&self, arn: &str, receipt: &str, seconds: i32) -> Result<(), QueueError> {
            if let Ok(mut calls) = self.hidden.lock() {
                calls.push((arn.into(), receipt.into(), seconds));
            }
            Ok(())
        }

        async fn resend(&self, arn: &str, body: &str, delay: Duration) -> Result<(), QueueError> {
            if let Ok(mut calls) = self.resent.lock() {
                calls.push((arn.into(), body.into(), delay));
            }
            Ok(())
        }
    }

    const ARN: &str = "arn:aws:sqs:us-east-2:123456789012:pacer-requests";

    /// An SQS event as Lambda delivers it (the shape of AWS's documented example).
    fn event(bodies: &[&str]) -> SqsEvent {
        event_received(bodies, 1)
    }

    fn event_received(bodies: &[&str], receive_count: u32) -> SqsEvent {
        let records: Vec<serde_json::Value> = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| {
                serde_json::json!({
                    "messageId": format!("m{i}"),
                    "receiptHandle": format!("r{i}"),
                    "body": body,
                    "attributes": {
                        "ApproximateReceiveCount": receive_count.to_string(),
                        "SentTimestamp": "1545082649183",
                        "SenderId": "AIDAIENQZJOLO23YVJ4VO",
                        "ApproximateFirstReceiveTimestamp": "1545082649185"
                    },
                    "messageAttributes": {},
                    "md5OfBody": "e4e68fb7bd0e697a0ae8f1bb342846b3",
                    "eventSource": "aws:sqs",
                    "eventSourceARN": "arn:aws:sqs:us-east-2:123456789012:pacer-requests",
                    "awsRegion": "us-east-2"
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({ "Records": records })).expect("SQS event")
    }

    #[tokio::test]
    async fn deferred_messages_are_reported_with_their_visibility_and_the_rest_are_not() {
        let queue = Arc::new(Recorded::default());
        let handler = LambdaHandler::new(Arc::new(Scripted), queue.clone());
        let response = handler
            .handle(event(&["done", "defer:4200", "bad", "defer:0"]), None)
            .await;
        let failed: Vec<_> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.as_str())
            .collect();
        // Only deferrals go back to the queue: a failed request has its record and is done.
        assert_eq!(failed, vec!["m1", "m3"]);
        let calls = queue.hidden.lock().expect("lock").clone();
        let arn = ARN;
        assert_eq!(
            calls,
            vec![
                (
                    arn.to_owned(),
                    "r1".to_owned(),
                    visibility_secs(Duration::from_millis(4200))
                ),
                (
                    arn.to_owned(),
                    "r3".to_owned(),
                    visibility_secs(Duration::ZERO)
                ),
            ]
        );
    }

    /// A delivery received ten times is deferred as a fresh copy (not reported, so Lambda
    /// deletes it): its receive count restarts and it never reaches the dead-letter queue.
    #[tokio::test]
    async fn often_received_deferrals_are_resent_not_reported() {
        let queue = Arc::new(Recorded::default());
        let handler = LambdaHandler::new(Arc::new(Scripted), queue.clone());
        let response = handler
            .handle(event_received(&["defer:4200", "defer:2000000"], 10), None)
            .await;
        assert!(response.batch_item_failures.is_empty());
        assert!(queue.hidden.lock().expect("lock").is_empty());
        assert_eq!(
            *queue.resent.lock().expect("lock"),
            vec![
                (
                    ARN.to_owned(),
                    "defer:4200".to_owned(),
                    Duration::from_millis(4200)
                ),
                (
                    ARN.to_owned(),
                    "defer:2000000".to_owned(),
                    crate::outcome::MAX_DELAY
                ),
            ]
        );
    }
}
