//! `pacer generate "PROMPT" --out DIR`: one request through the same handler as every other
//! mode. With Redis it books capacity in the global limiter and uses the chain stored
//! there; with no Redis and no API key it runs against an in-process simulator.
use std::time::Duration;

use clap::Args;
use pacer_simulator::{SimConfig, Simulator};

use pacer_function::{
    handler::HandlerOptions,
    outcome::{Attempt, Outcome},
    runtime::{self, RuntimeArgs},
};

/// `pacer generate` flags.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// What to draw.
    pub prompt: String,
    /// The folder (or s3://bucket/prefix) the image goes to.
    #[arg(env = "PACER_GENERATE_OUT", long, default_value = ".")]
    pub out: String,
    /// The chain to use (`namespace/name`); without Redis, a one-step chain over --model.
    #[arg(long, env = "PACER_CHAIN", default_value = "default/generate")]
    pub chain: String,
    /// The model of the built-in chain (no Redis).
    #[arg(
        env = "PACER_GENERATE_MODEL",
        long,
        default_value = "gemini-3.1-flash-image"
    )]
    pub model: String,
    /// For example `16:9`.
    #[arg(env = "PACER_GENERATE_ASPECT_RATIO", long)]
    pub aspect_ratio: Option<String>,
    /// `512` (or `0.5K`), `1K`, `2K` or `4K`; checked against the chain's models.
    #[arg(env = "PACER_GENERATE_IMAGE_SIZE", long)]
    pub image_size: Option<String>,
    /// The request id (the image is stored as ID.png); default: a fresh one.
    #[arg(env = "PACER_GENERATE_ID", long)]
    pub id: Option<String>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,

    #[command(flatten)]
    pub local: crate::config::ConfigArgs,
}

pub async fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let mut rt = args.runtime.clone();
    rt.sink = args.out.clone();
    let local = rt.redis_url.is_none()
        && rt.gemini_api_key.is_none()
        && rt.gemini_api_key_file.is_none()
        && rt.gemini_base_url == pacer_core::gemini::client::DEFAULT_BASE_URL;
    // Held for the whole request: the simulator stops when dropped.
    let _sim = if local {
        let sim = Simulator::new(SimConfig {
            latency: Duration::from_millis(200),
            ..SimConfig::default()
        })
        .spawn()
        .await?;
        rt.gemini_base_url = sim.url();
        eprintln!("no Redis and no API key: using an in-process Gemini simulator");
        Some(sim)
    } else {
        None
    };
    let fallback = {
        // Tier 1-like limits; only this process uses them.
        let limit = format!("{}:rpm=20,ipm=20", args.model).parse()?;
        let mut config = crate::loadtest::plan_from_limits(
            &[limit],
            "generate",
            0,
            Duration::from_secs(120),
            None,
        )?;
        for c in config.chains.values_mut() {
            c.name = args.chain.clone();
        }
        config.chains = config
            .chains
            .into_values()
            .map(|c| (c.name.clone(), c))
            .collect();
        config
    };
    let replica = runtime::build(
        &rt,
        args.local.local(Some(fallback))?,
        HandlerOptions::default(),
    )
    .await?;
    let id = args.id.clone().unwrap_or_else(|| {
        format!(
            "gen-{}-{:06x}",
            jiff::Timestamp::now().as_second(),
            rand::random::<u32>() & 0xff_ffff
        )
    });
    let mut body = serde_json::json!({"id": id, "chain": args.chain, "prompt": args.prompt});
    if let Some(a) = &args.aspect_ratio {
        body["aspectRatio"] = a.clone().into();
    }
    if let Some(s) = &args.image_size {
        body["imageSize"] = s.clone().into();
    }
    // Deferred: capacity is booked further out than the chain allows; wait and try again.
    for n in 1..=20 {
        match replica
            .handler
            .handle(&body.to_string(), Attempt::received(n))
            .await
        {
            Outcome::Succeeded(r) | Outcome::AlreadyDone(r) if r.error.is_none() => {
                for image in &r.images {
                    println!("{image}");
                }
                eprintln!(
                    "{} via {} ({} input tokens, {} output tokens)",
                    r.id,
                    r.model.as_deref().unwrap_or("?"),
                    r.input_tokens,
                    r.output_tokens
                );
                return Ok(());
            }
            Outcome::Succeeded(r) | Outcome::AlreadyDone(r) | Outcome::Failed(r) => {
                anyhow::bail!(
                    "request {} failed: {}",
                    r.id,
                    r.error.unwrap_or_else(|| "unknown".into())
                );
            }
            Outcome::DeadLetter { reason } => anyhow::bail!("not a request: {reason}"),
            Outcome::Defer { after, reason } => {
                eprintln!("deferred ({}): trying again in {after:?}", reason.label());
                tokio::time::sleep(after).await;
            }
        }
    }
    anyhow::bail!("no capacity after 20 tries")
}
