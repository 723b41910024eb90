//! The Lambda handler: an SQS batch in, `batchItemFailures` out.
//!
//! The event source mapping must have `ReportBatchItemFailures`: messages not reported are
//! deleted by Lambda, reported ones come back after their visibility timeout. A deferred
//! message's visibility is set to its booked wait before it is reported, so it returns
//! exactly when it can run (without that, it would return after the queue's whole timeout).
use std::{collections::HashMap, sync::Arc};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use tokio::sync::Mutex;

use crate::outcome::{Outcome, Process, visibility_secs};

/// What the handler keeps between invocations (built once, at cold start).
pub struct LambdaHandler {
    processor: Arc<dyn Process>,
    sqs: aws_sdk_sqs::Client,
    /// Queue URLs by event source ARN, resolved once each.
    queue_urls: Mutex<HashMap<String, String>>,
}

impl LambdaHandler {
    /// A handler over a processor and an SQS client (for visibility changes).
    pub fn new(processor: Arc<dyn Process>, sqs: aws_sdk_sqs::Client) -> Self {
        Self {
            processor,
            sqs,
            queue_urls: Mutex::default(),
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
            match self.queue_url(arn).await {
                Ok(url) => {
                    let r = self
                        .sqs
                        .change_message_visibility()
                        .queue_url(url)
                        .receipt_handle(receipt)
                        .visibility_timeout(visibility_secs(after))
                        .send()
                        .await;
                    if let Err(e) = r {
                        tracing::warn!(error = %aws_sdk_sqs::error::DisplayErrorContext(&e), "setting the deferred visibility failed; the queue's timeout applies");
                    }
                }
                Err(e) => tracing::warn!(error = %e, arn, "cannot resolve the queue URL"),
            }
        }
        Some(id)
    }

    async fn queue_url(&self, arn: &str) -> anyhow::Result<String> {
        if let Some(url) = self.queue_urls.lock().await.get(arn) {
            return Ok(url.clone());
        }
        // arn:aws:sqs:REGION:ACCOUNT:NAME
        let parts: Vec<&str> = arn.split(':').collect();
        let (Some(account), Some(name)) = (parts.get(4), parts.get(5)) else {
            anyhow::bail!("not an SQS queue ARN: {arn}");
        };
        let url = self
            .sqs
            .get_queue_url()
            .queue_name(*name)
            .queue_owner_aws_account_id(*account)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!(aws_sdk_sqs::error::DisplayErrorContext(e).to_string()))?
            .queue_url
            .ok_or_else(|| anyhow::anyhow!("no URL for queue {name}"))?;
        self.queue_urls
            .lock()
            .await
            .insert(arn.to_owned(), url.clone());
        Ok(url)
    }
}
