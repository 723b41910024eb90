//! Quota enforcement the way Google does it: a request counts when it arrives, on the
//! server's clock, all dimensions at once. Sliding windows by default, calendar (fixed)
//! windows optionally; requests per day reset at Pacific midnight.
//!
//! Deliberately independent of Pacer's limiter: this plays the provider that the limiter
//! must stay under, and measures (`max_in_any_window`) whether it did.
use std::{
    collections::{BTreeMap, VecDeque},
    time::Duration,
};

use jiff::Timestamp;
use serde::Serialize;

use crate::config::LimitSpec;

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

    pub fn quota_id(self) -> &'static str {
        match self {
            Dim::Rpm => "GenerateRequestsPerMinutePerProjectPerModel",
            Dim::Tpm => "GenerateContentPaidTierInputTokensPerModelPerMinute",
            Dim::Ipm => "GenerateImagesPerMinutePerProjectPerModel",
            Dim::Rpd => "GenerateRequestsPerDayPerProjectPerModel",
            Dim::Spend => "GenerateContentSpendPer10MinutesPerProject",
        }
    }

    pub fn quota_metric(self) -> &'static str {
        match self {
            Dim::Rpm => "generativelanguage.googleapis.com/generate_requests_per_model",
            Dim::Tpm => {
                "generativelanguage.googleapis.com/generate_content_paid_tier_input_token_count"
            }
            Dim::Ipm => "generativelanguage.googleapis.com/generate_content_images_per_model",
            Dim::Rpd => "generativelanguage.googleapis.com/generate_requests_per_model_per_day",
            Dim::Spend => "generativelanguage.googleapis.com/generate_content_spend",
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
    log: VecDeque<(i64, u64)>,
    sum: u64,
    fixed_index: i64,
    fixed_sum: u64,
    max_in_any_window: u64,
}

impl Window {
    fn new(len: Duration, limit: Option<u64>) -> Window {
        Window {
            len_us: i64::try_from(len.as_micros()).unwrap_or(i64::MAX).max(1),
            limit,
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

    fn check(&self, now: i64, cost: u64, fixed: bool) -> Option<Duration> {
        let limit = self.limit?;
        let micros = |us: i64| Duration::from_micros(u64::try_from(us.max(0)).unwrap_or(0));
        if fixed {
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

/// Requests per day on the Pacific calendar day.
#[derive(Debug)]
struct Daily {
    limit: Option<u64>,
    day_end: i64,
    count: u64,
    max_in_any_day: u64,
}

/// Counters for `/_sim/stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelStats {
    pub accepted: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    pub faults: BTreeMap<&'static str, u64>,
    pub max_in_any_window: BTreeMap<&'static str, u64>,
    pub limits: BTreeMap<&'static str, u64>,
    pub window_s: f64,
    pub fixed_windows: bool,
}

/// The quota state of one (project, model).
#[derive(Debug)]
pub struct ModelQuota {
    fixed: bool,
    window_s: f64,
    rpm: Window,
    tpm: Window,
    ipm: Window,
    spend: Window,
    daily: Daily,
    accepted: u64,
    rejected: BTreeMap<&'static str, u64>,
    faults: BTreeMap<&'static str, u64>,
}

impl ModelQuota {
    pub fn new(spec: Option<&LimitSpec>, fixed: bool) -> ModelQuota {
        let window = spec.map_or(Duration::from_secs(60), |s| s.window);
        let spend_window = spec.map_or(Duration::from_secs(600), |s| s.spend_window);
        ModelQuota {
            fixed,
            window_s: window.as_secs_f64(),
            rpm: Window::new(window, spec.and_then(|s| s.rpm)),
            tpm: Window::new(window, spec.and_then(|s| s.tpm)),
            ipm: Window::new(window, spec.and_then(|s| s.ipm)),
            spend: Window::new(spend_window, spec.and_then(|s| s.spend)),
            daily: Daily {
                limit: spec.and_then(|s| s.rpd),
                day_end: i64::MIN,
                count: 0,
                max_in_any_day: 0,
            },
            accepted: 0,
            rejected: BTreeMap::new(),
            faults: BTreeMap::new(),
        }
    }

    fn window_mut(&mut self, dim: Dim) -> Option<&mut Window> {
        match dim {
            Dim::Rpm => Some(&mut self.rpm),
            Dim::Tpm => Some(&mut self.tpm),
            Dim::Ipm => Some(&mut self.ipm),
            Dim::Spend => Some(&mut self.spend),
            Dim::Rpd => None,
        }
    }

    /// Counts the request if every dimension has room (all or nothing); otherwise returns
    /// every exceeded dimension.
    pub fn arrive(&mut self, now: Timestamp, costs: Costs) -> Result<(), Vec<Exceeded>> {
        let now_us = now.as_microsecond();
        if now_us >= self.daily.day_end {
            let next = pacer_core::pacific::next_midnights(now, 1);
            self.daily.day_end = next.first().map_or(i64::MAX, |t| t.as_microsecond());
            self.daily.count = 0;
        }
        let mut exceeded = Vec::new();
        for dim in [Dim::Rpm, Dim::Tpm, Dim::Ipm, Dim::Spend] {
            let fixed = self.fixed;
            let cost = costs.of(dim);
            if let Some(w) = self.window_mut(dim) {
                w.prune(now_us);
                if let (Some(limit), Some(retry_in)) = (w.limit, w.check(now_us, cost, fixed)) {
                    exceeded.push(Exceeded {
                        dim,
                        limit,
                        retry_in,
                    });
                }
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
            return Err(exceeded);
        }
        for dim in [Dim::Rpm, Dim::Tpm, Dim::Ipm, Dim::Spend] {
            let cost = costs.of(dim);
            if let Some(w) = self.window_mut(dim) {
                w.admit(now_us, cost);
            }
        }
        self.daily.count += 1;
        self.daily.max_in_any_day = self.daily.max_in_any_day.max(self.daily.count);
        self.accepted += 1;
        Ok(())
    }

    pub fn fault(&mut self, kind: &'static str) {
        *self.faults.entry(kind).or_default() += 1;
    }

    pub fn stats(&self) -> ModelStats {
        let mut max = BTreeMap::new();
        let mut limits = BTreeMap::new();
        for (dim, w) in [
            (Dim::Rpm, &self.rpm),
            (Dim::Tpm, &self.tpm),
            (Dim::Ipm, &self.ipm),
            (Dim::Spend, &self.spend),
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
        ModelStats {
            accepted: self.accepted,
            rejected: self.rejected.clone(),
            faults: self.faults.clone(),
            max_in_any_window: max,
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

    fn spec(rpm: u64) -> LimitSpec {
        let mut s = LimitSpec::new("m");
        s.rpm = Some(rpm);
        s.window = Duration::from_secs(10);
        s
    }

    #[test]
    fn sliding_window_counts_at_arrival() {
        let mut q = ModelQuota::new(Some(&spec(2)), false);
        let c = Costs::default();
        assert!(q.arrive(at(0), c).is_ok());
        assert!(q.arrive(at(4_000), c).is_ok());
        let e = q.arrive(at(5_000), c).expect_err("third in the window");
        assert_eq!(e[0].dim, Dim::Rpm);
        assert_eq!(e[0].retry_in, Duration::from_secs(5));
        assert!(q.arrive(at(10_001), c).is_ok());
        assert_eq!(q.stats().max_in_any_window["rpm"], 2);
        assert_eq!(q.stats().rejected["rpm"], 1);
    }

    #[test]
    fn fixed_window_resets_on_the_boundary() {
        let mut q = ModelQuota::new(Some(&spec(1)), true);
        let c = Costs::default();
        // 1_800_000_000_000 ms is a multiple of 10 s: window boundaries at at(10_000k).
        assert!(q.arrive(at(9_000), c).is_ok());
        let e = q.arrive(at(9_500), c).expect_err("same calendar window");
        assert_eq!(e[0].retry_in, Duration::from_millis(500));
        assert!(q.arrive(at(10_000), c).is_ok());
        // Two in 1 s across the boundary: the measurement (sliding) sees it.
        assert_eq!(q.stats().max_in_any_window["rpm"], 2);
    }

    #[test]
    fn limit_zero_rejects_everything() {
        let mut q = ModelQuota::new(Some(&spec(0)), false);
        assert!(q.arrive(at(0), Costs::default()).is_err());
    }
}
