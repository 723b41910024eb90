//! The models the simulator knows: image tokens and price per image size, and when each
//! was shut down (a retired model answers 404, as Google's does).
use jiff::civil::{Date, date};

/// What one model costs and whether it still serves.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    /// `:predict` (Imagen) rather than `generateContent`.
    pub predict: bool,
    /// Shut down on this date (UTC); `None` while current.
    pub retired_on: Option<Date>,
    /// (image size, output tokens per image, price per image in micro-dollars).
    pub sizes: Vec<(&'static str, u64, u64)>,
    pub default_size: &'static str,
    /// Reasoning tokens reported per answer (Pro models think before drawing).
    pub thought_tokens: u64,
}

impl ModelSpec {
    /// Tokens and price for `size` (the default when `None`); `None` if unsupported.
    pub fn cost(&self, size: Option<&str>) -> Option<(u64, u64)> {
        let size = size.unwrap_or(self.default_size);
        let size = if size == "0.5K" { "512" } else { size };
        self.sizes
            .iter()
            .find(|(s, _, _)| *s == size)
            .map(|(_, tokens, price)| (*tokens, *price))
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
                ("1K", 1120, 134_000),
                ("2K", 1120, 134_000),
                ("4K", 2000, 240_000),
            ],
            default_size: "1K",
            thought_tokens: 0,
        }
    }
}

fn flash31(name: &str, retired_on: Option<Date>) -> ModelSpec {
    ModelSpec {
        name: name.to_owned(),
        predict: false,
        retired_on,
        sizes: vec![
            ("512", 747, 45_000),
            ("1K", 1120, 67_000),
            ("2K", 1680, 101_000),
            ("4K", 2520, 151_000),
        ],
        default_size: "1K",
        thought_tokens: 0,
    }
}

fn pro3(name: &str, retired_on: Option<Date>) -> ModelSpec {
    ModelSpec {
        name: name.to_owned(),
        predict: false,
        retired_on,
        sizes: vec![
            ("1K", 1120, 134_000),
            ("2K", 1120, 134_000),
            ("4K", 2000, 240_000),
        ],
        default_size: "1K",
        thought_tokens: 160,
    }
}

fn flash25(name: &str, retired_on: Date) -> ModelSpec {
    ModelSpec {
        name: name.to_owned(),
        predict: false,
        retired_on: Some(retired_on),
        sizes: vec![("1K", 1290, 39_000)],
        default_size: "1K",
        thought_tokens: 0,
    }
}

fn imagen(name: &str, retired_on: Date) -> ModelSpec {
    ModelSpec {
        name: name.to_owned(),
        predict: true,
        retired_on: Some(retired_on),
        sizes: vec![("1K", 0, 40_000), ("2K", 0, 40_000)],
        default_size: "1K",
        thought_tokens: 0,
    }
}

/// The built-in table (DESIGN.md section 1, late 2026).
pub fn builtin() -> Vec<ModelSpec> {
    vec![
        flash31("gemini-3.1-flash-image", None),
        pro3("gemini-3-pro-image", None),
        flash31("gemini-3.1-flash-image-preview", Some(date(2026, 6, 25))),
        pro3("gemini-3-pro-image-preview", Some(date(2026, 6, 25))),
        flash25("gemini-2.5-flash-image", date(2026, 10, 2)),
        flash25("gemini-2.5-flash-image-preview", date(2026, 1, 15)),
        imagen("imagen-3.0-generate-002", date(2025, 11, 10)),
        imagen("imagen-4.0-generate-001", date(2026, 6, 24)),
        imagen("imagen-4.0-ultra-generate-001", date(2026, 6, 24)),
        imagen("imagen-4.0-fast-generate-001", date(2026, 6, 24)),
    ]
}

/// Aspect ratios image models accept.
pub const ASPECT_RATIOS: &[&str] = &[
    "1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9", "1:4", "4:1", "1:8",
    "8:1",
];
