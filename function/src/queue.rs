//! The queue a worker polls: SQS, or an in-memory queue with SQS's semantics (visibility
//! timeouts, receive counts, receipt handles) for `pacer demo` and `pacer loadtest` runs
//! with nothing installed.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::Duration,
};

use async_trait::async_trait;
use aws_sdk_sqs::types::MessageSystemAttributeName;
use tokio::time::Instant;

use crate::outcome::{MAX_DELAY, MAX_MESSAGE_BYTES, MAX_VISIBILITY, visibility_secs};

/// One received message.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The queue's message id.
    pub message_id: String,
    /// The handle for this delivery (changes on every receive).
    pub receipt: String,
    /// The message body.
    pub body: String,
    /// How many times it has been received, this one included.
    pub receive_count: u32,
    /// When this delivery was received (SQS's 12-hour visibility cap counts from here).
    pub received_at: Instant,
}

/// A queue error (always retryable: the worker backs off and polls again). Keeps the SQS
/// SDK's error as its source, so the chain reaches the logs.
#[derive(Debug, thiserror::Error)]
#[error("queue: {message}")]
pub struct QueueError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl QueueError {
    /// An error Pacer itself detected.
    pub fn new(message: impl Into<String>) -> Self {
        QueueError {
            message: message.into(),
            source: None,
        }
    }

    /// An SQS call that failed, with the SDK's error (all its context in the message).
    pub fn sqs<E>(e: aws_sdk_sqs::error::SdkError<E>) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        QueueError {
            message: aws_sdk_sqs::error::DisplayErrorContext(&e).to_string(),
            source: Some(Box::new(e)),
        }
    }
}

/// What the worker needs of a queue.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Up to `max` messages (1 to 10), hidden for `visibility`; waits up to `wait` for one.
    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError>;
    /// Deletes a delivered message.
    async fn delete(&self, receipt: &str) -> Result<(), QueueError>;
    /// Hides a delivered message for `visibility` from now (0: visible at once).
    async fn change_visibility(
        &self,
        receipt: &str,
        visibility: Duration,
    ) -> Result<(), QueueError>;
    /// Sends a message, visible after `delay` (at most 15 minutes).
    async fn send_delayed(&self, body: &str, delay: Duration) -> Result<(), QueueError>;
    /// Sends a message, visible at once.
    async fn send(&self, body: &str) -> Result<(), QueueError> {
        self.send_delayed(body, Duration::ZERO).await
    }
}

/// An SQS queue (or moto's).
pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
    url: String,
}

impl SqsQueue {
    /// The queue at `url`.
    pub fn new(client: aws_sdk_sqs::Client, url: impl Into<String>) -> Self {
        Self {
            client,
            url: url.into(),
        }
    }
}

fn sqs_err<E>(e: aws_sdk_sqs::error::SdkError<E>) -> QueueError
where
    E: std::error::Error + Send + Sync + 'static,
{
    QueueError::sqs(e)
}

#[async_trait]
impl Queue for SqsQueue {
    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(wait.as_secs().min(20) as i32)
            .visibility_timeout(visibility_secs(visibility))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(sqs_err)?;
        let received_at = Instant::now();
        Ok(out
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                let receive_count = m
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(1);
                Some(Delivery {
                    message_id: m.message_id?,
                    receipt: m.receipt_handle?,
                    body: m.body.unwrap_or_default(),
                    receive_count,
                    received_at,
                })
            })
            .collect())
    }

    async fn delete(&self, receipt: &str) -> Result<(), QueueError> {
        self.client
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(sqs_err)?;
        Ok(())
    }

    async fn change_visibility(
        &self,
        receipt: &str,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(visibility_secs(visibility))
            .send()
            .await
            .map_err(sqs_err)?;
        Ok(())
    }

    async fn send_delayed(&self, body: &str, delay: Duration) -> Result<(), QueueError> {
        check_send(body, delay)?;
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .delay_seconds(delay.as_secs_f64().ceil() as i32)
            .send()
            .await
            .map_err(sqs_err)?;
        Ok(())
    }
}

/// SQS's limits on a send, checked before the call so both queues refuse alike.
fn check_send(body: &str, delay: Duration) -> Result<(), QueueError> {
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(QueueError::new(format!(
            "a message of {} bytes is over SQS's {MAX_MESSAGE_BYTES}",
            body.len()
        )));
    }
    if delay > MAX_DELAY {
        return Err(QueueError::new(format!(
            "a delay of {delay:?} is over SQS's {MAX_DELAY:?}"
        )));
    }
    Ok(())
}

/// An in-memory queue with SQS's delivery semantics and limits, on tokio's clock (so tests
/// can pause time): visibility timeouts of at most 12 hours from the receipt, receive
/// counts, receipt handles, delays of at most 15 minutes, 256 KiB bodies, and (with
/// [`MemoryQueue::with_max_receives`]) a redrive policy that moves a message received too
/// often to a dead-letter list. Visibility is exact to the millisecond rather than rounded
/// up to seconds.
#[derive(Default)]
pub struct MemoryQueue {
    state: Mutex<MemoryState>,
    arrived: tokio::sync::Notify,
    /// The redrive policy's `maxReceiveCount`, if any.
    max_receives: Option<u32>,
}

#[derive(Default)]
struct MemoryState {
    next_id: u64,
    /// Message id → message.
    messages: BTreeMap<u64, Stored>,
    /// Current receipt → message id.
    receipts: HashMap<String, u64>,
    /// Bodies moved out by the redrive policy.
    dead: Vec<String>,
}

struct Stored {
    body: String,
    visible_at: Instant,
    receive_count: u32,
    receipt: Option<String>,
    received_at: Instant,
}

impl MemoryQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty queue whose redrive policy dead-letters a message at its receive after
    /// the `max_receives`-th, as SQS's `maxReceiveCount` does.
    pub fn with_max_receives(max_receives: u32) -> Self {
        Self {
            max_receives: Some(max_receives.max(1)),
            ..Self::default()
        }
    }

    /// The bodies the redrive policy moved to the dead-letter list.
    pub fn dead_letters(&self) -> Vec<String> {
        self.lock().dead.clone()
    }

    /// Messages not yet deleted (visible or in flight).
    pub fn len(&self) -> usize {
        self.lock().messages.len()
    }

    /// Whether every message has been deleted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When the next hidden message becomes visible, if any is hidden.
    pub fn next_visible_at(&self) -> Option<Instant> {
        self.lock().messages.values().map(|m| m.visible_at).min()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_visible(&self, max: usize, visibility: Duration) -> Vec<Delivery> {
        let now = Instant::now();
        let mut st = self.lock();
        let ids: Vec<u64> = st
            .messages
            .iter()
            .filter(|(_, m)| m.visible_at <= now)
            .map(|(id, _)| *id)
            .take(max)
            .collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let exhausted = self
                .max_receives
                .is_some_and(|max| st.messages.get(&id).is_some_and(|m| m.receive_count >= max));
            if exhausted {
                if let Some(m) = st.messages.remove(&id) {
                    if let Some(r) = m.receipt {
                        st.receipts.remove(&r);
                    }
                    st.dead.push(m.body);
                }
                continue;
            }
            st.next_id += 1;
            let receipt = format!("{id}-{}", st.next_id);
            let old = st.messages.get_mut(&id).and_then(|m| {
                m.visible_at = now + visibility;
                m.receive_count += 1;
                m.received_at = now;
                m.receipt.replace(receipt.clone())
            });
            if let Some(old) = old {
                st.receipts.remove(&old);
            }
            st.receipts.insert(receipt.clone(), id);
            if let Some(m) = st.messages.get(&id) {
                out.push(Delivery {
                    message_id: id.to_string(),
                    receipt,
                    body: m.body.clone(),
                    receive_count: m.receive_count,
                    received_at: now,
                });
            }
        }
        out
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let deadline = Instant::now() + wait;
        loop {
            let got = self.take_visible(max.max(1), visibility);
            if !got.is_empty() || Instant::now() >= deadline {
                return Ok(got);
            }
            // Wake on a send, when a hidden message turns visible, or at the deadline.
            let until = self.next_visible_at().map_or(deadline, |t| t.min(deadline));
            let _ =
                tokio::time::timeout_at(until.max(Instant::now()), self.arrived.notified()).await;
        }
    }

    async fn delete(&self, receipt: &str) -> Result<(), QueueError> {
        let mut st = self.lock();
        // SQS accepts a stale receipt as long as the message exists; an unknown one is a no-op.
        if let Some(id) = st.receipts.remove(receipt) {
            st.messages.remove(&id);
        }
        Ok(())
    }

    async fn change_visibility(
        &self,
        receipt: &str,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        {
            let mut st = self.lock();
            let Some(id) = st.receipts.get(receipt).copied() else {
                return Err(QueueError::new(format!("receipt {receipt} is not current")));
            };
            if let Some(m) = st.messages.get_mut(&id) {
                let now = Instant::now();
                if now + visibility > m.received_at + MAX_VISIBILITY {
                    return Err(QueueError::new(format!(
                        "visibility {visibility:?} would end over 12 hours after the receipt \
                         (SQS refuses it)"
                    )));
                }
                m.visible_at = now + visibility;
            }
        }
        self.arrived.notify_waiters();
        Ok(())
    }

    async fn send_delayed(&self, body: &str, delay: Duration) -> Result<(), QueueError> {
        check_send(body, delay)?;
        {
            let mut st = self.lock();
            st.next_id += 1;
            let id = st.next_id;
            let now = Instant::now();
            st.messages.insert(
                id,
                Stored {
                    body: body.to_owned(),
                    visible_at: now + delay,
                    receive_count: 0,
                    receipt: None,
                    received_at: now,
                },
            );
        }
        self.arrived.notify_waiters();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn memory_queue_has_sqs_semantics() {
        let q = MemoryQueue::new();
        q.send("a").await.unwrap();
        let d = q
            .receive(10, Duration::from_secs(5), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!((d.len(), d[0].receive_count), (1, 1));
        // Hidden during its visibility timeout.
        assert!(
            q.receive(10, Duration::from_secs(5), Duration::ZERO)
                .await
                .unwrap()
                .is_empty()
        );
        // Deferred by 2 s: it comes back then, with a higher receive count.
        q.change_visibility(&d[0].receipt, Duration::from_secs(2))
            .await
            .unwrap();
        let again = q
            .receive(10, Duration::from_secs(5), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(again[0].receive_count, 2);
        // The old receipt no longer changes visibility; the new one deletes it.
        assert!(
            q.change_visibility(&d[0].receipt, Duration::ZERO)
                .await
                .is_err()
        );
        q.delete(&again[0].receipt).await.unwrap();
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn memory_queue_has_sqs_limits() {
        let q = MemoryQueue::with_max_receives(2);
        let h = Duration::from_secs(3600);
        // Delays of at most 15 minutes, bodies of at most 256 KiB.
        assert!(
            q.send_delayed("late", Duration::from_secs(901))
                .await
                .is_err()
        );
        assert!(q.send(&"x".repeat(MAX_MESSAGE_BYTES + 1)).await.is_err());
        q.send_delayed("a", Duration::from_secs(60)).await.unwrap();
        assert!(q.receive(10, h, Duration::ZERO).await.unwrap().is_empty());
        tokio::time::advance(Duration::from_secs(60)).await;
        let d = q.receive(10, h, Duration::ZERO).await.unwrap();
        // Visibility ends at most 12 hours after the receipt.
        tokio::time::advance(h).await;
        assert!(
            q.change_visibility(&d[0].receipt, 11 * h + Duration::from_secs(1))
                .await
                .is_err()
        );
        q.change_visibility(&d[0].receipt, Duration::ZERO)
            .await
            .unwrap();
        // The second receive is the last; the third dead-letters it.
        let d = q.receive(10, h, Duration::ZERO).await.unwrap();
        assert_eq!(d[0].receive_count, 2);
        q.change_visibility(&d[0].receipt, Duration::ZERO)
            .await
            .unwrap();
        assert!(q.receive(10, h, Duration::ZERO).await.unwrap().is_empty());
        assert_eq!(q.dead_letters(), vec!["a".to_owned()]);
        assert!(q.is_empty());
    }
}
