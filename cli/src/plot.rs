//! The picture of `pacer demo` and `pacer loadtest`: requests per second arriving at the
//! provider (averaged over the trailing limit window, which is what the provider enforces)
//! against the limit line, one thin series per replica and a thick one for the total.
//!
//! Bitmap only; text is drawn with a system font (DejaVu or Liberation) when one is found,
//! otherwise the plot is drawn without labels rather than failing.
use std::{path::Path, sync::OnceLock};

use plotters::prelude::*;

/// One series: a name and the arrival times (seconds since the run started) it counts.
pub struct Series {
    pub name: String,
    pub arrivals: Vec<f64>,
}

/// What to draw.
pub struct Plot<'a> {
    pub title: &'a str,
    /// One per replica.
    pub replicas: Vec<Series>,
    /// Every call sent, rejected ones included (drawn in red when it differs from the total
    /// accepted).
    pub sent: Option<Series>,
    /// The limit per window and the window in seconds.
    pub limit: u64,
    pub window_s: f64,
}

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Registers a system font once; false when none is found.
fn font_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        for path in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(path) {
                // Fonts live for the process: leaking one file is the price of 'static.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Requests per second over the trailing window, sampled every `step` seconds up to `end`.
fn rate_curve(arrivals: &[f64], window_s: f64, step: f64, end: f64) -> Vec<(f64, f64)> {
    let mut sorted = arrivals.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut out = Vec::new();
    let (mut lo, mut hi) = (0usize, 0usize);
    let mut t = 0.0;
    while t <= end + 1e-9 {
        while hi < sorted.len() && sorted[hi] <= t {
            hi += 1;
        }
        while lo < hi && sorted[lo] <= t - window_s {
            lo += 1;
        }
        out.push((t, (hi - lo) as f64 / window_s));
        t += step;
    }
    out
}

/// Draws `plot` to a PNG at `path`.
pub fn draw(plot: &Plot<'_>, path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let text = font_available();
    let all: Vec<f64> = plot
        .replicas
        .iter()
        .flat_map(|s| s.arrivals.iter().copied())
        .collect();
    let last = all
        .iter()
        .chain(plot.sent.iter().flat_map(|s| s.arrivals.iter()))
        .copied()
        .fold(0.0, f64::max);
    let end = (last + plot.window_s).max(plot.window_s * 2.0);
    let step = (plot.window_s / 40.0).clamp(0.05, 1.0);
    let limit_rate = plot.limit as f64 / plot.window_s;
    let total = rate_curve(&all, plot.window_s, step, end);
    let sent = plot
        .sent
        .as_ref()
        .map(|s| rate_curve(&s.arrivals, plot.window_s, step, end));
    let peak = total
        .iter()
        .chain(sent.iter().flatten())
        .map(|p| p.1)
        .fold(limit_rate, f64::max);

    let root = BitMapBackend::new(path, (960, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(12);
    if text {
        builder
            .caption(plot.title, ("sans-serif", 20))
            .x_label_area_size(36)
            .y_label_area_size(52);
    }
    let mut chart = builder.build_cartesian_2d(0.0..end, 0.0..peak * 1.15)?;
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(WHITE.mix(0.0));
    if text {
        mesh.x_desc("seconds since start")
            .y_desc(format!("requests/s over the {} s window", plot.window_s))
            .label_style(("sans-serif", 13));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;

    for (i, s) in plot.replicas.iter().enumerate() {
        let color = Palette99::pick(i).mix(0.55);
        let curve = rate_curve(&s.arrivals, plot.window_s, step, end);
        let series = chart.draw_series(LineSeries::new(curve, color.stroke_width(1)))?;
        // A legend entry for the first few only: 32 replicas would bury the chart.
        if text && i < 4 {
            series
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
        }
    }
    if let Some(sent) = sent {
        let differs = sent
            .iter()
            .zip(&total)
            .any(|(a, b)| (a.1 - b.1).abs() > 1e-9);
        if differs {
            let s = chart.draw_series(LineSeries::new(sent, RED.stroke_width(2)))?;
            if text {
                s.label("sent (with rejected)")
                    .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED.stroke_width(2)));
            }
        }
    }
    let s = chart.draw_series(LineSeries::new(total, BLACK.stroke_width(3)))?;
    if text {
        s.label("total accepted")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK.stroke_width(3)));
    }
    let s = chart.draw_series(LineSeries::new(
        [(0.0, limit_rate), (end, limit_rate)],
        BLUE.stroke_width(2),
    ))?;
    if text {
        s.label(format!("limit ({} per {} s)", plot.limit, plot.window_s))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE.stroke_width(2)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 12))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_the_trailing_window_average() {
        let c = rate_curve(&[0.0, 0.5, 1.0, 3.0], 2.0, 1.0, 4.0);
        let at = |t: f64| c.iter().find(|p| (p.0 - t).abs() < 1e-9).map(|p| p.1);
        assert_eq!(at(1.0), Some(1.5));
        assert_eq!(at(2.0), Some(1.0));
        assert_eq!(at(4.0), Some(0.5));
    }

    #[test]
    fn draws_a_png() {
        let dir = std::env::temp_dir().join(format!("pacer-plot-{}", std::process::id()));
        let path = dir.join("p.png");
        let plot = Plot {
            title: "test",
            replicas: vec![Series {
                name: "r0".into(),
                arrivals: (0..50).map(|i| i as f64 * 0.2).collect(),
            }],
            sent: None,
            limit: 10,
            window_s: 2.0,
        };
        draw(&plot, &path).expect("draws");
        let bytes = std::fs::read(&path).expect("written");
        assert_eq!(&bytes[1..4], b"PNG");
        let _ = std::fs::remove_dir_all(dir);
    }
}
