//! The models the simulator knows: image tokens and price per image size, the aspect
//! ratios each takes, and when each was shut down (a retired model answers 404, as
//! Google's does).
//!
//! Facts about Gemini models (ids, sizes, tokens per size, prices, aspect ratios, reasoning
//! tokens, shutdown dates) come from core's one model table (`pacer_core::models::MODELS`);
//! only the retired Imagen models (`:predict`), which no client of Pacer's calls any more,
//! are written here. Serialization is not shared with core, only facts: the simulator
//! spells sizes itself, so a client's wrong spelling cannot pass it.
use jiff::civil::{Date, date};
use pacer_core::models::{self, ImageSize, MODELS, ModelInfo};

/// What one model costs and whether it still serves.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    /// `:predict` (Imagen) rather than `generateContent`.
    pub predict: bool,
    /// Shut down on this date (UTC); `None` while current.
    pub retired_on: Option<Date>,
    /// (image size as Google spells it, output tokens per image, price per image in
    /// micro-dollars).
    pub sizes: Vec<(String, u64, u64)>,
    pub default_size: &'static str,
    /// Reasoning tokens reported per answer (Pro models think before drawing).
    pub thought_tokens: u64,
    /// Takes [`models::EXTREME_ASPECT_RATIOS`] on top of [`models::ASPECT_RATIOS`].
    pub extreme_ratios: bool,
    /// What usage is billed at (Gemini models: spend is the answer's tokens at these
    /// rates, as Google bills it); `None`: the per-image price (Imagen).
    pub rates: Option<models::TokenRates>,
}

impl ModelSpec {
    /// Tokens and price for `size` (the default when `None`); `None` if the model does not
    /// take that value. Exact match only: `"0.5K"` is not a value Google takes.
    pub fn cost(&self, size: Option<&str>) -> Option<(u64, u64)> {
        let size = size.unwrap_or(self.default_size);
        self.sizes
            .iter()
            .find(|(s, _, _)| s == size)
            .map(|(_, tokens, price)| (*tokens, *price))
    }

    /// What one answer is billed, in micro-dollars: its tokens at the model's rates
    /// (input, text and thinking output, image output), or the per-image `price`.
    pub fn spend_micros(&self, input: u64, text_output: u64, image_output: u64, price: u64) -> u64 {
        self.rates.map_or(price, |r| {
            r.spend_micros(
                input,
                text_output.saturating_add(self.thought_tokens),
                image_output,
            )
        })
    }

    /// The `imageSize` values this model takes.
    pub fn size_names(&self) -> Vec<&str> {
        self.sizes.iter().map(|(s, _, _)| s.as_str()).collect()
    }

    /// The `aspectRatio` values this model takes.
    pub fn ratios(&self) -> Vec<&'static str> {
        models::aspect_ratios(self.extreme_ratios)
    }

    /// Whether this model takes the `aspectRatio` `ratio`.
    pub fn takes_ratio(&self, ratio: &str) -> bool {
        models::takes_ratio(self.extreme_ratios, ratio)
    }

    pub fn is_retired(&self, today: Date) -> bool {
        self.retired_on.is_some_and(|d| today >= d)
    }

    /// A model named only by `--limit`: priced like a current Pro image model.
    pub fn generic(name: &str) -> ModelSpec {
        ModelSpec {
            name: name.to_owned(),
            predict: false,
            retired_on: None,
            sizes: vec![
                ("1K".to_owned(), 1120, 134_000),
                ("2K".to_owned(), 1120, 134_000),
                ("4K".to_owned(), 2000, 240_000),
            ],
            default_size: "1K",
            thought_tokens: 0,
            extreme_ratios: false,
            rates: models::model_info("gemini-3-pro-image").map(|m| m.rates),
        }
    }

    /// A Gemini model from core's table.
    fn from_table(info: &ModelInfo) -> ModelSpec {
        let sizes = info
            .costs
            .iter()
            .filter_map(|(size, cost)| {
                let cost = (*cost)?;
                Some((
                    size_on_the_wire(*size).to_owned(),
                    cost.output_tokens,
                    cost.price_micros,
                ))
            })
            .collect();
        ModelSpec {
            name: info.id.to_owned(),
            predict: false,
            retired_on: info.retired.and_then(|d| d.parse().ok()),
            sizes,
            default_size: size_on_the_wire(ImageSize::DEFAULT),
            thought_tokens: info.thought_tokens,
            extreme_ratios: info.extreme_ratios,
            rates: Some(info.rates),
        }
    }
}

/// How Google spells an image size in `imageConfig.imageSize` (core's table names the
/// size; the simulator keeps its own spelling so a client's wrong one cannot pass).
fn size_on_the_wire(size: ImageSize) -> &'static str {
    match size {
        ImageSize::Half => "512",
        ImageSize::K1 => "1K",
        ImageSize::K2 => "2K",
        ImageSize::K4 => "4K",
    }
}

fn imagen(name: &str, retired_on: Date) -> ModelSpec {
    ModelSpec {
        name: name.to_owned(),
        predict: true,
        retired_on: Some(retired_on),
        sizes: vec![("1K".to_owned(), 0, 40_000), ("2K".to_owned(), 0, 40_000)],
        default_size: "1K",
        thought_tokens: 0,
        extreme_ratios: false,
        rates: None,
    }
}

/// The built-in table: core's Gemini models, plus the retired Imagen models (`:predict`).
pub fn builtin() -> Vec<ModelSpec> {
    let mut all: Vec<ModelSpec> = MODELS.iter().map(ModelSpec::from_table).collect();
    all.extend([
        imagen("imagen-3.0-generate-002", date(2025, 11, 10)),
        imagen("imagen-4.0-generate-001", date(2026, 6, 24)),
        imagen("imagen-4.0-ultra-generate-001", date(2026, 6, 24)),
        imagen("imagen-4.0-fast-generate-001", date(2026, 6, 24)),
    ]);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str) -> ModelSpec {
        builtin()
            .into_iter()
            .find(|m| m.name == name)
            .expect("in the table")
    }

    #[test]
    fn sizes_as_google_spells_them() {
        let flash = model("gemini-3.1-flash-image");
        assert_eq!(flash.size_names(), vec!["512", "1K", "2K", "4K"]);
        assert_eq!(flash.cost(Some("512")), Some((747, 45_000)));
        assert_eq!(flash.cost(Some("0.5K")), None);
        assert_eq!(flash.cost(None), Some((1120, 67_000)));
        let pro = model("gemini-3-pro-image");
        assert_eq!(pro.cost(Some("512")), None);
        assert_eq!(pro.cost(Some("4K")), Some((2000, 240_000)));
        assert_eq!(pro.thought_tokens, 160);
    }

    #[test]
    fn extreme_ratios_on_flash_only() {
        assert!(model("gemini-3.1-flash-image").takes_ratio("1:8"));
        assert!(!model("gemini-3-pro-image").takes_ratio("1:8"));
        assert!(model("gemini-3-pro-image").takes_ratio("21:9"));
        assert!(!model("gemini-3-pro-image").takes_ratio("7:3"));
    }

    #[test]
    fn retirement_from_the_table() {
        let today = date(2026, 11, 30);
        assert!(model("gemini-2.5-flash-image").is_retired(today));
        assert!(model("gemini-3-pro-image-preview").is_retired(today));
        assert!(!model("gemini-3-pro-image").is_retired(today));
        assert!(model("imagen-4.0-generate-001").predict);
    }
}
