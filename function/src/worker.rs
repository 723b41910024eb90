//! The worker loop (`pacer worker` on SQS; `pacer demo` and `pacer loadtest` on either
//! queue): polls a queue and processes many messages at once.
//!
//! Each message is held only as long as it is being worked on: its visibility is extended
//! while it runs, it is deleted only after its result is stored, and a deferred message
//! gets a visibility timeout equal to its booked wait, so it comes back exactly when it
//! can run, with no busy retry. On shutdown the worker stops receiving, lets what is in
//! flight finish for a grace period, and makes whatever is left visible again at once.
use pacer_core::sync::lock;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::{Metrics, OutcomeLabels, ReasonLabels},
    outcome::{Attempt, DEAD_LETTER_HIDE, Outcome, Process, Requeue, RequeuePolicy},
    queue::{Delivery, Queue, QueueError},
};

/// How the worker polls and holds messages.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Messages processed at once (image calls take seconds: hundreds is normal).
    pub concurrency: usize,
    /// The visibility timeout given on receive and renewed while a message runs.
    pub visibility: Duration,
    /// Long-poll wait per receive call (0 to 20 s).
    pub wait_time: Duration,
    /// How long in-flight messages may finish after shutdown before they are released.
    pub shutdown_grace: Duration,
    /// How deferrals go back to the queue (hidden, or re-sent once received often).
    pub requeue: RequeuePolicy,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            concurrency: 256,
            visibility: Duration::from_secs(60),
            wait_time: Duration::from_secs(20),
            shutdown_grace: Duration::from_secs(30),
            requeue: RequeuePolicy::default(),
        }
    }
}

/// Polls `queue` and processes messages with `processor` until `shutdown` is cancelled;
/// then drains as described in the module docs.
pub async fn run(
    queue: Arc<dyn Queue>,
    options: WorkerOptions,
    processor: Arc<dyn Process>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), QueueError> {
    let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
    // Receipts of messages in flight, so shutdown can release them.
    let in_flight: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let mut failures = 0u32;

    while !shutdown.is_cancelled() {
        // Never hold more messages than can be worked on: take permits before receiving.
        let want = permits.available_permits().clamp(1, 10);
        let mut held = tokio::select! {
            // The semaphore is never closed.
            p = permits.clone().acquire_many_owned(want as u32) => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let received = tokio::select! {
            r = queue.receive(want, options.visibility, options.wait_time) => r,
            _ = shutdown.cancelled() => break,
        };
        let deliveries = match received {
            Ok(d) => {
                failures = 0;
                d
            }
            Err(e) => {
                failures += 1;
                let backoff = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                tracing::warn!(error = %e, ?backoff, "receive failed");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        for delivery in deliveries {
            let Some(permit) = held.split(1) else { break };
            lock(&in_flight).insert(delivery.message_id.clone(), delivery.receipt.clone());
            let ctx = Context {
                queue: queue.clone(),
                options: options.clone(),
                processor: processor.clone(),
                metrics: metrics.clone(),
            };
            let in_flight = in_flight.clone();
            tasks.spawn(async move {
                let id = delivery.message_id.clone();
                ctx.handle(delivery).await;
                lock(&in_flight).remove(&id);
                drop(permit);
            });
        }
        // Reap finished tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
    }

    metrics.healthy.store(false, Ordering::Relaxed);
    tracing::info!(in_flight = tasks.len(), grace = ?options.shutdown_grace, "draining");
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
            let _ = queue.change_visibility(&receipt, Duration::ZERO).await;
        }
    }
    Ok(())
}

struct Context {
    queue: Arc<dyn Queue>,
    options: WorkerOptions,
    processor: Arc<dyn Process>,
    metrics: Arc<Metrics>,
}

impl Context {
    async fn handle(&self, delivery: Delivery) {
        self.metrics.in_flight.inc();
        // Keep the message hidden while it runs: renew at half the visibility timeout.
        let keepalive = {
            let queue = self.queue.clone();
            let receipt = delivery.receipt.clone();
            let vis = self.options.visibility;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(vis / 2).await;
                    if let Err(e) = queue.change_visibility(&receipt, vis).await {
                        tracing::warn!(error = %e, "extending visibility failed");
                    }
                }
            })
        };
        let outcome = self
            .processor
            .process(&delivery.body, Attempt::received(delivery.receive_count))
            .await;
        keepalive.abort();
        self.metrics.in_flight.dec();
        self.metrics
            .messages
            .get_or_create(&OutcomeLabels {
                outcome: outcome.label(),
            })
            .inc();
        let result = match &outcome {
            Outcome::Defer { after, reason } => {
                self.metrics
                    .deferred
                    .get_or_create(&ReasonLabels {
                        reason: reason.label(),
                    })
                    .inc();
                self.requeue(&delivery, *after).await
            }
            Outcome::DeadLetter { reason } => {
                tracing::warn!(
                    reason,
                    receive_count = delivery.receive_count,
                    "a message that is not a request, with no id: left for the dead-letter queue"
                );
                self.queue
                    .change_visibility(&delivery.receipt, DEAD_LETTER_HIDE)
                    .await
            }
            _ => self.queue.delete(&delivery.receipt).await,
        };
        if let Err(e) = result {
            // The message comes back after its visibility timeout; its record makes the
            // redelivery a cheap acknowledgement.
            tracing::warn!(error = %e, outcome = outcome.label(), "queue action failed");
        }
    }

    /// Puts a deferred delivery back to return after `after` (see [`RequeuePolicy`]). A
    /// failed re-send falls back to hiding this delivery.
    async fn requeue(&self, delivery: &Delivery, after: Duration) -> Result<(), QueueError> {
        let held = delivery.received_at.elapsed();
        let policy = self.options.requeue;
        match policy.requeue(after, delivery.receive_count, held) {
            Requeue::Hide(visibility) => {
                self.queue
                    .change_visibility(&delivery.receipt, visibility)
                    .await
            }
            Requeue::Resend(delay) => match self.queue.send_delayed(&delivery.body, delay).await {
                Ok(()) => {
                    self.metrics.resent.inc();
                    self.queue.delete(&delivery.receipt).await
                }
                Err(e) => {
                    tracing::warn!(error = %e, "re-sending a deferred message failed; hiding it");
                    self.queue
                        .change_visibility(&delivery.receipt, policy.hide_for(after, held))
                        .await
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{outcome::DeferReason, queue::MemoryQueue, record::ResultRecord};
    use async_trait::async_trait;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicU32;

    /// Defers each message once by 3 s, then fails it (so it is deleted).
    struct DeferOnce(AtomicU32);

    #[async_trait]
    impl Process for DeferOnce {
        async fn process(&self, body: &str, attempt: Attempt) -> Outcome {
            self.0.fetch_add(1, Ordering::Relaxed);
            let receive_count = attempt.receive_count;
            if receive_count == 1 {
                Outcome::Defer {
                    after: Duration::from_secs(3),
                    reason: DeferReason::Capacity,
                }
            } else {
                Outcome::Failed(ResultRecord::failed(body, receive_count, "test"))
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deferred_messages_return_after_their_wait_and_finish() {
        let queue = Arc::new(MemoryQueue::new());
        for i in 0..25 {
            queue.send(&format!("m{i}")).await.unwrap();
        }
        let processor = Arc::new(DeferOnce(AtomicU32::new(0)));
        let shutdown = CancellationToken::new();
        let opts = WorkerOptions {
            concurrency: 4,
            wait_time: Duration::from_millis(100),
            ..Default::default()
        };
        let start = tokio::time::Instant::now();
        let worker = tokio::spawn(run(
            queue.clone(),
            opts,
            processor.clone(),
            Arc::default(),
            shutdown.clone(),
        ));
        while !queue.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = start.elapsed();
        shutdown.cancel();
        worker.await.unwrap().unwrap();
        assert_eq!(
            processor.0.load(Ordering::Relaxed),
            50,
            "each message processed exactly twice"
        );
        assert!(
            took >= Duration::from_secs(3),
            "a deferred message came back early: {took:?}"
        );
        assert!(
            took < Duration::from_secs(4),
            "deferred messages came back late: {took:?}"
        );
    }

    /// Defers each message `times` times by `after`, then finishes it; counts deliveries.
    struct DeferTimes {
        times: u32,
        after: Duration,
        seen: Mutex<HashMap<String, u32>>,
    }

    #[async_trait]
    impl Process for DeferTimes {
        async fn process(&self, body: &str, _attempt: Attempt) -> Outcome {
            let n = {
                let mut seen = lock(&self.seen);
                let n = seen.entry(body.to_owned()).or_default();
                *n += 1;
                *n
            };
            if n <= self.times {
                Outcome::Defer {
                    after: self.after,
                    reason: DeferReason::Capacity,
                }
            } else {
                Outcome::AlreadyDone(ResultRecord::failed(body, n, "done"))
            }
        }
    }

    /// Runs a worker until the queue is empty, looking every `poll` (long waits want a
    /// long poll: the clock is paused, but each poll is a real loop turn).
    async fn run_until_empty(
        queue: Arc<MemoryQueue>,
        processor: Arc<dyn Process>,
        poll: Duration,
    ) -> Arc<Metrics> {
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let opts = WorkerOptions {
            concurrency: 8,
            wait_time: poll,
            ..Default::default()
        };
        let worker = tokio::spawn(run(
            queue.clone(),
            opts,
            processor,
            metrics.clone(),
            shutdown.clone(),
        ));
        while !queue.is_empty() {
            tokio::time::sleep(poll).await;
        }
        shutdown.cancel();
        worker.await.unwrap().unwrap();
        metrics
    }

    /// A backlog deferred 30 times each on a queue whose redrive policy dead-letters at the
    /// 20th receive (the chart's): every message is re-sent before that, none dead-lettered.
    #[tokio::test(start_paused = true)]
    async fn deferrals_never_walk_a_message_into_the_dead_letter_queue() {
        let queue = Arc::new(MemoryQueue::with_max_receives(20));
        for i in 0..10 {
            queue.send(&format!("m{i}")).await.unwrap();
        }
        let processor = Arc::new(DeferTimes {
            times: 30,
            after: Duration::from_secs(2),
            seen: Mutex::default(),
        });
        let metrics =
            run_until_empty(queue.clone(), processor.clone(), Duration::from_millis(100)).await;
        assert!(
            queue.dead_letters().is_empty(),
            "{:?}",
            queue.dead_letters()
        );
        assert!(lock(&processor.seen).values().all(|n| *n == 31));
        // Each copy is hidden at its receives 1 to 9 and re-sent at its 10th: 30
        // deferrals take three copies.
        assert_eq!(metrics.resent.get(), 30);
    }

    /// A body that is not a request and has no id is kept for a person: hidden at each
    /// receive, never deleted or re-sent, until the redrive policy dead-letters it (the
    /// requests around it finish).
    #[tokio::test(start_paused = true)]
    async fn a_message_without_an_id_is_dead_lettered_with_its_body() {
        struct Rejects;
        #[async_trait]
        impl Process for Rejects {
            async fn process(&self, body: &str, _attempt: Attempt) -> Outcome {
                if body.starts_with('{') {
                    Outcome::AlreadyDone(ResultRecord::failed(body, 0, "done"))
                } else {
                    Outcome::DeadLetter {
                        reason: "not JSON".into(),
                    }
                }
            }
        }
        let queue = Arc::new(MemoryQueue::with_max_receives(11));
        queue.send("{\"id\": \"ok\"}").await.unwrap();
        queue.send("<xml/>").await.unwrap();
        let metrics =
            run_until_empty(queue.clone(), Arc::new(Rejects), Duration::from_secs(1)).await;
        assert_eq!(queue.dead_letters(), vec!["<xml/>".to_owned()]);
        assert_eq!(metrics.resent.get(), 0);
    }

    /// A wait to Pacific midnight (20 h) on SQS's 12-hour visibility cap: the message
    /// comes back once at the cap and once at its time (no refused visibility change, no
    /// return within a minute).
    #[tokio::test(start_paused = true)]
    async fn a_wait_past_the_visibility_cap_costs_one_extra_receive() {
        let queue = Arc::new(MemoryQueue::with_max_receives(20));
        queue.send("day").await.unwrap();
        let until = tokio::time::Instant::now() + Duration::from_secs(20 * 3600);
        struct UntilMidnight(tokio::time::Instant, AtomicU32);
        #[async_trait]
        impl Process for UntilMidnight {
            async fn process(&self, body: &str, _attempt: Attempt) -> Outcome {
                self.1.fetch_add(1, Ordering::Relaxed);
                let now = tokio::time::Instant::now();
                if now >= self.0 {
                    return Outcome::AlreadyDone(ResultRecord::failed(body, 0, "done"));
                }
                Outcome::Defer {
                    after: self.0 - now,
                    reason: DeferReason::RateLimited,
                }
            }
        }
        let processor = Arc::new(UntilMidnight(until, AtomicU32::new(0)));
        run_until_empty(queue.clone(), processor.clone(), Duration::from_secs(20)).await;
        assert_eq!(processor.1.load(Ordering::Relaxed), 3);
        assert!(tokio::time::Instant::now() >= until);
        assert!(queue.dead_letters().is_empty());
    }
}
