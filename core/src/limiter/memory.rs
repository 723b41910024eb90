//! The in-process limiter: the same algorithm as `acquire.lua`, on an injected clock.
//!
//! It is the embedded default for a single process with no Redis, and the per-replica
//! fallback (`failure mode = local`) when Redis is unreachable. Every branch here has a
//! twin in the Lua script; keep them in step.
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;

use super::{
    Blocker, Calendar, Check, Clock, Decision, DimensionUsage, Hint, Limiter, Limits, Origin,
    PacificCalendar, PenaltyScope, QuotaKey, Result, SystemClock, TenantUsage, Ticket, Usage,
    costs_i64, dur_us, us_dur,
};
use crate::quota::{Costs, Dim, ModelQuota, TenantShare};

const DAY_US: i64 = 86_400_000_000;

#[derive(Debug, Clone)]
struct Entry {
    start: i64,
    costs: [i64; 4],
    /// `None` once released.
    id: Option<Arc<str>>,
}

/// One (project, model) as the two Redis keys hold it: the hash's fields and the log.
#[derive(Debug, Default, Clone)]
pub(crate) struct KeyState {
    now: i64,
    /// When this state began (0: not yet, as a missing hash).
    generation: i64,
    last_start: i64,
    last_blocker: i64,
    cooldown: i64,
    day_blocked: i64,
    day_start: i64,
    day_end: i64,
    day_after: i64,
    day_count: i64,
    next_count: i64,
    /// The latest start a lost state had: every limited dimension waits its window from it.
    fence: i64,
    /// The latest start pruned from the log (the hash's `pr`): a window that grows past it
    /// cannot be recounted.
    pruned: i64,
    /// Until when a window may hold room given back (the hash's `rm`): a release, a lower
    /// reconcile, a re-fit. Before the queue's end, room is looked for only then.
    room_until: i64,
    log: VecDeque<Entry>,
    /// Sequence number of `log[0]`.
    base: u64,
    /// Per dimension: entries with a sequence number below this are outside the window.
    cursor: [u64; 4],
    /// Per dimension: the start the cursor was moved past (the script's `k1..k4`).
    targets: [i64; 4],
    sums: [i64; 4],
    windows: [i64; 4],
    /// The limits the bookings were made under (the hash's `l1..l4`; `None`: not yet
    /// recorded, as a hash written before they were).
    limits: Option<[i64; 4]>,
    /// Request id to its latest booking (the hash's `t:<id>` fields).
    tickets: HashMap<Arc<str>, u64>,
    /// The learned cut of the windowed rates, per mille (the hash's `ac`), and when it
    /// last changed (`al`).
    cut: i64,
    cut_at: i64,
    /// When each tenant last booked (the hash's `a:<tenant>` fields): its latest start.
    tenant_seen: HashMap<String, i64>,
    /// The latest start of a booking checked before its start (the hash's `ck`): it may
    /// be called already, so no other tenant may take it over.
    checked: i64,
    /// In a tenant's state: where its fair scan last found no room within its share
    /// (`fr`), for which share (`fp`) and room mark (`fm`).
    frontier: (i64, i64, i64),
    /// Bookings' priority classes when not 0 (the hash's `p:<id>` fields), and the lowest
    /// class ever booked (`pm`).
    classes: HashMap<Arc<str>, i64>,
    lowest_class: i64,
    /// The dimension the day's and month's counts are kept in (the script's `dd`):
    /// requests (0) for a model's per-day quota, spend (3) in a tenant's state, for its
    /// budgets.
    day_dim: usize,
    /// The month holding now (a tenant's monthly budget): its start, end, the next one's
    /// end (`ms`, `me`, `ma`), and what is booked in it and in the next (`mc`, `mn`).
    month_start: i64,
    month_end: i64,
    month_after: i64,
    month_count: i64,
    next_month_count: i64,
}

/// The pool's tenants as one decision sees them (the script's `TEN` and `T`).
pub(crate) struct Tenants<'a> {
    pub shares: &'a [TenantShare],
    /// The request's tenant.
    pub index: usize,
    /// Each tenant's state of this (project, model), in `shares`' order.
    pub states: &'a mut [KeyState],
    /// Each tenant's budgets in the project (over all of its models), in the same order.
    pub budgets: &'a mut [KeyState],
    /// The model: a victim's id in the project's log names it.
    pub model: &'a str,
    /// What the caller last saw of the request's tenant's budgets.
    pub budget_hint: Hint,
}

/// The most the learned cut takes (the rate never falls below a tenth of the limits), and
/// what one clean window gives back.
const CUT_MAX: i64 = 900;
const CUT_STEP: i64 = 100;

/// A project's spend state, weighed with a model's in one decision (the script's `P`):
/// Google's spend limit is the project's, shared by its models.
pub(crate) struct Project<'a> {
    pub state: &'a mut KeyState,
    /// What the caller last saw of it.
    pub hint: Hint,
    /// The booking's id in the project's log: the request id and its model (two models
    /// may book one id).
    pub id: String,
}

/// The project's limits: only spend, over the spend window (the script's
/// `project_limits`).
fn project_limits(limits: &Limits) -> Limits {
    Limits {
        limit: [-1, -1, -1, limits.limit[3]],
        window_us: [limits.window_us[3]; 4],
        per_day: -1,
    }
}

/// The pool's limits scaled by `permille` (unlimited stays unlimited).
fn portion(limits: &[i64; 4], permille: i64) -> [i64; 4] {
    limits.map(|l| if l < 0 { -1 } else { l * permille / 1000 })
}

/// The project's part of a booking.
fn spend_only(costs: [i64; 4]) -> [i64; 4] {
    [0, 0, 0, costs[3]]
}

/// What the algorithm decided, before it is dressed as a [`Decision`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Start {
        start: i64,
        now: i64,
        costs: [i64; 4],
    },
    Reject {
        retry_us: Option<i64>,
        blocker: Blocker,
    },
}

impl KeyState {
    fn entry(&self, seq: u64) -> Option<&Entry> {
        self.log
            .get(usize::try_from(seq.checked_sub(self.base)?).ok()?)
    }

    fn end_seq(&self) -> u64 {
        self.base + self.log.len() as u64
    }

    /// What a caller learns from a reply.
    pub(crate) fn hint(&self) -> Hint {
        Hint {
            generation: self.generation,
            last_start: self.last_start,
            day_end: self.day_end,
            day_count: self.day_count,
            day_blocked: self.day_blocked,
            ..Hint::default()
        }
    }

    /// What a caller learns of a tenant's budgets: their generation, and the day's and
    /// month's spend with their ends.
    pub(crate) fn budget_hint(&self) -> Hint {
        Hint {
            generation: self.generation,
            day_end: self.day_end,
            day_count: self.day_count,
            month_end: self.month_end,
            month_count: self.month_count,
            ..Hint::default()
        }
    }

    /// A budget's hash lost (deleted, evicted, a restart without persistence): what the
    /// caller saw spent in this day and month comes back (the most any caller saw, a lower
    /// bound of what was lost). Its hint is of another generation of the hash; the day and
    /// month already rolled to now's (the script's budget restore).
    fn restore_budget(&mut self, h: Hint) {
        if h.generation <= 0 || h.generation == self.generation {
            return;
        }
        if h.day_end == self.day_end {
            self.day_count = self.day_count.max(h.day_count);
        }
        if h.month_end == self.month_end {
            self.month_count = self.month_count.max(h.month_count);
        }
    }

    /// What a caller learns of a project's spend state: its generation and latest start
    /// (the day is the model's business).
    pub(crate) fn project_hint(&self) -> Hint {
        Hint {
            generation: self.generation,
            last_start: self.last_start,
            ..Hint::default()
        }
    }

    /// Starts an operation: the monotonic now, and whether the state is new (the script's
    /// `fresh`: a missing hash).
    fn begin(&mut self, clock_now: i64) -> (i64, bool) {
        let now = clock_now.max(self.now);
        self.now = now;
        let fresh = self.generation == 0;
        if fresh {
            self.generation = now;
        }
        (now, fresh)
    }

    /// Moves dimension `d`'s cursor past every entry starting at or before `target`.
    fn advance(&mut self, d: usize, target: i64) {
        self.targets[d] = self.targets[d].max(target);
        while let Some(e) = self.entry(self.cursor[d]) {
            if e.start > target {
                break;
            }
            self.sums[d] -= e.costs[d];
            self.cursor[d] += 1;
        }
    }

    /// Recomputes dimension `d` from the log (its window changed).
    fn rebuild(&mut self, d: usize, target: i64) {
        self.targets[d] = target;
        let idx = self.log.partition_point(|e| e.start <= target);
        self.cursor[d] = self.base + idx as u64;
        self.sums[d] = self.log.iter().skip(idx).map(|e| e.costs[d]).sum();
    }

    /// The earliest start, from `s0` on, at which dimension `d`'s window holds at most
    /// `need` (the limit minus the new request's cost). Windows only lose entries as the
    /// start moves later, so walking the log forward from the cursor finds it.
    fn earliest(&self, d: usize, need: i64, s0: i64, window: i64) -> i64 {
        let mut sum = self.sums[d];
        if sum <= need {
            return s0;
        }
        let start = usize::try_from(self.cursor[d] - self.base).unwrap_or(usize::MAX);
        let mut it = self.log.iter().skip(start).peekable();
        while let Some(e) = it.next() {
            sum -= e.costs[d];
            // Entries with the same start leave the window together.
            let group_ends = it.peek().is_none_or(|n| n.start != e.start);
            if sum <= need && group_ends {
                return e.start + window;
            }
        }
        s0 // unreachable: an empty window always has room for a cost that fits the limit
    }

    /// Whether a booking at `g` (before the queue's latest start) keeps every window that
    /// holds `g` within its limit: the windows ending at `g` and at each booking starting
    /// less than a window after it, counted exactly. The queue's walk ([`Self::earliest`])
    /// counts everything booked after the cursor, so after a raise or a release it would
    /// wait behind bookings that leave room.
    fn room_at(&self, g: i64, costs: &[i64; 4], limits: &Limits) -> bool {
        if self.day_blocked > g {
            return false;
        }
        if limits.per_day >= 0 && (g >= self.day_end || self.day_count + costs[0] > limits.per_day)
        {
            return false;
        }
        let dims: Vec<usize> = (0..4)
            .filter(|&d| limits.limit[d] >= 0 && costs[d] > 0)
            .collect();
        if dims.iter().any(|&d| g < self.fence + limits.window_us[d]) {
            return false;
        }
        dims.iter().all(|&d| {
            let (w, room) = (limits.window_us[d], limits.limit[d] - costs[d]);
            let from = self.log.partition_point(|e| e.start <= g - w);
            let near: Vec<(i64, i64)> = self
                .log
                .iter()
                .skip(from)
                .take_while(|e| e.start < g + w)
                .map(|e| (e.start, e.costs[d]))
                .collect();
            // A sliding sum over the windows (t - w, t], t = g and each later start.
            let (mut lo, mut hi, mut held) = (0, 0, 0);
            let mut within = |t: i64| {
                while hi < near.len() && near[hi].0 <= t {
                    held += near[hi].1;
                    hi += 1;
                }
                while lo < hi && near[lo].0 <= t - w {
                    held -= near[lo].1;
                    lo += 1;
                }
                held <= room
            };
            std::iter::once(g)
                .chain(near.iter().map(|(s, _)| *s).filter(|s| *s > g))
                .all(&mut within)
        })
    }

    /// Adds a booking at `start`, before bookings that start later (the script's `add` at a
    /// start below the latest): later sequence numbers move up by one, and the entry counts
    /// in a dimension's sum only where it lies after that dimension's cursor.
    fn insert(&mut self, start: i64, costs: [i64; 4], id: Arc<str>) -> u64 {
        let idx = self.log.partition_point(|e| e.start <= start);
        let seq = self.base + idx as u64;
        for s in self.tickets.values_mut() {
            if *s >= seq {
                *s += 1;
            }
        }
        for (d, c) in costs.iter().enumerate() {
            if start > self.targets[d] {
                self.sums[d] += c;
            } else {
                self.cursor[d] += 1;
            }
        }
        self.log.insert(
            idx,
            Entry {
                start,
                costs,
                id: Some(id.clone()),
            },
        );
        self.tickets.insert(id, seq);
        seq
    }

    /// The month, as [`Self::roll_day`] (the script's `roll_month`).
    fn roll_month(&mut self, now: i64, months: [i64; 3]) {
        if self.month_end != 0 && now < self.month_end {
            return;
        }
        let (ms, me, ma) = if now >= months[1] {
            (months[1], months[2], months[2] + 31 * DAY_US)
        } else {
            (months[0], months[1], months[2])
        };
        self.month_count = if ms == self.month_end {
            self.next_month_count
        } else {
            0
        };
        self.next_month_count = 0;
        (self.month_start, self.month_end, self.month_after) = (ms, me, ma);
    }

    /// Counts `x` (in the day dimension) for a booking at `start` in its day and month (the
    /// script's `count`).
    fn count(&mut self, start: i64, x: i64) {
        if start >= self.day_start && start < self.day_end {
            self.day_count = (self.day_count + x).max(0);
        } else if start >= self.day_end {
            self.next_count = (self.next_count + x).max(0);
        }
        if self.month_end > 0 {
            if start >= self.month_start && start < self.month_end {
                self.month_count = (self.month_count + x).max(0);
            } else if start >= self.month_end {
                self.next_month_count = (self.next_month_count + x).max(0);
            }
        }
    }

    /// A tenant's budgets at start `s` (the script's `budget`; -1: none): the start they
    /// allow (the next day's or month's when this one's is spent), and the time to retry
    /// from when that is later than the day or month after.
    fn budget(
        &self,
        mut s: i64,
        mut blocker: Blocker,
        cost: i64,
        daily: i64,
        monthly: i64,
    ) -> (i64, Blocker, Option<i64>) {
        if cost <= 0 {
            return (s, blocker, None);
        }
        if monthly >= 0 {
            if s < self.month_end && self.month_count + cost > monthly {
                (s, blocker) = (self.month_end, Blocker::Budget);
            }
            if s >= self.month_end
                && (s >= self.month_after || self.next_month_count + cost > monthly)
            {
                return (s, Blocker::Budget, Some(s.max(self.month_after)));
            }
        }
        if daily >= 0 {
            if s < self.day_end && self.day_count + cost > daily {
                (s, blocker) = (self.day_end, Blocker::Budget);
            }
            if s >= self.day_end && (s >= self.day_after || self.next_count + cost > daily) {
                return (s, Blocker::Budget, Some(s.max(self.day_after)));
            }
        }
        (s, blocker, None)
    }

    /// Whether a booking at `x` stays within a tenant's budgets, in the day and month it is
    /// in (the script's `within_budget`).
    fn within_budget(&self, x: i64, cost: i64, daily: i64, monthly: i64) -> bool {
        cost <= 0
            || ((daily < 0 || (x < self.day_end && self.day_count + cost <= daily))
                && (monthly < 0 || (x < self.month_end && self.month_count + cost <= monthly)))
    }

    fn roll_day(&mut self, now: i64, calendar: &dyn Calendar) {
        if self.day_end != 0 && now < self.day_end {
            return;
        }
        let b = calendar.boundaries(now);
        let (ds, de, da) = pick_day(&b, now);
        self.day_count = if ds == self.day_end {
            self.next_count
        } else {
            0
        };
        self.next_count = 0;
        self.day_start = ds;
        self.day_end = de;
        self.day_after = da;
    }

    /// Drops entries outside every window that started before `keep_from` (bookings stay
    /// until their check and reconcile, even behind a queue longer than a window). An id's
    /// mapping goes with its entry only if it still names that entry (a later booking of
    /// the same id keeps its own).
    fn prune(&mut self, keep_from: i64) {
        let min = self.cursor.iter().copied().min().unwrap_or(0);
        while self.base < min && self.log.front().is_some_and(|e| e.start <= keep_from) {
            // Released entries (placeholders here) are already gone from the script's log.
            if let Some(e) = self.log.pop_front()
                && let Some(id) = e.id
            {
                self.pruned = self.pruned.max(e.start);
                if self.tickets.get(&id) == Some(&self.base) {
                    self.tickets.remove(&id);
                    self.classes.remove(&id);
                }
            }
            self.base += 1;
        }
    }

    /// Evidence that state was lost: the caller saw another generation, or a later booking
    /// than the state holds (a rollback), or the hash and the log disagree (one key lost).
    /// Then every limited dimension waits out its own window from the latest start anyone
    /// saw, but never from later than now; the fence only moves to a later start, so later stale callers do not extend
    /// it. A lost booking that had started by the time of the loss may have been called,
    /// so the fence also covers that time (the generation's start after a restart, now for
    /// a lost key or a rollback found by this call); one that starts later is never
    /// called, as its check finds it gone. What only the callers still know of the day
    /// comes back from their hints: the day's count (the most any of them saw, a lower
    /// bound of the lost one) and a per-day block. Returns whether there was evidence.
    fn fence(&mut self, h: Hint, fresh: bool) -> bool {
        // One key lost: the hash is gone but the log still holds bookings, or the log is
        // gone while the hash still counts bookings in a window (released entries, kept
        // here as zero-cost placeholders, are gone from the script's log).
        let broken = if fresh {
            self.log.iter().any(|e| e.id.is_some())
        } else {
            self.log.is_empty() && self.sums.iter().any(|s| *s > 0)
        };
        let other_gen = h.generation > 0 && h.generation != self.generation;
        let rolled_back = h.last_start > self.last_start;
        if !(broken || other_gen || rolled_back) {
            return false;
        }
        if h.day_end == self.day_end {
            self.day_count = self.day_count.max(h.day_count);
        }
        self.day_blocked = self.day_blocked.max(h.day_blocked);
        let mut at = h.last_start;
        if other_gen {
            at = at.max(self.generation);
        }
        if rolled_back {
            at = at.max(self.now);
        }
        if broken {
            // Count what the log still holds, and fence from its latest booking and the
            // hash's.
            if let Some(e) = self.log.iter().rev().find(|e| e.id.is_some()) {
                at = at.max(e.start);
            }
            at = at.max(self.last_start).max(self.now);
            for d in 0..4 {
                self.cursor[d] = self.cursor[d].max(self.base);
                let skip = usize::try_from(self.cursor[d] - self.base).unwrap_or(usize::MAX);
                self.sums[d] = self.log.iter().skip(skip).map(|e| e.costs[d]).sum();
            }
        }
        // Never past now: a lost booking that starts later was not called (its holder
        // sleeps to its start, then checks, and finds it gone).
        self.fence = self.fence.max(at.min(self.now));
        self.last_start = self.last_start.max(at);
        true
    }

    /// The limits changed (a lower limit, a longer window or margin, more headroom, or a
    /// raise): the bookings that have not started are fitted again under the new limits,
    /// in start order, each kept at its start if every window ending there still holds at
    /// most the limit (counting what has started and what was kept before it), released
    /// otherwise, so the latest go first. Their holders' check answers [`Blocker::Lost`].
    /// The latest start (`last_start`) stays: it is every caller's rollback hint, and new
    /// bookings still queue behind it.
    /// Returns whether the recorded limits changed.
    /// The limits less the learned cut (the script's `learned`); with `raise`, one window
    /// since the cut last changed gives back [`CUT_STEP`] first.
    fn learned(&mut self, now: i64, limits: &Limits, raise: bool) -> Limits {
        let mut cut_limits = *limits;
        if self.cut <= 0 {
            return cut_limits;
        }
        if raise && now - self.cut_at >= limits.window_us[0] {
            self.cut = (self.cut - CUT_STEP).max(0);
            self.cut_at = now;
        }
        for limit in cut_limits.limit.iter_mut().take(3) {
            if *limit > 0 {
                *limit = (*limit * (1000 - self.cut) / 1000).max(1);
            }
        }
        cut_limits
    }

    fn refit(&mut self, now: i64, limits: &Limits) -> bool {
        let before = self.limits.replace(limits.limit);
        let Some(before) = before else { return true };
        if before == limits.limit && self.windows == limits.window_us {
            return false;
        }
        let limited: Vec<usize> = (0..4).filter(|&d| limits.limit[d] >= 0).collect();
        let Some(reach) = limited.iter().map(|&d| limits.window_us[d]).max() else {
            return true;
        };
        // A longer window may reach entries already pruned: what cannot be counted is taken
        // as full, as after a loss (each limited dimension waits its window from them).
        if limited
            .iter()
            .any(|&d| limits.window_us[d] > self.windows[d])
        {
            self.fence = self.fence.max(self.pruned);
        }
        let from = self.log.partition_point(|e| e.start <= now - reach);
        // Per dimension: what the kept entries hold in the window ending at the entry
        // being fitted (a sliding sum over `kept`, from `lo`).
        let mut kept: Vec<(i64, [i64; 4])> = Vec::new();
        let mut lo = [0usize; 4];
        let mut held = [0i64; 4];
        let mut gone = Vec::new();
        for (i, e) in self.log.iter().enumerate().skip(from) {
            if e.id.is_none() {
                continue;
            }
            for &d in &limited {
                while let Some((s, c)) = kept.get(lo[d])
                    && *s <= e.start - limits.window_us[d]
                {
                    held[d] -= c[d];
                    lo[d] += 1;
                }
            }
            let fits = limited.iter().all(|&d| {
                held[d] + e.costs[d] <= limits.limit[d]
                    && (e.costs[d] == 0 || e.start >= self.fence + limits.window_us[d])
            });
            if e.start <= now || fits {
                kept.push((e.start, e.costs));
                for (h, c) in held.iter_mut().zip(e.costs) {
                    *h += c;
                }
            } else {
                gone.push(self.base + i as u64);
            }
        }
        for seq in gone {
            self.release_seq(seq);
        }
        // A raise opens room in every window up to the queue's end.
        self.room_until = self.room_until.max(self.last_start + reach);
        true
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn acquire(
        &mut self,
        clock_now: i64,
        calendar: &dyn Calendar,
        limits: &Limits,
        request_id: &str,
        costs: [i64; 4],
        max_wait: i64,
        hint: Hint,
        mut project: Option<Project<'_>>,
        mut tenants: Option<Tenants<'_>>,
        priority: i64,
    ) -> Outcome {
        let clock_now = project
            .as_ref()
            .map_or(clock_now, |p| clock_now.max(p.state.now));
        let clock_now = tenants
            .as_ref()
            .map_or(clock_now, |t| clock_now.max(t.states[t.index].now));
        let (now, fresh) = self.begin(clock_now);
        let mut limits = *limits;
        let mut pl = None;
        if let Some(p) = project.as_mut() {
            let (_, pfresh) = p.state.begin(now);
            let l = project_limits(&limits);
            limits.limit[3] = -1;
            p.state.fence(p.hint, pfresh);
            let _ = p.state.refit(now, &l);
            pl = Some(l);
        }
        self.roll_day(now, calendar);
        self.fence(hint, fresh);
        let limits = &self.learned(now, &limits, true);
        let _ = self.refit(now, limits);
        // The pool's limits as this decision applies them (the learned cut included, spend
        // the project's): a tenant's ceiling and share are parts of these.
        let mut lf = limits.limit;
        if let Some(l) = pl {
            lf[3] = l.limit[3];
        }
        // The tenant's ceiling: its limits, enforced even while the pool has room.
        let mut tl = Limits {
            limit: [-1; 4],
            window_us: limits.window_us,
            per_day: -1,
        };
        if let Some(t) = tenants.as_mut() {
            let cl = t.shares[t.index].ceiling_permille;
            if cl < 1000 {
                tl.limit = portion(&lf, i64::from(cl));
            }
            let st = &mut t.states[t.index];
            let (_, tfresh) = st.begin(now);
            // Callers keep no hint of a tenant's state: a lost one is found by the model's.
            st.fence(Hint::default(), tfresh);
            let _ = st.refit(now, &tl);
            for b in t.budgets.iter_mut() {
                b.begin(now);
                b.roll_day(now, calendar);
                b.roll_month(now, calendar.months(now));
            }
            let hint = t.budget_hint;
            t.budgets[t.index].restore_budget(hint);
        }
        // The tenant's budgets (spend per day and per month; -1: none).
        let budgets = tenants.as_ref().map_or((-1, -1), |t| {
            let share = &t.shares[t.index];
            let micros = |b: Option<u64>| b.map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX));
            (
                micros(share.daily_budget_micros),
                micros(share.monthly_budget_micros),
            )
        });
        // A retried acquire of the same delivery gets its ticket back while the start is
        // ahead; once it has passed, the entry stays counted and the id books afresh.
        if let Some(e) = self.tickets.get(request_id).and_then(|s| self.entry(*s))
            && e.start > now
        {
            return Outcome::Start {
                start: e.start,
                now,
                costs: e.costs,
            };
        }
        if limits.never_fits(&costs)
            || pl.is_some_and(|l| l.never_fits(&spend_only(costs)))
            || tl.never_fits(&costs)
            || (budgets.0 >= 0 && costs[3] > budgets.0)
            || (budgets.1 >= 0 && costs[3] > budgets.1)
        {
            return Outcome::Reject {
                retry_us: None,
                blocker: Blocker::NeverFits,
            };
        }
        // Callers queue in arrival order: nobody starts before the latest booking (but see
        // the room taken below).
        let mut s = now;
        let mut blocker = Blocker::Dimension(Dim::Requests);
        if self.last_start > s {
            s = self.last_start;
            blocker = Blocker::from_code(self.last_blocker).unwrap_or(blocker);
        }
        if self.cooldown > s {
            s = self.cooldown;
            blocker = Blocker::Cooldown;
        }
        let s0 = s;
        for d in 0..4 {
            let w = limits.window_us[d];
            if self.windows[d] != w {
                self.windows[d] = w;
                self.rebuild(d, s0 - w);
            } else {
                self.advance(d, s0 - w);
            }
        }
        // The project's log holds every model's bookings, some later than this model's
        // queue: its cursor follows now, never one model's start, so its sum counts every
        // booking that any start from now on can share a window with.
        if let (Some(p), Some(l)) = (project.as_mut(), pl.as_ref()) {
            for d in 0..4 {
                let w = l.window_us[d];
                if p.state.windows[d] != w {
                    p.state.windows[d] = w;
                    p.state.rebuild(d, now - w);
                } else {
                    p.state.advance(d, now - w);
                }
            }
        }
        // The tenant's log holds its bookings only, some later than the others': its
        // cursor follows now too.
        if let Some(t) = tenants.as_mut() {
            let st = &mut t.states[t.index];
            for d in 0..4 {
                let w = limits.window_us[d];
                if st.windows[d] != w {
                    st.windows[d] = w;
                    st.rebuild(d, now - w);
                } else {
                    st.advance(d, now - w);
                }
            }
        }
        let keep_from = now - limits.window_us.iter().copied().max().unwrap_or(0);
        let prune_all = |st: &mut KeyState,
                         project: &mut Option<Project<'_>>,
                         tenants: &mut Option<Tenants<'_>>| {
            st.prune(keep_from);
            if let (Some(p), Some(l)) = (project.as_mut(), pl.as_ref()) {
                p.state.prune(now - l.window_us[3]);
            }
            if let Some(t) = tenants.as_mut() {
                t.states[t.index].prune(keep_from);
            }
        };
        // A queue ahead, yet room now (a raised limit, released bookings): take it.
        let g = now.max(self.cooldown);
        let given_back =
            g < self.room_until || project.as_ref().is_some_and(|p| g < p.state.room_until);
        if self.last_start > g
            && given_back
            && g - now <= max_wait
            && self.room_at(g, &costs, limits)
            && project
                .as_ref()
                .zip(pl.as_ref())
                .is_none_or(|(p, l)| p.state.room_at(g, &spend_only(costs), l))
            && tenants.as_ref().is_none_or(|t| {
                let st = &t.states[t.index];
                st.room_at(g, &costs, &tl)
                    && t.budgets[t.index].within_budget(g, costs[3], budgets.0, budgets.1)
            })
        {
            self.insert(g, costs, Arc::from(request_id));
            if g < self.day_end {
                self.day_count += costs[0];
            } else {
                self.next_count += costs[0];
            }
            if let Some(p) = project.as_mut() {
                p.state
                    .insert(g, spend_only(costs), Arc::from(p.id.as_str()));
                p.state.last_start = p.state.last_start.max(g);
            }
            self.note_class(request_id, priority);
            if let Some(t) = tenants.as_mut() {
                self.book_tenant(t, g, costs, request_id);
            }
            prune_all(self, &mut project, &mut tenants);
            return Outcome::Start {
                start: g,
                now,
                costs,
            };
        }
        let reject = |s: i64, blocker| Outcome::Reject {
            retry_us: Some(s - now),
            blocker,
        };
        // Priority: behind a queue, a request of a higher class takes the slot of the
        // earliest booking of a lower one that has not started (its holder's check finds
        // it gone and it books afresh). Before fairness: priority overtakes shares, never
        // a ceiling.
        if priority > self.lowest_class
            && self.last_start > now
            && let Some(x) = self.overtake(
                now,
                limits,
                &lf,
                &tl,
                pl.as_ref(),
                &mut project,
                &mut tenants,
                request_id,
                costs,
                priority,
                budgets,
            )
        {
            prune_all(self, &mut project, &mut tenants);
            return Outcome::Start {
                start: x,
                now,
                costs,
            };
        }
        // Fair shares: behind a queue, a tenant below its share takes the slot of a booking
        // of a tenant above its own share (not started, not checked), in start order; the
        // holder's check finds it gone and it books afresh.
        if let Some(t) = tenants.as_mut()
            && t.shares.len() > 1
            && self.last_start > now
            && let Some(x) = self.fair_slot(
                now,
                limits,
                &lf,
                &tl,
                pl.as_ref(),
                &mut project,
                t,
                request_id,
                costs,
                budgets,
            )
        {
            self.note_class(request_id, priority);
            prune_all(self, &mut project, &mut tenants);
            return Outcome::Start {
                start: x,
                now,
                costs,
            };
        }
        if s0 - now > max_wait {
            prune_all(self, &mut project, &mut tenants);
            return reject(s0, blocker);
        }
        for (d, cost) in costs.iter().enumerate() {
            if limits.limit[d] < 0 {
                continue;
            }
            let w = limits.window_us[d];
            let t = self.earliest(d, limits.limit[d] - cost, s0, w);
            if t > s {
                s = t;
                blocker = Blocker::Dimension(Dim::ALL[d]);
            }
            // After lost state: this dimension's window from the latest start anyone saw.
            if *cost > 0 && self.fence + w > s {
                s = self.fence + w;
                blocker = Blocker::Dimension(Dim::ALL[d]);
            }
        }
        // The project's spend: the earliest start from s at which every spend window
        // holding it has room, counting every model's bookings (a later start only frees
        // the model's own windows, as nothing of this model starts after s).
        if let (Some(p), Some(l)) = (project.as_ref(), pl.as_ref())
            && l.limit[3] >= 0
            && costs[3] > 0
        {
            let w = l.window_us[3];
            let t = p.state.earliest(3, l.limit[3] - costs[3], s, w);
            if t > s {
                s = t;
                blocker = Blocker::Dimension(Dim::SpendMicros);
            }
            if p.state.fence + w > s {
                s = p.state.fence + w;
                blocker = Blocker::Dimension(Dim::SpendMicros);
            }
        }
        // The tenant's ceiling, counting all of its bookings (its cursor follows now, so
        // the walk holds for any later start), and its budgets. A tenant they hold back
        // waits in the queue, not in the log: booked past the start the pool gives, it
        // would move the queue's end for every other tenant.
        if let Some(t) = tenants.as_ref() {
            let st = &t.states[t.index];
            let pool_s = s;
            for (d, cost) in costs.iter().enumerate() {
                if tl.limit[d] < 0 || *cost == 0 {
                    continue;
                }
                let w = limits.window_us[d];
                let t = st.earliest(d, tl.limit[d] - cost, s, w);
                if t > s {
                    s = t;
                    blocker = Blocker::Dimension(Dim::ALL[d]);
                }
                if st.fence + w > s {
                    s = st.fence + w;
                    blocker = Blocker::Dimension(Dim::ALL[d]);
                }
            }
            let (bs, _, retry) =
                t.budgets[t.index].budget(s, blocker, costs[3], budgets.0, budgets.1);
            if retry.is_some() || bs > s {
                prune_all(self, &mut project, &mut tenants);
                return reject(retry.unwrap_or(bs), Blocker::Budget);
            }
            if s > pool_s {
                prune_all(self, &mut project, &mut tenants);
                return reject(s, blocker);
            }
        }
        if self.day_blocked > s {
            s = self.day_blocked;
            blocker = Blocker::Daily;
        }
        if limits.per_day >= 0 {
            if s < self.day_end && self.day_count + costs[0] > limits.per_day {
                s = self.day_end;
                blocker = Blocker::Daily;
            }
            if s >= self.day_end
                && (s >= self.day_after || self.next_count + costs[0] > limits.per_day)
            {
                prune_all(self, &mut project, &mut tenants);
                return reject(s.max(self.day_after), Blocker::Daily);
            }
        }
        if s - now > max_wait {
            prune_all(self, &mut project, &mut tenants);
            return reject(s, blocker);
        }
        // The per-day quota may have moved the start into the next day: the budgets again.
        if let Some(t) = tenants.as_ref() {
            let (bs, _, retry) =
                t.budgets[t.index].budget(s, blocker, costs[3], budgets.0, budgets.1);
            if retry.is_some() || bs != s {
                prune_all(self, &mut project, &mut tenants);
                return reject(retry.unwrap_or(bs).max(s + 1), Blocker::Budget);
            }
        }
        let id: Arc<str> = Arc::from(request_id);
        let seq = self.end_seq();
        self.log.push_back(Entry {
            start: s,
            costs,
            id: Some(id.clone()),
        });
        self.tickets.insert(id, seq);
        for (d, c) in costs.iter().enumerate() {
            self.sums[d] += c;
        }
        self.last_start = s;
        self.last_blocker = blocker.code();
        for d in 0..4 {
            self.advance(d, s - limits.window_us[d]);
        }
        if s < self.day_end {
            self.day_count += costs[0];
        } else {
            self.next_count += costs[0];
        }
        if let Some(p) = project.as_mut() {
            p.state
                .insert(s, spend_only(costs), Arc::from(p.id.as_str()));
            p.state.last_start = p.state.last_start.max(s);
        }
        self.note_class(request_id, priority);
        if let Some(t) = tenants.as_mut() {
            self.book_tenant(t, s, costs, request_id);
        }
        prune_all(self, &mut project, &mut tenants);
        Outcome::Start {
            start: s,
            now,
            costs,
        }
    }

    /// The estimated spend of `request_id`'s booking at `start`, if it is held.
    fn spend_of(&self, request_id: &str, start: i64) -> Option<i64> {
        if self.generation == 0 {
            return None;
        }
        let seq = self.booked(request_id, start)?;
        self.entry(seq)
            .filter(|e| e.id.is_some())
            .map(|e| e.costs[3])
    }

    /// Records a booking's priority class (the hash's `p:<id>`), when not 0.
    fn note_class(&mut self, request_id: &str, priority: i64) {
        if priority != 0 {
            self.classes.insert(Arc::from(request_id), priority);
            self.lowest_class = self.lowest_class.min(priority);
        }
    }

    /// The earliest slot of a booking of a lower priority class this request may take over
    /// (not started, not checked, costing at least as much in every limited dimension), the
    /// swap made (the script's `overtake`).
    #[allow(clippy::too_many_arguments)]
    fn overtake(
        &mut self,
        now: i64,
        limits: &Limits,
        lf: &[i64; 4],
        tl: &Limits,
        pl: Option<&Limits>,
        project: &mut Option<Project<'_>>,
        tenants: &mut Option<Tenants<'_>>,
        request_id: &str,
        costs: [i64; 4],
        priority: i64,
        budgets: (i64, i64),
    ) -> Option<i64> {
        let w = limits.window_us;
        let mut lo = (now + 1)
            .max(self.checked + 1)
            .max(self.cooldown)
            .max(self.day_blocked);
        for d in 0..4 {
            if lf[d] >= 0 && costs[d] > 0 {
                lo = lo.max(self.fence + w[d]);
                if let Some(t) = tenants.as_ref() {
                    lo = lo.max(t.states[t.index].fence + w[d]);
                }
                if d == 3
                    && let (Some(p), Some(l)) = (project.as_ref(), pl)
                {
                    lo = lo.max(p.state.fence + l.window_us[3]);
                }
            }
        }
        let from = self.log.partition_point(|e| e.start < lo);
        let (seq, x, vid, victim_spend) = self
            .log
            .iter()
            .enumerate()
            .skip(from)
            .filter(|(_, e)| e.id.is_some())
            .take(64)
            .find_map(|(i, e)| {
                let id = e.id.as_ref()?;
                let lower = self.classes.get(id).copied().unwrap_or(0) < priority;
                let cheaper = (0..4).all(|d| lf[d] < 0 || e.costs[d] >= costs[d]);
                let room = tenants.as_ref().is_none_or(|t| {
                    let st = &t.states[t.index];
                    t.budgets[t.index].within_budget(e.start, costs[3], budgets.0, budgets.1)
                        && st.room_at(e.start, &costs, tl)
                });
                (lower && cheaper && room)
                    .then(|| (self.base + i as u64, e.start, id.clone(), e.costs[3]))
            })?;
        let rm = self.room_until;
        self.release_seq(seq);
        self.room_until = rm;
        if let Some(p) = project.as_mut() {
            let model =
                p.id.strip_prefix(request_id)
                    .unwrap_or_default()
                    .trim_start()
                    .to_owned();
            let prm = p.state.room_until;
            p.state.release(&format!("{vid} {model}"), x);
            p.state.room_until = prm;
            p.state
                .insert(x, spend_only(costs), Arc::from(p.id.as_str()));
            p.state.last_start = p.state.last_start.max(x);
        }
        if let Some(t) = tenants.as_mut() {
            // Out of its tenant's state too (the same tenant's, or another's), its spend
            // back to that tenant's budgets.
            if let Some(j) = t.states.iter().position(|st| st.booked(&vid, x).is_some()) {
                t.states[j].release(&vid, x);
                t.budgets[j].count(x, -victim_spend);
            }
        }
        self.insert(x, costs, Arc::from(request_id));
        if x < self.day_end {
            self.day_count += costs[0];
        } else {
            self.next_count += costs[0];
        }
        self.note_class(request_id, priority);
        if let Some(t) = tenants.as_mut() {
            self.book_tenant(t, x, costs, request_id);
        }
        Some(x)
    }

    /// Books in the tenant's state, and records when the tenant last booked.
    fn book_tenant(&mut self, t: &mut Tenants<'_>, at: i64, costs: [i64; 4], request_id: &str) {
        t.budgets[t.index].count(at, costs[3]);
        let st = &mut t.states[t.index];
        st.insert(at, costs, Arc::from(request_id));
        st.last_start = st.last_start.max(at);
        let seen = self
            .tenant_seen
            .entry(t.shares[t.index].name.clone())
            .or_insert(0);
        *seen = (*seen).max(at);
    }

    /// The earliest slot of another tenant's booking this request may take over, the swap
    /// made (the script's `fair_slot`): shares are weights among the tenants active within
    /// a window (booked from a window ago on), raised to a tenant's floor and cut to its
    /// ceiling, so an idle tenant's share goes to the others. A slot is taken only from a
    /// tenant above its own share in the window ending there, by a request that costs no
    /// more in any limited dimension, where the window keeps this tenant within its share.
    #[allow(clippy::too_many_arguments)]
    fn fair_slot(
        &mut self,
        now: i64,
        limits: &Limits,
        lf: &[i64; 4],
        tl: &Limits,
        pl: Option<&Limits>,
        project: &mut Option<Project<'_>>,
        t: &mut Tenants<'_>,
        request_id: &str,
        costs: [i64; 4],
        budgets: (i64, i64),
    ) -> Option<i64> {
        let w = limits.window_us;
        let reach = (0..4).filter(|&d| lf[d] >= 0).map(|d| w[d]).max()?;
        let active: Vec<bool> = t
            .shares
            .iter()
            .enumerate()
            .map(|(j, s)| {
                j == t.index
                    || self
                        .tenant_seen
                        .get(&s.name)
                        .is_some_and(|&a| a > now - reach)
            })
            .collect();
        let shares = crate::quota::fair_shares(t.shares, &active);
        let share = |j: usize| shares[j];
        let mine = share(t.index);
        let sl = Limits {
            limit: portion(lf, mine),
            window_us: w,
            per_day: -1,
        };
        // Not before a fence, a cooldown, a day block, or a booking already checked.
        let me = &t.states[t.index];
        let mut lo = (now + 1)
            .max(self.checked + 1)
            .max(self.cooldown)
            .max(self.day_blocked);
        let mut prim = None;
        for d in 0..4 {
            if lf[d] >= 0 && costs[d] > 0 {
                if costs[d] > sl.limit[d] {
                    return None;
                }
                lo = lo.max(self.fence + w[d]).max(me.fence + w[d]);
                if d == 3
                    && let (Some(p), Some(l)) = (project.as_ref(), pl)
                {
                    lo = lo.max(p.state.fence + l.window_us[3]);
                }
            }
            if lf[d] >= 0 && prim.is_none() {
                prim = Some(d);
            }
        }
        let prim = prim?;
        // Past where this tenant last found no room within its share, at this share (the
        // scan's frontier), unless room was given back in its state since.
        if me.frontier.1 == mine && me.frontier.2 == me.room_until {
            lo = lo.max(me.frontier.0 + 1);
        }
        // Candidates: each other active tenant's earliest bookings from lo, in start order.
        // A start where this tenant has no room skips to when its earliest booking in that
        // window leaves it (no start before then has room), and the scan fetches from there.
        let mut frontier = true;
        for _ in 0..8 {
            let mut cands: Vec<(i64, usize, Arc<str>, [i64; 4])> = Vec::new();
            for (j, st) in t.states.iter().enumerate() {
                if j == t.index || !active[j] {
                    continue;
                }
                let from = st.log.partition_point(|e| e.start < lo);
                cands.extend(
                    st.log
                        .iter()
                        .skip(from)
                        .filter_map(|e| e.id.clone().map(|id| (e.start, j, id, e.costs)))
                        .take(16),
                );
            }
            cands.sort_by_key(|c| (c.0, c.1));
            let mut skip = None;
            for (x, j, vid, cv) in cands {
                let me = &mut t.states[t.index];
                if !(me.room_at(x, &costs, &sl) && me.room_at(x, &costs, tl)) {
                    let first = me
                        .log
                        .iter()
                        .find(|e| e.id.is_some() && e.start > x - w[prim])
                        .map(|e| e.start);
                    let to = first.map_or(x + 1, |f| (f + w[prim]).max(x + 1));
                    // No room within the share before `to`: later scans start there.
                    if frontier {
                        me.frontier = (to - 1, mine, me.room_until);
                    }
                    skip = Some(to);
                    break;
                }
                frontier = false;
                if !t.budgets[t.index].within_budget(x, costs[3], budgets.0, budgets.1) {
                    return None;
                }
                if !(0..4).all(|d| lf[d] < 0 || cv[d] >= costs[d]) {
                    continue;
                }
                // The other tenant is above its share in the window ending at its slot.
                let held: i64 = t.states[j]
                    .log
                    .iter()
                    .filter(|e| e.start > x - w[prim] && e.start <= x)
                    .map(|e| e.costs[prim])
                    .sum();
                if held <= portion(lf, share(j))[prim] {
                    continue;
                }
                let Some(seq) = self.booked(&vid, x) else {
                    continue;
                };
                // A swap gives no room back: the model's and the project's states keep
                // their record of that (the other tenant's state does not: it has room now).
                let rm = self.room_until;
                self.release_seq(seq);
                self.room_until = rm;
                t.states[j].release(&vid, x);
                t.budgets[j].count(x, -cv[3]);
                if let Some(p) = project.as_mut() {
                    let prm = p.state.room_until;
                    p.state.release(&format!("{vid} {}", t.model), x);
                    p.state.room_until = prm;
                    p.state
                        .insert(x, spend_only(costs), Arc::from(p.id.as_str()));
                    p.state.last_start = p.state.last_start.max(x);
                }
                self.insert(x, costs, Arc::from(request_id));
                if x < self.day_end {
                    self.day_count += costs[0];
                } else {
                    self.next_count += costs[0];
                }
                self.book_tenant(t, x, costs, request_id);
                return Some(x);
            }
            lo = skip?;
        }
        None
    }

    /// The entry booked for `request_id` with this start: the id's latest booking, or an
    /// earlier one (a later booking of the same id has taken the mapping since).
    fn booked(&self, request_id: &str, start: i64) -> Option<u64> {
        if let Some(&seq) = self.tickets.get(request_id)
            && self.entry(seq).is_some_and(|e| e.start == start)
        {
            return Some(seq);
        }
        let from = self.log.partition_point(|e| e.start < start);
        self.log
            .iter()
            .enumerate()
            .skip(from)
            .take_while(|(_, e)| e.start == start)
            .find(|(_, e)| e.id.as_deref() == Some(request_id))
            .map(|(i, _)| self.base + i as u64)
    }

    fn set_costs(&mut self, seq: u64, new: [i64; 4]) -> Option<[i64; 4]> {
        let idx = usize::try_from(seq - self.base).ok()?;
        let start = self.log.get(idx)?.start;
        let reach = self.windows.iter().copied().max().unwrap_or(0);
        self.room_until = self.room_until.max(start + reach);
        let old = std::mem::replace(&mut self.log.get_mut(idx)?.costs, new);
        for d in 0..4 {
            if seq >= self.cursor[d] {
                self.sums[d] += new[d] - old[d];
            }
        }
        Some(old)
    }

    /// Just before a booked call: the state must not have been lost, the booking must still
    /// be held (in the project's spend state too), and no cooldown or day block set since
    /// it was booked may forbid it (a booking made under one starts after it). A ticket
    /// that may not run is released.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check(
        &mut self,
        clock_now: i64,
        calendar: &dyn Calendar,
        request_id: &str,
        start: i64,
        hint: Hint,
        mut project: Option<Project<'_>>,
        mut tenant: Option<&mut KeyState>,
    ) -> Check {
        let clock_now = project
            .as_ref()
            .map_or(clock_now, |p| clock_now.max(p.state.now));
        let clock_now = tenant.as_ref().map_or(clock_now, |t| clock_now.max(t.now));
        let (now, fresh) = self.begin(clock_now);
        let pfresh = project.as_mut().map(|p| p.state.begin(now).1);
        let tfresh = tenant.as_mut().map(|t| t.begin(now).1);
        self.roll_day(now, calendar);
        let lost = Check::Cancelled {
            retry_after: None,
            blocking: Blocker::Lost,
        };
        let mut fenced = self.fence(hint, fresh);
        if let (Some(p), Some(pf)) = (project.as_mut(), pfresh) {
            fenced |= p.state.fence(p.hint, pf);
        }
        // Gives the booking up in every state.
        let drop = |st: &mut KeyState,
                    project: &mut Option<Project<'_>>,
                    tenant: &mut Option<&mut KeyState>| {
            st.release(request_id, start);
            if let Some(p) = project.as_mut() {
                p.state.release(&p.id, start);
            }
            if let Some(t) = tenant.as_mut() {
                t.release(request_id, start);
            }
        };
        if fenced {
            // Fenced now, so nobody books into the lost window; this ticket is not used.
            drop(self, &mut project, &mut tenant);
            return lost;
        }
        let held = !fresh
            && self.booked(request_id, start).is_some()
            && project
                .as_ref()
                .is_none_or(|p| pfresh != Some(true) && p.state.booked(&p.id, start).is_some())
            && tenant
                .as_ref()
                .is_none_or(|t| tfresh != Some(true) && t.booked(request_id, start).is_some());
        if !held {
            drop(self, &mut project, &mut tenant);
            // A state found new is not created here (the script does not save it).
            if fresh {
                self.generation = 0;
            }
            if pfresh == Some(true)
                && let Some(p) = project.as_mut()
            {
                p.state.generation = 0;
            }
            if tfresh == Some(true)
                && let Some(t) = tenant.as_mut()
            {
                t.generation = 0;
            }
            return lost;
        }
        let mut until = None;
        if self.cooldown > now {
            until = Some((self.cooldown, Blocker::Cooldown));
        }
        if self.day_blocked > now && until.is_none_or(|(u, _)| self.day_blocked > u) {
            until = Some((self.day_blocked, Blocker::Daily));
        }
        let Some((until, blocking)) = until else {
            if start > self.checked && start > now {
                self.checked = start;
            }
            return Check::Go;
        };
        drop(self, &mut project, &mut tenant);
        Check::Cancelled {
            retry_after: Some(us_dur(until - now)),
            blocking,
        }
    }

    pub(crate) fn reconcile(&mut self, request_id: &str, start: i64, actual: [i64; 4]) {
        if self.generation == 0 {
            return;
        }
        if let Some(seq) = self.booked(request_id, start)
            && let Some(old) = self.set_costs(seq, actual)
            && self.day_dim != 0
        {
            // A budget is charged what the call cost (a request stays a request).
            self.count(start, actual[self.day_dim] - old[self.day_dim]);
        }
    }

    pub(crate) fn release(&mut self, request_id: &str, start: i64) {
        if self.generation == 0 {
            return;
        }
        if let Some(seq) = self.booked(request_id, start) {
            self.release_seq(seq);
        }
    }

    /// Releases the entry `seq`: a placeholder without costs or id stays in its place (the
    /// script removes the member), and it no longer counts against its day.
    fn release_seq(&mut self, seq: u64) {
        let Some(old) = self.set_costs(seq, [0; 4]) else {
            return;
        };
        let idx = usize::try_from(seq - self.base).unwrap_or(usize::MAX);
        let Some(e) = self.log.get_mut(idx) else {
            return;
        };
        let start = e.start;
        if let Some(id) = e.id.take()
            && self.tickets.get(&id) == Some(&seq)
        {
            self.tickets.remove(&id);
            self.classes.remove(&id);
        }
        self.count(start, -old[self.day_dim]);
    }

    pub(crate) fn penalize(
        &mut self,
        clock_now: i64,
        calendar: &dyn Calendar,
        delay: i64,
        scope: PenaltyScope,
    ) {
        let (now, _) = self.begin(clock_now);
        self.roll_day(now, calendar);
        match scope {
            PenaltyScope::PerMinute => self.cooldown = self.cooldown.max(now + delay),
            PenaltyScope::PerDay => self.day_blocked = self.day_blocked.max(self.day_end),
            PenaltyScope::Unexplained => {
                self.cooldown = self.cooldown.max(now + delay);
                // The 429s of one over-full window count once.
                if self.cut == 0 || now - self.cut_at >= self.windows[0] / 2 {
                    self.cut = CUT_MAX.min(1000 - (1000 - self.cut) * 7 / 10);
                    self.cut_at = now;
                }
            }
        }
    }

    /// From the running sums, O(1): they cover the window ending at the latest booking (or
    /// the latest decision); once that booking is a full window old, nothing is left. The
    /// operator reads usage with the config it has just compiled, so a limit change is
    /// applied here, at once, even while every replica sleeps on its booking.
    pub(crate) fn usage(
        &mut self,
        clock_now: i64,
        quota: &ModelQuota,
        project: Option<&mut KeyState>,
    ) -> Usage {
        let mut declared = Limits::of(quota);
        // Spend is the project's when its state is given.
        let mut spend_used = None;
        if let Some(p) = project {
            let pl = project_limits(&declared);
            declared.limit[3] = -1;
            let now = clock_now.max(p.now);
            if p.generation != 0 && p.refit(now, &pl) {
                p.now = now;
            }
            spend_used = Some(
                if p.generation == 0 || p.last_start <= now - pl.window_us[3] {
                    0
                } else {
                    p.sums[3].max(0)
                },
            );
        }
        if self.generation != 0 {
            let now = clock_now.max(self.now);
            let limits = self.learned(now, &declared, false);
            if self.refit(now, &limits) {
                self.now = now;
            }
        }
        let now = clock_now.max(self.now);
        let dimensions = Dim::ALL
            .iter()
            .map(|&dim| {
                let d = dim.index();
                let used = match spend_used {
                    Some(used) if dim == Dim::SpendMicros => used,
                    _ if self.generation == 0 || self.last_start <= now - declared.window_us[d] => {
                        0
                    }
                    _ => self.sums[d].max(0),
                };
                DimensionUsage {
                    dim,
                    used: u64::try_from(used).unwrap_or(0),
                    limit: quota.dim(dim).limit,
                    window: quota.dim(dim).window,
                }
            })
            .collect();
        let today = now < self.day_end;
        Usage {
            dimensions,
            cooldown_remaining: us_dur(self.cooldown - now),
            daily_used: if today {
                u64::try_from(self.day_count).unwrap_or(0)
            } else {
                0
            },
            daily_limit: quota.requests_per_day,
            daily_blocked_remaining: us_dur(self.day_blocked - now),
            queue: us_dur(self.last_start - now),
            rate_cut_permille: u32::try_from(self.cut).unwrap_or(0),
        }
    }

    /// A tenant's use (the script's `n`), read at `now`: requests started within `window`
    /// and booked ahead, its budgets' day and month counts as they stand now.
    fn tenant_usage(&self, tenant: &str, now: i64, window: i64, budget: &KeyState) -> TenantUsage {
        let (mut requests, mut ahead) = (0i64, 0i64);
        for e in self
            .log
            .iter()
            .filter(|e| e.id.is_some() && e.start > now - window)
        {
            if e.start <= now {
                requests += e.costs[0];
            } else {
                ahead += e.costs[0];
            }
        }
        let current = |start: i64, stop: i64, after: i64, count: i64, next: i64| {
            let v = if now >= start && now < stop {
                count
            } else if now >= stop && now < after {
                next
            } else {
                0
            };
            u64::try_from(v).unwrap_or(0)
        };
        TenantUsage {
            tenant: tenant.to_owned(),
            requests: u64::try_from(requests).unwrap_or(0),
            booked_ahead: u64::try_from(ahead).unwrap_or(0),
            spent_today_micros: current(
                budget.day_start,
                budget.day_end,
                budget.day_after,
                budget.day_count,
                budget.next_count,
            ),
            spent_this_month_micros: current(
                budget.month_start,
                budget.month_end,
                budget.month_after,
                budget.month_count,
                budget.next_month_count,
            ),
            queue: us_dur(self.last_start - now),
        }
    }

    /// Loses the log and keeps the hash (tests: one key evicted or deleted).
    #[cfg(test)]
    pub(crate) fn lose_log(&mut self) {
        self.base = self.end_seq();
        self.log.clear();
    }

    /// Loses the hash and keeps the log (tests: one key evicted or deleted).
    #[cfg(test)]
    pub(crate) fn lose_hash(&mut self) {
        *self = KeyState {
            log: std::mem::take(&mut self.log),
            base: self.base,
            ..KeyState::default()
        };
    }
}

/// The day containing `now` among the boundaries `[start, m1, m2, m3]`:
/// (start, end, the end of the following day).
pub(crate) fn pick_day(b: &[i64; 4], now: i64) -> (i64, i64, i64) {
    if now < b[0] {
        return (now, b[0], b[1]);
    }
    for i in 0..3 {
        if now < b[i + 1] {
            let after = if i + 2 <= 3 {
                b[i + 2]
            } else {
                b[i + 1] + DAY_US
            };
            return (b[i], b[i + 1], after);
        }
    }
    (b[3], b[3] + DAY_US, b[3] + 2 * DAY_US)
}

pub(crate) fn decision(
    key: &QuotaKey,
    request_id: &str,
    outcome: Outcome,
    origin: Origin,
    project_spend: bool,
) -> Decision {
    match outcome {
        Outcome::Start { start, now, costs } => {
            let ticket = Ticket {
                key: key.clone(),
                request_id: request_id.to_owned(),
                start_us: start,
                costs: Costs::from_array(costs.map(|c| u64::try_from(c).unwrap_or(0))),
                origin,
                project_spend,
                tenant: None,
            };
            if start <= now {
                Decision::Admitted { ticket }
            } else {
                Decision::Booked {
                    ticket,
                    wait: us_dur(start - now),
                }
            }
        }
        Outcome::Reject { retry_us, blocker } => Decision::Rejected {
            retry_after: retry_us.map(us_dur),
            blocking: blocker,
        },
    }
}

/// Where `tenant`'s budgets in `key`'s project are kept (one state over all its models).
pub(crate) fn budget_key(key: &QuotaKey, tenant: &str) -> QuotaKey {
    QuotaKey::new(key.project.clone(), format!("*t:{tenant}:budget"))
}

/// The in-process limiter.
#[derive(Debug)]
pub struct MemoryLimiter {
    clock: Arc<dyn Clock>,
    calendar: Arc<dyn Calendar>,
    origin: Origin,
    /// Per key: the state, and what this limiter last saw of it (as a Redis client keeps
    /// its hints; they only differ here when a test loses or rolls back the state).
    states: Mutex<HashMap<QuotaKey, (KeyState, Hint)>>,
    /// What this limiter last saw of each tenant's budgets (under their keys in
    /// `states`).
    budget_hints: Mutex<HashMap<QuotaKey, Hint>>,
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        MemoryLimiter::new(Arc::new(SystemClock))
    }
}

impl MemoryLimiter {
    /// A limiter on `clock`, with the provider's Pacific calendar.
    pub fn new(clock: Arc<dyn Clock>) -> MemoryLimiter {
        MemoryLimiter {
            clock,
            calendar: Arc::new(PacificCalendar),
            origin: Origin::Shared,
            states: Mutex::new(HashMap::new()),
            budget_hints: Mutex::new(HashMap::new()),
        }
    }

    /// The same limiter with another calendar (tests: short days).
    pub fn with_calendar(mut self, calendar: Arc<dyn Calendar>) -> MemoryLimiter {
        self.calendar = calendar;
        self
    }

    /// Marks the tickets this limiter issues (the failsafe's local fallback).
    pub(crate) fn with_origin(mut self, origin: Origin) -> MemoryLimiter {
        self.origin = origin;
        self
    }

    fn with_state<T>(&self, key: &QuotaKey, f: impl FnOnce(&mut KeyState, &mut Hint) -> T) -> T {
        self.with_states(key, false, &[], |st, hint, _, _| f(st, hint))
    }

    /// `key`'s state, with `project_spend` its project's spend state (kept under the key
    /// `(project, "*spend")`), each with what this limiter last saw of it, and the states
    /// of `tenants` (kept under `(project, "<model>:*t:<tenant>")`), in their order,
    /// followed by their budgets (under `(project, "*t:<tenant>:budget")`).
    fn with_states<T>(
        &self,
        key: &QuotaKey,
        project_spend: bool,
        tenants: &[&str],
        f: impl FnOnce(&mut KeyState, &mut Hint, Option<&mut (KeyState, Hint)>, &mut [KeyState]) -> T,
    ) -> T {
        // A poisoned lock only means another caller panicked mid-decision; the state is
        // still a valid log (every mutation keeps the sums consistent before returning).
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let pkey = QuotaKey::new(key.project.clone(), "*spend");
        let mut project = project_spend.then(|| states.remove(&pkey).unwrap_or_default());
        let tkeys: Vec<QuotaKey> = tenants
            .iter()
            .map(|t| QuotaKey::new(key.project.clone(), format!("{}:*t:{t}", key.model)))
            .chain(tenants.iter().map(|t| budget_key(key, t)))
            .collect();
        let n = tenants.len();
        let mut tstates: Vec<KeyState> = tkeys
            .iter()
            .enumerate()
            .map(|(i, k)| KeyState {
                day_dim: if i < n { 0 } else { 3 },
                ..states.remove(k).unwrap_or_default().0
            })
            .collect();
        let (st, hint) = match states.get_mut(key) {
            Some(slot) => slot,
            None => states.entry(key.clone()).or_default(),
        };
        let out = f(st, hint, project.as_mut(), &mut tstates);
        if let Some(p) = project {
            states.insert(pkey, p);
        }
        for (k, t) in tkeys.into_iter().zip(tstates) {
            states.insert(k, (t, Hint::default()));
        }
        out
    }

    /// The project's spend state as one decision sees it (a reborrow: the caller keeps
    /// it, to store what the decision left in its hint).
    fn project<'a>(
        project: &'a mut Option<&mut (KeyState, Hint)>,
        key: &QuotaKey,
        request_id: &str,
    ) -> Option<Project<'a>> {
        project.as_mut().map(|p| Project {
            hint: p.1,
            state: &mut p.0,
            id: Self::project_id(key, request_id),
        })
    }

    /// Loses the hash of `key`'s state, keeping its log (tests: one key evicted or
    /// deleted; a tenant's budgets are under [`budget_key`]).
    #[cfg(test)]
    pub(crate) fn lose_hash_of(&self, key: &QuotaKey) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((st, _)) = states.get_mut(key) {
            st.lose_hash();
        }
    }

    /// The booking's id in its project's log (the script's `pid`).
    fn project_id(key: &QuotaKey, request_id: &str) -> String {
        format!("{request_id} {}", key.model)
    }

    /// Synchronous acquire as the default tenant (tests).
    #[cfg(test)]
    pub(crate) fn acquire_now(
        &self,
        key: &QuotaKey,
        quota: &ModelQuota,
        request_id: &str,
        costs: Costs,
        max_wait: Duration,
    ) -> Decision {
        self.acquire_for_now(
            key,
            quota,
            super::Asker::default(),
            request_id,
            costs,
            max_wait,
        )
        .expect("a valid request")
    }

    /// Synchronous acquire (the failsafe's local path), for `tenant` (see
    /// [`Limiter::acquire_for`]).
    pub fn acquire_for_now(
        &self,
        key: &QuotaKey,
        quota: &ModelQuota,
        asker: super::Asker<'_>,
        request_id: &str,
        costs: Costs,
        max_wait: Duration,
    ) -> Result<Decision> {
        if request_id.is_empty() {
            return Err(super::Error::Invalid("empty request id".into()));
        }
        let tenant_at = super::tenant_index(quota, asker.tenant)?;
        let limits = Limits::of(quota);
        let now = self.clock.now_us();
        let project_spend = quota.spend_micros.limit.is_some();
        let names: Vec<&str> = quota.tenants.iter().map(|t| t.name.as_str()).collect();
        let bkey = tenant_at.map(|i| budget_key(key, names[i]));
        let budget_hint = bkey.as_ref().map_or_else(Hint::default, |k| {
            let hints = self.budget_hints.lock().unwrap_or_else(|p| p.into_inner());
            hints.get(k).copied().unwrap_or_default()
        });
        let (outcome, seen) = self.with_states(
            key,
            project_spend,
            &names,
            |st, hint, mut project, tstates| {
                let (states, budgets) = tstates.split_at_mut(names.len());
                let tenants = tenant_at.map(|index| Tenants {
                    shares: &quota.tenants,
                    index,
                    states,
                    budgets,
                    model: &key.model,
                    budget_hint,
                });
                let outcome = st.acquire(
                    now,
                    &*self.calendar,
                    &limits,
                    request_id,
                    costs_i64(&costs),
                    dur_us(max_wait),
                    *hint,
                    Self::project(&mut project, key, request_id),
                    tenants,
                    i64::from(asker.priority),
                );
                *hint = st.hint();
                if let Some((ps, ph)) = project {
                    *ph = ps.project_hint();
                }
                let seen = tenant_at.map(|i| tstates[names.len() + i].budget_hint());
                (outcome, seen)
            },
        );
        if let (Some(k), Some(seen)) = (bkey, seen) {
            let mut hints = self.budget_hints.lock().unwrap_or_else(|p| p.into_inner());
            hints.insert(k, seen);
        }
        let mut d = decision(key, request_id, outcome, self.origin, project_spend);
        if let (Some(i), Decision::Admitted { ticket } | Decision::Booked { ticket, .. }) =
            (tenant_at, &mut d)
        {
            ticket.tenant = Some(quota.tenants[i].name.clone());
        }
        Ok(d)
    }
}

#[async_trait]
impl Limiter for MemoryLimiter {
    async fn acquire_for(
        &self,
        key: &QuotaKey,
        quota: &ModelQuota,
        asker: super::Asker<'_>,
        request_id: &str,
        costs: Costs,
        max_wait: Duration,
    ) -> Result<Decision> {
        self.acquire_for_now(key, quota, asker, request_id, costs, max_wait)
    }

    async fn check(&self, ticket: &Ticket) -> Result<Check> {
        let now = self.clock.now_us();
        let tenants: Vec<&str> = ticket.tenant.as_deref().into_iter().collect();
        Ok(self.with_states(
            &ticket.key,
            ticket.project_spend,
            &tenants,
            |st, hint, mut project, tstates| {
                let (rid, start) = (ticket.request_id.as_str(), ticket.start_us);
                let spent = st.spend_of(rid, start);
                let (tenant, budget) = match tstates {
                    [t, b] => (Some(t), Some(b)),
                    _ => (None, None),
                };
                let check = st.check(
                    now,
                    &*self.calendar,
                    rid,
                    start,
                    *hint,
                    Self::project(&mut project, &ticket.key, rid),
                    tenant,
                );
                // A booking given up gives its estimate back to the tenant's budgets.
                if let (Some(b), Some(spent)) = (budget, spent)
                    && st.spend_of(rid, start).is_none()
                    && b.generation != 0
                {
                    b.count(start, -spent);
                }
                if st.generation != 0 {
                    *hint = st.hint();
                }
                if let Some((ps, ph)) = project
                    && ps.generation != 0
                {
                    *ph = ps.project_hint();
                }
                check
            },
        ))
    }

    async fn reconcile(&self, ticket: &Ticket, actual: Costs) -> Result<()> {
        let id = Self::project_id(&ticket.key, &ticket.request_id);
        let c = costs_i64(&actual);
        let tenants: Vec<&str> = ticket.tenant.as_deref().into_iter().collect();
        self.with_states(
            &ticket.key,
            ticket.project_spend,
            &tenants,
            |st, _, project, tstates| {
                let (rid, start) = (ticket.request_id.as_str(), ticket.start_us);
                let mut spent = st.spend_of(rid, start);
                st.reconcile(rid, start, c);
                if let Some((ps, _)) = project {
                    ps.reconcile(&id, start, spend_only(c));
                }
                if let [t, b] = tstates {
                    spent = spent.or_else(|| t.spend_of(rid, start));
                    t.reconcile(rid, start, c);
                    // The budgets are charged what the call cost.
                    if let Some(spent) = spent
                        && b.generation != 0
                    {
                        b.count(start, c[3] - spent);
                    }
                }
            },
        );
        Ok(())
    }

    async fn release(&self, ticket: &Ticket) -> Result<()> {
        let id = Self::project_id(&ticket.key, &ticket.request_id);
        let tenants: Vec<&str> = ticket.tenant.as_deref().into_iter().collect();
        self.with_states(
            &ticket.key,
            ticket.project_spend,
            &tenants,
            |st, _, project, tstates| {
                let (rid, start) = (ticket.request_id.as_str(), ticket.start_us);
                let mut spent = st.spend_of(rid, start);
                st.release(rid, start);
                if let Some((ps, _)) = project {
                    ps.release(&id, start);
                }
                if let [t, b] = tstates {
                    spent = spent.or_else(|| t.spend_of(rid, start));
                    t.release(rid, start);
                    if let Some(spent) = spent
                        && b.generation != 0
                    {
                        b.count(start, -spent);
                    }
                }
            },
        );
        Ok(())
    }

    async fn penalize(&self, key: &QuotaKey, delay: Duration, scope: PenaltyScope) -> Result<()> {
        let now = self.clock.now_us();
        self.with_state(key, |st, _| {
            st.penalize(now, &*self.calendar, dur_us(delay), scope)
        });
        Ok(())
    }

    async fn tenant_usage(&self, key: &QuotaKey, quota: &ModelQuota) -> Result<Vec<TenantUsage>> {
        if quota.tenants.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.clock.now_us();
        let names: Vec<&str> = quota.tenants.iter().map(|t| t.name.as_str()).collect();
        let window = Limits::of(quota).window_us[0];
        Ok(self.with_states(key, false, &names, |_, _, _, tstates| {
            let (states, budgets) = tstates.split_at(names.len());
            names
                .iter()
                .zip(states.iter().zip(budgets))
                .map(|(name, (st, b))| st.tenant_usage(name, now.max(st.now), window, b))
                .collect()
        }))
    }

    async fn usage(&self, key: &QuotaKey, quota: &ModelQuota) -> Result<Usage> {
        let now = self.clock.now_us();
        let project_spend = quota.spend_micros.limit.is_some();
        Ok(
            self.with_states(key, project_spend, &[], |st, _, project, _| {
                st.usage(now, quota, project.map(|(ps, _)| ps))
            }),
        )
    }

    fn day_resets_in(&self) -> Duration {
        super::day_resets_in(&*self.calendar, self.clock.now_us())
    }
}

#[cfg(test)]
mod tests;
