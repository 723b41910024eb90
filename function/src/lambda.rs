//! The Lambda handler: an SQS batch in, `batchItemFailures` out.
//!
//! The event source mapping must have `ReportBatchItemFailures`: messages not reported are
//! deleted by Lambda, reported ones come back after their visibility timeout. A deferred
//! message's visibility is set to its booked wait before it is reported, so it returns
//! exactly when it can run (without that, it would return after the queue's whole timeout).
use std::{collections::HashMap, sync::Arc};

use async_trait::async_trait;
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use tokio::sync::Mutex;

use crate::{
    handler::HandlerOptions,
    outcome::{Outcome, Process, visibility_secs},
    queue::QueueError,
    runtime::{self, RuntimeArgs},
};

/// Sets a received message's visibility timeout (SQS in production, a fake in tests).
#[async_trait]
pub trait Visibility: Send + Sync {
    /// Hides the message behind `receipt`, from the queue `arn`, for `seconds`.
    async fn set(&self, arn: &str, receipt: &str, seconds: i32) -> Result<(), QueueError>;
}

/// What the handler keeps between invocations (built once, at cold start).
pub struct LambdaHandler {
    processor: Arc<dyn Process>,
    visibility: Arc<dyn Visibility>,
}

impl LambdaHandler {
    /// A handler over a processor and what sets visibility.
    pub fn new(processor: Arc<dyn Process>, visibility: Arc<dyn Visibility>) -> Self {
        Self {
            processor,
            visibility,
        }
    }

    /// Processes one batch; messages are handled concurrently (one batch holds up to 10,
    /// or more with a batching window).
    pub async fn handle(&self, event: SqsEvent) -> SqsBatchResponse {
        let results = futures::future::join_all(
            event
                .records
                .iter()
                .map(|record| self.handle_record(record)),
        )
        .await;
        let mut response = SqsBatchResponse::default();
        for failed in results.into_iter().flatten() {
            response.add_failure(failed);
        }
        response
    }

    /// Returns the message id to report as failed, if any.
    async fn handle_record(&self, record: &SqsMessage) -> Option<String> {
        let id = record.message_id.clone().unwrap_or_default();
        let body = record.body.as_deref().unwrap_or_default();
        let receive_count = record
            .attributes
            .get("ApproximateReceiveCount")
            .and_then(|c| c.parse().ok())
            .unwrap_or(1);
        let outcome = self.processor.process(body, receive_count).await;
        tracing::info!(message_id = %id, outcome = outcome.label(), "processed");
        let Outcome::Defer { after, .. } = outcome else {
            return None;
        };
        if let (Some(arn), Some(receipt)) = (&record.event_source_arn, &record.receipt_handle) {
            let seconds = visibility_secs(after);
            if let Err(e) = self.visibility.set(arn, receipt, seconds).await {
                tracing::warn!(error = %e, arn, "setting the deferred visibility failed; the queue's timeout applies");
            }
        }
        Some(id)
    }
}

/// Visibility through SQS; queue URLs are resolved from event source ARNs once each.
pub struct SqsVisibility {
    sqs: aws_sdk_sqs::Client,
    queue_urls: Mutex<HashMap<String, String>>,
}

impl SqsVisibility {
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
impl Visibility for SqsVisibility {
    async fn set(&self, arn: &str, receipt: &str, seconds: i32) -> Result<(), QueueError> {
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
}

/// The Lambda binary's body: builds the replica once (the cold start) and serves batches.
pub async fn serve(args: &RuntimeArgs) -> Result<(), lambda_runtime::Error> {
    let started = std::time::Instant::now();
    let replica = runtime::build(args, None, HandlerOptions::default()).await?;
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let visibility = Arc::new(SqsVisibility::new(aws_sdk_sqs::Client::new(&aws)));
    let handler = Arc::new(LambdaHandler::new(replica.handler, visibility));
    // The cold start's own share (Lambda adds the runtime's start and the download).
    tracing::info!(
        init_ms = started.elapsed().as_millis() as u64,
        "pacer-lambda initialized"
    );
    lambda_runtime::run(lambda_runtime::service_fn(
        move |event: lambda_runtime::LambdaEvent<SqsEvent>| {
            let handler = handler.clone();
            async move { Ok::<_, lambda_runtime::Error>(handler.handle(event.payload).await) }
        },
    ))
    .await
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
        async fn process(&self, body: &str, _receive_count: u32) -> Outcome {
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

    #[derive(Default)]
    struct Recorded(StdMutex<Vec<(String, String, i32)>>);

    #[async_trait]
    impl Visibility for Recorded {
        async fn set(&self, arn: &str, receipt: &str, seconds: i32) -> Result<(), QueueError> {
            if let Ok(mut calls) = self.0.lock() {
                calls.push((arn.into(), receipt.into(), seconds));
            }
            Ok(())
        }
    }

    /// An SQS event as Lambda delivers it (the shape of AWS's documented example).
    fn event(bodies: &[&str]) -> SqsEvent {
        let records: Vec<serde_json::Value> = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| {
                serde_json::json!({
                    "messageId": format!("m{i}"),
                    "receiptHandle": format!("r{i}"),
                    "body": body,
                    "attributes": {
                        "ApproximateReceiveCount": "1",
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
        let visibility = Arc::new(Recorded::default());
        let handler = LambdaHandler::new(Arc::new(Scripted), visibility.clone());
        let response = handler
            .handle(event(&["done", "defer:4200", "bad", "defer:0"]))
            .await;
        let failed: Vec<_> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.as_str())
            .collect();
        // Only deferrals go back to the queue: a failed request has its record and is done.
        assert_eq!(failed, vec!["m1", "m3"]);
        let calls = visibility.0.lock().expect("lock").clone();
        let arn = "arn:aws:sqs:us-east-2:123456789012:pacer-requests";
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
}
