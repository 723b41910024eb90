//! `pacer loadtest --fault`: faults injected into a run, each either a property of the
//! simulated provider (a probability per request) or an event at a time into the run.
use std::{
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use pacer_simulator::{Faults, config::Schedule};

use pacer_function::sink::{Sink, SinkError, Stored};

/// One `--fault`.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// `redis-restart@10s`: FLUSHALL on the limiter's Redis at 10 s (limiter state, config,
    /// records all gone, as after a restart without persistence), then the run's config is
    /// written again as `pacer apply` would.
    RedisRestart { at: Duration },
    /// `sink-fail=5`: the first 5 image writes fail (with `--processes`, split across the
    /// replica processes).
    SinkFail { writes: u64 },
    /// `kill-replica@8s`: at 8 s one replica dies mid-work (`--processes`: SIGKILL of a
    /// child; otherwise its worker task is aborted, in-flight calls cut off).
    KillReplica { at: Duration },
    /// `503=0.35`: the simulator answers 35 % of calls 503 "model is overloaded".
    Overload(f64),
    /// `500=P`: 500 INTERNAL with probability P.
    ServerError(f64),
    /// `504=P`: 504 DEADLINE_EXCEEDED with probability P.
    GatewayTimeout(f64),
    /// `429=P`: bare ("ghost") 429s with no details, even under quota.
    Ghost429(f64),
    /// `reset=P`: the connection breaks mid-answer after the call was counted.
    Reset(f64),
    /// `slow=P:MS`: with probability P the answer takes MS ms longer (past the chain's
    /// request timeout, it is a call the provider counted and the client gave up on).
    Slow(f64, u64),
    /// `503-burst=EVERY:LENGTH` (seconds): every EVERY s, answer 503 for LENGTH s.
    OverloadBurst(Schedule),
    /// `limit@15s=10`: at 15 s the binding limit (the chain's first model, its rpm or ipm)
    /// becomes 10, written to Redis as `pacer apply` writes it. The simulator's own limit
    /// is the higher of the two all run long; the run is judged by the simulator's arrival
    /// times: no window starting 2 s after the change may hold more than the new limit.
    Limit { at: Duration, to: u64 },
}

/// How `--fault` values are written, for error messages and the flag's help.
pub const SYNTAX: &str = "redis-restart@SECS, sink-fail=N, kill-replica@SECS, limit@SECS=N, \
                          503=P, 500=P, 504=P, 429=P, reset=P, slow=P:MS, 503-burst=EVERY:LENGTH";

fn secs(s: &str) -> Option<Duration> {
    let s = s.trim();
    let v: f64 = s.strip_suffix('s').unwrap_or(s).parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| Duration::from_secs_f64(v))
}

fn probability(s: &str) -> Option<f64> {
    let p: f64 = s.trim().parse().ok()?;
    (0.0..=1.0).contains(&p).then_some(p)
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Fault, String> {
        let bad = || format!("--fault {s:?}: expected one of {SYNTAX}");
        let s = s.trim();
        if let Some((name, at)) = s.split_once('@') {
            if name == "limit" {
                let (at, to) = at.split_once('=').ok_or_else(bad)?;
                return Ok(Fault::Limit {
                    at: secs(at).ok_or_else(bad)?,
                    to: to.trim().parse().map_err(|_| bad())?,
                });
            }
            let at = secs(at).ok_or_else(bad)?;
            return match name {
                "redis-restart" => Ok(Fault::RedisRestart { at }),
                "kill-replica" => Ok(Fault::KillReplica { at }),
                _ => Err(bad()),
            };
        }
        let (name, value) = s.split_once('=').ok_or_else(bad)?;
        let p = || probability(value).ok_or_else(bad);
        match name {
            "sink-fail" => Ok(Fault::SinkFail {
                writes: value.trim().parse().map_err(|_| bad())?,
            }),
            "503" => Ok(Fault::Overload(p()?)),
            "500" => Ok(Fault::ServerError(p()?)),
            "504" => Ok(Fault::GatewayTimeout(p()?)),
            "429" => Ok(Fault::Ghost429(p()?)),
            "reset" => Ok(Fault::Reset(p()?)),
            "slow" => {
                let (pr, ms) = value.split_once(':').ok_or_else(bad)?;
                Ok(Fault::Slow(
                    probability(pr).ok_or_else(bad)?,
                    ms.trim().parse().map_err(|_| bad())?,
                ))
            }
            "503-burst" => Ok(Fault::OverloadBurst(value.parse().map_err(|_| bad())?)),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::RedisRestart { at } => write!(f, "redis-restart@{}s", at.as_secs_f64()),
            Fault::SinkFail { writes } => write!(f, "sink-fail={writes}"),
            Fault::KillReplica { at } => write!(f, "kill-replica@{}s", at.as_secs_f64()),
            Fault::Limit { at, to } => write!(f, "limit@{}s={to}", at.as_secs_f64()),
            Fault::Overload(p) => write!(f, "503={p}"),
            Fault::ServerError(p) => write!(f, "500={p}"),
            Fault::GatewayTimeout(p) => write!(f, "504={p}"),
            Fault::Ghost429(p) => write!(f, "429={p}"),
            Fault::Reset(p) => write!(f, "reset={p}"),
            Fault::Slow(p, ms) => write!(f, "slow={p}:{ms}"),
            Fault::OverloadBurst(s) => write!(
                f,
                "503-burst={}:{}",
                s.every.as_secs_f64(),
                s.length.as_secs_f64()
            ),
        }
    }
}

/// The simulator's faults for a run: the probability flags, then every `--fault` on top.
pub fn simulator_faults(base: Faults, faults: &[Fault]) -> Faults {
    let mut f = base;
    for fault in faults {
        match *fault {
            Fault::Overload(p) => f.overload = p,
            Fault::ServerError(p) => f.server_error = p,
            Fault::GatewayTimeout(p) => f.gateway_timeout = p,
            Fault::Ghost429(p) => f.ghost_429 = p,
            Fault::Reset(p) => f.reset = p,
            Fault::Slow(p, ms) => (f.slow, f.slow_ms) = (p, ms),
            Fault::OverloadBurst(s) => f.overload_burst = Some(s),
            Fault::RedisRestart { .. }
            | Fault::SinkFail { .. }
            | Fault::KillReplica { .. }
            | Fault::Limit { .. } => {}
        }
    }
    f
}

/// Sink writes to fail in all, from `sink-fail=N` flags.
pub fn sink_failures(faults: &[Fault]) -> u64 {
    faults
        .iter()
        .map(|f| match f {
            Fault::SinkFail { writes } => *writes,
            _ => 0,
        })
        .sum()
}

/// A sink whose first writes fail (a missing bucket, a denying policy), then recovers.
/// Also counts writes per key, so a request stored twice shows.
/// In a replica process every write and failure also streams to the parent (a killed
/// replica's too).
pub struct FailingSink {
    pub inner: Arc<dyn Sink>,
    pub remaining: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub writes: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
    pub stream: bool,
}

impl FailingSink {
    pub fn new(inner: Arc<dyn Sink>, failures: u64) -> FailingSink {
        FailingSink {
            inner,
            remaining: Arc::new(AtomicU64::new(failures)),
            failed: Arc::default(),
            writes: Arc::default(),
            stream: false,
        }
    }
}

#[async_trait]
impl Sink for FailingSink {
    async fn existing(&self, key: &str, id: &str) -> Result<Stored, SinkError> {
        self.inner.existing(key, id).await
    }

    async fn put(
        &self,
        key: &str,
        data: &[u8],
        mime_type: &str,
        id: &str,
    ) -> Result<String, SinkError> {
        let fail = self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            self.failed.fetch_add(1, Ordering::Relaxed);
            if self.stream {
                super::CallLog::emit(&super::ChildLine::SinkFailed(key.to_owned()));
            }
            return Err(SinkError {
                location: key.to_owned(),
                message: "loadtest fault: sink-fail".to_owned(),
                permanent: false,
            });
        }
        let location = self.inner.put(key, data, mime_type, id).await?;
        *super::lock(&self.writes).entry(key.to_owned()).or_default() += 1;
        if self.stream {
            super::CallLog::emit(&super::ChildLine::Stored(key.to_owned()));
        }
        Ok(location)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_syntax() {
        assert_eq!(
            "redis-restart@10s".parse(),
            Ok(Fault::RedisRestart {
                at: Duration::from_secs(10)
            })
        );
        assert_eq!(
            "kill-replica@8".parse(),
            Ok(Fault::KillReplica {
                at: Duration::from_secs(8)
            })
        );
        assert_eq!("sink-fail=5".parse(), Ok(Fault::SinkFail { writes: 5 }));
        assert_eq!("503=0.35".parse(), Ok(Fault::Overload(0.35)));
        assert_eq!("slow=0.1:30000".parse(), Ok(Fault::Slow(0.1, 30_000)));
        assert!("503=1.5".parse::<Fault>().is_err());
        assert_eq!(
            "limit@15s=10".parse(),
            Ok(Fault::Limit {
                at: Duration::from_secs(15),
                to: 10
            })
        );
        assert!("limit@15s".parse::<Fault>().is_err());
        assert!("limit@15s=ten".parse::<Fault>().is_err());
        for text in [
            "limit@2.5s=20",
            "redis-restart@12s",
            "kill-replica@8.5s",
            "503=0.35",
            "503-burst=30:5",
        ] {
            let fault: Fault = text.parse().expect(text);
            assert_eq!(fault.to_string().parse::<Fault>(), Ok(fault), "{text}");
        }
        assert!("explode@3s".parse::<Fault>().is_err());
        let f = simulator_faults(
            Faults::default(),
            &["503=0.35".parse().unwrap(), "429=0.1".parse().unwrap()],
        );
        assert_eq!((f.overload, f.ghost_429), (0.35, 0.1));
    }
}
