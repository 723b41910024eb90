//! `pacer top`: a live view of every pool and model from Redis — usage against each limit
//! as bars, cooldowns, the day's count with the time to Pacific midnight, the queue of
//! bookings waiting, the rate learned from unexplained 429s. `--once` prints one frame as
//! plain text (for scripts and logs); without it the frame is redrawn in the terminal's
//! alternate screen every `--interval-ms` until `q`, Esc or Ctrl-C.
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use pacer_core::{
    config::ConfigStore,
    limiter::{Limiter, TenantUsage, Usage, redis::RedisLimiter},
};
use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyModifiers},
    style::{Color, Style},
    text::{Line, Span},
    widgets::{Block, Paragraph},
};

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Redis holding the config and the limiter.
    #[arg(long, env = "PACER_REDIS_URL", hide_env_values = true)]
    pub redis_url: String,
    /// Print one frame as plain text and exit.
    #[arg(long, env = "PACER_TOP_ONCE")]
    pub once: bool,
    /// Show only pools whose `namespace/name` starts with this (for example `team-a/`).
    #[arg(long, env = "PACER_TOP_POOL")]
    pub pool: Option<String>,
    /// How often the live view reads Redis again, in milliseconds.
    #[arg(long, env = "PACER_TOP_INTERVAL_MS", default_value_t = 1000)]
    pub interval_ms: u64,
}

/// One model of one pool, as read from the limiter.
#[derive(Debug, Clone)]
pub struct Row {
    pub pool: String,
    pub model: String,
    pub usage: Usage,
    /// Per tenant of the pool (none declared: empty), with its daily budget.
    pub tenants: Vec<(TenantUsage, Option<u64>)>,
}

/// Everything one frame shows.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub rows: Vec<Row>,
    /// Time left until the per-day limits reset (Pacific midnight).
    pub day_resets_in: Duration,
    pub config_version: u64,
}

/// Reads every configured pool and model's usage: one limiter read per model.
pub async fn read(
    store: &ConfigStore,
    limiter: &RedisLimiter,
    only: Option<&str>,
) -> anyhow::Result<Snapshot> {
    let config = store
        .load()
        .await
        .context("reading the config from Redis")?;
    let mut rows = Vec::new();
    let shown = |name: &str| only.is_none_or(|prefix| name.starts_with(prefix));
    for pool in config.pools.values().filter(|p| shown(&p.name)) {
        for model in pool.models.keys() {
            let Some(quota) = pool.model_quota(model) else {
                continue;
            };
            let usage = limiter
                .usage(&pool.key(model), &quota)
                .await
                .with_context(|| format!("reading {}'s usage of {model}", pool.name))?;
            let tenants = limiter
                .tenant_usage(&pool.key(model), &quota)
                .await
                .with_context(|| format!("reading {}'s tenants' use of {model}", pool.name))?
                .into_iter()
                .zip(&pool.tenants)
                .map(|(u, t)| (u, t.daily_budget_micros))
                .collect();
            rows.push(Row {
                pool: pool.name.clone(),
                model: model.clone(),
                usage,
                tenants,
            });
        }
    }
    Ok(Snapshot {
        rows,
        day_resets_in: to_pacific_midnight(),
        config_version: config.version,
    })
}

fn to_pacific_midnight() -> Duration {
    let now = jiff::Timestamp::now();
    pacer_core::pacific::next_midnights(now, 1)
        .first()
        .and_then(|m| Duration::try_from(m.duration_since(now)).ok())
        .unwrap_or_default()
}

const BAR: usize = 24;

/// How full a limit is: the ratio, and a bar of [`BAR`] cells.
fn bar(used: u64, limit: Option<u64>) -> (Option<f64>, String) {
    match limit {
        Some(l) if l > 0 => {
            let ratio = used as f64 / l as f64;
            let filled = ((ratio.min(1.0) * BAR as f64).round() as usize).min(BAR);
            (
                Some(ratio),
                format!("[{}{}]", "#".repeat(filled), "-".repeat(BAR - filled)),
            )
        }
        _ => (None, format!("[{}]", " ".repeat(BAR))),
    }
}

fn hms(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// The frame as lines of spans; colour marks what is near (yellow, 80 %) or at a limit.
pub fn frame(snapshot: &Snapshot) -> Vec<Line<'static>> {
    let mut lines = vec![Line::from(format!(
        "pacer top — config v{}, {} model(s), per-day limits reset in {} (Pacific midnight)",
        snapshot.config_version,
        snapshot.rows.len(),
        hms(snapshot.day_resets_in)
    ))];
    if snapshot.rows.is_empty() {
        lines.push(Line::from(
            "no pools configured: apply some with `pacer apply -f` or the operator",
        ));
    }
    let mut pool = None;
    for row in &snapshot.rows {
        if pool != Some(&row.pool) {
            lines.push(Line::from(""));
            lines.push(Line::from(Span::styled(
                format!("pool {}", row.pool),
                Style::new().fg(Color::Cyan),
            )));
            pool = Some(&row.pool);
        }
        let u = &row.usage;
        let mut notes = Vec::new();
        if !u.cooldown_remaining.is_zero() {
            notes.push(format!(
                "cooling down {:.1}s",
                u.cooldown_remaining.as_secs_f64()
            ));
        }
        if !u.daily_blocked_remaining.is_zero() {
            notes.push("day spent".to_owned());
        }
        if !u.queue.is_zero() {
            notes.push(format!(
                "bookings queued {:.1}s ahead",
                u.queue.as_secs_f64()
            ));
        }
        if u.rate_cut_permille > 0 {
            notes.push(format!(
                "learned rate {}%",
                100 - u.rate_cut_permille.min(1000) / 10
            ));
        }
        lines.push(Line::from(format!(
            "  {}{}",
            row.model,
            if notes.is_empty() {
                String::new()
            } else {
                format!("  ({})", notes.join(", "))
            }
        )));
        let mut dims: Vec<(String, u64, Option<u64>)> = u
            .dimensions
            .iter()
            .filter(|d| d.limit.is_some() || d.used > 0)
            .map(|d| (d.dim.name().to_owned(), d.used, d.limit))
            .collect();
        if u.daily_limit.is_some() || u.daily_used > 0 {
            dims.push(("requests today".to_owned(), u.daily_used, u.daily_limit));
        }
        for (name, used, limit) in dims {
            let (ratio, cells) = bar(used, limit);
            let colour = match ratio {
                Some(r) if r >= 1.0 => Color::Red,
                Some(r) if r >= 0.8 => Color::Yellow,
                _ => Color::Green,
            };
            let figure = match (limit, ratio) {
                (Some(l), Some(r)) => format!("{used}/{l} {:>4.0}%", r * 100.0),
                (Some(l), None) => format!("{used}/{l}"),
                _ => format!("{used} (unlimited)"),
            };
            lines.push(Line::from(vec![
                Span::raw(format!("    {name:<15} ")),
                Span::styled(cells, Style::new().fg(colour)),
                Span::raw(format!(" {figure}")),
            ]));
        }
        // Each tenant's part of this window's requests, what it booked ahead, and what its
        // calls cost today (against its daily budget; the budget is the project's, over
        // every model).
        let total: u64 = row.tenants.iter().map(|(t, _)| t.requests).sum();
        for (t, budget) in &row.tenants {
            let share = if total > 0 {
                format!("{:>3.0}%", t.requests as f64 * 100.0 / total as f64)
            } else {
                "  -".to_owned()
            };
            let spent = t.spent_today_micros as f64 / 1e6;
            let money = match budget {
                Some(b) => format!("${spent:.2} of ${:.2} today", *b as f64 / 1e6),
                None => format!("${spent:.2} today"),
            };
            let ahead = if t.booked_ahead > 0 {
                format!(
                    ", {} booked {:.1}s ahead",
                    t.booked_ahead,
                    t.queue.as_secs_f64()
                )
            } else {
                String::new()
            };
            lines.push(Line::from(format!(
                "    tenant {:<12} {} requests ({share}){ahead}, {money}",
                t.tenant, t.requests
            )));
        }
    }
    lines
}

/// The frame as plain text (`--once`).
pub fn frame_text(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    for line in frame(snapshot) {
        for span in line.spans {
            out.push_str(&span.content);
        }
        out.push('\n');
    }
    out
}

pub async fn run(args: TopArgs) -> anyhow::Result<()> {
    let store = ConfigStore::connect(&args.redis_url)
        .await
        .context("connecting to Redis (PACER_REDIS_URL)")?;
    let limiter = RedisLimiter::connect(&args.redis_url, Default::default())
        .await
        .context("connecting the limiter to Redis")?;
    if args.once {
        print!(
            "{}",
            frame_text(&read(&store, &limiter, args.pool.as_deref()).await?)
        );
        return Ok(());
    }
    let interval = Duration::from_millis(args.interval_ms.max(100));
    let mut terminal = ratatui::init();
    let result = live(
        &mut terminal,
        &store,
        &limiter,
        args.pool.as_deref(),
        interval,
    )
    .await;
    ratatui::restore();
    result
}

async fn live(
    terminal: &mut ratatui::DefaultTerminal,
    store: &ConfigStore,
    limiter: &RedisLimiter,
    only: Option<&str>,
    interval: Duration,
) -> anyhow::Result<()> {
    loop {
        // A failed read is shown, not fatal: Redis may be failing over.
        let lines = match read(store, limiter, only).await {
            Ok(snapshot) => frame(&snapshot),
            Err(e) => vec![Line::from(Span::styled(
                format!("reading Redis failed: {e:#}"),
                Style::new().fg(Color::Red),
            ))],
        };
        terminal.draw(|f| {
            let view = Paragraph::new(lines.clone())
                .block(Block::bordered().title(" pacer top — q to quit "));
            f.render_widget(view, f.area());
        })?;
        // Keys are read on a blocking thread so the runtime keeps serving Redis.
        let quit = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            if event::poll(interval)?
                && let Event::Key(key) = event::read()?
            {
                return Ok(matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
                    || (key.code == KeyCode::Char('c')
                        && key.modifiers.contains(KeyModifiers::CONTROL)));
            }
            Ok(false)
        })
        .await??;
        if quit {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use pacer_core::limiter::DimensionUsage;
    use pacer_core::quota::Dim;

    use super::*;

    #[test]
    fn a_frame_shows_each_limit_as_a_bar_with_its_figure() {
        let usage = Usage {
            dimensions: vec![
                DimensionUsage {
                    dim: Dim::Requests,
                    used: 18,
                    limit: Some(20),
                    window: Duration::from_secs(60),
                },
                DimensionUsage {
                    dim: Dim::InputTokens,
                    used: 0,
                    limit: None,
                    window: Duration::from_secs(60),
                },
            ],
            cooldown_remaining: Duration::from_secs(3),
            daily_used: 40,
            daily_limit: Some(250),
            daily_blocked_remaining: Duration::ZERO,
            queue: Duration::ZERO,
            rate_cut_permille: 300,
        };
        let text = frame_text(&Snapshot {
            rows: vec![Row {
                pool: "team/images".into(),
                model: "gemini-3-pro-image".into(),
                usage,
                tenants: vec![
                    (
                        TenantUsage {
                            tenant: "web".into(),
                            requests: 9,
                            booked_ahead: 4,
                            spent_today_micros: 1_250_000,
                            spent_this_month_micros: 1_250_000,
                            queue: Duration::from_secs(12),
                        },
                        Some(5_000_000),
                    ),
                    (
                        TenantUsage {
                            tenant: "batch".into(),
                            requests: 3,
                            ..TenantUsage::default()
                        },
                        None,
                    ),
                ],
            }],
            day_resets_in: Duration::from_secs(3 * 3600 + 61),
            config_version: 7,
        });
        assert!(text.contains("pool team/images"), "{text}");
        assert!(
            text.contains(
                "tenant web          9 requests ( 75%), 4 booked 12.0s ahead, $1.25 of $5.00 today"
            ),
            "{text}"
        );
        assert!(
            text.contains("tenant batch        3 requests ( 25%), $0.00 today"),
            "{text}"
        );
        assert!(
            text.contains("gemini-3-pro-image  (cooling down 3.0s, learned rate 70%)"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "[{}{}] 18/20   90%",
                "#".repeat(22),
                "-".repeat(2)
            )),
            "{text}"
        );
        assert!(text.contains("40/250"), "{text}");
        assert!(text.contains("reset in 3:01:01"), "{text}");
        assert!(
            !text.contains("input_tokens"),
            "unused and unlimited: {text}"
        );
    }
}
