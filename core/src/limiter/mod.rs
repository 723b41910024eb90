//! The global limiter: every replica books capacity here before it calls the provider.
//!
//! The algorithm (DESIGN.md section 3) is an exact weighted sliding-window log with
//! reservations, the same in both implementations:
//!
//! - every admitted request is an entry in a log, scored by its scheduled start and
//!   carrying its costs; per dimension a running sum covers the entries still inside that
//!   dimension's window (window plus margin), and a cursor marks where the sum starts;
//! - callers queue in arrival order: a new request starts no earlier than the latest booked
//!   start, the shared cooldown and now, so only windows ending at its own start can
//!   overflow, and the earliest start that fits is found by walking the log forward from the
//!   cursor, all dimensions at once, all or nothing. One exception: while a queue stands
//!   ahead and room was given back within a window of now (a release, a reconcile below
//!   the estimate, a re-fit under new limits: the state records until when), a request
//!   that fits now (or at the cooldown's end) is booked there, after an exact count of
//!   every window holding that time, including the bookings that start later. (The count
//!   reads every booking within a window of now: done on every decision behind a queue,
//!   it cost a saturated Redis 2.5 times the CPU per decision.) The queue's walk counts everything booked after the cursor, so it would leave
//!   such room unused: room opened by a raised limit or by bookings given back;
//! - the caller gets back `Admitted`, `Booked` (sleep exactly `wait`, then call) or
//!   `Rejected` with the earliest time it could fit and what blocks it;
//! - a booking belongs to one delivery: a retried acquire replays it only while its start
//!   is ahead, and [`Limiter::check`] re-checks it just before the call;
//! - lost state is fenced once, per dimension: every caller sends the generation and the
//!   latest start it saw, and evidence of loss (another generation, a later start than the
//!   state holds, the log and the hash disagreeing) makes every limited dimension wait out
//!   its own window from the latest start anyone saw that has begun, and from when the
//!   loss was found (what had started by then may have been called). A lost booking that
//!   starts later is stopped by its check, so the fence never reaches past the time the
//!   loss was found: DESIGN section 3 fenced from the latest booked start, which after a
//!   failover idled the limit for a whole queue (up to `max_wait`) on top of the window.
//!   The fence only moves to a later start, so stale callers do not extend it.
//! - a limit change takes effect at once, bookings already made included: the state
//!   records the limits and windows its bookings were made under, and the first acquire
//!   that brings others (a lower or higher limit, another window or margin, more headroom:
//!   callers pass the compiled config's limits every time) fits the bookings that have not
//!   started again under the new ones, in start order, in the same atomic step. Each is kept
//!   at its start if every window ending there holds at most the new limit (counting what
//!   has started), and released otherwise, so the latest go first; its holder's
//!   [`Limiter::check`] answers [`Blocker::Lost`] and it books afresh under the new limits
//!   or defers. A raise keeps every booking where it is; new ones take the room it opens
//!   at once (the exception above), then fill each window up to the new limit. A window that grows past entries already pruned from the log
//!   cannot recount them: they are taken as full, as after a loss (the fence moves to the
//!   latest pruned start, so each limited dimension waits its new window from it).
//!   The re-fit happens at the first call that brings the new limits: an acquire, or a
//!   [`Limiter::usage`] read, which the operator makes with the config it has just
//!   compiled, in the reconcile that writes a changed pool. That read matters: a saturated
//!   fleet does not acquire at all while every worker sleeps on its booking (measured: no
//!   acquire for 5.4 s after an apply, so the first window after it still held the old
//!   limit). `check` takes no limits: its caller holds the quota from when it booked, up
//!   to `max_wait` old, exactly the config a change replaces; it learns from the re-fit
//!   that its booking is gone. A caller still on the old config (a replica within its
//!   refresh interval, or a handler rebooking with the quota its delivery started with)
//!   moves the limits back for its own acquire: a raise releases nothing, and the next
//!   call on the new config fits its booking again, so such bookings last only until then.
//!
//! - [`memory`]: the in-process limiter (embedded default; per-replica fallback).
//! - [`redis`]: the shared limiter, one Lua script per decision, on a standalone Redis or
//!   a Redis Cluster: a (project, model)'s two keys share one hash tag, so each decision
//!   runs on one primary and pairs spread over the primaries (see [`crate::keys`]). On a
//!   cluster the server a pair's state lives on is tracked per pair, so a failover is
//!   fenced for the pairs of the failed primary only.
//! - [`failsafe`]: what happens when Redis is unreachable (closed, open, local) behind a
//!   circuit breaker.
use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::quota::{Costs, DEFAULT_TENANT, Dim, ModelQuota};

pub mod failsafe;
pub mod memory;
pub mod redis;

/// Names one limiter state: a provider project and a model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QuotaKey {
    /// The provider project (a Google Cloud project id).
    pub project: String,
    /// The model id.
    pub model: String,
}

impl QuotaKey {
    /// A key for one (project, model).
    pub fn new(project: impl Into<String>, model: impl Into<String>) -> QuotaKey {
        QuotaKey {
            project: project.into(),
            model: model.into(),
        }
    }

    /// The hash tag every Redis key of this pair shares with its project's other models
    /// and the project's spend state (one Cluster slot; see [`crate::keys`]).
    pub fn hash_tag(&self) -> String {
        crate::keys::limiter_tag(&self.project)
    }

    /// The Redis sorted set of booked starts.
    pub fn log_key(&self) -> String {
        format!(
            "{}:log",
            crate::keys::limiter_state(&self.project, Some(&self.model))
        )
    }

    /// The Redis hash of running sums, cursors, cooldown and day count.
    pub fn state_key(&self) -> String {
        format!(
            "{}:st",
            crate::keys::limiter_state(&self.project, Some(&self.model))
        )
    }

    /// The project's spend log: every model's bookings, for the spend shared by them.
    pub fn spend_log_key(&self) -> String {
        format!("{}:log", crate::keys::limiter_state(&self.project, None))
    }

    /// The project's spend state.
    pub fn spend_state_key(&self) -> String {
        format!("{}:st", crate::keys::limiter_state(&self.project, None))
    }

    /// The log of one tenant's bookings of this pair (its ceiling and fair share).
    pub fn tenant_log_key(&self, tenant: &str) -> String {
        format!(
            "{}:*t:{tenant}:log",
            crate::keys::limiter_state(&self.project, Some(&self.model))
        )
    }

    /// One tenant's state of this pair.
    pub fn tenant_state_key(&self, tenant: &str) -> String {
        format!(
            "{}:*t:{tenant}:st",
            crate::keys::limiter_state(&self.project, Some(&self.model))
        )
    }

    /// One tenant's budgets in this pair's project (shared by its models).
    pub fn tenant_budget_key(&self, tenant: &str) -> String {
        crate::keys::tenant_budget(&self.project, tenant)
    }
}

impl fmt::Display for QuotaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.project, self.model)
    }
}

/// What stops a request from starting sooner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Blocker {
    /// A windowed dimension is full.
    Dimension(Dim),
    /// The requests-per-day quota is spent (or a per-day 429 was seen) until the next
    /// Pacific midnight.
    Daily,
    /// A shared cooldown set by [`Limiter::penalize`].
    Cooldown,
    /// The request costs more than a limit in some dimension: it can never be admitted.
    NeverFits,
    /// The booking is gone, or the limiter lost its state since it was booked (restart,
    /// rollback, eviction): it may not be used. Book afresh.
    Lost,
    /// The tenant's daily or monthly budget is spent until its reset.
    Budget,
}

impl Blocker {
    pub(crate) fn code(self) -> i64 {
        match self {
            Blocker::Dimension(d) => d.index() as i64 + 1,
            Blocker::Daily => 5,
            Blocker::Cooldown => 6,
            Blocker::NeverFits => 7,
            Blocker::Lost => 8,
            Blocker::Budget => 9,
        }
    }

    pub(crate) fn from_code(code: i64) -> Option<Blocker> {
        Some(match code {
            1..=4 => Blocker::Dimension(Dim::ALL[usize::try_from(code - 1).ok()?]),
            5 => Blocker::Daily,
            6 => Blocker::Cooldown,
            7 => Blocker::NeverFits,
            8 => Blocker::Lost,
            9 => Blocker::Budget,
            _ => return None,
        })
    }
}

/// Which limiter issued a ticket: reconcile and release go back to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The shared (or the only) limiter.
    Shared,
    /// The per-replica fallback, while the shared limiter was unreachable.
    Local,
    /// Admitted unchecked (`failure mode = open` while the shared limiter was unreachable).
    Unchecked,
}

/// A booking: what was admitted, and when it may start.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ticket {
    /// The (project, model) it was booked on.
    pub key: QuotaKey,
    /// The caller's request id (the idempotency key).
    pub request_id: String,
    /// The scheduled start, in µs since the Unix epoch on the limiter's clock.
    pub start_us: i64,
    /// The costs it reserved.
    pub costs: Costs,
    /// Which limiter issued it.
    pub origin: Origin,
    /// Its spend was also booked in the project's spend state (the pool limits spend):
    /// check, reconcile and release go there too.
    #[serde(default)]
    pub project_spend: bool,
    /// The tenant it was booked for, when the pool declares tenants: check, reconcile and
    /// release go to its state too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// The answer to [`Limiter::acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start now.
    Admitted {
        /// The booking.
        ticket: Ticket,
    },
    /// Capacity is booked for later: sleep exactly `wait`, then start.
    Booked {
        /// The booking.
        ticket: Ticket,
        /// How long to wait before starting.
        wait: Duration,
    },
    /// Nothing was booked.
    Rejected {
        /// The earliest time the request could fit from now (`None`: never). A lower bound
        /// when the queue is longer than the caller's `max_wait`.
        retry_after: Option<Duration>,
        /// What blocks it.
        blocking: Blocker,
    },
}

impl Decision {
    /// The ticket, if the request was admitted or booked.
    pub fn ticket(&self) -> Option<&Ticket> {
        match self {
            Decision::Admitted { ticket } | Decision::Booked { ticket, .. } => Some(ticket),
            Decision::Rejected { .. } => None,
        }
    }

    /// How long to wait before starting (zero when admitted), if not rejected.
    pub fn wait(&self) -> Option<Duration> {
        match self {
            Decision::Admitted { .. } => Some(Duration::ZERO),
            Decision::Booked { wait, .. } => Some(*wait),
            Decision::Rejected { .. } => None,
        }
    }

    /// What blocks the request, if it was rejected.
    pub fn blocker(&self) -> Option<Blocker> {
        match self {
            Decision::Rejected { blocking, .. } => Some(*blocking),
            _ => None,
        }
    }
}

/// The answer to [`Limiter::check`]: may a booked ticket still be used?
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The booking stands and nothing set since forbids it: call the provider now.
    Go,
    /// The booking may not run (a cooldown or per-day block set since it was booked, or the
    /// booking is gone). Whatever was left of it has been released: defer by `retry_after`
    /// (`None`: unknown, use a default) or book afresh.
    Cancelled {
        /// The earliest time a new booking could start, if known.
        retry_after: Option<Duration>,
        /// Why it may not run.
        blocking: Blocker,
    },
}

/// How far a provider's 429 reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PenaltyScope {
    /// A per-minute quota: cool down for the `RetryInfo` delay.
    PerMinute,
    /// A per-day quota: cool down until the next Pacific midnight.
    PerDay,
    /// A bare 429 from a shared quota that publishes no limit (Vertex AI): cool down for
    /// the delay and lower the booked rate of the request, token and image windows, for
    /// every replica. Each clean window gives back a tenth of the limits.
    Unexplained,
}

/// Use of one dimension, for status and monitoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DimensionUsage {
    /// The dimension.
    pub dim: Dim,
    /// Booked in the window ending at the latest booking (so it includes bookings that
    /// start later), read from the running sums in O(1); 0 once the latest booking is a
    /// full window (with margin) old.
    pub used: u64,
    /// The limit (`None`: unlimited).
    pub limit: Option<u64>,
    /// The window (without margin).
    pub window: Duration,
}

/// A read-only snapshot of one (project, model).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// One entry per dimension, in [`Dim::ALL`] order.
    pub dimensions: Vec<DimensionUsage>,
    /// Time left on the shared cooldown.
    pub cooldown_remaining: Duration,
    /// Requests counted in the current Pacific day.
    pub daily_used: u64,
    /// The requests-per-day limit.
    pub daily_limit: Option<u64>,
    /// Time left on a per-day block (a per-day 429 was seen).
    pub daily_blocked_remaining: Duration,
    /// How far in the future the latest booking starts (the queue's length in time).
    pub queue: Duration,
    /// The learned cut of the request, token and image limits, per mille (0: the declared
    /// rate; 300: 70 % of it), set by unexplained 429s ([`PenaltyScope::Unexplained`]).
    #[serde(default)]
    pub rate_cut_permille: u32,
}

/// What went wrong talking to the limiter's store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Redis did not answer within the decision timeout. Retryable.
    #[error("the limiter's Redis did not answer within {0:?}; check Redis health and latency")]
    Timeout(Duration),
    /// Redis answered with an error or the connection failed. Retryable.
    #[error("the limiter's Redis failed: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// The shared limiter is unreachable and the failure mode is `closed`, or the circuit
    /// breaker is open. Retryable: defer the work by `retry_after`.
    #[error("the shared limiter is unavailable (failure mode closed); retry in {retry_after:?}")]
    Unavailable {
        /// When to try again.
        retry_after: Duration,
    },
    /// The script answered something this version does not understand. Permanent until
    /// every replica runs the same version.
    #[error("unexpected limiter reply: {0}")]
    Protocol(String),
    /// The caller passed something the limiter cannot use (e.g. an empty request id).
    #[error("invalid limiter request: {0}")]
    Invalid(String),
}

impl Error {
    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Error::Protocol(_) | Error::Invalid(_))
    }

    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Timeout(_) => "timeout",
            Error::Redis(_) => "redis",
            Error::Unavailable { .. } => "unavailable",
            Error::Protocol(_) => "protocol",
            Error::Invalid(_) => "invalid",
        }
    }
}

/// The limiter's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A global limiter: books capacity for one (project, model) under its quota.
#[async_trait]
pub trait Limiter: Send + Sync {
    /// Books `costs` for `request_id`: all dimensions at once, all or nothing. Admits now,
    /// books a start within `max_wait`, or rejects. A booking belongs to one delivery of
    /// one request: callers put the delivery's claim token in `request_id`. The same
    /// `request_id` again returns the same ticket only while its start is still ahead (a
    /// retried acquire); once its start has passed the old entry stays counted and the
    /// same id books afresh, so a replay can never call the provider uncounted.
    async fn acquire(
        &self,
        key: &QuotaKey,
        quota: &ModelQuota,
        request_id: &str,
        costs: Costs,
        max_wait: Duration,
    ) -> Result<Decision> {
        self.acquire_for(key, quota, Asker::default(), request_id, costs, max_wait)
            .await
    }

    /// [`Limiter::acquire`] for one of the pool's tenants (`quota.tenants`; ignored when
    /// the pool declares none) and a priority class: the booking also counts against the
    /// tenant's ceiling; behind a queue, a request of a higher class takes over the slot of
    /// the earliest booking of a lower class that has not started, and a tenant below its
    /// fair share of a window the slot of a booking of a tenant above its own share (the
    /// holder's check answers [`Blocker::Lost`], and it books afresh). A tenant the pool
    /// does not declare is refused with [`Error::Invalid`].
    async fn acquire_for(
        &self,
        key: &QuotaKey,
        quota: &ModelQuota,
        asker: Asker<'_>,
        request_id: &str,
        costs: Costs,
        max_wait: Duration,
    ) -> Result<Decision>;

    /// Re-checks a booked ticket just before its call: the booking must still be held at
    /// its start, and no cooldown or per-day block may have been set since it was booked.
    /// A ticket that may not run is released and [`Check::Cancelled`] returned. When the
    /// check finds evidence that the limiter lost its state, it fences it (as an acquire
    /// would) and answers [`Blocker::Lost`]: the ticket is not used. Callers check every
    /// ticket that waited ([`Decision::Booked`]); an admitted ticket was checked by its own
    /// acquire.
    async fn check(&self, ticket: &Ticket) -> Result<Check>;

    /// Replaces a ticket's reserved costs by the actual ones (reserve an upper bound, so
    /// this only frees capacity). A ticket that aged out is ignored.
    async fn reconcile(&self, ticket: &Ticket, actual: Costs) -> Result<()>;

    /// Gives back a ticket whose request was never sent.
    async fn release(&self, ticket: &Ticket) -> Result<()>;

    /// Applies a provider 429 to every replica: a shared cooldown of `delay`
    /// ([`PenaltyScope::PerMinute`]) or a block until the next Pacific midnight.
    async fn penalize(&self, key: &QuotaKey, delay: Duration, scope: PenaltyScope) -> Result<()>;

    /// A snapshot of one (project, model). When `quota`'s limits or windows differ from
    /// those the bookings were made under, they are applied first, as an acquire would (the
    /// bookings beyond them that have not started are released): the operator reads usage
    /// with the config it has just compiled, so its read applies a change at once.
    async fn usage(&self, key: &QuotaKey, quota: &ModelQuota) -> Result<Usage>;

    /// Each of the pool's tenants' use of one (project, model) (`quota.tenants`; empty when
    /// it declares none). Reads only. A limiter that keeps no tenant states (a test
    /// double) answers none.
    async fn tenant_usage(&self, _key: &QuotaKey, _quota: &ModelQuota) -> Result<Vec<TenantUsage>> {
        Ok(Vec::new())
    }

    /// What fails together with `key`'s state: one name for a store that is up or down as
    /// a whole (the default), the project's hash tag on a Redis Cluster (a project is one
    /// slot, on one primary). The failsafe keeps one circuit breaker per domain.
    fn failure_domain(&self, _key: &QuotaKey) -> String {
        String::new()
    }

    /// How long until the next quota day begins on this limiter's calendar (the provider's
    /// Pacific midnight by default; a rehearsal's short days where it was given them), for
    /// a per-day 429: its messages wait that long.
    fn day_resets_in(&self) -> Duration {
        day_resets_in(&PacificCalendar, SystemClock.now_us())
    }
}

/// Who a booking is for: one of the pool's tenants, and the request's priority class
/// (higher books ahead of lower bookings that have not started).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asker<'a> {
    /// The tenant ([`DEFAULT_TENANT`] when the request names none).
    pub tenant: &'a str,
    /// The priority class (0: the default).
    pub priority: i32,
}

impl Default for Asker<'_> {
    fn default() -> Self {
        Asker {
            tenant: DEFAULT_TENANT,
            priority: 0,
        }
    }
}

/// One tenant's use of one (project, model), from its state in the limiter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TenantUsage {
    /// The tenant.
    pub tenant: String,
    /// Requests it started within the requests window ending now.
    pub requests: u64,
    /// Requests it has booked to start later.
    pub booked_ahead: u64,
    /// What its bookings cost in the current day and month (estimates until reconciled),
    /// in micro-dollars.
    pub spent_today_micros: u64,
    pub spent_this_month_micros: u64,
    /// How far ahead its latest booking starts.
    pub queue: Duration,
}

/// What a caller last saw of one key's state. Sent with every acquire and check, so the
/// limiter can tell that it lost its state (another generation, an earlier latest start)
/// and restore what only the callers still know of the day. A tenant's budgets have one
/// too (generation, and the day's and month's spend), sent with every acquire of that
/// tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Hint {
    /// When the state began (0: never seen).
    pub generation: i64,
    /// The latest booked start.
    pub last_start: i64,
    /// The end of the quota day `day_count` is for.
    pub day_end: i64,
    /// Requests counted in that day.
    pub day_count: i64,
    /// When a per-day block ends.
    pub day_blocked: i64,
    /// A tenant's budgets only: the end of the month `month_count` is for (`day_count`
    /// being the day's spend).
    pub month_end: i64,
    /// Spend counted in that month.
    pub month_count: i64,
}

impl Hint {
    /// As the script reads them.
    pub(crate) fn to_array(self) -> [i64; 5] {
        [
            self.generation,
            self.last_start,
            self.day_end,
            self.day_count,
            self.day_blocked,
        ]
    }

    /// From the script's reply, at `at` (generation, latest start, day end, day count,
    /// day block), if it is long enough.
    pub(crate) fn from_reply(reply: &[i64], at: [usize; 5]) -> Option<Hint> {
        Some(Hint {
            generation: *reply.get(at[0])?,
            last_start: *reply.get(at[1])?,
            day_end: *reply.get(at[2])?,
            day_count: *reply.get(at[3])?,
            day_blocked: *reply.get(at[4])?,
            ..Hint::default()
        })
    }

    /// A tenant's budgets as the script reads them: generation, day end, day's spend,
    /// month end, month's spend.
    pub(crate) fn budget_array(self) -> [i64; 5] {
        [
            self.generation,
            self.day_end,
            self.day_count,
            self.month_end,
            self.month_count,
        ]
    }

    /// A tenant's budgets from the script's reply at `at` (as [`Hint::budget_array`]).
    pub(crate) fn budget_from_reply(reply: &[i64], at: usize) -> Option<Hint> {
        Some(Hint {
            generation: *reply.get(at)?,
            day_end: *reply.get(at + 1)?,
            day_count: *reply.get(at + 2)?,
            month_end: *reply.get(at + 3)?,
            month_count: *reply.get(at + 4)?,
            ..Hint::default()
        })
    }
}

/// Time for the in-memory limiter and the circuit breaker: injected so tests never sleep.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now, in µs since the Unix epoch.
    fn now_us(&self) -> i64;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> i64 {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock reading `now_us`.
    pub fn new(now_us: i64) -> ManualClock {
        ManualClock(Arc::new(AtomicI64::new(now_us)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(dur_us(by), Ordering::SeqCst);
    }

    /// Sets the clock.
    pub fn set(&self, now_us: i64) {
        self.0.store(now_us, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_us(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// How long from `now_us` until the next day begins on `calendar`.
pub fn day_resets_in(calendar: &dyn Calendar, now_us: i64) -> Duration {
    us_dur((calendar.boundaries(now_us)[1] - now_us).max(0))
}

/// Where quota days begin. The limiter is told the day boundaries around now; the default
/// is the provider's Pacific calendar.
pub trait Calendar: Send + Sync + fmt::Debug {
    /// The start of the day containing `at_us` followed by the next three day starts, in µs.
    fn boundaries(&self, at_us: i64) -> [i64; 4];

    /// The start of the month containing `at_us` (budgets' months) and the next two month
    /// starts, in µs.
    fn months(&self, at_us: i64) -> [i64; 3];
}

/// The provider's calendar: days start at midnight America/Los_Angeles (23 h and 25 h days
/// on DST changes).
#[derive(Debug, Clone, Copy, Default)]
pub struct PacificCalendar;

impl Calendar for PacificCalendar {
    fn boundaries(&self, at_us: i64) -> [i64; 4] {
        let at = jiff::Timestamp::from_microsecond(at_us).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let us = |t: jiff::Timestamp| t.as_microsecond();
        let next = crate::pacific::next_midnights(at, 3);
        let day = 86_400_000_000;
        let start = us(crate::pacific::day_start(at));
        let m = |i: usize, prev: i64| next.get(i).map(|t| us(*t)).unwrap_or(prev + day);
        let m1 = m(0, start);
        let m2 = m(1, m1);
        [start, m1, m2, m(2, m2)]
    }

    fn months(&self, at_us: i64) -> [i64; 3] {
        let at = jiff::Timestamp::from_microsecond(at_us).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        crate::pacific::month_starts(at).map(|t| t.as_microsecond())
    }
}

/// Days of a fixed length from an origin (tests: a day of a few seconds).
#[derive(Debug, Clone, Copy)]
pub struct FixedDays {
    /// A day start, in µs since the Unix epoch.
    pub origin_us: i64,
    /// The length of every day, in µs.
    pub day_us: i64,
}

impl Calendar for FixedDays {
    fn boundaries(&self, at_us: i64) -> [i64; 4] {
        let len = self.day_us.max(1);
        let start = self.origin_us + (at_us - self.origin_us).div_euclid(len) * len;
        [start, start + len, start + 2 * len, start + 3 * len]
    }

    /// Months of 30 of these days from the origin (rehearsals compress them too).
    fn months(&self, at_us: i64) -> [i64; 3] {
        let len = self.day_us.max(1) * 30;
        let start = self.origin_us + (at_us - self.origin_us).div_euclid(len) * len;
        [start, start + len, start + 2 * len]
    }
}

/// An explicit list of day starts (tests: real Pacific DST days compressed in time).
#[derive(Debug, Clone)]
pub struct ListedDays(pub Vec<i64>);

impl Calendar for ListedDays {
    fn boundaries(&self, at_us: i64) -> [i64; 4] {
        let day = 86_400_000_000;
        let i = self.0.partition_point(|b| *b <= at_us).saturating_sub(1);
        let get = |j: usize| self.0.get(i + j).copied();
        let start = get(0).unwrap_or(at_us);
        let m1 = get(1).unwrap_or(start + day);
        let m2 = get(2).unwrap_or(m1 + day);
        [start, m1, m2, get(3).unwrap_or(m2 + day)]
    }

    /// The provider's months: the listed days only stand in for days.
    fn months(&self, at_us: i64) -> [i64; 3] {
        PacificCalendar.months(at_us)
    }
}

pub(crate) fn dur_us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 4)
}

pub(crate) fn us_dur(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// Limits as the algorithm sees them: `-1` for unlimited, windows with margin, in µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub limit: [i64; 4],
    pub window_us: [i64; 4],
    pub per_day: i64,
}

impl Limits {
    pub fn of(quota: &ModelQuota) -> Limits {
        let lim = |l: Option<u64>| {
            l.map(|l| i64::try_from(l).unwrap_or(i64::MAX))
                .unwrap_or(-1)
        };
        let mut limit = [0; 4];
        let mut window_us = [0; 4];
        for d in Dim::ALL {
            limit[d.index()] = lim(quota.dim(d).limit);
            window_us[d.index()] = quota.effective_window_us(d);
        }
        Limits {
            limit,
            window_us,
            per_day: lim(quota.requests_per_day),
        }
    }

    /// The dimension the request can never fit in, if any.
    pub fn never_fits(&self, costs: &[i64; 4]) -> bool {
        (0..4).any(|d| self.limit[d] >= 0 && costs[d] > self.limit[d])
            || (self.per_day >= 0 && costs[0] > self.per_day)
    }
}

/// The position of `tenant` among the quota's tenants (`None`: the pool declares none).
pub(crate) fn tenant_index(quota: &ModelQuota, tenant: &str) -> Result<Option<usize>> {
    if quota.tenants.is_empty() {
        return Ok(None);
    }
    match quota.tenants.iter().position(|t| t.name == tenant) {
        Some(i) => Ok(Some(i)),
        None => Err(Error::Invalid(format!(
            "tenant {tenant:?} is not one of the pool's tenants ({}): declare it in the QuotaPool's spec.tenants or send one of those",
            quota
                .tenants
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

pub(crate) fn costs_i64(c: &Costs) -> [i64; 4] {
    c.to_array()
        .map(|v| i64::try_from(v).unwrap_or(i64::MAX / 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let k = QuotaKey::new("proj", "gemini-3-pro-image");
        assert_eq!(k.log_key(), "{pacer:proj}:gemini-3-pro-image:log");
        assert_eq!(k.state_key(), "{pacer:proj}:gemini-3-pro-image:st");
        assert_eq!(k.spend_log_key(), "{pacer:proj}:*spend:log");
        assert_eq!(k.spend_state_key(), "{pacer:proj}:*spend:st");
    }

    #[test]
    fn blocker_codes_round_trip() {
        for b in [
            Blocker::Dimension(Dim::Requests),
            Blocker::Dimension(Dim::SpendMicros),
            Blocker::Daily,
            Blocker::Cooldown,
            Blocker::NeverFits,
            Blocker::Lost,
        ] {
            assert_eq!(Blocker::from_code(b.code()), Some(b));
        }
    }

    #[test]
    fn pacific_boundaries_cross_dst() {
        let at: jiff::Timestamp = "2026-10-31T20:00:00Z".parse().expect("ts");
        let b = PacificCalendar.boundaries(at.as_microsecond());
        let h = 3_600_000_000;
        assert_eq!(b[1] - b[0], 24 * h);
        assert_eq!(b[2] - b[1], 25 * h);
        assert_eq!(b[3] - b[2], 24 * h);
    }

    #[test]
    fn fixed_and_listed_days() {
        let c = FixedDays {
            origin_us: 100,
            day_us: 10,
        };
        assert_eq!(c.boundaries(125), [120, 130, 140, 150]);
        assert_eq!(c.boundaries(95), [90, 100, 110, 120]);
        let l = ListedDays(vec![0, 10, 30, 40, 60]);
        assert_eq!(l.boundaries(12), [10, 30, 40, 60]);
    }
}
