//! `pacer demo`: the main job on embedded defaults, with nothing installed. An in-process
//! Gemini simulator with a realistic (Tier 1-like, shortened) limit, several virtual
//! replicas sharing one limiter and one queue, a progress line, images in a folder, a
//! summary table and a plot of requests per second against the limit. With Redis, a queue
//! or a Gemini endpoint configured, the same command uses them.
use std::{io::Write as _, path::PathBuf, sync::Arc, time::Instant};

use clap::Args;

use crate::loadtest::{self, LoadtestArgs};

/// `pacer demo` flags (all optional).
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Virtual replicas.
    #[arg(long, env = "PACER_DEMO_REPLICAS", default_value_t = 4)]
    pub replicas: usize,
    /// Prompts to generate.
    #[arg(long, env = "PACER_DEMO_REQUESTS", default_value_t = 60)]
    pub requests: usize,
    /// The provider project's limit (the `pacer simulate` syntax): Tier 1's 20 requests
    /// per minute, on a 10 s window so the demo ends in well under a minute.
    #[arg(
        long,
        env = "PACER_DEMO_LIMIT",
        default_value = "gemini-3.1-flash-image:rpm=20,ipm=20,window=10"
    )]
    pub limit: String,
    /// Where the images, the summary and the plot go.
    #[arg(long, env = "PACER_DEMO_OUT", default_value = "pacer-demo")]
    pub out: PathBuf,
    #[command(flatten)]
    pub conn: crate::connect::Connections,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let gemini_base_url = match (&args.conn.gemini_base_url, &args.conn.gemini_api_key) {
        (Some(url), _) => Some(url.clone()),
        (None, Some(_)) => Some(pacer_core::gemini::client::DEFAULT_BASE_URL.to_owned()),
        (None, None) => None,
    };
    let lt = LoadtestArgs {
        replicas: args.replicas,
        requests: args.requests,
        demand: 0.0,
        conn: crate::connect::Connections {
            gemini_base_url,
            ..args.conn.clone()
        },
        limits: vec![args.limit.parse()?],
        // Few messages per replica, so the batch spreads over every replica.
        concurrency: 8,
        out: Some(args.out.join("images").display().to_string()),
        plot: args.out.join("requests-per-second.png"),
        timeout_seconds: 300,
        ..LoadtestArgs::default()
    };
    eprintln!(
        "pacer demo: {} replicas, {} prompts, limit {} (simulated provider unless configured)",
        lt.replicas, lt.requests, args.limit
    );
    // On a terminal the bar redraws in place; in a log (CI, a pipe) a plain line each
    // quarter of the way, so the log stays readable.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let last = std::sync::Mutex::new((usize::MAX, 0u64));
    let progress: loadtest::Progress = Arc::new(move |done, total| {
        let secs = started.elapsed().as_secs();
        let mut last = pacer_core::sync::lock(&last);
        let step = if terminal {
            (done, secs)
        } else {
            ((done * 4).checked_div(total).unwrap_or(4), 0)
        };
        if *last == step {
            return;
        }
        *last = step;
        let width = 30;
        let filled = (done * width).checked_div(total).unwrap_or(width);
        let line = format!(
            "[{}{}] {done}/{total} requests done, {:.0} s",
            "#".repeat(filled),
            ".".repeat(width - filled),
            started.elapsed().as_secs_f64()
        );
        if terminal {
            eprint!("\r{line}");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
    });
    let report = loadtest::execute(&lt, None, Some(progress)).await?;
    if terminal {
        eprintln!();
    }
    loadtest::print_table(&report);
    let summary = args.out.join("summary.json");
    std::fs::write(&summary, serde_json::to_string_pretty(&report)?)?;
    println!(
        "done in {:.1} s: images in {}, summary in {}, plot in {}",
        started.elapsed().as_secs_f64(),
        report.images,
        summary.display(),
        report.plot
    );
    // The demo is the promise in small: it fails when the promise breaks.
    let broken = [
        (report.lost, "lost"),
        (report.failed, "failed"),
        (report.duplicates, "stored twice"),
        (report.upstream_429, "answered 429 by the provider"),
        (
            report.over_limit_windows.unwrap_or(0) as usize,
            "over the limit in a window",
        ),
    ];
    let broken: Vec<String> = broken
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
    if !broken.is_empty() || !report.disagreements.is_empty() {
        anyhow::bail!(
            "the fleet broke the limit's promise: {}; disagreements with the simulator: {:?}",
            broken.join(", "),
            report.disagreements
        );
    }
    Ok(())
}
