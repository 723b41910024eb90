//! Measurement shared by the benchmarks, `pacer loadtest` and the tests: the most in any
//! window, windows over a limit, percentiles. Windows are half-open: an event at `t` and
//! one at `t + window` are never in the same window (as the limiter counts).
use std::ops::{AddAssign, SubAssign};

/// The largest total weight in any window of `window` over `(time, weight)` events, in
/// any order.
pub fn max_in_window<W>(events: &[(i64, W)], window: i64) -> W
where
    W: Copy + Default + Ord + AddAssign + SubAssign,
{
    let mut events = events.to_vec();
    events.sort_unstable_by_key(|e| e.0);
    let (mut best, mut sum, mut lo) = (W::default(), W::default(), 0);
    for hi in 0..events.len() {
        sum += events[hi].1;
        while events[lo].0 <= events[hi].0 - window {
            sum -= events[lo].1;
            lo += 1;
        }
        // Events at the same time as `hi` after it belong to the same window.
        if hi + 1 == events.len() || events[hi + 1].0 != events[hi].0 {
            best = best.max(sum);
        }
    }
    best
}

/// The most events in any window of `window` over event times, in any order.
pub fn max_count_in_window(times: &[i64], window: i64) -> u64 {
    let events: Vec<(i64, u64)> = times.iter().map(|&t| (t, 1)).collect();
    max_in_window(&events, window)
}

/// Events past a limit: how many events have a trailing window of `window` (themselves
/// included) holding more than `limit`. 0 means no window ever went over.
pub fn over_limit_windows(times: &[i64], window: i64, limit: u64) -> u64 {
    let mut times = times.to_vec();
    times.sort_unstable();
    let (mut lo, mut over) = (0usize, 0u64);
    for hi in 0..times.len() {
        while times[hi] - times[lo] >= window {
            lo += 1;
        }
        if (hi - lo + 1) as u64 > limit {
            over += 1;
        }
    }
    over
}

/// The `p` quantile (0 to 1) of sorted values, nearest rank; 0 when empty.
pub fn percentile<T: Copy + Into<f64>>(sorted: &[T], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_half_open_and_weighted() {
        assert_eq!(max_in_window(&[(0, 2u64), (5, 3), (10, 4)], 10), 7);
        assert_eq!(max_in_window(&[(10, 4i64), (0, 2), (9, 3)], 10), 7);
        assert_eq!(max_in_window::<u64>(&[], 10), 0);
        assert_eq!(max_count_in_window(&[0, 10, 20, 1000, 1005], 1000), 4);
        assert_eq!(max_count_in_window(&[0, 10, 1010, 1020], 1000), 2);
    }

    #[test]
    fn over_limit_windows_count_events_past_the_limit() {
        assert_eq!(over_limit_windows(&[0, 1, 2, 3], 10, 2), 2);
        assert_eq!(over_limit_windows(&[0, 10, 20], 10, 1), 0);
        assert_eq!(over_limit_windows(&[], 10, 1), 0);
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert_eq!(percentile(&v, 0.99), 5.0);
        assert_eq!(percentile::<f64>(&[], 0.5), 0.0);
    }
}
