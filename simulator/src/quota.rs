//! Quota enforcement the way Google does it: a request counts when it arrives, on the
//! server's clock, all dimensions at once. Sliding windows by default, calendar (fixed)
//! windows optionally; requests per day reset at Pacific midnight. Requests, tokens and
//! images count per (project, model) in [`ModelQuota`]; spend counts per project, in one
//! [`ProjectSpend`] that every model of the project admits against.
//!
//! Deliberately independent of Pacer's limiter: this plays the provider that the limiter
//! must stay under, and measures whether it did. Two measurements, kept apart:
//!
//! - `max_in_any_window`: the most *accepted* cost in any window. Bounded by the limit by
//!   construction (the simulator admits only under it), so it shows utilisation, never a
//!   breach.
//! - `max_arrivals_in_any_window`: the most cost that *arrived* in any window, refused or
//!   not (quota 429s, injected faults, invalid requests). This is what the fleet sent, and
//!   the figure a test compares with the limit to catch an over-sending fleet.
use std::{
    collections::{BTreeMap, VecDeque},
    time::Duration,
};

use jiff::Timestamp;
use serde::Serialize;

use crate::config::{LimitSpec, SpendLimit};

/// A quota dimension, with the names Google uses for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dim {
    Rpm,
    Tpm,
    Ipm,
    Rpd,
    Spend,
}

impl Dim {
    pub const ALL: [Dim; 5] = [Dim::Rpm, Dim::Tpm, Dim::Ipm, Dim::Rpd, Dim::Spend];

    pub fn label(self) -> &'static str {
        match self {
            Dim::Rpm => "rpm",
            Dim::Tpm => "tpm",
            Dim::Ipm => "ipm",
            Dim::Rpd => "rpd",
            Dim::Spend => "spend",
        }
    }

    /// The `quotaId` of a 429's violation. Seen in Google's answers: the rpm, rpd and tpm
    /// ids, each with `-FreeTier` on a free-tier project (the one whose image-model limit
    /// is 0). Assumed (Google publishes no example): the ipm and spend ids, and that they
    /// keep one spelling on every tier.
    pub fn quota_id(self, free_tier: bool) -> &'static str {
        match (self, free_tier) {
            (Dim::Rpm, false) => "GenerateRequestsPerMinutePerProjectPerModel",
            (Dim::Rpm, true) => "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
            (Dim::Tpm, false) => "GenerateContentPaidTierInputTokensPerModelPerMinute",
            (Dim::Tpm, true) => "GenerateContentInputTokensPerModelPerMinute-FreeTier",
            (Dim::Ipm, _) => "GenerateImagesPerMinutePerProjectPerModel",
            (Dim::Rpd, false) => "GenerateRequestsPerDayPerProjectPerModel",
            (Dim::Rpd, true) => "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
            (Dim::Spend, _) => "GenerateContentSpendPer10MinutesPerProject",
        }
    }

    /// The `quotaMetric` of a 429's violation (free-tier metrics as seen in Google's
    /// answers; ipm and spend assumed, as for [`Dim::quota_id`]).
    pub fn quota_metric(self, free_tier: bool) -> &'static str {
        match (self, free_tier) {
            (Dim::Rpm | Dim::Rpd, true) => {
                "generativelanguage.googleapis.com/generate_content_free_tier_requests"
            }
            (Dim::Tpm, true) => {
                "generativelanguage.googleapis.com/generate_content_free_tier_input_token_count"
            }
            (Dim::Rpm, false) => "generativelanguage.googleapis.com/generate_requests_per_model",
            (Dim::Tpm, false) => {
                "generativelanguage.googleapis.com/generate_content_paid_tier_input_token_count"
            }
            (Dim::Ipm, _) => "generativelanguage.googleapis.com/generate_content_images_per_model",
            (Dim::Rpd, false) => {
                "generativelanguage.googleapis.com/generate_requests_per_model_per_day"
            }
            (Dim::Spend, _) => "generativelanguage.googleapis.com/generate_content_spend",
        }
    }
}

/// What one request costs in each dimension.
#[derive(Debug, Clone, Copy, Default)]
pub struct Costs {
    pub input_tokens: u64,
    pub images: u64,
    pub spend_micros: u64,
}

impl Costs {
    fn of(&self, dim: Dim) -> u64 {
        match dim {
            Dim::Rpm | Dim::Rpd => 1,
            Dim::Tpm => self.input_tokens,
            Dim::Ipm => self.images,
            Dim::Spend => self.spend_micros,
        }
    }
}

/// One exceeded dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub dim: Dim,
    pub limit: u64,
    /// When this dimension would admit the request.
    pub retry_in: Duration,
}

/// A windowed dimension: the log of accepted arrivals (for the sliding check and for
/// measuring), and the current calendar window's sum (for the fixed check).
#[derive(Debug)]
struct Window {
    len_us: i64,
    limit: Option<u64>,
    /// Checked in calendar windows instead of sliding ones (measured sliding either way).
    fixed: bool,
    log: VecDeque<(i64, u64)>,
    sum: u64,
    fixed_index: i64,
    fixed_sum: u64,
    max_in_any_window: u64,
}

impl Window {
    fn new(len: Duration, limit: Option<u64>, fixed: bool) -> Window {
        Window {
            len_us: i64::try_from(len.as_micros()).unwrap_or(i64::MAX).max(1),
            limit,
            fixed,
            log: VecDeque::new(),
            sum: 0,
            fixed_index: i64::MIN,
            fixed_sum: 0,
            max_in_any_window: 0,
        }
    }

    fn prune(&mut self, now: i64) {
        while let Some(&(t, c)) = self.log.front() {
            if t > now - self.len_us {
                break;
            }
            self.sum -= c;
            self.log.pop_front();
        }
        let index = now.div_euclid(self.len_us);
        if index != self.fixed_index {
            self.fixed_index = index;
            self.fixed_sum = 0;
        }
    }

    fn check(&self, now: i64, cost: u64) -> Option<Duration> {
        let limit = self.limit?;
        let micros = |us: i64| Duration::from_micros(u64::try_from(us.max(0)).unwrap_or(0));
        if self.fixed {
            if self.fixed_sum + cost <= limit {
                return None;
            }
            return Some(micros((self.fixed_index + 1) * self.len_us - now));
        }
        if self.sum + cost <= limit {
            return None;
        }
        if cost > limit {
            return Some(micros(self.len_us));
        }
        // The earliest time enough of the oldest arrivals have left the window.
        let mut freed = 0;
        for &(t, c) in &self.log {
            freed += c;
            if self.sum - freed + cost <= limit {
                return Some(micros(t + self.len_us - now));
            }
        }
        Some(micros(self.len_us))
    }

    fn admit(&mut self, now: i64, cost: u64) {
        self.log.push_back((now, cost));
        self.sum += cost;
        self.fixed_sum += cost;
        // A window's sum peaks right after an arrival: checking at each one finds the max.
        self.max_in_any_window = self.max_in_any_window.max(self.sum);
    }
}

/// The measurement of every arrival in one dimension: a sliding log of (time, cost) of
/// all arrivals, accepted or not, and the largest sum seen in any window.
#[derive(Debug)]
struct ArrivalWindow {
    len_us: i64,
    log: VecDeque<(i64, u64)>,
    sum: u64,
    max: u64,
}

impl ArrivalWindow {
    fn new(len: Duration) -> ArrivalWindow {
        ArrivalWindow {
            len_us: i64::try_from(len.as_micros()).unwrap_or(i64::MAX).max(1),
            log: VecDeque::new(),
            sum: 0,
            max: 0,
        }
    }

    /// Records an arrival at `now` (never earlier than the previous one). Windows are
    /// half-open, `(t - len, t]`, as the quota check's are.
    fn record(&mut self, now: i64, cost: u64) {
        while let Some(&(t, c)) = self.log.front() {
            if t > now - self.len_us {
                break;
            }
            self.sum -= c;
            self.log.pop_front();
        }
        self.log.push_back((now, cost));
        self.sum += cost;
        // A window's sum peaks right after an arrival: checking at each one finds the max.
        self.max = self.max.max(self.sum);
    }
}

/// Whether an arrival carried Pacer's `x-pacer-ticket` header, and whether that ticket
/// was seen before on the same project (a replayed booking: a call the limiter did not
/// count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketSeen {
    Untagged,
    Fresh,
    Duplicate,
}

/// Arrivals by ticket (`tagged` + `untagged` = arrivals; `duplicates` are among `tagged`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TicketStats {
    pub tagged: u64,
    pub untagged: u64,
    pub duplicates: u64,
}

/// Requests per day on the Pacific calendar day.
#[derive(Debug)]
struct Daily {
    limit: Option<u64>,
    /// Rehearsal days (µs), from multiples of it since the epoch; `None`: Pacific days.
    length_us: Option<i64>,
    day_end: i64,
    count: u64,
    max_in_any_day: u64,
}

/// Counters for `/_sim/stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelStats {
    /// Every request that reached the model, whatever the answer.
    pub arrivals: u64,
    /// The most arrivals' cost in any sliding window of each dimension (`rpm`, `tpm`,
    /// `ipm`, `spend`), refused ones included. `spend` is the project's (all its models).
    pub max_arrivals_in_any_window: BTreeMap<&'static str, u64>,
    pub accepted: u64,
    /// Quota refusals by dimension (one request exceeding two dimensions counts in both).
    pub rejected: BTreeMap<&'static str, u64>,
    /// Injected faults by kind (`ghost_429`, `overload`, `server_error`, ...).
    pub faults: BTreeMap<&'static str, u64>,
    /// The most accepted cost in any window (never above the limit, by construction);
    /// `spend` is the project's.
    pub max_in_any_window: BTreeMap<&'static str, u64>,
    /// When each accepted request arrived, in milliseconds since the epoch, sorted.
    pub accepted_at_ms: Vec<i64>,
    /// When each request refused for quota arrived (same clock): with `accepted_at_ms`,
    /// where a fleet went over.
    pub rejected_at_ms: Vec<i64>,
    pub tickets: TicketStats,
    pub limits: BTreeMap<&'static str, u64>,
    pub window_s: f64,
    pub fixed_windows: bool,
}

impl ModelStats {
    /// Adds another project's figures for the same model: counts add up, maxima are the
    /// largest of any one project's (each project has its own quota).
    pub fn merge(&mut self, other: &ModelStats) {
        self.arrivals += other.arrivals;
        for (k, v) in &other.max_arrivals_in_any_window {
            let e = self.max_arrivals_in_any_window.entry(k).or_default();
            *e = (*e).max(*v);
        }
        self.accepted += other.accepted;
        for (k, v) in &other.rejected {
            *self.rejected.entry(k).or_default() += v;
        }
        for (k, v) in &other.faults {
            *self.faults.entry(k).or_default() += v;
        }
        for (k, v) in &other.max_in_any_window {
            let e = self.max_in_any_window.entry(k).or_default();
            *e = (*e).max(*v);
        }
        self.accepted_at_ms.extend_from_slice(&other.accepted_at_ms);
        self.accepted_at_ms.sort_unstable();
        self.rejected_at_ms.extend_from_slice(&other.rejected_at_ms);
        self.rejected_at_ms.sort_unstable();
        self.tickets.tagged += other.tickets.tagged;
        self.tickets.untagged += other.tickets.untagged;
        self.tickets.duplicates += other.tickets.duplicates;
    }
}

/// A project's spend figures for `/_sim/stats` (each of its models reports the same
/// `max_in_any_window` and `max_arrivals_in_any_window` under `spend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SpendStats {
    /// Micro-dollars per window; `None` (`null`): unlimited.
    pub limit: Option<u64>,
    pub window_s: f64,
    /// The most accepted spend in any window (never above the limit, by construction).
    pub max_in_any_window: u64,
    /// The most spend that arrived in any window, refused requests included.
    pub max_arrivals_in_any_window: u64,
}

/// One project's spend window. Google's spend quota ("spend per 10 minutes") is the
/// project's, shared by all its models: each model's [`ModelQuota`] admits against, and
/// measures into, this one window, so two models cannot spend twice the limit.
#[derive(Debug)]
pub struct ProjectSpend {
    window: Window,
    window_s: f64,
    arrived: ArrivalWindow,
    /// The latest arrival time on any of the project's models, so this window's log stays
    /// ordered too (see `ModelQuota::last_us`).
    last_us: i64,
}

impl ProjectSpend {
    pub fn new(limit: SpendLimit, fixed: bool) -> ProjectSpend {
        ProjectSpend {
            window: Window::new(limit.window, limit.micros, fixed),
            window_s: limit.window.as_secs_f64(),
            arrived: ArrivalWindow::new(limit.window),
            last_us: i64::MIN,
        }
    }

    pub fn stats(&self) -> SpendStats {
        SpendStats {
            limit: self.window.limit,
            window_s: self.window_s,
            max_in_any_window: self.window.max_in_any_window,
            max_arrivals_in_any_window: self.arrived.max,
        }
    }
}

/// The quota state of one (project, model): every dimension but spend, which is the
/// project's ([`ProjectSpend`], passed to each call).
#[derive(Debug)]
pub struct ModelQuota {
    fixed: bool,
    window_s: f64,
    rpm: Window,
    tpm: Window,
    ipm: Window,
    daily: Daily,
    /// All arrivals, per dimension (rpm, tpm, ipm).
    arrived: [ArrivalWindow; 3],
    /// The latest arrival time: arrivals are stamped before parsing and counted under the
    /// lock, so a later one can reach the lock first; clamping keeps the logs ordered.
    last_us: i64,
    arrivals: u64,
    accepted: u64,
    accepted_at_ms: Vec<i64>,
    rejected_at_ms: Vec<i64>,
    tickets: TicketStats,
    rejected: BTreeMap<&'static str, u64>,
    faults: BTreeMap<&'static str, u64>,
}

/// The dimensions a model counts in its own windows (spend is the project's).
const PER_MODEL: [Dim; 3] = [Dim::Rpm, Dim::Tpm, Dim::Ipm];

impl ModelQuota {
    /// The model's quota from `spec`, whose `spend` and `spend_window` are ignored here:
    /// they set the project's [`ProjectSpend`].
    pub fn new(spec: Option<&LimitSpec>, fixed: bool) -> ModelQuota {
        let window = spec.map_or(Duration::from_secs(60), |s| s.window);
        ModelQuota {
            fixed,
            window_s: window.as_secs_f64(),
            rpm: Window::new(window, spec.and_then(|s| s.rpm), fixed),
            tpm: Window::new(window, spec.and_then(|s| s.tpm), fixed),
            ipm: Window::new(window, spec.and_then(|s| s.ipm), fixed),
            daily: Daily {
                limit: spec.and_then(|s| s.rpd),
                length_us: spec
                    .and_then(|s| s.day)
                    .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX).max(1)),
                day_end: i64::MIN,
                count: 0,
                max_in_any_day: 0,
            },
            arrived: [
                ArrivalWindow::new(window),
                ArrivalWindow::new(window),
                ArrivalWindow::new(window),
            ],
            last_us: i64::MIN,
            arrivals: 0,
            accepted: 0,
            accepted_at_ms: Vec::new(),
            rejected_at_ms: Vec::new(),
            tickets: TicketStats::default(),
            rejected: BTreeMap::new(),
            faults: BTreeMap::new(),
        }
    }

    /// Counts an arrival, before any decision about it: every request that reaches the
    /// model counts here (and its spend in the project's `spend`), whatever it is
    /// answered. Returns the arrival's time on the simulator's (monotonic) clock, in
    /// microseconds.
    pub fn count_arrival(
        &mut self,
        spend: &mut ProjectSpend,
        now: Timestamp,
        costs: Costs,
        ticket: TicketSeen,
    ) -> i64 {
        let now_us = now.as_microsecond().max(self.last_us).max(spend.last_us);
        self.last_us = now_us;
        spend.last_us = now_us;
        self.arrivals += 1;
        for (w, dim) in self.arrived.iter_mut().zip(PER_MODEL) {
            w.record(now_us, costs.of(dim));
        }
        spend.arrived.record(now_us, costs.of(Dim::Spend));
        match ticket {
            TicketSeen::Untagged => self.tickets.untagged += 1,
            TicketSeen::Fresh => self.tickets.tagged += 1,
            TicketSeen::Duplicate => {
                self.tickets.tagged += 1;
                self.tickets.duplicates += 1;
            }
        }
        now_us
    }

    /// Counts the arrival ([`Self::count_arrival`]), then decides it: admitted if every
    /// dimension has room, the project's spend included, all or nothing.
    pub fn arrive(
        &mut self,
        spend: &mut ProjectSpend,
        now: Timestamp,
        costs: Costs,
        ticket: TicketSeen,
    ) -> Result<(), Vec<Exceeded>> {
        let now_us = self.count_arrival(spend, now, costs, ticket);
        self.admit(spend, now_us, costs)
    }

    /// The windows a request of this model counts in: its own, and the project's spend.
    fn windows<'a>(&'a mut self, spend: &'a mut ProjectSpend) -> [(Dim, &'a mut Window); 4] {
        [
            (Dim::Rpm, &mut self.rpm),
            (Dim::Tpm, &mut self.tpm),
            (Dim::Ipm, &mut self.ipm),
            (Dim::Spend, &mut spend.window),
        ]
    }

    /// Admits an arrival counted at `now_us` if every dimension has room (all or
    /// nothing); otherwise returns every exceeded dimension.
    fn admit(
        &mut self,
        spend: &mut ProjectSpend,
        now_us: i64,
        costs: Costs,
    ) -> Result<(), Vec<Exceeded>> {
        if now_us >= self.daily.day_end {
            self.daily.day_end = match self.daily.length_us {
                Some(len) => (now_us.div_euclid(len) + 1) * len,
                None => {
                    let now = Timestamp::from_microsecond(now_us).unwrap_or(Timestamp::MAX);
                    let next = pacer_core::pacific::next_midnights(now, 1);
                    next.first().map_or(i64::MAX, |t| t.as_microsecond())
                }
            };
            self.daily.count = 0;
        }
        let mut exceeded = Vec::new();
        for (dim, w) in self.windows(spend) {
            w.prune(now_us);
            if let (Some(limit), Some(retry_in)) = (w.limit, w.check(now_us, costs.of(dim))) {
                exceeded.push(Exceeded {
                    dim,
                    limit,
                    retry_in,
                });
            }
        }
        if let Some(limit) = self.daily.limit
            && self.daily.count + 1 > limit
        {
            let left = (self.daily.day_end - now_us).max(0);
            exceeded.push(Exceeded {
                dim: Dim::Rpd,
                limit,
                retry_in: Duration::from_micros(u64::try_from(left).unwrap_or(0)),
            });
        }
        if !exceeded.is_empty() {
            for e in &exceeded {
                *self.rejected.entry(e.dim.label()).or_default() += 1;
            }
            self.rejected_at_ms.push(now_us.div_euclid(1000));
            return Err(exceeded);
        }
        for (dim, w) in self.windows(spend) {
            w.admit(now_us, costs.of(dim));
        }
        self.daily.count += 1;
        self.daily.max_in_any_day = self.daily.max_in_any_day.max(self.daily.count);
        self.accepted += 1;
        // Arrival times are monotonic here, so the list stays sorted.
        self.accepted_at_ms.push(now_us.div_euclid(1000));
        Ok(())
    }

    pub fn fault(&mut self, kind: &'static str) {
        *self.faults.entry(kind).or_default() += 1;
    }

    /// The model's figures; under `spend`, its project's (`spend`).
    pub fn stats(&self, spend: &ProjectSpend) -> ModelStats {
        let mut max = BTreeMap::new();
        let mut limits = BTreeMap::new();
        for (dim, w) in [
            (Dim::Rpm, &self.rpm),
            (Dim::Tpm, &self.tpm),
            (Dim::Ipm, &self.ipm),
            (Dim::Spend, &spend.window),
        ] {
            max.insert(dim.label(), w.max_in_any_window);
            if let Some(l) = w.limit {
                limits.insert(dim.label(), l);
            }
        }
        max.insert(Dim::Rpd.label(), self.daily.max_in_any_day);
        if let Some(l) = self.daily.limit {
            limits.insert(Dim::Rpd.label(), l);
        }
        let max_arrivals = PER_MODEL
            .iter()
            .zip(&self.arrived)
            .map(|(dim, w)| (dim.label(), w.max))
            .chain([(Dim::Spend.label(), spend.arrived.max)])
            .collect();
        ModelStats {
            arrivals: self.arrivals,
            max_arrivals_in_any_window: max_arrivals,
            accepted: self.accepted,
            rejected: self.rejected.clone(),
            faults: self.faults.clone(),
            max_in_any_window: max,
            accepted_at_ms: self.accepted_at_ms.clone(),
            rejected_at_ms: self.rejected_at_ms.clone(),
            tickets: self.tickets,
            limits,
            window_s: self.window_s,
            fixed_windows: self.fixed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millisecond(1_800_000_000_000 + ms).expect("in range")
    }

    /// A model alone in its project, with the project's spend from its own spec.
    struct Alone {
        model: ModelQuota,
        spend: ProjectSpend,
    }

    impl Alone {
        fn new(spec: Option<&LimitSpec>, fixed: bool) -> Alone {
            let limit = spec.map_or_else(SpendLimit::default, |s| SpendLimit {
                micros: s.spend,
                window: s.spend_window,
            });
            Alone {
                model: ModelQuota::new(spec, fixed),
                spend: ProjectSpend::new(limit, fixed),
            }
        }

        fn arrive(&mut self, now: Timestamp, c: Costs, t: TicketSeen) -> Result<(), Vec<Exceeded>> {
            self.model.arrive(&mut self.spend, now, c, t)
        }

        fn arrive_at(&mut self, now: Timestamp, c: Costs) -> Result<(), Vec<Exceeded>> {
            self.arrive(now, c, TicketSeen::Untagged)
        }

        fn count_arrival(&mut self, now: Timestamp, c: Costs, t: TicketSeen) -> i64 {
            self.model.count_arrival(&mut self.spend, now, c, t)
        }

        fn fault(&mut self, kind: &'static str) {
            self.model.fault(kind);
        }

        fn stats(&self) -> ModelStats {
            self.model.stats(&self.spend)
        }
    }

    fn spec(rpm: u64) -> LimitSpec {
        let mut s = LimitSpec::new("m");
        s.rpm = Some(rpm);
        s.window = Duration::from_secs(10);
        s
    }

    /// Rehearsal days: `rpd` resets at multiples of the day length since the epoch, and a
    /// refusal says when the day ends.
    #[test]
    fn compressed_days_reset_the_daily_count() {
        let mut s = LimitSpec::new("m");
        s.rpd = Some(2);
        s.day = Some(Duration::from_secs(20));
        let mut q = Alone::new(Some(&s), false);
        // at(0) is 1_800_000_000 s since the epoch: a day start for 20 s days.
        assert!(q.arrive_at(at(0), Costs::default()).is_ok());
        assert!(q.arrive_at(at(1_000), Costs::default()).is_ok());
        let refused = q
            .arrive_at(at(2_000), Costs::default())
            .expect_err("the day is full");
        assert_eq!(refused[0].dim, Dim::Rpd);
        assert_eq!(refused[0].retry_in, Duration::from_secs(18));
        assert!(
            q.arrive_at(at(20_000), Costs::default()).is_ok(),
            "a new day"
        );
    }

    #[test]
    fn sliding_window_counts_at_arrival() {
        let mut q = Alone::new(Some(&spec(2)), false);
        let c = Costs::default();
        assert!(q.arrive_at(at(0), c).is_ok());
        assert!(q.arrive_at(at(4_000), c).is_ok());
        let e = q.arrive_at(at(5_000), c).expect_err("third in the window");
        assert_eq!(e[0].dim, Dim::Rpm);
        assert_eq!(e[0].retry_in, Duration::from_secs(5));
        assert!(q.arrive_at(at(10_001), c).is_ok());
        assert_eq!(q.stats().max_in_any_window["rpm"], 2);
        assert_eq!(q.stats().rejected["rpm"], 1);
    }

    #[test]
    fn fixed_window_resets_on_the_boundary() {
        let mut q = Alone::new(Some(&spec(1)), true);
        let c = Costs::default();
        // 1_800_000_000_000 ms is a multiple of 10 s: window boundaries at at(10_000k).
        assert!(q.arrive_at(at(9_000), c).is_ok());
        let e = q.arrive_at(at(9_500), c).expect_err("same calendar window");
        assert_eq!(e[0].retry_in, Duration::from_millis(500));
        assert!(q.arrive_at(at(10_000), c).is_ok());
        // Two in 1 s across the boundary: the measurement (sliding) sees it.
        assert_eq!(q.stats().max_in_any_window["rpm"], 2);
    }

    #[test]
    fn a_burst_over_the_limit_counts_every_arrival() {
        let mut q = Alone::new(Some(&spec(20)), false);
        let c = Costs {
            input_tokens: 7,
            images: 1,
            spend_micros: 100,
        };
        let mut ok = 0;
        for i in 0..25 {
            if q.arrive(at(i), c, TicketSeen::Untagged).is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, 20);
        let s = q.stats();
        assert_eq!(s.arrivals, 25);
        assert_eq!(s.accepted, 20);
        assert_eq!(s.rejected["rpm"], 5);
        assert_eq!(s.rejected.len(), 1);
        assert_eq!(s.max_arrivals_in_any_window["rpm"], 25);
        assert_eq!(s.max_arrivals_in_any_window["tpm"], 25 * 7);
        assert_eq!(s.max_arrivals_in_any_window["ipm"], 25);
        assert_eq!(s.max_arrivals_in_any_window["spend"], 25 * 100);
        // Accepted figures stay at the limit: they cannot show a breach.
        assert_eq!(s.max_in_any_window["rpm"], 20);
        let base = 1_800_000_000_000;
        assert_eq!(s.accepted_at_ms, (base..base + 20).collect::<Vec<_>>());
    }

    #[test]
    fn arrivals_slide_like_the_quota_window() {
        let mut q = Alone::new(None, false);
        let mut q10 = Alone::new(Some(&spec(100)), false);
        let c = Costs::default();
        // 60 s window by default: 3 arrivals at 0, 30 and 59.999 s, then one at 60 s
        // (the one at 0 has left: windows are (t - 60 s, t]).
        for ms in [0, 30_000, 59_999, 60_000] {
            q.count_arrival(at(ms), c, TicketSeen::Untagged);
        }
        assert_eq!(q.stats().max_arrivals_in_any_window["rpm"], 3);
        // 10 s windows: 0..9 s gives 10, the next 10 spread out never exceed it.
        for s in 0..20 {
            q10.count_arrival(at(s * 1000), c, TicketSeen::Untagged);
        }
        assert_eq!(q10.stats().max_arrivals_in_any_window["rpm"], 10);
        assert_eq!(q10.stats().arrivals, 20);
        assert_eq!(q10.stats().accepted, 0);
    }

    #[test]
    fn arrivals_out_of_order_are_clamped_and_faults_count() {
        let mut q = Alone::new(Some(&spec(5)), false);
        let c = Costs::default();
        q.count_arrival(at(1_000), c, TicketSeen::Fresh);
        q.fault("ghost_429");
        // Stamped earlier, counted later: counted at the latest time seen.
        assert!(q.arrive(at(500), c, TicketSeen::Duplicate).is_ok());
        q.count_arrival(at(2_000), c, TicketSeen::Untagged);
        let s = q.stats();
        assert_eq!(s.arrivals, 3);
        assert_eq!(s.accepted, 1);
        assert_eq!(s.accepted_at_ms, vec![1_800_000_001_000]);
        assert_eq!(s.faults["ghost_429"], 1);
        assert_eq!(s.max_arrivals_in_any_window["rpm"], 3);
        assert_eq!(
            s.tickets,
            TicketStats {
                tagged: 2,
                untagged: 1,
                duplicates: 1
            }
        );
    }

    #[test]
    fn merged_stats_add_counts_and_keep_the_largest_window() {
        let mut a = Alone::new(Some(&spec(1)), false);
        let mut b = Alone::new(Some(&spec(1)), false);
        let c = Costs::default();
        for ms in [0, 1, 2] {
            let _ = a.arrive(at(ms), c, TicketSeen::Fresh);
        }
        let _ = b.arrive(at(1), c, TicketSeen::Untagged);
        let mut m = a.stats();
        m.merge(&b.stats());
        assert_eq!(m.arrivals, 4);
        assert_eq!(m.accepted, 2);
        assert_eq!(m.rejected["rpm"], 2);
        assert_eq!(m.max_arrivals_in_any_window["rpm"], 3);
        assert_eq!(m.accepted_at_ms, vec![1_800_000_000_000, 1_800_000_000_001]);
        assert_eq!((m.tickets.tagged, m.tickets.untagged), (3, 1));
    }

    fn spending(micros: u64) -> Costs {
        Costs {
            spend_micros: micros,
            ..Costs::default()
        }
    }

    /// Spend is the project's: what one model spent, another model of the project cannot;
    /// another project's models count on their own; each model reports the project's
    /// figures.
    #[test]
    fn models_of_a_project_share_its_spend_window() {
        let limit = SpendLimit {
            micros: Some(100),
            window: Duration::from_secs(10),
        };
        let mut acme = ProjectSpend::new(limit, false);
        let mut other = ProjectSpend::new(limit, false);
        let mut pro = ModelQuota::new(None, false);
        let mut flash = ModelQuota::new(None, false);
        let mut elsewhere = ModelQuota::new(None, false);
        let u = TicketSeen::Untagged;
        assert!(pro.arrive(&mut acme, at(0), spending(70), u).is_ok());
        let refused = flash
            .arrive(&mut acme, at(1_000), spending(40), u)
            .expect_err("the project's spend is used up");
        assert_eq!(refused.len(), 1);
        assert_eq!(
            (refused[0].dim, refused[0].limit, refused[0].retry_in),
            (Dim::Spend, 100, Duration::from_secs(9))
        );
        assert_eq!(
            refused[0].dim.quota_id(false),
            "GenerateContentSpendPer10MinutesPerProject"
        );
        // A refused request spends nothing: 30 still fit.
        assert!(flash.arrive(&mut acme, at(2_000), spending(30), u).is_ok());
        assert!(
            elsewhere
                .arrive(&mut other, at(2_000), spending(100), u)
                .is_ok()
        );
        for s in [pro.stats(&acme), flash.stats(&acme)] {
            assert_eq!(s.max_in_any_window["spend"], 100);
            assert_eq!(s.max_arrivals_in_any_window["spend"], 140);
            assert_eq!(s.limits["spend"], 100);
        }
        assert_eq!(flash.stats(&acme).rejected["spend"], 1);
        assert!(!pro.stats(&acme).rejected.contains_key("spend"));
        assert_eq!(
            acme.stats(),
            SpendStats {
                limit: Some(100),
                window_s: 10.0,
                max_in_any_window: 100,
                max_arrivals_in_any_window: 140,
            }
        );
        assert_eq!(elsewhere.stats(&other).max_in_any_window["spend"], 100);
        // The window slides for the project: at 10 s the first 70 has left it.
        assert!(flash.arrive(&mut acme, at(10_000), spending(70), u).is_ok());
    }

    /// A request over one model's own limit spends nothing of the project's window.
    #[test]
    fn a_refusal_elsewhere_spends_nothing() {
        let limit = SpendLimit {
            micros: Some(100),
            window: Duration::from_secs(10),
        };
        let mut acme = ProjectSpend::new(limit, true);
        let mut pro = ModelQuota::new(Some(&spec(1)), true);
        let mut flash = ModelQuota::new(None, true);
        let u = TicketSeen::Untagged;
        assert!(pro.arrive(&mut acme, at(0), spending(10), u).is_ok());
        let refused = pro
            .arrive(&mut acme, at(1), spending(50), u)
            .expect_err("over rpm");
        assert_eq!(refused[0].dim, Dim::Rpm);
        assert!(flash.arrive(&mut acme, at(2), spending(90), u).is_ok());
        assert_eq!(acme.stats().max_in_any_window, 100);
        // Fixed windows: the project's spend resets on the calendar boundary.
        assert!(flash.arrive(&mut acme, at(9_999), spending(1), u).is_err());
        assert!(
            flash
                .arrive(&mut acme, at(10_000), spending(100), u)
                .is_ok()
        );
    }

    #[test]
    fn limit_zero_rejects_everything() {
        let mut q = Alone::new(Some(&spec(0)), false);
        assert!(q.arrive_at(at(0), Costs::default()).is_err());
    }
}
