//! The limiter's semantics, checked on the in-memory limiter under a manual clock.
use crate::measure::max_in_window;
use std::{sync::Arc, time::Duration};

use proptest::prelude::*;

use super::*;
use crate::limiter::{Asker, FixedDays, Hint, ManualClock, PacificCalendar};
use crate::quota::DimensionQuota;

const T0: i64 = 1_790_000_000_000_000; // 2026-09-21, µs
const SEC: i64 = 1_000_000;

fn key() -> QuotaKey {
    QuotaKey::new("proj", "gemini-3-pro-image")
}

fn quota(
    rpm: Option<u64>,
    tpm: Option<u64>,
    window_s: u64,
    margin: Option<Duration>,
) -> ModelQuota {
    ModelQuota {
        margin,
        ..ModelQuota::requests_and_tokens(rpm, tpm, Duration::from_secs(window_s))
    }
}

fn limiter(clock: &ManualClock) -> MemoryLimiter {
    MemoryLimiter::new(Arc::new(clock.clone()))
}

fn req(tokens: u64) -> Costs {
    Costs::new(1, tokens, 1, 0)
}

const NO_MARGIN: Option<Duration> = Some(Duration::ZERO);
const LONG: Duration = Duration::from_secs(3600);

#[test]
fn admits_to_the_limit_then_books_exactly_one_window_later() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = quota(Some(3), None, 60, NO_MARGIN);
    for i in 0..3 {
        let d = l.acquire_now(&key(), &q, &format!("r{i}"), req(10), LONG);
        assert!(matches!(d, Decision::Admitted { .. }), "{d:?}");
        clock.advance(Duration::from_secs(1));
    }
    let d = l.acquire_now(&key(), &q, "r3", req(10), LONG);
    assert_eq!(d.wait(), Some(Duration::from_secs(57)), "{d:?}");
    // The next one queues behind it, one window after the second.
    let d = l.acquire_now(&key(), &q, "r4", req(10), LONG);
    assert_eq!(d.wait(), Some(Duration::from_secs(58)), "{d:?}");
}

#[test]
fn same_request_id_returns_same_ticket() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = quota(Some(1), None, 60, NO_MARGIN);
    let a = l.acquire_now(&key(), &q, "a", req(1), LONG);
    let b = l.acquire_now(&key(), &q, "b", req(1), LONG);
    clock.advance(Duration::from_secs(10));
    let b2 = l.acquire_now(&key(), &q, "b", req(1), LONG);
    assert_eq!(b.ticket(), b2.ticket());
    assert_eq!(b2.wait(), Some(Duration::from_secs(50)));
    assert!(a.ticket().is_some());
}

/// A booking belongs to one delivery: once its start has passed, the same id books afresh
/// (a redelivery must never call the provider on an entry already used).
#[test]
fn same_request_id_books_afresh_once_its_start_has_passed() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = quota(Some(1), None, 60, NO_MARGIN);
    let a = l.acquire_now(&key(), &q, "a", req(1), LONG);
    assert!(matches!(a, Decision::Admitted { .. }), "{a:?}");
    clock.advance(Duration::from_secs(1));
    let a2 = l.acquire_now(&key(), &q, "a", req(1), LONG);
    assert_eq!(
        a2.wait(),
        Some(Duration::from_secs(59)),
        "a new entry: {a2:?}"
    );
    // Both entries count: the next request waits for the second one's window.
    let b = l.acquire_now(&key(), &q, "b", req(1), LONG);
    assert_eq!(b.wait(), Some(Duration::from_secs(119)), "{b:?}");
    // While its start is ahead, the same id replays the second booking.
    clock.advance(Duration::from_secs(1));
    let a3 = l.acquire_now(&key(), &q, "a", req(1), LONG);
    assert_eq!(a3.ticket(), a2.ticket());
}

/// Reconcile and release reach the booking they name, not a later one of the same id.
#[tokio::test]
async fn release_of_an_earlier_booking_leaves_the_later_one() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = quota(Some(1), Some(100), 60, NO_MARGIN);
    let a1 = l.acquire_now(&key(), &q, "a", req(10), LONG);
    let t1 = a1.ticket().expect("admitted").clone();
    clock.advance(Duration::from_secs(1));
    let a2 = l.acquire_now(&key(), &q, "a", req(10), LONG);
    let t2 = a2.ticket().expect("booked").clone();
    assert_ne!(t1.start_us, t2.start_us, "{a2:?}");
    l.reconcile(&t1, req(5)).await.expect("ok");
    l.release(&t1).await.expect("ok");
    // The second booking still holds its place: b queues one window after it.
    let b = l.acquire_now(&key(), &q, "b", req(10), LONG);
    assert_eq!(b.wait(), Some(Duration::from_secs(119)), "{b:?}");
    let again = l.acquire_now(&key(), &q, "a", req(10), LONG);
    assert_eq!(again.ticket(), Some(&t2));
}

/// A queue longer than a window: bookings far ahead stay in the log until their start,
/// so their check passes and a retried acquire still finds them.
#[tokio::test]
async fn bookings_behind_a_long_queue_survive_until_their_start() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = quota(Some(1), None, 60, NO_MARGIN);
    let tickets: Vec<Ticket> = ["a", "b", "c", "d"]
        .iter()
        .map(|id| {
            l.acquire_now(&key(), &q, id, req(1), LONG)
                .ticket()
                .expect("booked")
                .clone()
        })
        .collect();
    assert_eq!(tickets[3].start_us, T0 + 180 * SEC);
    let again = l.acquire_now(&key(), &q, "b", req(1), LONG);
    assert_eq!(again.ticket(), Some(&tickets[1]));
    clock.set(tickets[1].start_us);
    assert_eq!(l.check(&tickets[1]).await.expect("ok"), Check::Go);
    clock.set(tickets[2].start_us);
    assert_eq!(l.check(&tickets[2]).await.expect("ok"), Check::Go);
}

#[test]
fn rejects_with_earliest_fit_and_blocker() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = quota(None, Some(100), 60, NO_MARGIN);
    assert!(
        l.acquire_now(&key(), &q, "a", req(80), Duration::ZERO)
            .ticket()
            .is_some()
    );
    let d = l.acquire_now(&key(), &q, "b", req(30), Duration::from_secs(5));
    assert_eq!(
        d,
        Decision::Rejected {
            retry_after: Some(Duration::from_secs(60)),
            blocking: Blocker::Dimension(Dim::InputTokens)
        }
    );
    // A smaller one still fits now: nothing was booked by the rejection.
    assert!(matches!(
        l.acquire_now(&key(), &q, "c", req(20), Duration::ZERO),
        Decision::Admitted { .. }
    ));
    let d = l.acquire_now(&key(), &q, "d", req(101), LONG);
    assert_eq!(
        d,
        Decision::Rejected {
            retry_after: None,
            blocking: Blocker::NeverFits
        }
    );
}

#[tokio::test]
async fn reconcile_and_release_free_capacity() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = quota(Some(2), Some(100), 60, NO_MARGIN);
    let a = l
        .acquire(&key(), &q, "a", req(100), LONG)
        .await
        .expect("ok");
    let ta = a.ticket().expect("admitted").clone();
    let b = l
        .acquire(&key(), &q, "b", req(50), Duration::ZERO)
        .await
        .expect("ok");
    assert!(matches!(b, Decision::Rejected { .. }));
    l.reconcile(&ta, req(40)).await.expect("ok");
    let b = l
        .acquire(&key(), &q, "b", req(50), Duration::ZERO)
        .await
        .expect("ok");
    let tb = b.ticket().expect("admitted after reconcile").clone();
    let c = l
        .acquire(&key(), &q, "c", req(1), Duration::ZERO)
        .await
        .expect("ok");
    assert_eq!(
        c,
        Decision::Rejected {
            retry_after: Some(Duration::from_secs(60)),
            blocking: Blocker::Dimension(Dim::Requests)
        }
    );
    l.release(&tb).await.expect("ok");
    let c = l
        .acquire(&key(), &q, "c", req(1), Duration::ZERO)
        .await
        .expect("ok");
    assert!(matches!(c, Decision::Admitted { .. }), "{c:?}");
    let u = l.usage(&key(), &q).await.expect("ok");
    assert_eq!(u.dimensions[0].used, 2);
    assert_eq!(u.dimensions[1].used, 41);
}

#[tokio::test]
async fn cooldown_is_shared_and_ends() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = quota(Some(100), None, 60, NO_MARGIN);
    l.penalize(&key(), Duration::from_secs(30), PenaltyScope::PerMinute)
        .await
        .expect("ok");
    let d = l.acquire_now(&key(), &q, "a", req(1), Duration::from_secs(5));
    assert_eq!(
        d,
        Decision::Rejected {
            retry_after: Some(Duration::from_secs(30)),
            blocking: Blocker::Cooldown
        }
    );
    let d = l.acquire_now(&key(), &q, "a", req(1), Duration::from_secs(60));
    assert_eq!(d.wait(), Some(Duration::from_secs(30)));
    clock.advance(Duration::from_secs(30));
    assert!(matches!(
        l.acquire_now(&key(), &q, "b", req(1), Duration::ZERO),
        Decision::Admitted { .. }
    ));
}

#[test]
fn daily_quota_rolls_over_on_short_days() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock).with_calendar(Arc::new(FixedDays {
        origin_us: T0,
        day_us: 10 * SEC,
    }));
    let mut q = quota(None, None, 1, NO_MARGIN);
    q.requests_per_day = Some(2);
    for id in ["a", "b"] {
        assert!(matches!(
            l.acquire_now(&key(), &q, id, req(1), Duration::ZERO),
            Decision::Admitted { .. }
        ));
    }
    let d = l.acquire_now(&key(), &q, "c", req(1), Duration::ZERO);
    assert_eq!(
        d,
        Decision::Rejected {
            retry_after: Some(Duration::from_secs(10)),
            blocking: Blocker::Daily
        }
    );
    // Booked into tomorrow; it counts against tomorrow.
    let d = l.acquire_now(&key(), &q, "c", req(1), Duration::from_secs(10));
    assert_eq!(d.wait(), Some(Duration::from_secs(10)));
    clock.advance(Duration::from_secs(10));
    assert!(
        l.acquire_now(&key(), &q, "d", req(1), Duration::ZERO)
            .ticket()
            .is_some()
    );
    let d = l.acquire_now(&key(), &q, "e", req(1), Duration::ZERO);
    assert_eq!(d.blocker(), Some(Blocker::Daily), "{d:?}");
}

#[test]
fn daily_quota_follows_pacific_dst_days() {
    // 2026-11-01 is 25 hours long in Los Angeles: it starts 07:00Z and ends 08:00Z next day.
    let start: i64 = 1_793_516_400 * SEC; // 2026-11-01T07:00:00Z
    let clock = ManualClock::new(start - SEC);
    let l = limiter(&clock);
    let mut q = quota(None, None, 1, NO_MARGIN);
    q.requests_per_day = Some(1);
    assert!(
        l.acquire_now(&key(), &q, "a", req(1), Duration::ZERO)
            .ticket()
            .is_some()
    );
    let d = l.acquire_now(&key(), &q, "b", req(1), Duration::ZERO);
    assert_eq!(
        d,
        Decision::Rejected {
            retry_after: Some(Duration::from_secs(1)),
            blocking: Blocker::Daily
        }
    );
    clock.set(start);
    assert!(
        l.acquire_now(&key(), &q, "b", req(1), Duration::ZERO)
            .ticket()
            .is_some()
    );
    // 24 h later it is still 1 November (23:00 PST): one more hour to go.
    clock.set(start + 24 * 3600 * SEC);
    let d = l.acquire_now(&key(), &q, "c", req(1), Duration::ZERO);
    assert_eq!(
        d,
        Decision::Rejected {
            retry_after: Some(Duration::from_secs(3600)),
            blocking: Blocker::Daily
        }
    );
}

#[tokio::test]
async fn per_day_penalty_blocks_until_midnight() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock).with_calendar(Arc::new(FixedDays {
        origin_us: T0 - 5 * SEC,
        day_us: 20 * SEC,
    }));
    let q = quota(Some(10), None, 1, NO_MARGIN);
    l.penalize(&key(), Duration::from_secs(1), PenaltyScope::PerDay)
        .await
        .expect("ok");
    let d = l.acquire_now(&key(), &q, "a", req(1), Duration::ZERO);
    assert_eq!(
        d,
        Decision::Rejected {
            retry_after: Some(Duration::from_secs(15)),
            blocking: Blocker::Daily
        }
    );
    clock.advance(Duration::from_secs(15));
    assert!(
        l.acquire_now(&key(), &q, "a", req(1), Duration::ZERO)
            .ticket()
            .is_some()
    );
}

#[test]
fn window_change_at_runtime_recounts() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = quota(Some(2), None, 10, NO_MARGIN);
    assert!(
        l.acquire_now(&key(), &q, "a", req(1), Duration::ZERO)
            .ticket()
            .is_some()
    );
    clock.advance(Duration::from_secs(5));
    assert!(
        l.acquire_now(&key(), &q, "b", req(1), Duration::ZERO)
            .ticket()
            .is_some()
    );
    clock.advance(Duration::from_secs(6));
    // Window grows to 20 s: both are back inside it.
    let q20 = quota(Some(2), None, 20, NO_MARGIN);
    let d = l.acquire_now(&key(), &q20, "c", req(1), LONG);
    assert_eq!(d.wait(), Some(Duration::from_secs(9)));
}

#[test]
fn margin_stretches_windows() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = quota(Some(1), None, 60, None); // 1 s margin
    assert!(
        l.acquire_now(&key(), &q, "a", req(1), Duration::ZERO)
            .ticket()
            .is_some()
    );
    let d = l.acquire_now(&key(), &q, "b", req(1), LONG);
    assert_eq!(d.wait(), Some(Duration::from_secs(61)));
}

#[derive(Debug, Clone)]
struct Arrival {
    gap_us: i64,
    tokens: u64,
    max_wait_ms: u64,
    after: u8, // 0..=9: 0 release, 1 reconcile down, else keep
}

fn arrivals() -> impl Strategy<Value = Vec<Arrival>> {
    prop::collection::vec(
        (0i64..400_000, 1u64..2_000, 0u64..8_000, 0u8..10).prop_map(
            |(gap_us, tokens, max_wait_ms, after)| Arrival {
                gap_us,
                tokens,
                max_wait_ms,
                after,
            },
        ),
        1..600,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random arrivals, lumpy costs, releases and reconciles: no window of any dimension
    /// ever holds more than its limit, and starts follow arrival order (but for room
    /// given back by a release or a reconcile, taken at once).
    #[test]
    fn no_window_exceeds_any_limit_and_fifo_holds(
        arrivals in arrivals(),
        rpm in 1u64..40,
        tpm in 2_000u64..20_000,
        window_s in 1u64..6,
        margin_ms in prop::option::of(0u64..300),
    ) {
        let clock = ManualClock::new(T0);
        let l = limiter(&clock);
        let q = quota(Some(rpm), Some(tpm), window_s, margin_ms.map(Duration::from_millis));
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        let mut booked: Vec<(String, i64, Costs)> = Vec::new();
        let mut last_start = i64::MIN;
        for (i, a) in arrivals.iter().enumerate() {
            clock.advance(Duration::from_micros(a.gap_us as u64));
            let id = format!("r{i}");
            let d = l.acquire_now(&key(), &q, &id, req(a.tokens), Duration::from_millis(a.max_wait_ms));
            let Some(t) = d.ticket().cloned() else { continue };
            // Only room found at the acquire itself goes ahead of the queue.
            prop_assert!(
                t.start_us >= last_start || t.start_us == clock.now_us(),
                "FIFO: {} < {}", t.start_us, last_start
            );
            last_start = last_start.max(t.start_us);
            match a.after {
                0 => { rt.block_on(l.release(&t)).expect("ok"); }
                1 => {
                    let actual = req(a.tokens / 2);
                    rt.block_on(l.reconcile(&t, actual)).expect("ok");
                    booked.push((id, t.start_us, actual));
                }
                _ => booked.push((id, t.start_us, t.costs)),
            }
        }
        for dim in [Dim::Requests, Dim::InputTokens] {
            let ev: Vec<(i64, i64)> = booked.iter().map(|(_, s, c)| (*s, c.get(dim) as i64)).collect();
            let max = max_in_window(&ev, q.effective_window_us(dim));
            let limit = q.dim(dim).limit.unwrap_or(u64::MAX) as i64;
            prop_assert!(max <= limit, "{dim:?}: {max} > {limit}");
        }
    }

    /// Steady overload with lumpy costs: the binding limit is used at least 95 %.
    #[test]
    fn steady_overload_uses_the_binding_limit(
        rpm in 20u64..400,
        tokens_bind in any::<bool>(),
        seed in any::<u64>(),
        window_s in 1u64..10,
    ) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mean = 1_000u64;
        // Either tokens bind (half the request limit's worth of tokens) or requests do.
        let tpm = if tokens_bind { rpm * mean / 2 } else { rpm * mean * 3 };
        let w = window_s as i64 * SEC;
        let clock = ManualClock::new(T0);
        let l = limiter(&clock);
        let q = quota(Some(rpm), Some(tpm), window_s, None);
        let windows = 8;
        let mut admitted: Vec<(i64, Costs)> = Vec::new();
        let mut i = 0u64;
        while clock.now_us() < T0 + (windows + 1) * w {
            clock.advance(Duration::from_micros(rng.random_range(0..(w as u64 / 200).max(1))));
            for _ in 0..rng.random_range(1..4) {
                i += 1;
                let c = req(rng.random_range(mean / 10..mean * 19 / 10));
                if let Some(t) = l.acquire_now(&key(), &q, &format!("r{i}"), c, Duration::from_micros(w as u64)).ticket() {
                    admitted.push((t.start_us, t.costs));
                }
            }
        }
        let (dim, limit) = if tokens_bind { (Dim::InputTokens, tpm) } else { (Dim::Requests, rpm) };
        let used: u64 = admitted.iter()
            .filter(|(s, _)| *s >= T0 + w && *s < T0 + (windows + 1) * w)
            .map(|(_, c)| c.get(dim)).sum();
        let util = used as f64 / (limit * windows as u64) as f64;
        prop_assert!(util >= 0.95, "utilization {util:.4} of {dim:?}");
        let ev: Vec<(i64, i64)> = admitted.iter().map(|(s, c)| (*s, c.get(dim) as i64)).collect();
        prop_assert!(max_in_window(&ev, q.effective_window_us(dim)) <= limit as i64);
    }
}

/// One replica talking to a [`KeyState`] as a Redis client talks to the script: it sends
/// what it last saw of the state and keeps what the reply says.
#[derive(Debug, Default)]
struct Caller {
    hint: Hint,
}

impl Caller {
    fn decide(
        &mut self,
        st: &mut KeyState,
        now: i64,
        q: &ModelQuota,
        id: &str,
        costs: Costs,
        max_wait: Duration,
    ) -> Decision {
        let outcome = st.acquire(
            now,
            &PacificCalendar,
            &Limits::of(q),
            id,
            costs_i64(&costs),
            dur_us(max_wait),
            self.hint,
            None,
            None,
            0,
        );
        self.hint = st.hint();
        decision(&key(), id, outcome, Origin::Shared, false)
    }

    fn acquire(
        &mut self,
        st: &mut KeyState,
        now: i64,
        q: &ModelQuota,
        id: &str,
        costs: Costs,
        max_wait: Duration,
    ) -> Ticket {
        let d = self.decide(st, now, q, id, costs, max_wait);
        d.ticket()
            .unwrap_or_else(|| panic!("expected a ticket for {id}: {d:?}"))
            .clone()
    }

    fn check(&mut self, st: &mut KeyState, now: i64, t: &Ticket) -> Check {
        let c = st.check(
            now,
            &PacificCalendar,
            &t.request_id,
            t.start_us,
            self.hint,
            None,
            None,
        );
        if st.generation != 0 {
            self.hint = st.hint();
        }
        c
    }
}

const MS: i64 = 1_000;

/// Limit 2 per minute; book A, snapshot, book B, restore the snapshot (same generation, B
/// lost), book C: C must not start inside A and B's window.
#[test]
fn rollback_to_an_older_snapshot_is_fenced() {
    let q = quota(Some(2), None, 60, None);
    let w = q.effective_window_us(Dim::Requests);
    let mut st = KeyState::default();
    let mut me = Caller::default();
    let a = me.acquire(&mut st, T0, &q, "A", req(1), Duration::ZERO);
    let snapshot = st.clone();
    let b = me.acquire(&mut st, T0 + MS, &q, "B", req(1), Duration::ZERO);
    assert_eq!((a.start_us, b.start_us), (T0, T0 + MS));
    st = snapshot;
    let c = me.acquire(&mut st, T0 + 2 * MS, &q, "C", req(1), LONG);
    assert!(b.start_us < T0 + 2 * MS);
    assert_eq!(
        c.start_us,
        T0 + 2 * MS + w,
        "from when the rollback was found"
    );
}

/// Both keys lost (FLUSHALL, a restart without persistence): each limited dimension waits
/// out its own window from the latest start the caller saw; long unlimited windows and
/// dimensions the request does not use hold nothing back.
#[test]
fn lost_state_fences_each_dimension_with_its_own_window() {
    let mut q = quota(Some(3), None, 10, None);
    q.images = DimensionQuota {
        limit: Some(5),
        window: Duration::from_secs(60),
    };
    q.spend_micros = DimensionQuota {
        limit: None,
        window: Duration::from_secs(600),
    };
    let (w_req, w_img) = (
        q.effective_window_us(Dim::Requests),
        q.effective_window_us(Dim::Images),
    );
    let text = Costs::new(1, 10, 0, 0);
    let mut st = KeyState::default();
    let mut me = Caller::default();
    let a = me.acquire(&mut st, T0, &q, "a", text, Duration::ZERO);
    st = KeyState::default();
    let b = me.acquire(&mut st, T0 + SEC, &q, "b", text, LONG);
    // Fenced from the new generation's start (what had started by then may have been
    // called), for the requests window only.
    assert!(a.start_us < T0 + SEC);
    assert_eq!(b.start_us, T0 + SEC + w_req, "requests window only");
    let c = me.acquire(&mut st, T0 + SEC, &q, "c", Costs::new(1, 10, 1, 0), LONG);
    assert_eq!(c.start_us, T0 + SEC + w_img, "images wait their own window");
}

/// Two callers that saw the old state: the second, whose latest start is not later, does
/// not push the fence out again; a later one moves it to its own latest start.
#[test]
fn stale_callers_do_not_extend_the_fence() {
    let q = quota(Some(2), None, 3, None);
    let w = q.effective_window_us(Dim::Requests);
    let mut st = KeyState::default();
    let (mut early, mut late) = (Caller::default(), Caller::default());
    early.acquire(&mut st, T0, &q, "e1", req(1), Duration::ZERO);
    let l1 = late.acquire(&mut st, T0 + MS, &q, "l1", req(1), Duration::ZERO);
    st = KeyState::default();
    let l2 = late.acquire(&mut st, T0 + 2 * MS, &q, "l2", req(1), LONG);
    assert!(l1.start_us < T0 + 2 * MS);
    assert_eq!(l2.start_us, T0 + 2 * MS + w);
    let e2 = early.acquire(&mut st, T0 + 200 * MS, &q, "e2", req(1), LONG);
    assert_eq!(e2.start_us, l2.start_us, "not extended");
    // A third caller that saw nothing does not move it either.
    let n = Caller::default().acquire(&mut st, T0 + 300 * MS, &q, "n", req(1), LONG);
    assert_eq!(n.start_us, l2.start_us + w, "queued behind, as usual");
}

/// Only the log lost (the hash still counts its bookings): detected by a caller that saw
/// nothing, fenced once, and the limit is whole again right after the fence.
#[test]
fn losing_only_the_log_is_detected() {
    let q = quota(Some(2), None, 2, None);
    let w = q.effective_window_us(Dim::Requests);
    let mut st = KeyState::default();
    let a = Caller::default().acquire(&mut st, T0, &q, "a", req(1), Duration::ZERO);
    st.lose_log();
    let b = Caller::default().acquire(&mut st, T0 + MS, &q, "b", req(1), LONG);
    assert!(a.start_us < T0 + MS);
    assert_eq!(
        b.start_us,
        T0 + MS + w,
        "fenced from when the loss was found"
    );
    let c = Caller::default().acquire(&mut st, T0 + 2 * MS, &q, "c", req(1), LONG);
    assert_eq!(c.start_us, b.start_us, "the sums were recounted");
}

/// Only the hash lost: a caller that saw it, and one that did not, both wait the
/// dimension's own window from when the loss was found, not the longest window.
#[test]
fn losing_only_the_state_is_detected() {
    let mut q = quota(Some(1), None, 2, None);
    q.spend_micros = DimensionQuota {
        limit: None,
        window: Duration::from_secs(600),
    };
    let w = q.effective_window_us(Dim::Requests);
    for stale in [true, false] {
        let mut st = KeyState::default();
        let mut me = Caller::default();
        let a = me.acquire(&mut st, T0, &q, "a", req(1), Duration::ZERO);
        st.lose_hash();
        let mut caller = if stale { me } else { Caller::default() };
        let b = caller.acquire(&mut st, T0 + MS, &q, "b", req(1), LONG);
        assert!(a.start_us < T0 + MS);
        assert_eq!(b.start_us, T0 + MS + w, "stale caller: {stale}");
    }
}

/// A check that finds the state lost reports it and fences, so a caller that never saw
/// the old state cannot book into the lost window either.
#[test]
fn check_on_lost_state_reports_lost_and_fences() {
    let q = quota(Some(1), None, 2, None);
    let w = q.effective_window_us(Dim::Requests);
    let mut st = KeyState::default();
    let mut me = Caller::default();
    me.acquire(&mut st, T0, &q, "a", req(1), Duration::ZERO);
    let b = me.acquire(&mut st, T0 + MS, &q, "b", req(1), LONG);
    st = KeyState::default();
    let c = me.check(&mut st, b.start_us, &b);
    assert_eq!(
        c,
        Check::Cancelled {
            retry_after: None,
            blocking: Blocker::Lost
        }
    );
    let n = Caller::default().acquire(&mut st, b.start_us + MS, &q, "n", req(1), LONG);
    assert_eq!(n.start_us, b.start_us + w);
    // Found before b's start: fenced from then, not from b's start (b was never called).
    let mut st = KeyState::default();
    let mut me = Caller::default();
    me.acquire(&mut st, T0, &q, "a", req(1), Duration::ZERO);
    let b = me.acquire(&mut st, T0 + MS, &q, "b", req(1), LONG);
    st = KeyState::default();
    let found = T0 + 2 * MS;
    assert_eq!(me.check(&mut st, found, &b), c);
    let n = Caller::default().acquire(&mut st, found + MS, &q, "n", req(1), LONG);
    assert_eq!(n.start_us, found + w, "b starts at {}", b.start_us);
    // A rollback that still holds the ticket: reported lost too, and released.
    let mut st = KeyState::default();
    let mut me = Caller::default();
    let a = me.acquire(&mut st, T0, &q, "a", req(1), LONG);
    let snapshot = st.clone();
    let b = me.acquire(&mut st, T0 + MS, &q, "b", req(1), LONG);
    st = snapshot;
    assert!(matches!(
        me.check(&mut st, a.start_us + MS, &a),
        Check::Cancelled {
            blocking: Blocker::Lost,
            ..
        }
    ));
    assert_eq!(me.check(&mut st, b.start_us + w, &b), c);
}

/// What only the callers still know of the day comes back with them after a loss: the
/// day's count and a per-day block.
#[test]
fn lost_state_keeps_the_day_count_and_block_the_callers_saw() {
    let mut q = quota(Some(100), None, 2, None);
    q.requests_per_day = Some(3);
    let mut st = KeyState::default();
    let mut me = Caller::default();
    for id in ["a", "b", "c"] {
        me.acquire(&mut st, T0, &q, id, req(1), Duration::ZERO);
    }
    st = KeyState::default();
    let d = me.decide(&mut st, T0 + MS, &q, "d", req(1), LONG);
    assert_eq!(d.blocker(), Some(Blocker::Daily), "the day is spent: {d:?}");
    let mut st = KeyState::default();
    let mut me = Caller::default();
    me.acquire(&mut st, T0, &q, "a", req(1), Duration::ZERO);
    st.penalize(T0, &PacificCalendar, 0, PenaltyScope::PerDay);
    me.decide(&mut st, T0, &q, "b", req(1), Duration::ZERO);
    st = KeyState::default();
    let d = me.decide(&mut st, T0 + MS, &q, "c", req(1), LONG);
    assert_eq!(
        d.blocker(),
        Some(Blocker::Daily),
        "still blocked for the day: {d:?}"
    );
}

/// Usage comes from the running sums: the window ending at the latest booking, and
/// nothing once that booking is a full window old.
#[tokio::test]
async fn usage_reads_the_running_sums() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = quota(Some(2), Some(1_000), 60, NO_MARGIN);
    for id in ["a", "b", "c"] {
        l.acquire_now(&key(), &q, id, req(100), LONG);
    }
    let u = l.usage(&key(), &q).await.expect("ok");
    // c starts at T0 + 60 s: its window holds c alone (a and b left it).
    assert_eq!((u.dimensions[0].used, u.dimensions[1].used), (1, 100));
    assert_eq!(u.queue, Duration::from_secs(60));
    clock.advance(Duration::from_secs(120));
    let u = l.usage(&key(), &q).await.expect("ok");
    assert_eq!((u.dimensions[0].used, u.dimensions[1].used), (0, 0));
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// FLUSHALL, or a restart without persistence.
    Reset,
    LoseLog,
    LoseHash,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Replicas that check every booked ticket at its start, with the state lost now and
    /// then (both keys, the log, the hash): the calls that went ahead never exceed the
    /// limit in any window, lost bookings included.
    #[test]
    fn calls_stay_under_the_limit_across_lost_state(
        arrivals in prop::collection::vec((0i64..300_000, 0usize..3, 0u64..4_000), 1..400),
        faults in prop::collection::vec((20usize..400, 0u8..3), 0..4),
        rpm in 1u64..8,
        window_ms in 500u64..3_000,
    ) {
        let mut q = quota(Some(rpm), None, 1, Some(Duration::from_millis(50)));
        q.requests.window = Duration::from_millis(window_ms);
        let mut st = KeyState::default();
        let mut callers: Vec<Caller> = (0..3).map(|_| Caller::default()).collect();
        let mut now = T0;
        let mut pending: Vec<(usize, Ticket)> = Vec::new();
        let mut called: Vec<(i64, i64)> = Vec::new();
        for (i, &(gap, who, max_wait_ms)) in arrivals.iter().enumerate() {
            now += gap;
            // Booked tickets are checked at their start, in start order.
            pending.sort_by_key(|(_, t)| t.start_us);
            while pending.first().is_some_and(|(_, t)| t.start_us <= now) {
                let (c, t) = pending.remove(0);
                if callers[c].check(&mut st, t.start_us, &t) == Check::Go {
                    called.push((t.start_us, 1));
                }
            }
            // Faults only once every replica has a hint: one that never saw the state
            // cannot tell a reset from a new key.
            if i >= 3 {
                for &(at, kind) in &faults {
                    if at == i {
                        match [Fault::Reset, Fault::LoseLog, Fault::LoseHash][kind as usize] {
                            Fault::Reset => st = KeyState::default(),
                            Fault::LoseLog => st.lose_log(),
                            Fault::LoseHash => st.lose_hash(),
                        }
                    }
                }
            }
            let who = if i < 3 { i } else { who };
            let outcome = st.acquire(
                now,
                &PacificCalendar,
                &Limits::of(&q),
                &format!("r{i}"),
                costs_i64(&req(1)),
                dur_us(Duration::from_millis(max_wait_ms)),
                callers[who].hint,
                None,
                None,
                0,
            );
            callers[who].hint = st.hint();
            match decision(&key(), &format!("r{i}"), outcome, Origin::Shared, false) {
                Decision::Admitted { ticket } => called.push((ticket.start_us, 1)),
                Decision::Booked { ticket, .. } => pending.push((who, ticket)),
                Decision::Rejected { .. } => {}
            }
        }
        called.sort();
        let max = max_in_window(&called, q.effective_window_us(Dim::Requests));
        prop_assert!(max <= rpm as i64, "{max} calls in one window, limit {rpm}");
    }
}

/// Books `n` requests of one request each, ids `<prefix><i>`, at the current clock.
fn book_many(l: &MemoryLimiter, q: &ModelQuota, prefix: &str, n: usize) -> Vec<Ticket> {
    (0..n)
        .filter_map(|i| {
            l.acquire_now(&key(), q, &format!("{prefix}{i}"), req(1), LONG)
                .ticket()
                .cloned()
        })
        .collect()
}

/// Checks every ticket at its start, in start order (as the handler does just before its
/// call), and returns the starts of those that may go ahead and the ids of those lost.
async fn check_all(
    l: &MemoryLimiter,
    clock: &ManualClock,
    tickets: &[Ticket],
) -> (Vec<(i64, i64)>, Vec<String>) {
    let mut sorted = tickets.to_vec();
    sorted.sort_by_key(|t| t.start_us);
    let (mut called, mut lost) = (Vec::new(), Vec::new());
    for t in &sorted {
        clock.set(t.start_us.max(clock.now_us()));
        match l.check(t).await.expect("check") {
            Check::Go => called.push((t.start_us, 1)),
            Check::Cancelled {
                blocking: Blocker::Lost,
                ..
            } => lost.push(t.request_id.clone()),
            other => panic!("unexpected check answer for {}: {other:?}", t.request_id),
        }
    }
    (called, lost)
}

/// Issue 18: limit 20 per 10 s, 60 bookings queued over 3 windows, the limit lowered to
/// 10. The first acquire that sees the new limit releases the bookings beyond it that have
/// not started (latest first in each window); their holders see Lost at check, and no
/// window from the change on holds more than 10 of what remains plus the new bookings.
#[tokio::test]
async fn lowering_a_limit_releases_the_bookings_beyond_it() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let w = 10 * SEC;
    let q20 = quota(Some(20), None, 10, NO_MARGIN);
    let old = book_many(&l, &q20, "old", 60);
    assert_eq!(old.len(), 60);
    assert_eq!(old[59].start_us, T0 + 2 * w, "three windows queued");
    clock.advance(Duration::from_secs(1));
    let change = clock.now_us();
    let q10 = quota(Some(10), None, 10, NO_MARGIN);
    let new = book_many(&l, &q10, "new", 20);
    assert_eq!(new.len(), 20);
    // A retried acquire of a released booking books afresh, under the new limit.
    let again = l.acquire_now(&key(), &q10, "old59", req(1), LONG);
    assert_ne!(again.ticket(), Some(&old[59]), "{again:?}");
    let mut all = old.clone();
    all.extend(new);
    all.extend(again.ticket().cloned());
    let (mut called, lost) = check_all(&l, &clock, &all).await;
    // The 20 that had started stay; 10 of each later window are released, the latest.
    assert_eq!(lost.len(), 20, "released: {lost:?}");
    for i in (30..40).chain(50..60) {
        assert!(
            lost.contains(&format!("old{i}")),
            "old{i} released: {lost:?}"
        );
    }
    called.retain(|(s, _)| *s >= change);
    called.sort();
    assert_eq!(max_in_window(&called, w), 10, "{called:?}");
}

/// Raised from 10 to 20: the bookings already made stay where they are; new bookings take
/// the room the raise opens at once (every window holding now had 10), then fill the queued
/// windows up to the new limit, never past it.
#[tokio::test]
async fn raising_a_limit_fills_windows_up_to_it() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let w = 10 * SEC;
    let q10 = quota(Some(10), None, 10, NO_MARGIN);
    let old = book_many(&l, &q10, "old", 30);
    assert_eq!(old[29].start_us, T0 + 2 * w);
    clock.advance(Duration::from_secs(1));
    let change = clock.now_us();
    let q20 = quota(Some(20), None, 10, NO_MARGIN);
    let new = book_many(&l, &q20, "new", 40);
    assert_eq!(new[0].start_us, change, "at once: {:?}", new[0]);
    assert_eq!(new[9].start_us, change, "{:?}", new[9]);
    // The queue's last window takes 10 more, the next one 20.
    assert_eq!(new[10].start_us, T0 + 2 * w, "{:?}", new[10]);
    assert_eq!(new[19].start_us, T0 + 2 * w, "{:?}", new[19]);
    assert_eq!(new[20].start_us, T0 + 3 * w, "{:?}", new[20]);
    assert_eq!(new[39].start_us, T0 + 3 * w, "{:?}", new[39]);
    // The window from T0 + 10 s holds the queued 10 and nothing more fits before it.
    let mut all = old.clone();
    all.extend(new);
    let (mut called, lost) = check_all(&l, &clock, &all).await;
    assert!(lost.is_empty(), "nothing released: {lost:?}");
    called.sort();
    assert_eq!(max_in_window(&called, w), 20);
}

/// Room given back inside a queue (a released booking) is taken by the next request at
/// once, and only as much as every window holding now allows: the others still queue.
#[tokio::test]
async fn room_given_back_inside_a_queue_is_taken_at_once() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let w = 10 * SEC;
    let q10 = quota(Some(10), None, 10, NO_MARGIN);
    let old = book_many(&l, &q10, "old", 30);
    clock.advance(Duration::from_secs(1));
    // One given back in the window holding now and one in the next: a booking now lies
    // in windows reaching into both.
    l.release(&old[13]).await.expect("release");
    let blocked = book_many(&l, &q10, "blocked", 1);
    assert_eq!(
        blocked[0].start_us,
        T0 + 3 * w,
        "no room now yet: {blocked:?}"
    );
    l.release(&old[3]).await.expect("release");
    let next = book_many(&l, &q10, "next", 2);
    assert_eq!(next[0].start_us, T0 + SEC, "the room now: {:?}", next[0]);
    assert_eq!(
        next[1].start_us,
        T0 + 3 * w,
        "behind the queue: {:?}",
        next[1]
    );
    let mut all: Vec<Ticket> = old
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 13)
        .map(|(_, t)| t.clone())
        .collect();
    all.extend(blocked);
    all.extend(next);
    let (mut called, lost) = check_all(&l, &clock, &all).await;
    assert!(lost.is_empty(), "{lost:?}");
    called.sort();
    assert_eq!(max_in_window(&called, w), 10, "{called:?}");
}

/// A longer window (or a larger margin) is a lower limit too: bookings that no longer fit
/// in the new window are released.
#[tokio::test]
async fn a_longer_window_releases_the_bookings_beyond_the_limit() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q10 = quota(Some(10), None, 10, NO_MARGIN);
    let old = book_many(&l, &q10, "old", 30);
    clock.advance(Duration::from_secs(1));
    let change = clock.now_us();
    let q20s = quota(Some(10), None, 20, NO_MARGIN);
    let new = book_many(&l, &q20s, "new", 10);
    let mut all = old.clone();
    all.extend(new);
    let (mut called, lost) = check_all(&l, &clock, &all).await;
    // T0 + 10 s lies inside a 20 s window with the 10 that started at T0.
    assert_eq!(lost.len(), 10, "{lost:?}");
    called.retain(|(s, _)| *s >= change);
    called.sort();
    assert!(max_in_window(&called, 20 * SEC) <= 10, "{called:?}");
}

/// A replica still on the old config (within its refresh interval) books under the old,
/// higher limit after the change; the next acquire on the new config releases that booking
/// too, so it never runs past the new limit.
#[tokio::test]
async fn a_booking_made_on_the_old_config_is_released_by_the_next_one_on_the_new() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let w = 10 * SEC;
    let q20 = quota(Some(20), None, 10, NO_MARGIN);
    let q10 = quota(Some(10), None, 10, NO_MARGIN);
    let old = book_many(&l, &q20, "old", 20);
    clock.advance(Duration::from_secs(1));
    let change = clock.now_us();
    let fresh = book_many(&l, &q10, "new", 10);
    assert_eq!(fresh[0].start_us, T0 + w);
    let stale = book_many(&l, &q20, "stale", 5);
    assert_eq!(stale[0].start_us, T0 + w, "booked under the old limit");
    let next = book_many(&l, &q10, "next", 1);
    assert_eq!(next[0].start_us, T0 + 2 * w);
    let mut all = old.clone();
    all.extend(fresh);
    all.extend(stale);
    all.extend(next);
    let (mut called, lost) = check_all(&l, &clock, &all).await;
    assert_eq!(lost.len(), 5, "{lost:?}");
    assert!(lost.iter().all(|id| id.starts_with("stale")), "{lost:?}");
    called.retain(|(s, _)| *s >= change);
    called.sort();
    assert_eq!(max_in_window(&called, w), 10);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Replicas that check every booked ticket at its start, with the limit and the window
    /// changed now and then: every call that went ahead after a change sits in windows of
    /// the limit in force that hold at most that limit, bookings made before the change
    /// included.
    #[test]
    fn calls_obey_the_limit_in_force_across_changes(
        arrivals in prop::collection::vec(
            (0i64..300_000, 0usize..3, 0u64..6_000, prop::option::of((1u64..8, 0usize..2))),
            1..400,
        ),
    ) {
        let windows = [Duration::from_millis(800), Duration::from_millis(1_500)];
        let quota_of = |rpm: u64, w: usize| {
            let mut q = quota(Some(rpm), None, 1, Some(Duration::from_millis(50)));
            q.requests.window = windows[w];
            q
        };
        let mut q = quota_of(4, 0);
        // (when the first acquire brought it, limit, window with margin)
        let mut regimes: Vec<(i64, i64, i64)> = vec![(i64::MIN, 4, q.effective_window_us(Dim::Requests))];
        let mut st = KeyState::default();
        let mut callers: Vec<Caller> = (0..3).map(|_| Caller::default()).collect();
        let mut now = T0;
        let mut pending: Vec<(usize, Ticket)> = Vec::new();
        let mut called: Vec<(i64, i64)> = Vec::new();
        let run_checks = |pending: &mut Vec<(usize, Ticket)>, callers: &mut Vec<Caller>, st: &mut KeyState, called: &mut Vec<(i64, i64)>, upto: i64| {
            pending.sort_by_key(|(_, t)| t.start_us);
            while pending.first().is_some_and(|(_, t)| t.start_us <= upto) {
                let (c, t) = pending.remove(0);
                if callers[c].check(st, t.start_us, &t) == Check::Go {
                    called.push((t.start_us, 1));
                }
            }
        };
        for (i, &(gap, who, max_wait_ms, change)) in arrivals.iter().enumerate() {
            now += gap;
            run_checks(&mut pending, &mut callers, &mut st, &mut called, now);
            if let Some((rpm, w)) = change {
                let next = quota_of(rpm, w);
                if next != q {
                    q = next;
                    regimes.push((now, rpm as i64, q.effective_window_us(Dim::Requests)));
                }
            }
            let id = format!("r{i}");
            match callers[who].decide(&mut st, now, &q, &id, req(1), Duration::from_millis(max_wait_ms)) {
                Decision::Admitted { ticket } => called.push((ticket.start_us, 1)),
                Decision::Booked { ticket, .. } => pending.push((who, ticket)),
                Decision::Rejected { .. } => {}
            }
        }
        run_checks(&mut pending, &mut callers, &mut st, &mut called, i64::MAX);
        called.sort();
        for &(t, _) in &called {
            // At the very time of a change, both the old and the new limits apply.
            if regimes.iter().any(|r| r.0 == t) {
                continue;
            }
            let Some(&(_, limit, w)) = regimes.iter().rev().find(|r| r.0 < t) else { continue };
            let held = called.iter().filter(|(s, _)| *s > t - w && *s <= t).count() as i64;
            prop_assert!(held <= limit, "{held} calls in the window ending at {t}, limit {limit}");
        }
    }
}

/// A window that grows past entries already pruned from the log cannot recount them: they
/// are taken as full, so nothing starts inside a new window with them.
#[test]
fn a_window_grown_past_pruned_bookings_waits_for_them() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let short = quota(Some(2), None, 1, NO_MARGIN);
    let long = quota(Some(2), None, 5, NO_MARGIN);
    let mut starts = book_many(&l, &short, "a", 2)
        .iter()
        .map(|t| (t.start_us, 1))
        .collect::<Vec<_>>();
    clock.advance(Duration::from_secs(2));
    // Prunes both (outside every window).
    starts.extend(
        book_many(&l, &short, "c", 1)
            .iter()
            .map(|t| (t.start_us, 1)),
    );
    let d = book_many(&l, &long, "d", 1);
    assert_eq!(d[0].start_us, T0 + 5 * SEC, "{d:?}");
    // The window of the new length ending at d holds c and d only.
    let held = starts
        .iter()
        .filter(|(s, _)| *s > d[0].start_us - 5 * SEC)
        .count();
    assert_eq!(held, 1, "{starts:?}");
}

/// The operator reads usage with the config it has just compiled: that read applies a
/// lowered limit at once, while every replica sleeps on its booking and none acquires.
#[tokio::test]
async fn a_usage_read_with_the_new_limits_applies_them_at_once() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q20 = quota(Some(20), None, 10, NO_MARGIN);
    let q10 = quota(Some(10), None, 10, NO_MARGIN);
    let old = book_many(&l, &q20, "old", 60);
    clock.advance(Duration::from_secs(1));
    let change = clock.now_us();
    l.usage(&key(), &q10).await.expect("usage");
    let (mut called, lost) = check_all(&l, &clock, &old).await;
    assert_eq!(lost.len(), 20, "{lost:?}");
    called.retain(|(s, _)| *s >= change);
    called.sort();
    assert_eq!(max_in_window(&called, 10 * SEC), 10, "{called:?}");
}

/// Issue 13: a shared quota that answers bare 429s (Vertex AI) is learned. An unexplained
/// 429 cuts the windowed rates by 30 % for every caller (the 429s of one window count
/// once); each clean window gives back a tenth.
#[tokio::test]
async fn unexplained_429s_cut_the_rate_and_clean_windows_give_it_back() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = quota(Some(10), None, 10, NO_MARGIN);
    for i in 0..10 {
        let d = l.acquire_now(&key(), &q, &format!("r{i}"), req(1), Duration::ZERO);
        assert!(matches!(d, Decision::Admitted { .. }), "{i}: {d:?}");
    }
    clock.advance(Duration::from_secs(5));
    let k = key();
    let unexplained = || l.penalize(&k, Duration::from_secs(1), PenaltyScope::Unexplained);
    unexplained().await.expect("ok");
    clock.advance(Duration::from_secs(1));
    unexplained().await.expect("ok");
    let u = l.usage(&key(), &q).await.expect("usage");
    assert_eq!(u.rate_cut_permille, 300, "two 429s of one window cut once");
    // The next window takes 7, not 10.
    clock.advance(Duration::from_secs(4));
    let admitted = |prefix: &str| {
        (0..10)
            .take_while(|i| {
                matches!(
                    l.acquire_now(&key(), &q, &format!("{prefix}{i}"), req(1), Duration::ZERO),
                    Decision::Admitted { .. }
                )
            })
            .count()
    };
    assert_eq!(admitted("a"), 7);
    // A clean window since the cut: a tenth back (8 in the window, 7 of them taken).
    clock.advance(Duration::from_secs(5));
    assert_eq!(admitted("b"), 1);
    assert_eq!(
        l.usage(&key(), &q).await.expect("usage").rate_cut_permille,
        200
    );
    // Another 429 a half window later cuts 30 % of what is left: 1000 - 0.7 * 800.
    clock.advance(Duration::from_secs(5));
    unexplained().await.expect("ok");
    assert_eq!(
        l.usage(&key(), &q).await.expect("usage").rate_cut_permille,
        440
    );
}

/// The project's spend, shared by its models (the twin of the Redis test
/// `spend_is_one_bucket_per_project_shared_by_its_models`).
#[tokio::test]
async fn spend_is_one_bucket_per_project_shared_by_its_models() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let a = QuotaKey::new("proj", "gemini-3-pro-image");
    let b = QuotaKey::new("proj", "gemini-3.1-flash-image");
    let elsewhere = QuotaKey::new("other", "gemini-3.1-flash-image");
    let mut q = ModelQuota::unlimited().with_windows(Duration::from_secs(10));
    q.spend_micros.limit = Some(10);
    q.margin = NO_MARGIN;
    let spend = |m| Costs::new(1, 0, 0, m);
    let zero = Duration::ZERO;
    let a1 = l.acquire(&a, &q, "a1", spend(5), zero).await.expect("ok");
    let a2 = l.acquire(&a, &q, "a2", spend(5), zero).await.expect("ok");
    assert!(matches!(a1, Decision::Admitted { .. }), "{a1:?}");
    assert!(matches!(a2, Decision::Admitted { .. }), "all of it: {a2:?}");
    let b1 = l.acquire(&b, &q, "b1", spend(1), zero).await.expect("ok");
    assert_eq!(b1.blocker(), Some(Blocker::Dimension(Dim::SpendMicros)));
    let o = l.acquire(&elsewhere, &q, "o", spend(10), zero).await;
    assert!(
        matches!(o, Ok(Decision::Admitted { .. })),
        "another project: {o:?}"
    );
    clock.advance(Duration::from_secs(1));
    let b2 = l.acquire(&b, &q, "b2", spend(1), LONG).await.expect("ok");
    assert_eq!(b2.wait(), Some(Duration::from_secs(9)));
    l.release(a2.ticket().expect("a2")).await.expect("ok");
    let b3 = l.acquire(&b, &q, "b3", spend(4), zero).await.expect("ok");
    assert!(matches!(b3, Decision::Admitted { .. }), "released: {b3:?}");
    let mut actual = a1.ticket().expect("a1").costs;
    actual.spend_micros = 1;
    l.reconcile(a1.ticket().expect("a1"), actual)
        .await
        .expect("ok");
    let b4 = l.acquire(&b, &q, "b4", spend(4), zero).await.expect("ok");
    assert!(
        matches!(b4, Decision::Admitted { .. }),
        "reconciled: {b4:?}"
    );
    let full = l.acquire(&a, &q, "a3", spend(1), zero).await.expect("ok");
    assert_eq!(full.blocker(), Some(Blocker::Dimension(Dim::SpendMicros)));
    for k in [&a, &b] {
        let u = l.usage(k, &q).await.expect("ok");
        assert_eq!(u.dimensions[Dim::SpendMicros.index()].used, 10, "{k}");
    }
    let b2t = b2.ticket().expect("b2").clone();
    assert_eq!(l.check(&b2t).await.expect("ok"), Check::Go);
    let mut lower = q.clone();
    lower.spend_micros.limit = Some(5);
    let _ = l
        .acquire(&a, &lower, "a4", Costs::new(1, 0, 0, 0), zero)
        .await
        .expect("ok");
    assert_eq!(
        l.check(&b2t).await.expect("ok"),
        Check::Cancelled {
            retry_after: None,
            blocking: Blocker::Lost
        },
        "the booking beyond the lowered limit is gone"
    );
}

// Issue 15: tenants sharing one pool.

fn tenant(name: &str, weight: u32, floor_percent: u32, ceiling_percent: u32) -> TenantShare {
    TenantShare {
        name: name.into(),
        weight,
        floor_permille: floor_percent * 10,
        ceiling_permille: ceiling_percent * 10,
        daily_budget_micros: None,
        monthly_budget_micros: None,
    }
}

/// A fleet that always calls at its booked start: requests arrive at their times, a
/// booked one checks at its start (a slot taken over answers `Lost` and books afresh, as
/// the handler does), a rejected one comes back when told. Returns every call: its start
/// and its tenant's position. Every request is called exactly once (asserted).
async fn run_fleet(
    clock: &ManualClock,
    l: &MemoryLimiter,
    q: &ModelQuota,
    arrivals: &[(i64, usize)],
    max_wait: Duration,
) -> Vec<(i64, usize)> {
    let mut calls: Vec<(i64, usize)> = run_classes(clock, l, q, arrivals, &[], max_wait, req(1))
        .await
        .into_iter()
        .map(|(start, tenant, _)| (start, tenant))
        .collect();
    calls.sort();
    calls
}

/// [`run_fleet`] with a priority class per request (`classes[i]`, 0 when absent); each
/// call also names its request.
async fn run_classes(
    clock: &ManualClock,
    l: &MemoryLimiter,
    q: &ModelQuota,
    arrivals: &[(i64, usize)],
    classes: &[i32],
    max_wait: Duration,
    costs: Costs,
) -> Vec<(i64, usize, usize)> {
    use std::collections::BTreeMap;
    // Events by time: (time, order) -> (request, ticket if it wakes up a booking).
    let mut events: BTreeMap<(i64, u64), (usize, Option<Ticket>)> = BTreeMap::new();
    let mut order = 0u64;
    for (i, &(at, _)) in arrivals.iter().enumerate() {
        order += 1;
        events.insert((at, order), (i, None));
    }
    let mut calls = Vec::new();
    let mut tries = vec![0u32; arrivals.len()];
    let mut called = vec![false; arrivals.len()];
    while let Some(((at, _), (i, ticket))) = events.pop_first() {
        clock.set(at.max(clock.now_us()));
        let name = q
            .tenants
            .get(arrivals[i].1)
            .map_or(crate::quota::DEFAULT_TENANT, |t| t.name.as_str());
        if let Some(t) = ticket {
            match l.check(&t).await.expect("check") {
                Check::Go => {
                    assert!(!called[i], "request {i} called twice");
                    called[i] = true;
                    calls.push((t.start_us, arrivals[i].1, i));
                    continue;
                }
                Check::Cancelled { .. } => {}
            }
        }
        tries[i] += 1;
        let id = format!("r{i}-{}", tries[i]);
        let d = l
            .acquire_for(
                &key(),
                q,
                Asker {
                    tenant: name,
                    priority: classes.get(i).copied().unwrap_or(0),
                },
                &id,
                costs,
                max_wait,
            )
            .await
            .expect("acquire");
        order += 1;
        match d {
            Decision::Admitted { ticket } => {
                assert!(!called[i], "request {i} called twice");
                called[i] = true;
                calls.push((ticket.start_us, arrivals[i].1, i));
            }
            Decision::Booked { ticket, .. } => {
                events.insert((ticket.start_us, order), (i, Some(ticket)));
            }
            Decision::Rejected { retry_after, .. } => {
                let back = retry_after.unwrap_or(Duration::from_secs(1));
                events.insert((at + dur_us(back).max(1), order), (i, None));
            }
        }
    }
    assert!(called.iter().all(|c| *c), "every request is called once");
    calls
}

/// Calls per tenant in each window `[from + k w, from + (k + 1) w)`.
fn per_window(calls: &[(i64, usize)], from: i64, w: i64, tenants: usize) -> Vec<Vec<u64>> {
    let mut out: Vec<Vec<u64>> = Vec::new();
    for &(s, t) in calls.iter().filter(|(s, _)| *s >= from) {
        let k = usize::try_from((s - from) / w).unwrap_or(0);
        while out.len() <= k {
            out.push(vec![0; tenants]);
        }
        out[k][t] += 1;
    }
    out
}

fn tenant_quota(tenants: Vec<TenantShare>) -> ModelQuota {
    ModelQuota {
        tenants,
        ..quota(Some(20), None, 10, NO_MARGIN)
    }
}

/// Weights 3:1, both backlogged at three times the limit, the heavy tenant's requests
/// first: from the first window after both arrived until one runs out, every window goes
/// 15:5, the pool stays full, no window over, nothing lost or called twice.
#[tokio::test]
async fn backlogged_tenants_share_each_window_by_weight() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = tenant_quota(vec![tenant("a", 3, 0, 100), tenant("b", 1, 0, 100)]);
    let mut arrivals: Vec<(i64, usize)> = (0..60).map(|_| (T0, 0)).collect();
    arrivals.extend((0..60).map(|_| (T0, 1)));
    let calls = run_fleet(&clock, &l, &q, &arrivals, LONG).await;
    let starts: Vec<(i64, i64)> = calls.iter().map(|(s, _)| (*s, 1)).collect();
    assert!(
        max_in_window(&starts, 10 * SEC) <= 20,
        "never over the limit"
    );
    let windows = per_window(&calls, T0 + 10 * SEC, 10 * SEC, 2);
    // a's 60 minus the first window's 20, at 15 per window: the next two windows, then
    // the third holds a's last 10.
    for (k, w) in windows.iter().take(2).enumerate() {
        assert_eq!(w, &vec![15, 5], "window {}: {windows:?}", k + 1);
    }
    assert!(
        windows
            .iter()
            .all(|w| w.iter().sum::<u64>() == 20 || w == windows.last().unwrap()),
        "the pool stays full: {windows:?}"
    );
}

/// A tenant idle for a while: the other uses the whole pool meanwhile; the late one gets
/// its weighted share from the first window after it arrives, taking slots the busy one
/// had booked ahead.
#[tokio::test]
async fn an_idle_tenants_share_goes_to_the_others_until_it_arrives() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = tenant_quota(vec![tenant("a", 3, 0, 100), tenant("b", 1, 0, 100)]);
    let mut arrivals: Vec<(i64, usize)> = (0..200).map(|_| (T0, 0)).collect();
    let late = T0 + 35 * SEC;
    arrivals.extend((0..40).map(|_| (late, 1)));
    let calls = run_fleet(&clock, &l, &q, &arrivals, LONG).await;
    let windows = per_window(&calls, T0, 10 * SEC, 2);
    for (k, w) in windows.iter().take(4).enumerate() {
        assert_eq!(
            w,
            &vec![20, 0],
            "window {k}: a alone uses it all: {windows:?}"
        );
    }
    // b arrives mid window 3; from window 4 on it has its share.
    for (k, w) in windows.iter().enumerate().skip(4).take(5) {
        assert_eq!(w, &vec![15, 5], "window {k}: {windows:?}");
    }
}

/// A floor: a tenant of weight 1 against one of weight 9 still gets its 20 % within a
/// window of its arrival, however deep the other's queue; a ceiling caps a tenant even
/// while the pool has room.
#[tokio::test]
async fn a_floor_is_met_within_a_window_and_a_ceiling_caps_an_idle_pool() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = tenant_quota(vec![tenant("flood", 9, 0, 100), tenant("late", 1, 20, 100)]);
    // Arrivals a millisecond apart, so every booking has a start of its own (the late
    // tenant's scan skips a window where it is full, not one booking at a time).
    let mut arrivals: Vec<(i64, usize)> = (0..200).map(|i| (T0 + i * MS, 0)).collect();
    arrivals.extend((0..20).map(|i| (T0 + 15 * SEC + i * MS, 1)));
    let calls = run_fleet(&clock, &l, &q, &arrivals, LONG).await;
    let windows = per_window(&calls, T0, 10 * SEC, 2);
    for (k, w) in windows.iter().enumerate().skip(2).take(4) {
        assert_eq!(w, &vec![16, 4], "window {k}: the floor, 20 %: {windows:?}");
    }
    let late: u64 = windows.iter().take(7).map(|w| w[1]).sum();
    assert_eq!(
        late, 20,
        "none of its requests at the end of the queue: {windows:?}"
    );
    // A ceiling of 25 %: 5 per window, with nobody else asking.
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = tenant_quota(vec![tenant("capped", 1, 0, 25), tenant("other", 1, 0, 100)]);
    let arrivals: Vec<(i64, usize)> = (0..20).map(|_| (T0, 0)).collect();
    let calls = run_fleet(&clock, &l, &q, &arrivals, LONG).await;
    let windows = per_window(&calls, T0, 10 * SEC, 2);
    assert_eq!(windows, vec![vec![5, 0]; 4], "capped at 5 of 20");
    // A tenant the pool does not declare is refused, naming the fix.
    let e = l
        .acquire_for(
            &key(),
            &q,
            Asker {
                tenant: "nobody",
                priority: 0,
            },
            "x",
            req(1),
            LONG,
        )
        .await
        .expect_err("undeclared");
    assert!(e.to_string().contains("spec.tenants"), "{e}");
}

/// Issue 15: 10 % high-priority requests over a low-priority backlog ten windows deep: each
/// high one books within a window of its arrival, ahead of the low ones booked before it
/// (taking their slots: they book afresh); every low one is still called, once; no window
/// is over the limit. A request's class above the chain's is what counts, and the lowest
/// classes are bumped first only through their start order (the earliest lower one).
#[tokio::test]
async fn a_higher_class_books_ahead_of_a_deep_lower_backlog() {
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let q = quota(Some(20), None, 10, NO_MARGIN);
    let mut arrivals: Vec<(i64, usize)> = (0..200).map(|i| (T0 + i * MS, 0)).collect();
    let mut classes = vec![0; 200];
    // 20 urgent ones, one every 2 s from 25 s on.
    arrivals.extend((0..20).map(|i| (T0 + 25 * SEC + i * 2 * SEC, 0)));
    classes.extend([5; 20]);
    let calls = run_classes(&clock, &l, &q, &arrivals, &classes, LONG, req(1)).await;
    let starts: Vec<(i64, i64)> = calls.iter().map(|(s, _, _)| (*s, 1)).collect();
    assert!(
        max_in_window(&starts, 10 * SEC) <= 20,
        "never over the limit"
    );
    let waits: Vec<i64> = calls
        .iter()
        .filter(|(_, _, i)| *i >= 200)
        .map(|(s, _, i)| s - arrivals[*i].0)
        .collect();
    assert_eq!(waits.len(), 20);
    assert!(
        waits.iter().all(|w| *w <= 10 * SEC),
        "every urgent request within a window: {waits:?}"
    );
    // Without classes the same urgent requests wait behind the backlog.
    let clock = ManualClock::new(T0);
    let l = limiter(&clock);
    let calls = run_classes(&clock, &l, &q, &arrivals, &[], LONG, req(1)).await;
    let late = calls
        .iter()
        .filter(|(s, _, i)| *i >= 200 && s - arrivals[*i].0 > 10 * SEC)
        .count();
    assert_eq!(late, 20, "a queue ten windows deep holds them back");
}

/// Issue 15: a tenant's daily budget, on days of 100 s. It never books past it in a day: its
/// requests beyond it wait for the next day's start (Budget), while another tenant of the
/// pool goes on; a call that cost less than its estimate gives the difference back; a
/// monthly budget (months of 30 such days) holds across days.
#[tokio::test]
async fn a_spent_budget_waits_for_its_reset_and_others_go_on() {
    let day = 100 * SEC;
    let clock = ManualClock::new(T0);
    let days = FixedDays {
        origin_us: T0,
        day_us: day,
    };
    let l = limiter(&clock).with_calendar(Arc::new(days));
    let dollar = Costs::new(1, 0, 1, 1_000_000);
    let q = tenant_quota(vec![
        TenantShare {
            daily_budget_micros: Some(5_000_000),
            ..tenant("a", 1, 0, 100)
        },
        tenant("b", 1, 0, 100),
    ]);
    let mut arrivals: Vec<(i64, usize)> = (0..10).map(|i| (T0 + i * MS, 0)).collect();
    arrivals.extend((0..10).map(|i| (T0 + (10 + i) * MS, 1)));
    let calls = run_classes(&clock, &l, &q, &arrivals, &[], LONG, dollar).await;
    let a_on = |from: i64, to: i64| {
        calls
            .iter()
            .filter(|(s, t, _)| *t == 0 && *s >= from && *s < to)
            .count()
    };
    assert_eq!(a_on(T0, T0 + day), 5, "$5 on the first day: {calls:?}");
    assert_eq!(
        a_on(T0 + day, T0 + day + 10 * SEC),
        5,
        "the rest at the reset"
    );
    assert!(
        calls
            .iter()
            .filter(|(_, t, _)| *t == 1)
            .all(|(s, _, _)| *s < T0 + 10 * SEC),
        "b goes on in the first window: {calls:?}"
    );
    // A reconcile below the estimate gives budget back; the answer names the budget.
    let clock = ManualClock::new(T0);
    let l = limiter(&clock).with_calendar(Arc::new(days));
    let q = tenant_quota(vec![TenantShare {
        daily_budget_micros: Some(2_000_000),
        monthly_budget_micros: Some(3_000_000),
        ..tenant("a", 1, 0, 100)
    }]);
    let a = Asker {
        tenant: "a",
        priority: 0,
    };
    let ask = |id: &'static str, costs: Costs| {
        let (l, q) = (&l, &q);
        async move {
            l.acquire_for(&key(), q, a, id, costs, LONG)
                .await
                .expect("acquire")
        }
    };
    let a1 = ask("a1", dollar).await;
    assert!(ask("a2", dollar).await.ticket().is_some());
    let a3 = ask("a3", dollar).await;
    assert_eq!(a3.blocker(), Some(Blocker::Budget), "{a3:?}");
    assert_eq!(
        a3,
        Decision::Rejected {
            retry_after: Some(Duration::from_secs(100)),
            blocking: Blocker::Budget
        }
    );
    let mut cheaper = dollar;
    cheaper.spend_micros = 400_000;
    l.reconcile(a1.ticket().expect("a1"), cheaper)
        .await
        .expect("reconcile");
    let mut half = dollar;
    half.spend_micros = 500_000;
    assert!(ask("a4", half).await.ticket().is_some(), "$0.60 back");
    // The next day: $2 more by the day, but $3 by the month: 0.4 + 1 + 0.5 = 1.9 spent.
    clock.set(T0 + day);
    assert!(ask("a5", dollar).await.ticket().is_some());
    let a6 = ask("a6", dollar).await;
    assert_eq!(
        a6.blocker(),
        Some(Blocker::Budget),
        "the month's $3: {a6:?}"
    );
    assert_eq!(
        a6,
        Decision::Rejected {
            retry_after: Some(Duration::from_secs(2_900)),
            blocking: Blocker::Budget
        },
        "waits for the month's end (30 days of 100 s)"
    );
}

/// A tenant's budgets' hash lost (deleted, evicted, a restart without persistence): the
/// day's and the month's spend come back from what the caller saw, so a spent budget stays
/// spent; a caller that saw nothing restores nothing.
#[tokio::test]
async fn a_lost_budget_keeps_what_its_callers_saw_spent() {
    let day = 100 * SEC;
    let dollar = Costs::new(1, 0, 1, 1_000_000);
    let q = tenant_quota(vec![TenantShare {
        daily_budget_micros: Some(2_000_000),
        monthly_budget_micros: Some(3_000_000),
        ..tenant("a", 1, 0, 100)
    }]);
    let a = Asker {
        tenant: "a",
        priority: 0,
    };
    let days = FixedDays {
        origin_us: T0,
        day_us: day,
    };
    for saw in [true, false] {
        let clock = ManualClock::new(T0);
        let l = limiter(&clock).with_calendar(Arc::new(days));
        let ask = |id: &'static str| {
            let (l, q) = (&l, &q);
            async move {
                l.acquire_for(&key(), q, a, id, dollar, LONG)
                    .await
                    .expect("acquire")
            }
        };
        assert!(ask("a1").await.ticket().is_some());
        assert!(ask("a2").await.ticket().is_some());
        l.lose_hash_of(&budget_key(&key(), "a"));
        // A hash made anew has a later generation than the lost one.
        clock.set(T0 + MS);
        if !saw {
            l.budget_hints
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        let a3 = ask("a3").await;
        if !saw {
            assert!(a3.ticket().is_some(), "nothing seen, nothing restored");
            continue;
        }
        assert_eq!(
            a3.blocker(),
            Some(Blocker::Budget),
            "the day's $2 still spent: {a3:?}"
        );
        // The next day: the month's $2 came back too, so $1 more is its $3.
        clock.set(T0 + day);
        assert!(ask("a4").await.ticket().is_some());
        let a5 = ask("a5").await;
        assert_eq!(
            a5,
            Decision::Rejected {
                retry_after: Some(Duration::from_secs(2_900)),
                blocking: Blocker::Budget
            },
            "the month's $3 spent"
        );
    }
}
