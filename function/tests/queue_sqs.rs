//! The queue contract on moto's SQS: delayed sends, and deferrals that never walk a message
//! into the dead-letter queue (the same contract `MemoryQueue` models for the fast tests).
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use aws_sdk_sqs::types::QueueAttributeName;
use pacer_function::{
    metrics::Metrics,
    outcome::{Attempt, DeferReason, Outcome, Process, RequeuePolicy},
    queue::{Queue, SqsQueue},
    record::ResultRecord,
    worker::{self, WorkerOptions},
};
use pacer_tests::Rig;
use tokio_util::sync::CancellationToken;

/// Defers every message `times` times by 1 s, then finishes it.
struct DeferTimes {
    times: u32,
    seen: Mutex<HashMap<String, u32>>,
}

#[async_trait]
impl Process for DeferTimes {
    async fn process(&self, body: &str, _attempt: Attempt) -> Outcome {
        let n = {
            let mut seen = self.seen.lock().expect("lock");
            let n = seen.entry(body.to_owned()).or_default();
            *n += 1;
            *n
        };
        if n <= self.times {
            Outcome::Defer {
                after: Duration::from_secs(1),
                reason: DeferReason::Capacity,
            }
        } else {
            Outcome::AlreadyDone(ResultRecord::failed(body, n, "done"))
        }
    }
}

async fn attribute(rig: &Rig, url: &str, name: QueueAttributeName) -> String {
    rig.sqs()
        .await
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(name.clone())
        .send()
        .await
        .expect("queue attributes")
        .attributes
        .and_then(|a| a.get(&name).cloned())
        .unwrap_or_default()
}

/// A queue whose redrive policy dead-letters at the 3rd receive; every message is deferred
/// 5 times. Re-sent from its 2nd receive on, none reaches the dead-letter queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferrals_never_dead_letter_on_sqs() {
    let rig = Rig::load();
    let sqs = rig.sqs().await;
    let ns = Rig::unique("redrive");
    let dlq_url = rig.create_queue(&format!("{ns}-dlq")).await;
    let dlq_arn = attribute(&rig, &dlq_url, QueueAttributeName::QueueArn).await;
    let url = rig.create_queue(&ns).await;
    sqs.set_queue_attributes()
        .queue_url(&url)
        .attributes(
            QueueAttributeName::RedrivePolicy,
            serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 3}).to_string(),
        )
        .send()
        .await
        .expect("redrive policy");
    let queue = Arc::new(SqsQueue::new(sqs.clone(), url.clone()));
    // A delayed send is not visible before its delay.
    queue
        .send_delayed("m-delayed", Duration::from_secs(2))
        .await
        .expect("send delayed");
    let early = queue
        .receive(10, Duration::from_secs(30), Duration::ZERO)
        .await
        .expect("receive");
    assert!(early.is_empty(), "visible before its delay: {early:?}");
    for i in 0..4 {
        queue.send(&format!("m{i}")).await.expect("send");
    }
    let processor = Arc::new(DeferTimes {
        times: 5,
        seen: Mutex::default(),
    });
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    let options = WorkerOptions {
        concurrency: 8,
        visibility: Duration::from_secs(30),
        wait_time: Duration::from_secs(1),
        requeue: RequeuePolicy {
            resend_from_receive: 2,
            ..RequeuePolicy::default()
        },
        ..WorkerOptions::default()
    };
    let run = tokio::spawn(worker::run(
        queue.clone(),
        options,
        processor.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    // Done when every message was delivered 6 times (5 deferrals, then finished).
    let started = std::time::Instant::now();
    loop {
        let done = {
            let seen = processor.seen.lock().expect("lock");
            seen.len() == 5 && seen.values().all(|n| *n >= 6)
        };
        if done {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not finished within 120 s: {:?}",
            processor.seen.lock().expect("lock")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.cancel();
    run.await.expect("worker").expect("worker run");
    let seen = processor.seen.lock().expect("lock").clone();
    assert!(
        seen.values().all(|n| *n == 6),
        "each delivered 6 times: {seen:?}"
    );
    assert!(metrics.resent.get() > 0, "deferrals were re-sent");
    let dead = attribute(
        &rig,
        &dlq_url,
        QueueAttributeName::ApproximateNumberOfMessages,
    )
    .await;
    assert_eq!(dead, "0", "nothing in the dead-letter queue");
}
