//! The SQS worker (`pacer worker`): long-polls a queue and processes many messages at once.
//!
//! Each message is held only as long as it is being worked on: its visibility is extended
//! while it runs, it is deleted only after its result is stored, and a deferred message
//! gets a visibility timeout equal to its booked wait, so it comes back exactly when it
//! can run, with no busy retry. On SIGTERM the worker stops receiving, lets what is in
//! flight finish for a grace period, and makes whatever is left visible again at once.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::{Metrics, OutcomeLabels, ReasonLabels},
    outcome::{Outcome, Process, visibility_secs},
};

/// How the worker polls and holds messages.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The queue to poll.
    pub queue_url: String,
    /// Messages processed at once (image calls take seconds: hundreds is normal).
    pub concurrency: usize,
    /// The visibility timeout given on receive and renewed while a message runs.
    pub visibility: Duration,
    /// Long-poll wait per receive call (0 to 20 s).
    pub wait_time: Duration,
    /// How long in-flight messages may finish after SIGTERM before they are released.
    pub shutdown_grace: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            queue_url: String::new(),
            concurrency: 256,
            visibility: Duration::from_secs(60),
            wait_time: Duration::from_secs(20),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Polls `options.queue_url` and processes messages with `processor` until `shutdown` is
/// cancelled; then drains as described in the module docs.
pub async fn run(
    sqs: aws_sdk_sqs::Client,
    options: WorkerOptions,
    processor: Arc<dyn Process>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
    // Receipt handles of messages in flight, so shutdown can release them.
    let in_flight: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let mut failures = 0u32;

    while !shutdown.is_cancelled() {
        // Never hold more messages than can be worked on: take permits before receiving.
        let want = permits.available_permits().clamp(1, 10);
        let held = tokio::select! {
            p = permits.clone().acquire_many_owned(want as u32) => p?,
            _ = shutdown.cancelled() => break,
        };
        let received = tokio::select! {
            r = sqs
                .receive_message()
                .queue_url(&options.queue_url)
                .max_number_of_messages(want as i32)
                .wait_time_seconds(options.wait_time.as_secs().min(20) as i32)
                .visibility_timeout(visibility_secs(options.visibility))
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .send() => r,
            _ = shutdown.cancelled() => break,
        };
        let messages = match received {
            Ok(out) => {
                failures = 0;
                out.messages.unwrap_or_default()
            }
            Err(e) => {
                failures += 1;
                let backoff = Duration::from_millis(200 * 2u64.pow(failures.min(6)));
                tracing::warn!(error = %aws_sdk_sqs::error::DisplayErrorContext(&e), ?backoff, "receive failed");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let mut held = held;
        for message in messages {
            let Some(permit) = held.split(1) else { break };
            let (Some(receipt), Some(id)) =
                (message.receipt_handle.clone(), message.message_id.clone())
            else {
                continue;
            };
            lock(&in_flight).insert(id.clone(), receipt.clone());
            let ctx = Delivery {
                sqs: sqs.clone(),
                options: options.clone(),
                processor: processor.clone(),
                metrics: metrics.clone(),
            };
            let in_flight = in_flight.clone();
            tasks.spawn(async move {
                ctx.handle(message, receipt).await;
                lock(&in_flight).remove(&id);
                drop(permit);
            });
        }
        // Reap finished tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
    }

    metrics.healthy.store(false, Ordering::Relaxed);
    let left = tasks.len();
    tracing::info!(in_flight = left, grace = ?options.shutdown_grace, "shutting down: draining");
    let drained = tokio::time::timeout(options.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
        let receipts: Vec<String> = lock(&in_flight).drain().map(|(_, r)| r).collect();
        tracing::warn!(
            released = receipts.len(),
            "grace period over: releasing unfinished messages"
        );
        for receipt in receipts {
            let _ = sqs
                .change_message_visibility()
                .queue_url(&options.queue_url)
                .receipt_handle(receipt)
                .visibility_timeout(0)
                .send()
                .await;
        }
    }
    Ok(())
}

struct Delivery {
    sqs: aws_sdk_sqs::Client,
    options: WorkerOptions,
    processor: Arc<dyn Process>,
    metrics: Arc<Metrics>,
}

impl Delivery {
    async fn handle(&self, message: Message, receipt: String) {
        let body = message.body.clone().unwrap_or_default();
        let receive_count = message
            .attributes
            .as_ref()
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|c| c.parse().ok())
            .unwrap_or(1);
        self.metrics.in_flight.inc();
        // Keep the message hidden while it runs: renew at half the visibility timeout.
        let keepalive = {
            let sqs = self.sqs.clone();
            let queue = self.options.queue_url.clone();
            let receipt = receipt.clone();
            let vis = self.options.visibility;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(vis / 2).await;
                    let r = sqs
                        .change_message_visibility()
                        .queue_url(&queue)
                        .receipt_handle(&receipt)
                        .visibility_timeout(visibility_secs(vis))
                        .send()
                        .await;
                    if let Err(e) = r {
                        tracing::warn!(error = %aws_sdk_sqs::error::DisplayErrorContext(&e), "extending visibility failed");
                    }
                }
            })
        };
        let outcome = self.processor.process(&body, receive_count).await;
        keepalive.abort();
        self.metrics.in_flight.dec();
        self.metrics
            .messages
            .get_or_create(&OutcomeLabels {
                outcome: outcome.label(),
            })
            .inc();
        let queue = &self.options.queue_url;
        let result = match &outcome {
            Outcome::Defer { after, reason } => {
                self.metrics
                    .deferred
                    .get_or_create(&ReasonLabels {
                        reason: reason.label(),
                    })
                    .inc();
                self.sqs
                    .change_message_visibility()
                    .queue_url(queue)
                    .receipt_handle(&receipt)
                    .visibility_timeout(visibility_secs(*after))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| aws_sdk_sqs::error::DisplayErrorContext(e).to_string())
            }
            _ => self
                .sqs
                .delete_message()
                .queue_url(queue)
                .receipt_handle(&receipt)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| aws_sdk_sqs::error::DisplayErrorContext(e).to_string()),
        };
        if let Err(e) = result {
            // The message comes back after its visibility timeout; its record makes the
            // redelivery a cheap acknowledgement.
            tracing::warn!(error = %e, outcome = outcome.label(), "queue action failed");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
