//! The one table of model facts: which image models exist, the sizes and aspect ratios
//! each takes, the output tokens and price of an image per size, their published limits per
//! tier, and when each was shut down.
//!
//! Everything that judges or prices a request reads this table: message validation in the
//! request path, the CRD compiler, cost estimation and the simulator. Only facts live here;
//! how a size is spelled on the wire is each client's own business (the simulator keeps its
//! own spelling, so a client's wrong one cannot pass it).
use serde::{Deserialize, Serialize};

use crate::quota::{Tier, TierLimits};

/// Google's inference service tiers for synchronous calls (`serviceTier` in the request
/// body). Flex costs half the standard rates and answers in minutes, best effort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceTier {
    Standard,
    Flex,
}

impl ServiceTier {
    /// As Google's SDKs send it.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceTier::Standard => "standard",
            ServiceTier::Flex => "flex",
        }
    }

    /// The share of the standard price a call on this tier is billed, in percent.
    pub fn price_percent(self) -> u64 {
        match self {
            ServiceTier::Standard => 100,
            ServiceTier::Flex => 50,
        }
    }

    /// The shortest call timeout that suits the tier: Google targets 1 to 15 minutes for a
    /// flex answer.
    pub fn min_call_timeout(self) -> std::time::Duration {
        match self {
            ServiceTier::Standard => std::time::Duration::ZERO,
            ServiceTier::Flex => std::time::Duration::from_secs(15 * 60),
        }
    }

    /// `micros` at this tier's price.
    pub fn price(self, micros: u64) -> u64 {
        micros.saturating_mul(self.price_percent()) / 100
    }
}

/// Image sizes the models accept (`imageConfig.imageSize`). Serde reads and writes them as
/// Google spells them (`512`, `1K`, `2K`, `4K`); `0.5K` is read as an alias of `512`, as
/// Pacer accepted it before Google settled on `512` (Google itself refuses `0.5K`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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

    /// What a model draws when a request names no size.
    pub const DEFAULT: ImageSize = ImageSize::K1;

    /// The size's name in messages, resources and errors (its serde name).
    pub fn name(self) -> &'static str {
        match self {
            ImageSize::Half => "512",
            ImageSize::K1 => "1K",
            ImageSize::K2 => "2K",
            ImageSize::K4 => "4K",
        }
    }
}

impl std::fmt::Display for ImageSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Aspect ratios every image model takes (`imageConfig.aspectRatio`).
pub const ASPECT_RATIOS: &[&str] = &[
    "1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9",
];

/// The extreme ratios only some models take, on top of [`ASPECT_RATIOS`]
/// ([`ModelInfo::extreme_ratios`]).
pub const EXTREME_ASPECT_RATIOS: &[&str] = &["1:4", "4:1", "1:8", "8:1"];

/// What one generated image costs on one model at one size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCost {
    /// Output tokens billed for the image.
    pub output_tokens: u64,
    /// Price of the image in micro-dollars.
    pub price_micros: u64,
}

/// What a model bills per million tokens, in micro-dollars: Google charges a call's
/// `usageMetadata` at these rates (input; text and thinking output; image output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRates {
    pub input: u64,
    pub text_output: u64,
    pub image_output: u64,
}

impl TokenRates {
    /// The spend of `input`, `text_output` (thinking included) and `image_output` tokens,
    /// in micro-dollars, rounded up.
    pub fn spend_micros(&self, input: u64, text_output: u64, image_output: u64) -> u64 {
        let total = u128::from(input) * u128::from(self.input)
            + u128::from(text_output) * u128::from(self.text_output)
            + u128::from(image_output) * u128::from(self.image_output);
        u64::try_from(total.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }
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
    /// Takes [`EXTREME_ASPECT_RATIOS`] on top of [`ASPECT_RATIOS`].
    pub extreme_ratios: bool,
    /// Reasoning tokens an answer reports (`thoughtsTokenCount`): the Pro models think
    /// before drawing. A typical observed count, not a bound.
    pub thought_tokens: u64,
    /// What its usage is billed at.
    pub rates: TokenRates,
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
const PRO_THOUGHT_TOKENS: u64 = 160;
// Per million tokens: input, text and thinking output, image output (the image rates are
// the ones the per-image prices above come from).
const PRO_RATES: TokenRates = TokenRates {
    input: 2_000_000,
    text_output: 12_000_000,
    image_output: 120_000_000,
};
const FLASH25_RATES: TokenRates = TokenRates {
    input: 300_000,
    text_output: 2_500_000,
    image_output: 30_000_000,
};
// Assumed: 3.1 flash image's input and text rates are taken as 3 flash's ($0.50, $3).
const FLASH31_RATES: TokenRates = TokenRates {
    input: 500_000,
    text_output: 3_000_000,
    image_output: 60_000_000,
};

/// The built-in table (last published numbers, late 2025). Every limit and price is only a
/// default: a `QuotaPool` overrides any of them.
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
        extreme_ratios: true,
        thought_tokens: 0,
        rates: FLASH31_RATES,
    },
    ModelInfo {
        id: "gemini-3-pro-image",
        retired: None,
        tier1: PRO_LIMITS.0,
        tier2: PRO_LIMITS.1,
        costs: PRO_COSTS,
        extreme_ratios: false,
        thought_tokens: PRO_THOUGHT_TOKENS,
        rates: PRO_RATES,
    },
    ModelInfo {
        id: "gemini-2.5-flash-image",
        retired: Some("2026-10-02"),
        tier1: FLASH_LIMITS.0,
        tier2: FLASH_LIMITS.1,
        costs: FLASH25_COSTS,
        extreme_ratios: false,
        thought_tokens: 0,
        rates: FLASH25_RATES,
    },
    ModelInfo {
        id: "gemini-3-pro-image-preview",
        retired: Some("2026-06-25"),
        tier1: PRO_LIMITS.0,
        tier2: PRO_LIMITS.1,
        costs: PRO_COSTS,
        extreme_ratios: false,
        thought_tokens: PRO_THOUGHT_TOKENS,
        rates: PRO_RATES,
    },
    ModelInfo {
        id: "gemini-3.1-flash-image-preview",
        retired: Some("2026-06-25"),
        tier1: FLASH_LIMITS.0,
        tier2: FLASH_LIMITS.1,
        costs: FLASH31_COSTS,
        extreme_ratios: true,
        thought_tokens: 0,
        rates: FLASH31_RATES,
    },
    ModelInfo {
        id: "gemini-2.5-flash-image-preview",
        retired: Some("2026-06-25"),
        tier1: FLASH_LIMITS.0,
        tier2: FLASH_LIMITS.1,
        costs: FLASH25_COSTS,
        extreme_ratios: false,
        thought_tokens: 0,
        rates: FLASH25_RATES,
    },
];

/// The built-in entry for a model id, if there is one.
pub fn model_info(model: &str) -> Option<&'static ModelInfo> {
    MODELS.iter().find(|m| m.id == model)
}

/// The aspect ratios of a model that takes [`EXTREME_ASPECT_RATIOS`] (`extreme`) or not.
pub fn aspect_ratios(extreme: bool) -> Vec<&'static str> {
    let mut all = ASPECT_RATIOS.to_vec();
    if extreme {
        all.extend_from_slice(EXTREME_ASPECT_RATIOS);
    }
    all
}

/// Whether a model that takes [`EXTREME_ASPECT_RATIOS`] (`extreme`) or not takes `ratio`.
pub fn takes_ratio(extreme: bool, ratio: &str) -> bool {
    ASPECT_RATIOS.contains(&ratio) || (extreme && EXTREME_ASPECT_RATIOS.contains(&ratio))
}

/// Every aspect ratio some model of the table takes: what a request may name before its
/// model is known.
pub fn any_model_aspect_ratios() -> Vec<&'static str> {
    aspect_ratios(MODELS.iter().any(|m| m.extreme_ratios))
}

/// Every image size some model of the table offers, smallest first.
pub fn any_model_image_sizes() -> Vec<ImageSize> {
    ImageSize::ALL
        .into_iter()
        .filter(|s| MODELS.iter().any(|m| m.takes_size(*s)))
        .collect()
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

    /// The sizes this model offers, smallest first.
    pub fn image_sizes(&self) -> Vec<ImageSize> {
        ImageSize::ALL
            .into_iter()
            .filter(|s| self.takes_size(*s))
            .collect()
    }

    /// Whether the model offers `size`.
    pub fn takes_size(&self, size: ImageSize) -> bool {
        self.image_cost(size).is_some()
    }

    /// The aspect ratios this model takes.
    pub fn aspect_ratios(&self) -> Vec<&'static str> {
        aspect_ratios(self.extreme_ratios)
    }

    /// Whether the model takes the aspect ratio `ratio`.
    pub fn takes_ratio(&self, ratio: &str) -> bool {
        takes_ratio(self.extreme_ratios, ratio)
    }

    /// What a call with this `usage` was billed, in micro-dollars: input tokens, text and
    /// thinking output, image output, each at its rate.
    pub fn usage_spend_micros(&self, usage: &crate::provider::Usage) -> u64 {
        let text = usage
            .candidate_tokens
            .saturating_sub(usage.image_tokens)
            .saturating_add(usage.thought_tokens);
        self.rates
            .spend_micros(usage.prompt_tokens, text, usage.image_tokens)
    }

    /// An upper bound of one image call's spend, booked before it: the image at `size`
    /// (its most expensive size when not offered), its typical thinking, and
    /// `input_tokens` (a bound) of input.
    pub fn booking_spend_micros(&self, size: Option<ImageSize>, input_tokens: u64) -> u64 {
        // The image at its token rate or its published price, whichever is higher (the
        // published prices are rounded).
        let tokens = self.bounding_cost(size, |c| c.output_tokens);
        let image = self
            .image_price_micros(size)
            .max(self.rates.spend_micros(0, 0, tokens));
        image.saturating_add(
            self.rates
                .spend_micros(input_tokens, self.thought_tokens, 0),
        )
    }

    /// `of` the image cost at `size` (`None`: the default size), or its largest over the
    /// sizes offered when this model does not offer `size`: bookings reserve an upper bound.
    fn bounding_cost(&self, size: Option<ImageSize>, of: impl Fn(ImageCost) -> u64) -> u64 {
        self.image_cost(size.unwrap_or(ImageSize::DEFAULT))
            .map(&of)
            .unwrap_or_else(|| {
                ImageSize::ALL
                    .iter()
                    .filter_map(|s| self.image_cost(*s))
                    .map(&of)
                    .max()
                    .unwrap_or(0)
            })
    }

    /// The price of one image of `size` (`None`: the default size), in micro-dollars.
    /// A size this model does not offer is priced at its most expensive size: bookings
    /// reserve an upper bound.
    pub fn image_price_micros(&self, size: Option<ImageSize>) -> u64 {
        self.bounding_cost(size, |c| c.price_micros)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn usage_is_billed_at_the_model_s_rates_and_bookings_bound_it() {
        let p = model_info("gemini-3-pro-image").unwrap();
        // A Pro 1K image with its thinking and a 40-token prompt: 1120 image tokens at
        // $120/M, 160 thinking tokens at $12/M, 40 input tokens at $2/M.
        let usage = crate::provider::Usage {
            prompt_tokens: 40,
            candidate_tokens: 1120,
            image_tokens: 1120,
            thought_tokens: 160,
            total_tokens: 1320,
        };
        assert_eq!(p.usage_spend_micros(&usage), 134_400 + 1_920 + 80);
        // The booking for a prompt bounded at 40 tokens covers it.
        assert!(p.booking_spend_micros(None, 40) >= p.usage_spend_micros(&usage));
        let f = model_info("gemini-3.1-flash-image").unwrap();
        let four_k = crate::provider::Usage {
            prompt_tokens: 10,
            candidate_tokens: 2520,
            image_tokens: 2520,
            thought_tokens: 0,
            total_tokens: 2530,
        };
        assert_eq!(f.usage_spend_micros(&four_k), 151_200 + 5);
        assert!(f.booking_spend_micros(Some(ImageSize::K4), 10) >= f.usage_spend_micros(&four_k));
    }

    #[test]
    fn prices_default_to_1k_and_unoffered_sizes_book_the_most_expensive() {
        let p = model_info("gemini-3-pro-image").expect("known");
        assert_eq!(p.image_price_micros(None), 134_000);
        assert_eq!(p.image_price_micros(Some(ImageSize::Half)), 240_000);
        let f = model_info("gemini-2.5-flash-image").expect("known");
        assert_eq!(f.image_price_micros(Some(ImageSize::K4)), 39_000);
    }

    #[test]
    fn sizes_and_ratios_per_model_and_for_any_model() {
        let flash = model_info("gemini-3.1-flash-image").expect("known");
        let pro = model_info("gemini-3-pro-image").expect("known");
        assert_eq!(flash.image_sizes(), ImageSize::ALL.to_vec());
        assert_eq!(
            pro.image_sizes(),
            vec![ImageSize::K1, ImageSize::K2, ImageSize::K4]
        );
        assert!(flash.takes_ratio("1:8") && !pro.takes_ratio("1:8"));
        assert!(pro.takes_ratio("21:9") && !pro.takes_ratio("7:3"));
        assert_eq!(pro.aspect_ratios().len(), 10);
        assert_eq!(any_model_aspect_ratios().len(), 14);
        assert_eq!(any_model_image_sizes(), ImageSize::ALL.to_vec());
    }

    #[test]
    fn sizes_read_both_spellings_of_512_and_write_google_s() {
        let half: ImageSize = serde_json::from_str("\"0.5K\"").expect("alias");
        assert_eq!(half, ImageSize::Half);
        assert_eq!(serde_json::to_string(&half).expect("json"), "\"512\"");
        for size in ImageSize::ALL {
            let json = serde_json::to_string(&size).expect("json");
            assert_eq!(json, format!("\"{}\"", size.name()));
            assert_eq!(
                serde_json::from_str::<ImageSize>(&json).expect("read"),
                size
            );
        }
        assert!(serde_json::from_str::<ImageSize>("\"8K\"").is_err());
    }

    #[test]
    fn free_tier_image_models_have_zero_limits() {
        let pro = model_info("gemini-3-pro-image").expect("known");
        assert_eq!(pro.limits(Tier::Free).rpm, Some(0));
    }
}
