//! The provider's side of a run: what the simulator counted, on its own clock, read from
//! the JSON of `/_sim/stats`, and the cross-check of the fleet's own call log against it.
//!
//! The fleet's log can miss calls (a replica killed mid-call, a call cut off by a timeout
//! after it arrived) and cannot see what it never sent through its wrapper, so the verdict
//! (upstream 429s, windows over the limit, calls without a limiter entry) comes from the
//! simulator; the fleet's own figures are printed next to it and a disagreement beyond what
//! cut-off calls explain fails the run.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What the simulator counted for one run (all models and projects of the run together,
/// windows for the binding model).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct SimFigures {
    /// Requests that reached the quota check, refused ones included. `None` when the
    /// simulator does not report arrivals.
    pub arrivals: Option<u64>,
    /// Calls it answered with an image (or a safety block): counted against the quota.
    pub accepted: u64,
    /// Refusals by quota reason (one refusal may name several dimensions).
    pub rejected: BTreeMap<String, u64>,
    /// Injected faults by kind.
    pub faults: BTreeMap<String, u64>,
    /// Calls answered 429 by the provider: quota refusals plus ghost 429s.
    pub upstream_429: u64,
    /// The most arrivals (refused included) in any window, per dimension, binding model.
    pub max_arrivals_in_any_window: Option<BTreeMap<String, u64>>,
    /// The binding model's limits per dimension.
    pub limits: BTreeMap<String, u64>,
    /// Dimensions whose most arrivals in a window exceeded the limit, with by how much.
    pub over_limit: BTreeMap<String, u64>,
    /// Provider calls that carried no `x-pacer-ticket` or a ticket already used: calls
    /// without their own limiter entry. `None` when the simulator does not count tickets.
    pub uncounted_calls: Option<u64>,
    pub tickets: Option<Tickets>,
    /// Unix ms of every accepted call of the binding model, sorted.
    #[serde(default, skip_serializing)]
    pub accepted_at_ms: Option<Vec<i64>>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Tickets {
    pub tagged: u64,
    pub untagged: u64,
    pub duplicates: u64,
}

fn counts(v: &Value) -> BTreeMap<String, u64> {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_u64().map(|n| (k.clone(), n)))
                .collect()
        })
        .unwrap_or_default()
}

fn add(into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

/// Reads `/_sim/stats` for the models of a run. Counts are summed over the run's models
/// (every project); windows and limits are the binding model's (its first project's
/// figures are the model's when only one project is simulated).
pub fn read(stats: &Value, models: &[String], binding: &str) -> SimFigures {
    let mut f = SimFigures::default();
    let mut arrivals = Some(0u64);
    let mut tickets = Some(Tickets::default());
    for model in models {
        let m = &stats["models"][model];
        if m.is_null() {
            continue;
        }
        arrivals = arrivals.zip(m["arrivals"].as_u64()).map(|(a, b)| a + b);
        f.accepted += m["accepted"].as_u64().unwrap_or_default();
        let rejected = counts(&m["rejected"]);
        let faults = counts(&m["faults"]);
        // A refusal counts once per exceeded dimension: the number of refused calls is at
        // least the largest of those, and arrivals tell it exactly when reported.
        let refused_lower = rejected.values().copied().max().unwrap_or(0);
        let ghosts = faults.get("ghost_429").copied().unwrap_or(0);
        let refused = match m["arrivals"].as_u64() {
            Some(a) => {
                let accepted = m["accepted"].as_u64().unwrap_or_default();
                // Faults answered before the quota check are not quota refusals, whether or
                // not the simulator counts them as arrivals.
                let pre_quota: u64 = faults
                    .iter()
                    .filter(|(k, _)| k.as_str() != "reset")
                    .map(|(_, v)| v)
                    .sum();
                let without = a.saturating_sub(accepted).saturating_sub(pre_quota);
                if without >= refused_lower {
                    without
                } else {
                    a.saturating_sub(accepted).max(refused_lower)
                }
            }
            None => refused_lower,
        };
        f.upstream_429 += refused + ghosts;
        add(&mut f.rejected, rejected);
        add(&mut f.faults, faults);
        tickets = tickets
            .zip(serde_json::from_value::<Tickets>(m["tickets"].clone()).ok())
            .map(|(a, b)| Tickets {
                tagged: a.tagged + b.tagged,
                untagged: a.untagged + b.untagged,
                duplicates: a.duplicates + b.duplicates,
            });
        if model == binding {
            f.limits = counts(&m["limits"]);
            f.max_arrivals_in_any_window = m["max_arrivals_in_any_window"]
                .as_object()
                .map(|_| counts(&m["max_arrivals_in_any_window"]));
            f.accepted_at_ms = m["accepted_at_ms"].as_array().map(|a| {
                let mut v: Vec<i64> = a.iter().filter_map(Value::as_i64).collect();
                v.sort_unstable();
                v
            });
        }
    }
    f.arrivals = arrivals;
    if let Some(max) = &f.max_arrivals_in_any_window {
        for (dim, limit) in &f.limits {
            if let Some(&n) = max.get(dim)
                && n > *limit
            {
                f.over_limit.insert(dim.clone(), n - limit);
            }
        }
    }
    f.uncounted_calls = tickets.as_ref().map(|t| t.untagged + t.duplicates);
    f.tickets = tickets;
    f
}

/// The fleet's own view of its provider calls, for the cross-check.
#[derive(Debug, Clone, Copy, Default)]
pub struct Own {
    /// Calls that left a replica (logged when they left).
    pub calls: u64,
    /// Of those, answered with an image or a safety block (HTTP 200).
    pub ok: u64,
    /// Answered 429.
    pub upstream_429: u64,
    /// Calls whose answer the replica never read: cut off by its timeout, its task
    /// aborted, its process killed, or the connection broken mid-answer. The provider
    /// may have counted them either way.
    pub unanswered: u64,
}

/// Where the fleet's log and the simulator disagree beyond what unanswered calls explain.
pub fn disagreements(own: &Own, sim: &SimFigures) -> Vec<String> {
    let mut out = Vec::new();
    let slack = own.unanswered;
    if let Some(arrivals) = sim.arrivals {
        // Every call is logged as it leaves (a killed replica's too: its log streams to
        // the parent), so every arrival is in the log; only a call cut off before its
        // request was written may be missing at the simulator.
        if arrivals > own.calls || arrivals + slack < own.calls {
            out.push(format!(
                "provider calls: the fleet logged {} ({} unanswered), the simulator counted {arrivals} arrivals",
                own.calls, own.unanswered
            ));
        }
    }
    // An accepted call is one the replica read as 200, unless it never read the answer.
    if sim.accepted < own.ok || sim.accepted > own.ok + slack {
        out.push(format!(
            "accepted calls: the fleet read {} answers with an image, the simulator accepted {} ({} unanswered)",
            own.ok, sim.accepted, own.unanswered
        ));
    }
    if sim.upstream_429 < own.upstream_429 || sim.upstream_429 > own.upstream_429 + slack {
        out.push(format!(
            "upstream 429s: the fleet saw {}, the simulator answered {} ({} unanswered)",
            own.upstream_429, sim.upstream_429, own.unanswered
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_extended_stats() {
        let stats = json!({"models": {"m": {
            "arrivals": 25, "accepted": 20, "rejected": {"rpm": 5, "ipm": 5},
            "faults": {}, "limits": {"rpm": 20, "ipm": 20},
            "max_arrivals_in_any_window": {"rpm": 25, "ipm": 25},
            "accepted_at_ms": [3, 1, 2],
            "tickets": {"tagged": 24, "untagged": 1, "duplicates": 2},
        }}});
        let f = read(&stats, &["m".into()], "m");
        assert_eq!(f.arrivals, Some(25));
        assert_eq!(f.upstream_429, 5);
        assert_eq!(f.over_limit, [("ipm".into(), 5), ("rpm".into(), 5)].into());
        assert_eq!(f.uncounted_calls, Some(3));
        assert_eq!(f.accepted_at_ms, Some(vec![1, 2, 3]));
    }

    #[test]
    fn older_stats_leave_the_new_figures_unknown() {
        let stats = json!({"models": {"m": {"accepted": 3, "rejected": {"rpm": 2, "ipm": 2}, "faults": {"ghost_429": 1}}}});
        let f = read(&stats, &["m".into()], "m");
        assert_eq!((f.arrivals, f.uncounted_calls), (None, None));
        assert_eq!(f.max_arrivals_in_any_window, None);
        assert_eq!(f.upstream_429, 3);
    }

    #[test]
    fn a_call_the_fleet_did_not_log_is_a_disagreement() {
        let sim = SimFigures {
            arrivals: Some(11),
            accepted: 11,
            ..SimFigures::default()
        };
        let own = Own {
            calls: 10,
            ok: 10,
            ..Own::default()
        };
        assert_eq!(disagreements(&own, &sim).len(), 2);
        let cut_off = Own {
            calls: 11,
            ok: 10,
            unanswered: 1,
            ..Own::default()
        };
        assert!(disagreements(&cut_off, &sim).is_empty());
    }
}
