//! `pacer loadtest --tenants`: several teams sending into one pool, and what each got.
//!
//! Each tenant sends its own requests (its `requests`, else an equal part of
//! `--requests`), from `after` seconds into the run, at the run's pace times the number
//! of tenants (all of them together at the run's pace); their messages name it. The
//! report's `tenants` section says, per tenant, what the simulator accepted and its share
//! of the calls accepted while every tenant had work waiting, against the share its weight,
//! floor and ceiling give it.
use std::{collections::BTreeMap, str::FromStr, time::Duration};

use pacer_core::quota::{TenantShare, fair_shares};
use serde::{Deserialize, Serialize};

/// One tenant of a loadtest: how the pool weighs it and what it sends.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantLoad {
    pub share: TenantShare,
    /// Requests it sends (`None`: an equal part of `--requests`).
    pub requests: Option<usize>,
    /// When it starts sending, into the run.
    pub after: Duration,
}

/// `--tenants NAME:weight=N,floor=P,ceiling=P,daily=USD,monthly=USD,requests=N,after=SECS,
/// NAME:...`: a token with `:` starts a tenant, the ones after it until the next are its
/// settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tenants(pub Vec<TenantLoad>);

impl FromStr for Tenants {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut out: Vec<TenantLoad> = Vec::new();
        for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let setting = match token.split_once(':') {
                Some((name, rest)) => {
                    if name.is_empty() {
                        return Err(format!("{token:?}: a tenant needs a name before `:`"));
                    }
                    out.push(TenantLoad {
                        share: TenantShare {
                            name: name.to_owned(),
                            weight: 1,
                            floor_permille: 0,
                            ceiling_permille: 1000,
                            daily_budget_micros: None,
                            monthly_budget_micros: None,
                        },
                        requests: None,
                        after: Duration::ZERO,
                    });
                    rest
                }
                None => token,
            };
            if setting.is_empty() {
                continue;
            }
            let Some(t) = out.last_mut() else {
                return Err(format!(
                    "{token:?} comes before any tenant: start with NAME:"
                ));
            };
            let (k, v) = setting
                .split_once('=')
                .ok_or_else(|| format!("{setting:?} is not KEY=VALUE"))?;
            let number = |what: &str| -> Result<f64, String> {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| format!("{}: {k}={v:?} is not {what}", t.share.name))
            };
            match k {
                "weight" => {
                    t.share.weight = v
                        .parse()
                        .ok()
                        .filter(|w| (1..=1000).contains(w))
                        .ok_or_else(|| format!("{}: weight={v:?} is not 1 to 1000", t.share.name))?
                }
                "floor" => {
                    t.share.floor_permille = percent(number("a percent")?, &t.share.name, k)?
                }
                "ceiling" => {
                    t.share.ceiling_permille = percent(number("a percent")?, &t.share.name, k)?
                }
                "requests" => t.requests = Some(number("a count")? as usize),
                "daily" => {
                    t.share.daily_budget_micros = Some((number("dollars")? * 1e6).round() as u64)
                }
                "monthly" => {
                    t.share.monthly_budget_micros = Some((number("dollars")? * 1e6).round() as u64)
                }
                "after" => t.after = Duration::from_secs_f64(number("seconds")?),
                _ => {
                    return Err(format!(
                        "{}: unknown setting {k:?} (weight, floor, ceiling, daily, monthly, requests, after)",
                        t.share.name
                    ));
                }
            }
        }
        if out.is_empty() {
            return Err("no tenant: give NAME:weight=N,...".into());
        }
        let floors: u32 = out.iter().map(|t| t.share.floor_permille).sum();
        if floors > 1000 {
            return Err(format!(
                "the floors add up to {} %: 100 at most",
                floors / 10
            ));
        }
        for (i, t) in out.iter().enumerate() {
            if out[..i].iter().any(|u| u.share.name == t.share.name) {
                return Err(format!("{} is given twice", t.share.name));
            }
        }
        Ok(Tenants(out))
    }
}

fn percent(p: f64, name: &str, key: &str) -> Result<u32, String> {
    if p > 100.0 {
        return Err(format!("{name}: {key}={p} is above 100"));
    }
    Ok((p * 10.0).round() as u32)
}

impl Tenants {
    /// The pools' `spec.tenants`.
    pub fn shares(&self) -> Vec<TenantShare> {
        self.0.iter().map(|t| t.share.clone()).collect()
    }

    /// Who sends each of the run's requests and when: (tenant, offset), in send order.
    /// `pace` is the run's gap between two sends (`None`: all at once).
    pub fn schedule(&self, requests: usize, pace: Option<Duration>) -> Vec<(usize, Duration)> {
        let n = self.0.len().max(1);
        let mut out: Vec<(usize, Duration)> = Vec::new();
        let unset = self
            .0
            .iter()
            .filter(|t| t.requests.is_none())
            .count()
            .max(1);
        let given: usize = self.0.iter().filter_map(|t| t.requests).sum();
        let rest = requests.saturating_sub(given);
        for (i, t) in self.0.iter().enumerate() {
            let count = t.requests.unwrap_or(rest / unset);
            for k in 0..count {
                let at = t.after + pace.map_or(Duration::ZERO, |p| p * (n * k) as u32);
                out.push((i, at));
            }
        }
        // Stable: at one time, the tenants in the order given.
        out.sort_by_key(|(i, at)| (*at, *i));
        out
    }
}

/// One tenant's figures.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct TenantFigures {
    /// Requests it sent.
    pub requests: usize,
    /// Its calls the provider accepted.
    pub accepted: usize,
    /// Its part of the calls accepted while every tenant had work waiting: in the whole
    /// windows (the limiter's, margin included, from the first call) that start a window
    /// after the last tenant began sending and end before the first one's last call.
    pub share: f64,
    /// The part its weight, floor and ceiling give it among the tenants that sent.
    pub expected_share: f64,
    /// Send to result, p99, in seconds.
    pub wait_p99_s: f64,
    /// From its first send until a window starting then held its expected share of the
    /// limit (95 % of it, rounded down), in seconds; `None` if none did.
    pub share_reached_after_s: Option<f64>,
    /// For a tenant that sent alone before the others began: its accepted calls in the
    /// whole limiter windows (from the first call) before another tenant's first send, over
    /// the limit times those windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_alone: Option<f64>,
    /// Its daily budget, in dollars, and what its calls cost per day (days of the run's
    /// calendar, from the one of the first call; the provider's reported usage, priced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_budget_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spend_usd_by_day: Vec<f64>,
}

/// Per tenant, from the accepted calls (unix ms, tenant) of the binding model, when each
/// tenant first sent (unix ms), the send-to-result latencies, the binding limit and the
/// limiter's window (margin included).
pub fn figures(
    tenants: &Tenants,
    accepted: &[(i64, usize)],
    first_sent_ms: &[Option<i64>],
    requests: &[usize],
    latencies: &[Vec<f64>],
    limit: u64,
    window_ms: i64,
) -> BTreeMap<String, TenantFigures> {
    let n = tenants.0.len();
    let sent: Vec<bool> = (0..n).map(|i| requests[i] > 0).collect();
    let expected = fair_shares(&tenants.shares(), &sent);
    let last_start = first_sent_ms.iter().flatten().max().copied().unwrap_or(0);
    let last_call: Vec<i64> = (0..n)
        .map(|i| {
            accepted
                .iter()
                .filter(|(_, t)| *t == i)
                .map(|(at, _)| *at)
                .max()
                .unwrap_or(i64::MAX)
        })
        .collect();
    let (mut from, mut to) = (
        last_start + window_ms,
        (0..n)
            .filter(|&i| sent[i])
            .map(|i| last_call[i])
            .min()
            .unwrap_or(i64::MAX),
    );
    // Whole windows: a window cut by the period's ends holds what the cut left, not a
    // share. The grid starts half a window before the first call: bookings behind a queue
    // start a window apart, in clusters, and a call leaves a little after its start, so a
    // boundary at a cluster would count a late call in the next window.
    if let Some(first) = accepted.iter().map(|(at, _)| *at - window_ms / 2).min()
        && window_ms > 0
        && to != i64::MAX
    {
        let k0 = (from - first + window_ms - 1).div_euclid(window_ms).max(0);
        let k1 = (to - first).div_euclid(window_ms);
        if k1 > k0 {
            (from, to) = (first + k0 * window_ms, first + k1 * window_ms - 1);
        }
    }
    let contended: Vec<usize> = accepted
        .iter()
        .filter(|(at, _)| *at >= from && *at <= to)
        .map(|(_, t)| *t)
        .collect();
    let mut out = BTreeMap::new();
    for (i, t) in tenants.0.iter().enumerate() {
        let mut waits = latencies[i].clone();
        waits.sort_by(f64::total_cmp);
        let mine: Vec<i64> = accepted
            .iter()
            .filter(|(_, u)| *u == i)
            .map(|(at, _)| *at)
            .collect();
        let want = ((expected[i] as f64 / 1000.0) * limit as f64 * 0.95).floor() as usize;
        let reached = first_sent_ms[i].and_then(|first| {
            (0..240).map(|k| first + k * 250).find_map(|start| {
                let held = mine
                    .iter()
                    .filter(|&&at| at >= start && at < start + window_ms)
                    .count();
                (want > 0 && held >= want).then(|| (start - first) as f64 / 1000.0)
            })
        });
        // Alone until another tenant's first send: its use of the limit meanwhile.
        let others_from = first_sent_ms
            .iter()
            .enumerate()
            .filter(|(j, f)| *j != i && f.is_some())
            .filter_map(|(_, f)| *f)
            .min();
        let utilization_alone = match (accepted.iter().map(|(at, _)| *at).min(), others_from) {
            (Some(first), Some(others))
                if first_sent_ms[i].is_some_and(|mine| mine < others) && window_ms > 0 =>
            {
                let whole = (others - first).div_euclid(window_ms);
                (whole > 0 && limit > 0).then(|| {
                    let n = mine
                        .iter()
                        .filter(|&&at| at >= first && at < first + whole * window_ms)
                        .count();
                    n as f64 / (limit as f64 * whole as f64)
                })
            }
            _ => None,
        };
        let share = if contended.is_empty() {
            0.0
        } else {
            contended.iter().filter(|u| **u == i).count() as f64 / contended.len() as f64
        };
        out.insert(
            t.share.name.clone(),
            TenantFigures {
                requests: requests[i],
                accepted: mine.len(),
                share,
                expected_share: expected[i] as f64 / 1000.0,
                wait_p99_s: pacer_core::measure::percentile(&waits, 0.99),
                share_reached_after_s: reached,
                utilization_alone,
                ..TenantFigures::default()
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_parse_with_their_settings_and_errors_say_what_is_wrong() {
        let t: Tenants = "a:weight=3,floor=20,b:weight=1,after=30,requests=10"
            .parse()
            .unwrap();
        assert_eq!(t.0.len(), 2);
        assert_eq!((t.0[0].share.weight, t.0[0].share.floor_permille), (3, 200));
        assert_eq!(t.0[1].after, Duration::from_secs(30));
        assert_eq!(t.0[1].requests, Some(10));
        for (bad, says) in [
            ("weight=3", "before any tenant"),
            ("a:weight=0", "1 to 1000"),
            ("a:colour=red", "unknown setting"),
            ("a:floor=60,b:floor=50", "add up to 110"),
            ("a:,a:", "twice"),
        ] {
            let e = bad.parse::<Tenants>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_schedule_splits_the_requests_and_paces_each_tenant() {
        let t: Tenants = "a:,b:after=10".parse().unwrap();
        let s = t.schedule(4, Some(Duration::from_secs(1)));
        assert_eq!(
            s,
            vec![
                (0, Duration::ZERO),
                (0, Duration::from_secs(2)),
                (1, Duration::from_secs(10)),
                (1, Duration::from_secs(12)),
            ]
        );
    }

    #[test]
    fn shares_are_counted_while_every_tenant_waits() {
        let t: Tenants = "a:weight=3,b:weight=1".parse().unwrap();
        // a alone in the first window (0..1000), then 3:1 until b's last call at 2900.
        let mut calls: Vec<(i64, usize)> = (0..4).map(|k| (k * 200, 0)).collect();
        for w in 1..3 {
            calls.extend((0..3).map(|k| (w * 1000 + k * 100, 0)));
            calls.push((w * 1000 + 900, 1));
        }
        calls.push((3500, 0));
        let f = figures(
            &t,
            &calls,
            &[Some(0), Some(0)],
            &[11, 2],
            &[vec![1.0], vec![2.0]],
            4,
            1000,
        );
        assert_eq!(f["a"].accepted, 11);
        assert!((f["b"].share - 0.25).abs() < 1e-9, "{:?}", f["b"]);
        assert!((f["b"].expected_share - 0.25).abs() < 1e-9);
        assert_eq!(f["a"].share_reached_after_s, Some(0.0));
        assert_eq!(f["b"].wait_p99_s, 2.0);
        assert_eq!(f["a"].utilization_alone, None, "both began at once");
        // b from 2 s on: a alone in two whole windows, 4 + 3 calls of 8.
        let f = figures(
            &t,
            &calls,
            &[Some(0), Some(2_000)],
            &[11, 2],
            &[vec![1.0], vec![2.0]],
            4,
            1000,
        );
        assert_eq!(f["a"].utilization_alone, Some(7.0 / 8.0));
        assert_eq!(f["b"].utilization_alone, None);
    }
}

/// `--priorities CLASS=FRACTION,...`: that fraction of the run's requests carry that
/// priority class (spread evenly through the send order); the rest class 0.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Priorities(pub Vec<(i32, f64)>);

impl FromStr for Priorities {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (class, fraction) = token
                .split_once('=')
                .ok_or_else(|| format!("{token:?} is not CLASS=FRACTION"))?;
            let class: i32 = class
                .parse()
                .ok()
                .filter(|c| (-1000..=1000).contains(c) && *c != 0)
                .ok_or_else(|| format!("{token:?}: the class is a number, -1000 to 1000, not 0"))?;
            let fraction: f64 = fraction
                .parse()
                .ok()
                .filter(|f: &f64| f.is_finite() && *f > 0.0 && *f <= 1.0)
                .ok_or_else(|| format!("{token:?}: the fraction is above 0, at most 1"))?;
            out.push((class, fraction));
        }
        let total: f64 = out.iter().map(|(_, f)| f).sum();
        if out.is_empty() || total > 1.0 + 1e-9 {
            return Err("give CLASS=FRACTION pairs whose fractions add up to 1 at most".into());
        }
        Ok(Priorities(out))
    }
}

impl Priorities {
    /// Each request's class, in send order: every class spread evenly (the first request
    /// of a class comes after 1 / fraction requests).
    pub fn classes(&self, requests: usize) -> Vec<i32> {
        let mut owed = vec![0.0f64; self.0.len()];
        (0..requests)
            .map(|_| {
                let mut class = 0;
                for (k, (c, f)) in self.0.iter().enumerate() {
                    owed[k] += f;
                    if class == 0 && owed[k] >= 1.0 - 1e-9 {
                        owed[k] -= 1.0;
                        class = *c;
                    }
                }
                class
            })
            .collect()
    }
}

/// One priority class's figures.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct ClassFigures {
    /// Requests of the class.
    pub requests: usize,
    /// Its calls the provider accepted.
    pub accepted: usize,
    /// From sending a request to its accepted call, p99, in seconds: the wait its booking
    /// (and any booking afresh) imposed, plus the queue's delivery.
    pub wait_p99_s: f64,
}

/// Per class, from each request's class, when it was sent and when its accepted call left.
pub fn class_figures(
    classes: &[i32],
    sent_ms: &[Option<i64>],
    called_ms: &[Option<i64>],
) -> BTreeMap<String, ClassFigures> {
    let mut waits: BTreeMap<i32, Vec<f64>> = BTreeMap::new();
    let mut out: BTreeMap<i32, ClassFigures> = BTreeMap::new();
    for (i, class) in classes.iter().enumerate() {
        let f = out.entry(*class).or_default();
        f.requests += 1;
        if let Some(called) = called_ms[i] {
            f.accepted += 1;
            if let Some(sent) = sent_ms[i] {
                waits
                    .entry(*class)
                    .or_default()
                    .push((called - sent).max(0) as f64 / 1000.0);
            }
        }
    }
    out.into_iter()
        .map(|(class, mut f)| {
            let mut w = waits.remove(&class).unwrap_or_default();
            w.sort_by(f64::total_cmp);
            f.wait_p99_s = pacer_core::measure::percentile(&w, 0.99);
            (class.to_string(), f)
        })
        .collect()
}

#[cfg(test)]
mod class_tests {
    use super::*;

    #[test]
    fn classes_are_spread_through_the_send_order() {
        let p: Priorities = "5=0.1".parse().unwrap();
        let c = p.classes(20);
        assert_eq!(c.iter().filter(|c| **c == 5).count(), 2);
        assert_eq!(c[9], 5);
        assert!("0=0.5".parse::<Priorities>().is_err());
        assert!("5=0.6,6=0.6".parse::<Priorities>().is_err());
        let f = class_figures(
            &[0, 5, 0],
            &[Some(0), Some(0), Some(0)],
            &[Some(9_000), Some(500), None],
        );
        assert_eq!(f["5"].wait_p99_s, 0.5);
        assert_eq!((f["0"].requests, f["0"].accepted), (2, 1));
    }
}
