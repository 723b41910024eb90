//! The limiter's semantics, checked on the in-memory limiter under a manual clock.
use std::{sync::Arc, time::Duration};

use proptest::prelude::*;

use super::*;
use crate::limiter::{FixedDays, ManualClock};
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
    let w = Duration::from_secs(window_s);
    let mut q = ModelQuota::unlimited().with_windows(w);
    q.requests = DimensionQuota {
        limit: rpm,
        window: w,
    };
    q.input_tokens = DimensionQuota {
        limit: tpm,
        window: w,
    };
    q.margin = margin;
    q
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
    assert!(
        matches!(
            d,
            Decision::Rejected {
                blocking: Blocker::Daily,
                ..
            }
        ),
        "{d:?}"
    );
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

/// The largest sum of one dimension in any window of `window` µs over `(start, cost)`,
/// sorted by start.
pub(crate) fn max_in_window(events: &[(i64, i64)], window: i64) -> i64 {
    let mut best = 0;
    let mut sum = 0;
    let mut lo = 0;
    for hi in 0..events.len() {
        sum += events[hi].1;
        while events[lo].0 <= events[hi].0 - window {
            sum -= events[lo].1;
            lo += 1;
        }
        // Entries with the same start as `hi` after it belong to the same window.
        if hi + 1 == events.len() || events[hi + 1].0 != events[hi].0 {
            best = best.max(sum);
        }
    }
    best
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
    /// ever holds more than its limit, and starts follow arrival order.
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
            prop_assert!(t.start_us >= last_start, "FIFO: {} < {}", t.start_us, last_start);
            last_start = t.start_us;
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
