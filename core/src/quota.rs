//! The quota model: what a provider project may spend per model, and what a request costs.
//!
//! Gemini limits each project per model in independent dimensions (DESIGN.md section 1):
//! requests, input tokens and images per minute, spend per rolling 10 minutes, and requests
//! per Pacific calendar day. [`ModelQuota`] is what the limiter enforces for one
//! (project, model); [`QuotaPool`] builds it from a tier's defaults, per-field overrides and
//! the headroom, which is applied here and nowhere else.
use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

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
    /// Spend per window, in micro-dollars.
    pub spend_micros: DimensionQuota,
    /// Requests per Pacific calendar day.
    pub requests_per_day: Option<u64>,
    /// Extra length added to every window, because the provider counts a request when it
    /// arrives and latency varies: starts spaced one window apart can still arrive inside
    /// one window. `None`: proportional, 1/60 of the window (1 s on 60 s), so short test
    /// windows are not starved.
    pub margin: Option<Duration>,
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
    /// numbers. Only [`QuotaPool::model_quota`] calls this, so headroom is applied once.
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

/// Image sizes the models accept (`imageConfig.imageSize`), named as Google spells them on
/// the wire; `0.5K` is read as an alias of `512` (Google itself refuses `0.5K`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImageSize {
    /// 512 px (`gemini-3.1-flash-image` only).
    #[serde(rename = "512", alias = "0.5K")]
    Half,
    /// 1K (the default).
    #[serde(rename = "1K")]
    K1,
    /// 2K.
    #[serde(rename = "2K")]
    K2,
    /// 4K.
    #[serde(rename = "4K")]
    K4,
}

impl ImageSize {
    /// Every size, smallest first.
    pub const ALL: [ImageSize; 4] = [ImageSize::Half, ImageSize::K1, ImageSize::K2, ImageSize::K4];

    /// The size a request names (`imageSize`), in any spelling the API has used for it
    /// (`"512"` and the older `"0.5K"` are the same size).
    pub fn from_name(name: &str) -> Option<ImageSize> {
        match name.trim() {
            "512" | "0.5K" => Some(ImageSize::Half),
            "1K" => Some(ImageSize::K1),
            "2K" => Some(ImageSize::K2),
            "4K" => Some(ImageSize::K4),
            _ => None,
        }
    }
}

/// What one generated image costs on one model at one size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCost {
    /// Output tokens billed for the image.
    pub output_tokens: u64,
    /// Price of the image in micro-dollars.
    pub price_micros: u64,
}

/// A model the built-in table knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelInfo {
    /// The model id used in `models/{id}:generateContent`.
    pub id: &'static str,
    /// The day the provider shut it down (ISO date), if it is retired.
    pub retired: Option<&'static str>,
    /// Tier 1 numbers.
    pub tier1: TierLimits,
    /// Tier 2 numbers.
    pub tier2: TierLimits,
    /// Output tokens and price per image by size (`None`: size not offered).
    pub costs: [(ImageSize, Option<ImageCost>); 4],
}

const fn limits(rpm: u64, tpm: u64, rpd: u64) -> TierLimits {
    // The provider publishes no IPM for these models; one image per request is the bound a
    // request-limited project can reach anyway, so IPM defaults to RPM.
    TierLimits {
        rpm: Some(rpm),
        tpm: Some(tpm),
        ipm: Some(rpm),
        rpd: Some(rpd),
    }
}

const fn cost(output_tokens: u64, price_micros: u64) -> Option<ImageCost> {
    Some(ImageCost {
        output_tokens,
        price_micros,
    })
}

const PRO_LIMITS: (TierLimits, TierLimits) =
    (limits(20, 100_000, 250), limits(500, 500_000, 15_000));
const FLASH_LIMITS: (TierLimits, TierLimits) = (
    limits(500, 500_000, 2_000),
    limits(2_000, 1_500_000, 50_000),
);
// $120 per million output image tokens: 1120 tokens $0.134, 2000 tokens $0.24.
const PRO_COSTS: [(ImageSize, Option<ImageCost>); 4] = [
    (ImageSize::Half, None),
    (ImageSize::K1, cost(1120, 134_000)),
    (ImageSize::K2, cost(1120, 134_000)),
    (ImageSize::K4, cost(2000, 240_000)),
];
// $30 per million output image tokens: 1290 tokens $0.039; one size only.
const FLASH25_COSTS: [(ImageSize, Option<ImageCost>); 4] = [
    (ImageSize::Half, None),
    (ImageSize::K1, cost(1290, 39_000)),
    (ImageSize::K2, None),
    (ImageSize::K4, None),
];
// DESIGN gives $0.045 (0.5K, 747 tokens) to $0.151 (4K, 2520 tokens): $60 per million
// output tokens at both ends, so 1K and 2K are priced at the same rate.
const FLASH31_COSTS: [(ImageSize, Option<ImageCost>); 4] = [
    (ImageSize::Half, cost(747, 45_000)),
    (ImageSize::K1, cost(1120, 67_000)),
    (ImageSize::K2, cost(1680, 101_000)),
    (ImageSize::K4, cost(2520, 151_000)),
];

/// The built-in table (last published numbers, late 2025). Every number is only a default:
/// a `QuotaPool` overrides any field.
///
/// `gemini-3.1-flash-image` has no published per-tier numbers; it defaults to those of
/// `gemini-2.5-flash-image`, the flash image model it replaces. Tier 3 has no published
/// per-model numbers; it defaults to Tier 2's (safe: Tier 3 limits are at least those).
pub const MODELS: &[ModelInfo] = &[
    ModelInfo {
        id: "gemini-3.1-flash-image",
        retired: None,
        tier1: FLASH_LIMITS.0,
        tier2: FLASH_LIMITS.1,
        costs: FLASH31_COSTS,
    },
    ModelInfo {
        id: "gemini-3-pro-image",
        retired: None,
        tier1: PRO_LIMITS.0,
        tier2: PRO_LIMITS.1,
        costs: PRO_COSTS,
    },
    ModelInfo {
        id: "gemini-2.5-flash-image",
        retired: Some("2026-10-02"),
        tier1: FLASH_LIMITS.0,
        tier2: FLASH_LIMITS.1,
        costs: FLASH25_COSTS,
    },
    ModelInfo {
        id: "gemini-3-pro-image-preview",
        retired: Some("2026-06-25"),
        tier1: PRO_LIMITS.0,
        tier2: PRO_LIMITS.1,
        costs: PRO_COSTS,
    },
    ModelInfo {
        id: "gemini-3.1-flash-image-preview",
        retired: Some("2026-06-25"),
        tier1: FLASH_LIMITS.0,
        tier2: FLASH_LIMITS.1,
        costs: FLASH31_COSTS,
    },
    ModelInfo {
        id: "gemini-2.5-flash-image-preview",
        retired: Some("2026-06-25"),
        tier1: FLASH_LIMITS.0,
        tier2: FLASH_LIMITS.1,
        costs: FLASH25_COSTS,
    },
];

/// The built-in entry for a model id, if there is one.
pub fn model_info(model: &str) -> Option<&'static ModelInfo> {
    MODELS.iter().find(|m| m.id == model)
}

impl ModelInfo {
    /// The default limits of this model in a tier.
    pub fn limits(&self, tier: Tier) -> TierLimits {
        match tier {
            Tier::Free => TierLimits {
                rpm: Some(0),
                tpm: Some(0),
                ipm: Some(0),
                rpd: Some(0),
            },
            Tier::Tier1 => self.tier1,
            Tier::Tier2 | Tier::Tier3 => self.tier2,
        }
    }

    /// What one image of `size` costs, if the model offers that size.
    pub fn image_cost(&self, size: ImageSize) -> Option<ImageCost> {
        self.costs
            .iter()
            .find(|(s, _)| *s == size)
            .and_then(|(_, c)| *c)
    }

    /// The price of one image named `size` (`None`: the default, 1K), in micro-dollars.
    /// A size this model does not offer, or does not know, is priced at its most
    /// expensive size: bookings reserve an upper bound.
    pub fn image_price_micros(&self, size: Option<&str>) -> u64 {
        let size = match size {
            None => Some(ImageSize::K1),
            Some(name) => ImageSize::from_name(name),
        };
        size.and_then(|s| self.image_cost(s))
            .map(|c| c.price_micros)
            .unwrap_or_else(|| {
                ImageSize::ALL
                    .iter()
                    .filter_map(|s| self.image_cost(*s))
                    .map(|c| c.price_micros)
                    .max()
                    .unwrap_or(0)
            })
    }
}

/// Per-model overrides of the tier's defaults; `None` keeps the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ModelOverrides {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Input tokens per minute.
    pub tpm: Option<u64>,
    /// Images per minute.
    pub ipm: Option<u64>,
    /// Requests per day.
    pub rpd: Option<u64>,
    /// This model's share of the project's spend per 10 minutes, in micro-dollars.
    pub spend_per_10min_micros: Option<u64>,
}

/// One provider project's shared quota, as the operator compiles it from the `QuotaPool`
/// resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaPool {
    /// The billing tier whose defaults fill unset fields.
    pub tier: Tier,
    /// Stay this many percent under every limit (0..=90).
    pub headroom_percent: u8,
    /// The models of the pool and their overrides.
    pub models: BTreeMap<String, ModelOverrides>,
    /// Per-minute windows (tests and rehearsals shorten them); `None`: 60 s.
    pub minute_window: Option<Duration>,
    /// The spend window; `None`: 600 s.
    pub spend_window: Option<Duration>,
    /// Window margin; `None`: proportional to each window (see [`ModelQuota::margin`]).
    pub margin: Option<Duration>,
}

impl QuotaPool {
    /// A pool of one tier with no overrides and no headroom.
    pub fn new(tier: Tier) -> QuotaPool {
        QuotaPool {
            tier,
            headroom_percent: 0,
            models: BTreeMap::new(),
            minute_window: None,
            spend_window: None,
            margin: None,
        }
    }

    /// What the limiter enforces for `model`: tier defaults, then overrides, then headroom.
    ///
    /// The spend limit is the project's, but the limiter keeps one state per (project,
    /// model); unless a model's share is set, the tier's spend limit is split evenly
    /// between the pool's models so their sum never exceeds it.
    pub fn model_quota(&self, model: &str) -> ModelQuota {
        let defaults = model_info(model)
            .map(|m| m.limits(self.tier))
            .unwrap_or_default();
        let o = self.models.get(model).copied().unwrap_or_default();
        let minute = self.minute_window.unwrap_or(Duration::from_secs(60));
        let models = u64::try_from(self.models.len().max(1)).unwrap_or(1);
        let spend = o
            .spend_per_10min_micros
            .unwrap_or(self.tier.spend_per_10min_micros() / models);
        let dq = |limit| DimensionQuota {
            limit,
            window: minute,
        };
        ModelQuota {
            requests: dq(o.rpm.or(defaults.rpm)),
            input_tokens: dq(o.tpm.or(defaults.tpm)),
            images: dq(o.ipm.or(defaults.ipm)),
            spend_micros: DimensionQuota {
                limit: Some(spend),
                window: self.spend_window.unwrap_or(Duration::from_secs(600)),
            },
            requests_per_day: o.rpd.or(defaults.rpd),
            margin: self.margin,
        }
        .with_headroom(self.headroom_percent)
    }
}

impl crate::config::CompiledPool {
    /// The price of one image of `model` at `size`, in micro-dollars: the pool's configured
    /// price when it sets one, else the built-in table's (its most expensive size when the
    /// size is unknown); `None` when neither knows the model.
    pub fn image_price_micros(&self, model: &str, size: Option<&str>) -> Option<u64> {
        self.models
            .get(model)
            .and_then(|m| m.price_micros_per_image)
            .or_else(|| model_info(model).map(|m| m.image_price_micros(size)))
    }

    /// What the limiter enforces for `model` of this pool (`None`: not one of its models):
    /// the declared limits with the pool's headroom applied, here and nowhere else. The
    /// pool's spend limit is the project's; the limiter keeps one state per (project,
    /// model), so it is split evenly between the pool's models.
    pub fn model_quota(&self, model: &str) -> Option<ModelQuota> {
        let m = self.models.get(model)?;
        let minute = Duration::from_millis(m.window_ms.max(1));
        let models = u64::try_from(self.models.len().max(1)).unwrap_or(1);
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
                    limit: self.spend_micros_per_10_minutes.map(|s| s / models),
                    window: spend_window,
                },
                requests_per_day: m.rpd,
                margin: self.window_margin_ms.map(Duration::from_millis),
            }
            .with_headroom(self.headroom_percent),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_defaults_overrides_and_headroom_apply_once() {
        let mut pool = QuotaPool::new(Tier::Tier1);
        pool.headroom_percent = 10;
        pool.models
            .insert("gemini-3-pro-image".into(), ModelOverrides::default());
        pool.models.insert(
            "gemini-3.1-flash-image".into(),
            ModelOverrides {
                rpm: Some(100),
                ..Default::default()
            },
        );
        let pro = pool.model_quota("gemini-3-pro-image");
        assert_eq!(pro.requests.limit, Some(18));
        assert_eq!(pro.input_tokens.limit, Some(90_000));
        assert_eq!(pro.requests_per_day, Some(225));
        // $10 split between two models, then 10 % headroom.
        assert_eq!(pro.spend_micros.limit, Some(4_500_000));
        assert_eq!(pro.spend_micros.window, Duration::from_secs(600));
        let flash = pool.model_quota("gemini-3.1-flash-image");
        assert_eq!(flash.requests.limit, Some(90));
        assert_eq!(flash.requests_per_day, Some(1_800));
    }

    #[test]
    fn free_tier_image_models_have_zero_limits() {
        let q = QuotaPool::new(Tier::Free).model_quota("gemini-3-pro-image");
        assert_eq!(q.requests.limit, Some(0));
    }

    #[test]
    fn cost_tables_follow_design() {
        let f = model_info("gemini-3.1-flash-image").expect("known");
        assert_eq!(
            f.image_cost(ImageSize::Half).map(|c| c.output_tokens),
            Some(747)
        );
        assert_eq!(
            f.image_cost(ImageSize::K4).map(|c| c.price_micros),
            Some(151_000)
        );
        let p = model_info("gemini-3-pro-image").expect("known");
        assert_eq!(
            p.image_cost(ImageSize::K4).map(|c| c.output_tokens),
            Some(2000)
        );
        assert_eq!(p.image_cost(ImageSize::Half), None);
        assert!(
            model_info("gemini-2.5-flash-image")
                .and_then(|m| m.retired)
                .is_some()
        );
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
