//! The fleet's own record of its provider calls: every call logged as it leaves and as it
//! ends (a call whose future is dropped, by the handler's timeout or an aborted replica, is
//! logged as cut off), and deferrals counted.
use super::*;

/// Calls that left a replica as the rest of the run should know them. In a replica process
/// every call is also streamed to the parent as it leaves and as it ends (one JSON line on
/// stdout each), so a replica killed mid-call still leaves a record of what it sent.
#[derive(Clone, Default)]
pub(super) struct CallLog {
    pub(super) calls: Arc<Mutex<Vec<Call>>>,
    pub(super) stream: bool,
}

impl CallLog {
    pub(super) fn streaming() -> CallLog {
        CallLog {
            stream: true,
            ..CallLog::default()
        }
    }

    pub(super) fn emit(line: &ChildLine) {
        if let Ok(text) = serde_json::to_string(line) {
            println!("{text}");
        }
    }

    pub(super) fn sent(&self, call: &Call) {
        if self.stream {
            CallLog::emit(&ChildLine::Sent(call.clone()));
        }
    }

    pub(super) fn record(&self, call: Call) {
        if self.stream {
            CallLog::emit(&ChildLine::Call(call.clone()));
        }
        lock(&self.calls).push(call);
    }

    pub(super) fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *lock(&self.calls))
    }
}

/// The result of a call whose answer the replica never read: its future was dropped (the
/// handler's request timeout, an aborted replica). The provider may have counted it.
pub(super) const CUT_OFF: &str = "cut_off";
/// The result of a call that left a replica process killed before it ended.
pub(super) const KILLED: &str = "killed";

pub(super) fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

pub(super) use pacer_core::sync::lock;

/// A provider that records every call (the request id is the prompt's first word).
pub(super) struct Recorded {
    pub(super) inner: Arc<dyn ImageProvider>,
    pub(super) replica: usize,
    pub(super) log: CallLog,
}

/// A call in flight: logged as cut off if its future is dropped before the answer.
pub(super) struct InFlight {
    pub(super) log: CallLog,
    call: Option<Call>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(mut call) = self.call.take() {
            call.took_ms = (now_ms() - call.start_ms).max(0) as u64;
            call.result = CUT_OFF.to_owned();
            self.log.record(call);
        }
    }
}

#[async_trait]
impl ImageProvider for Recorded {
    async fn generate(
        &self,
        model: &str,
        req: &ImageRequest,
    ) -> pacer_core::provider::Result<ImageResponse> {
        let call = Call {
            replica: self.replica,
            model: model.to_owned(),
            request: req
                .prompt
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
            start_ms: now_ms(),
            took_ms: 0,
            result: String::new(),
        };
        self.log.sent(&call);
        let mut in_flight = InFlight {
            log: self.log.clone(),
            call: Some(call),
        };
        let result = self.inner.generate(model, req).await;
        if let Some(mut call) = in_flight.call.take() {
            call.took_ms = (now_ms() - call.start_ms).max(0) as u64;
            call.result = match &result {
                Ok(_) => "ok".to_owned(),
                Err(e) => e.metric_label().to_owned(),
            };
            self.log.record(call);
        }
        result
    }
}

/// Counts deferrals (streamed to the parent from a replica process).
pub(super) struct Counting {
    pub(super) inner: Arc<dyn Process>,
    pub(super) deferred: Arc<AtomicU64>,
    /// Deliveries handled (each one a receive from the queue).
    pub(super) received: Arc<AtomicU64>,
    pub(super) stream: bool,
}

#[async_trait]
impl Process for Counting {
    async fn process(&self, body: &str, attempt: Attempt) -> Outcome {
        self.received.fetch_add(1, Ordering::Relaxed);
        let outcome = self.inner.process(body, attempt).await;
        if !outcome.is_final() {
            self.deferred.fetch_add(1, Ordering::Relaxed);
            if self.stream {
                CallLog::emit(&ChildLine::Deferred);
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider that answers after a while.
    struct Slow(Duration);

    #[async_trait]
    impl ImageProvider for Slow {
        async fn generate(
            &self,
            _model: &str,
            _req: &ImageRequest,
        ) -> pacer_core::provider::Result<ImageResponse> {
            tokio::time::sleep(self.0).await;
            Err(ProviderError::Overloaded {
                message: "slow".into(),
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_cut_off_by_a_timeout_is_logged() {
        let log = CallLog::default();
        let provider = Recorded {
            inner: Arc::new(Slow(Duration::from_secs(10))),
            replica: 3,
            log: log.clone(),
        };
        let req = ImageRequest::new("req-1 a fox");
        let cut = tokio::time::timeout(Duration::from_secs(1), provider.generate("m", &req)).await;
        assert!(cut.is_err(), "the timeout fired");
        let answered = provider.generate("m", &req).await;
        assert!(answered.is_err());
        let calls = log.take();
        let results: Vec<(&str, &str, usize)> = calls
            .iter()
            .map(|c| (c.request.as_str(), c.result.as_str(), c.replica))
            .collect();
        assert_eq!(
            results,
            [("req-1", CUT_OFF, 3), ("req-1", "overloaded", 3)],
            "{calls:?}"
        );
    }
}
