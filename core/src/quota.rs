//! The quota model: what a provider project may spend per model, and what a request costs.
//!
//! Gemini limits each project per model in independent dimensions (DESIGN.md section 1):
//! requests, input tokens and images per minute, spend per rolling 10 minutes, and requests
//! per Pacific calendar day. [`ModelQuota`] is what the limiter enforces for one
//! (project, model); [`CompiledPool::model_quota`](crate::config::CompiledPool::model_quota)
//! builds it from a pool's declared limits and its headroom, which is applied there and
//! nowhere else. The per-model facts (default limits per tier, sizes, prices) live in
//! [`crate::models`].
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::models::{ImageSize, model_info};

/// One windowed dimension of a quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dim {
    /// Requests per window (RPM).
    Requests,
    /// Input tokens per window (TPM).
    InputTokens,
    /// Images per window (IPM).
    Images,
    /// Spend per window (10 minutes by default), in micro-dollars.
    SpendMicros,
}

impl Dim {
    /// All dimensions, in the order the limiter stores them.
    pub const ALL: [Dim; 4] = [
        Dim::Requests,
        Dim::InputTokens,
        Dim::Images,
        Dim::SpendMicros,
    ];

    /// The dimension's position in arrays indexed by dimension.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The default window: one minute, or ten for spend.
    pub fn default_window(self) -> Duration {
        match self {
            Dim::SpendMicros => Duration::from_secs(600),
            _ => Duration::from_secs(60),
        }
    }

    /// A short stable name (metrics labels, JSON).
    pub fn name(self) -> &'static str {
        match self {
            Dim::Requests => "requests",
            Dim::InputTokens => "input_tokens",
            Dim::Images => "images",
            Dim::SpendMicros => "spend_micros",
        }
    }
}

/// A limit in one dimension and the sliding window it applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DimensionQuota {
    /// At most this much in any window; `None` means unlimited. `Some(0)` means the model
    /// is unavailable (the free tier's image models).
    pub limit: Option<u64>,
    /// The window's length.
    pub window: Duration,
}

/// What one request costs, in every dimension. Reserve an upper bound at `acquire` and
/// correct it with `reconcile` once the provider reports usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Costs {
    /// Requests (N images cost N requests: image models reject `candidateCount > 1`).
    pub requests: u64,
    /// Input (prompt) tokens.
    pub input_tokens: u64,
    /// Images generated.
    pub images: u64,
    /// Spend in micro-dollars.
    pub spend_micros: u64,
}

impl Costs {
    /// One request of the given number of input tokens, images and price.
    pub fn new(requests: u64, input_tokens: u64, images: u64, spend_micros: u64) -> Costs {
        Costs {
            requests,
            input_tokens,
            images,
            spend_micros,
        }
    }

    /// The cost in one dimension.
    pub fn get(&self, dim: Dim) -> u64 {
        match dim {
            Dim::Requests => self.requests,
            Dim::InputTokens => self.input_tokens,
            Dim::Images => self.images,
            Dim::SpendMicros => self.spend_micros,
        }
    }

    /// The costs as an array indexed by [`Dim::index`].
    pub fn to_array(&self) -> [u64; 4] {
        [
            self.requests,
            self.input_tokens,
            self.images,
            self.spend_micros,
        ]
    }

    /// The inverse of [`Costs::to_array`].
    pub fn from_array(a: [u64; 4]) -> Costs {
        Costs::new(a[0], a[1], a[2], a[3])
    }
}

/// Everything the limiter enforces for one (project, model), headroom already applied.
///
/// Passed on every call: the limits come from the compiled config the operator writes to
/// Redis and change at runtime, so replicas never compile them in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelQuota {
    /// Requests per window.
    pub requests: DimensionQuota,
    /// Input tokens per window.
    pub input_tokens: DimensionQuota,
    /// Images per window.
    pub images: DimensionQuota,
    /// Spend per window, in micro-dollars: the project's, shared by all of its models
    /// (Google's spend limit is per project). Both limiters book it in one state per
    /// project, in the same step as the model's own dimensions.
    pub spend_micros: DimensionQuota,
    /// Requests per Pacific calendar day.
    pub requests_per_day: Option<u64>,
    /// Extra length added to every window, because the provider counts a request when it
    /// arrives and latency varies: starts spaced one window apart can still arrive inside
    /// one window. `None`: proportional, 1/60 of the window (1 s on 60 s), so short test
    /// windows are not starved.
    pub margin: Option<Duration>,
    /// The teams sharing the pool (its `spec.tenants`; empty: none declared). The limiter
    /// gives each its fair share of every window and holds it to its ceiling.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<TenantShare>,
}

/// The tenant a request without one books as.
pub const DEFAULT_TENANT: &str = "default";

/// One team of a pool, as the limiter weighs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantShare {
    /// Its name (a message's `tenant`).
    pub name: String,
    /// Its weight: contending tenants share each window in proportion to their weights.
    pub weight: u32,
    /// The part of each window always available to it, per mille of the pool's limits.
    pub floor_permille: u32,
    /// The most of each window it may use even when the pool has room, per mille (1000:
    /// no ceiling).
    pub ceiling_permille: u32,
    /// Its spend per Pacific day, in micro-dollars (booked at each call's estimated price,
    /// charged what the call cost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_budget_micros: Option<u64>,
    /// Its spend per calendar month (Pacific), in micro-dollars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_budget_micros: Option<u64>,
}

impl ModelQuota {
    /// A quota with no limits at all and default windows.
    pub fn unlimited() -> ModelQuota {
        let d = |dim: Dim| DimensionQuota {
            limit: None,
            window: dim.default_window(),
        };
        ModelQuota {
            requests: d(Dim::Requests),
            input_tokens: d(Dim::InputTokens),
            images: d(Dim::Images),
            spend_micros: d(Dim::SpendMicros),
            requests_per_day: None,
            margin: None,
            tenants: Vec::new(),
        }
    }

    /// The quota of one dimension.
    pub fn dim(&self, dim: Dim) -> &DimensionQuota {
        match dim {
            Dim::Requests => &self.requests,
            Dim::InputTokens => &self.input_tokens,
            Dim::Images => &self.images,
            Dim::SpendMicros => &self.spend_micros,
        }
    }

    /// The quota of one dimension, mutably.
    pub fn dim_mut(&mut self, dim: Dim) -> &mut DimensionQuota {
        match dim {
            Dim::Requests => &mut self.requests,
            Dim::InputTokens => &mut self.input_tokens,
            Dim::Images => &mut self.images,
            Dim::SpendMicros => &mut self.spend_micros,
        }
    }

    /// A quota on requests and input tokens only (`None`: unlimited), every window
    /// `window`: the shape most tests and examples need.
    pub fn requests_and_tokens(
        requests: Option<u64>,
        input_tokens: Option<u64>,
        window: Duration,
    ) -> ModelQuota {
        let mut q = ModelQuota::unlimited().with_windows(window);
        q.requests.limit = requests;
        q.input_tokens.limit = input_tokens;
        q
    }

    /// Every window set to `window` (tests and rehearsals shorten them).
    pub fn with_windows(mut self, window: Duration) -> ModelQuota {
        for dim in Dim::ALL {
            self.dim_mut(dim).window = window;
        }
        self
    }

    /// The margin added to a window of this length.
    pub fn margin_for(&self, window: Duration) -> Duration {
        self.margin.unwrap_or(window / 60)
    }

    /// The window the limiter enforces in one dimension (window plus margin), in µs.
    pub fn effective_window_us(&self, dim: Dim) -> i64 {
        let w = self.dim(dim).window;
        let eff = w.saturating_add(self.margin_for(w));
        i64::try_from(eff.as_micros())
            .unwrap_or(i64::MAX / 4)
            .max(1)
    }

    /// The quota one of `replicas` independent limiters may use: every limit divided
    /// (rounded down), for the per-replica fallback when the shared limiter is unreachable.
    pub fn divided(&self, replicas: u32) -> ModelQuota {
        let n = u64::from(replicas.max(1));
        let mut q = self.clone();
        for dim in Dim::ALL {
            let d = q.dim_mut(dim);
            d.limit = d.limit.map(|l| l / n);
        }
        q.requests_per_day = q.requests_per_day.map(|l| l / n);
        q
    }

    /// Every limit reduced by `percent` (rounded down): stay that far under the provider's
    /// numbers. Only [`CompiledPool::model_quota`](crate::config::CompiledPool::model_quota)
    /// calls this, so headroom is applied once.
    fn with_headroom(mut self, percent: u8) -> ModelQuota {
        let keep = 100 - u64::from(percent.min(100));
        let cut = |l: u64| l.saturating_mul(keep) / 100;
        for dim in Dim::ALL {
            let d = self.dim_mut(dim);
            d.limit = d.limit.map(cut);
        }
        self.requests_per_day = self.requests_per_day.map(cut);
        self
    }
}

/// Each active tenant's share of every window, per mille (the limiter script's `shares`;
/// inactive tenants get 0): what is left after the tenants held at their floor or ceiling,
/// by weight, until none moves.
pub fn fair_shares(tenants: &[TenantShare], active: &[bool]) -> Vec<i64> {
    let mut shares = vec![0i64; tenants.len()];
    let mut fixed = vec![false; tenants.len()];
    for _ in 0..=tenants.len() {
        let (mut rest, mut wsum, mut moved) = (1000i64, 0i64, false);
        for (j, t) in tenants.iter().enumerate() {
            if active[j] {
                if fixed[j] {
                    rest -= shares[j];
                } else {
                    wsum += i64::from(t.weight);
                }
            }
        }
        for (j, t) in tenants.iter().enumerate() {
            if active[j] && !fixed[j] {
                let v = rest.max(0) * i64::from(t.weight) / wsum.max(1);
                let (floor, ceiling) = (i64::from(t.floor_permille), i64::from(t.ceiling_permille));
                if v < floor {
                    (shares[j], fixed[j], moved) = (floor, true, true);
                } else if v > ceiling {
                    (shares[j], fixed[j], moved) = (ceiling, true, true);
                } else {
                    shares[j] = v;
                }
            }
        }
        if !moved {
            break;
        }
    }
    shares
}

/// Gemini's billing tiers (2026 billing page).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Tier {
    /// No billing: image models answer 429 with `limit: 0`.
    Free,
    /// Billing linked.
    Tier1,
    /// $100 paid and 3 days.
    Tier2,
    /// $1,000 paid and 30 days.
    Tier3,
}

impl Tier {
    /// The project-wide spend limit per rolling 10 minutes, in micro-dollars.
    pub fn spend_per_10min_micros(self) -> u64 {
        match self {
            Tier::Free => 0,
            Tier::Tier1 => 10_000_000,
            Tier::Tier2 => 50_000_000,
            Tier::Tier3 => 200_000_000,
        }
    }
}

/// Published per-minute and per-day numbers for one model in one tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TierLimits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Input tokens per minute.
    pub tpm: Option<u64>,
    /// Images per minute.
    pub ipm: Option<u64>,
    /// Requests per day.
    pub rpd: Option<u64>,
}

impl crate::config::CompiledPool {
    /// The price of one image of `model` at `size`, in micro-dollars: the pool's configured
    /// price when it sets one, else the built-in table's (its most expensive size when the
    /// model does not offer `size`); `None` when neither knows the model.
    pub fn image_price_micros(&self, model: &str, size: Option<ImageSize>) -> Option<u64> {
        self.models
            .get(model)
            .and_then(|m| m.price_micros_per_image)
            .or_else(|| model_info(model).map(|m| m.image_price_micros(size)))
    }

    /// What one image call of `model` at `size` is booked at, in micro-dollars: the
    /// pool's configured per-image price when it sets one, else the table's upper bound
    /// (the image, typical thinking, `input_tokens` of input); `None` when neither knows
    /// the model.
    pub fn booking_spend_micros(
        &self,
        model: &str,
        size: Option<ImageSize>,
        input_tokens: u64,
    ) -> Option<u64> {
        self.models
            .get(model)
            .and_then(|m| m.price_micros_per_image)
            .or_else(|| model_info(model).map(|m| m.booking_spend_micros(size, input_tokens)))
    }

    /// What a finished call of `model` spent, in micro-dollars: `images` at the pool's
    /// configured price when it sets one; else the reported usage at the table's rates;
    /// `None` when neither applies (keep the booking).
    pub fn spent_micros(
        &self,
        model: &str,
        usage: Option<&crate::provider::Usage>,
        images: u64,
    ) -> Option<u64> {
        if let Some(price) = self
            .models
            .get(model)
            .and_then(|m| m.price_micros_per_image)
        {
            return Some(price.saturating_mul(images));
        }
        let usage = usage.filter(|u| u.image_tokens > 0 || u.candidate_tokens > 0)?;
        model_info(model).map(|m| m.usage_spend_micros(usage))
    }

    /// What the limiter enforces for `model` of this pool (`None`: not one of its models):
    /// the declared limits with the pool's headroom applied, here and nowhere else. The
    /// pool's spend limit is the project's, whole: the limiter books every model's spend
    /// in one state per project, so a chain's busy model can use all of it.
    pub fn model_quota(&self, model: &str) -> Option<ModelQuota> {
        let m = self.models.get(model)?;
        let minute = Duration::from_millis(m.window_ms.max(1));
        let dq = |limit| DimensionQuota {
            limit,
            window: minute,
        };
        // Spend keeps its 10-minute window scaled like the minute windows (rehearsals
        // shorten both by the same factor).
        let spend_window = minute.saturating_mul(10);
        Some(
            ModelQuota {
                requests: dq(m.rpm),
                input_tokens: dq(m.tpm),
                images: dq(m.ipm),
                spend_micros: DimensionQuota {
                    limit: self.spend_micros_per_10_minutes,
                    window: spend_window,
                },
                requests_per_day: m.rpd,
                margin: self.window_margin_ms.map(Duration::from_millis),
                tenants: self.tenants.clone(),
            }
            .with_headroom(self.headroom_percent),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{CompiledPool, FailureMode, ModelLimits, ProviderKind};

    fn pool(headroom_percent: u8, spend_micros: Option<u64>) -> CompiledPool {
        let limits = |rpm, tpm, rpd| ModelLimits {
            rpm: Some(rpm),
            tpm: Some(tpm),
            ipm: Some(rpm),
            rpd: Some(rpd),
            window_ms: 60_000,
            price_micros_per_image: None,
        };
        CompiledPool {
            name: "ns/p".into(),
            generation: 0,
            provider: ProviderKind::Gemini,
            project: "proj".into(),
            models: BTreeMap::from([
                ("gemini-3-pro-image".into(), limits(20, 100_000, 250)),
                ("gemini-3.1-flash-image".into(), limits(100, 500_000, 2_000)),
            ]),
            spend_micros_per_10_minutes: spend_micros,
            headroom_percent,
            alert_threshold_percent: 80,
            failure_mode: FailureMode::Closed,
            expected_replicas: 1,
            api_key_ref: None,
            api_key_env: None,
            window_margin_ms: None,
            base_url: None,
            vertex: None,
            tenants: Vec::new(),
        }
    }

    #[test]
    fn headroom_applies_once_and_spend_is_the_project_s() {
        let pool = pool(10, Some(10_000_000));
        let pro = pool.model_quota("gemini-3-pro-image").expect("in pool");
        assert_eq!(pro.requests.limit, Some(18));
        assert_eq!(pro.input_tokens.limit, Some(90_000));
        assert_eq!(pro.requests_per_day, Some(225));
        // The project's $10 for each model (booked in one state), then 10 % headroom.
        assert_eq!(pro.spend_micros.limit, Some(9_000_000));
        assert_eq!(pro.spend_micros.window, Duration::from_secs(600));
        let flash = pool.model_quota("gemini-3.1-flash-image").expect("in pool");
        assert_eq!(flash.requests.limit, Some(90));
        assert_eq!(flash.requests_per_day, Some(1_800));
        assert_eq!(pool.model_quota("gemini-2.5-flash-image"), None);
    }

    #[test]
    fn no_spend_limit_when_the_pool_sets_none() {
        let pro = pool(0, None)
            .model_quota("gemini-3-pro-image")
            .expect("in pool");
        assert_eq!(pro.spend_micros.limit, None);
        assert_eq!(pro.requests.limit, Some(20));
    }

    #[test]
    fn prices_come_from_the_table_by_size() {
        let pool = pool(0, None);
        assert_eq!(
            pool.image_price_micros("gemini-3-pro-image", Some(ImageSize::K4)),
            Some(240_000)
        );
        assert_eq!(
            pool.image_price_micros("gemini-3.1-flash-image", None),
            Some(67_000)
        );
        assert_eq!(pool.image_price_micros("imagen-5", None), None);
    }

    #[test]
    fn margin_is_proportional_by_default() {
        let q = ModelQuota::unlimited().with_windows(Duration::from_secs(60));
        assert_eq!(q.effective_window_us(Dim::Requests), 61_000_000);
        let q = ModelQuota {
            margin: Some(Duration::from_millis(5)),
            ..q
        };
        assert_eq!(q.effective_window_us(Dim::Requests), 60_005_000);
    }
}
