//! `pacer apply` and `pacer usage`: configuration without Kubernetes.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use pacer_core::{
    config::ConfigStore,
    limiter::{Limiter, QuotaKey, redis::RedisLimiter},
};

/// Validate QuotaPool and ModelChain YAML and write it to Redis (what the operator does).
#[derive(Args)]
pub struct ApplyArgs {
    /// The YAML file (the same documents `kubectl apply -f` takes); `-` reads stdin.
    #[arg(env = "PACER_APPLY_FILE", short = 'f', long = "filename")]
    pub file: PathBuf,
    /// Redis to write to.
    #[arg(long, env = "PACER_REDIS_URL", hide_env_values = true)]
    pub redis_url: String,
    /// The namespace of documents that name none.
    #[arg(long, short = 'n', env = "PACER_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Validate and print what would be written, write nothing.
    #[arg(env = "PACER_APPLY_DRY_RUN", long)]
    pub dry_run: bool,
}

pub async fn apply(args: ApplyArgs) -> anyhow::Result<()> {
    let yaml = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?
    };
    let store = ConfigStore::connect(&args.redis_url)
        .await
        .context("connecting to Redis")?;
    let existing = store.load().await.context("reading the current config")?;
    let compiled = pacer_crds::compile::compile_documents(&yaml, &args.namespace, &existing.pools)?;
    if compiled.pools.is_empty() && compiled.chains.is_empty() {
        anyhow::bail!("{} holds no QuotaPool or ModelChain", args.file.display());
    }
    for pool in &compiled.pools {
        if args.dry_run {
            println!("quotapool/{} valid (dry run)", pool.name);
        } else if existing.pools.get(&pool.name) == Some(pool) {
            // Unchanged: no new version, so no replica reloads for nothing.
            println!("quotapool/{} unchanged", pool.name);
        } else {
            let v = put_pool(&store, &args.redis_url, pool).await?;
            println!("quotapool/{} configured (version {v})", pool.name);
        }
    }
    for chain in &compiled.chains {
        if args.dry_run {
            println!("modelchain/{} valid (dry run)", chain.name);
        } else if existing.chains.get(&chain.name) == Some(chain) {
            println!("modelchain/{} unchanged", chain.name);
        } else {
            let v = store.put_chain(chain).await?;
            println!("modelchain/{} configured (version {v})", chain.name);
        }
    }
    Ok(())
}

/// Writes a pool and, as the operator does, has the limiter apply its limits now (bookings
/// a lowered limit no longer holds are released), not at the next booking. Returns the
/// config version written.
pub(crate) async fn put_pool(
    store: &ConfigStore,
    redis_url: &str,
    pool: &pacer_core::config::CompiledPool,
) -> anyhow::Result<u64> {
    let v = store.put_pool(pool).await?;
    let limiter = RedisLimiter::connect(redis_url, Default::default()).await?;
    for model in pool.models.keys() {
        if let Some(quota) = pool.model_quota(model) {
            limiter
                .usage(&QuotaKey::new(&pool.project, model), &quota)
                .await
                .with_context(|| format!("applying {model}'s limits to the limiter"))?;
        }
    }
    Ok(v)
}

/// Print live usage per pool and model.
#[derive(Args)]
pub struct UsageArgs {
    /// Redis holding the config and the limiter.
    #[arg(long, env = "PACER_REDIS_URL", hide_env_values = true)]
    pub redis_url: String,
    /// Print JSON instead of a table.
    #[arg(env = "PACER_USAGE_JSON", long)]
    pub json: bool,
}

pub async fn usage(args: UsageArgs) -> anyhow::Result<()> {
    let store = ConfigStore::connect(&args.redis_url)
        .await
        .context("connecting to Redis")?;
    let config = store.load().await?;
    let limiter = RedisLimiter::connect(&args.redis_url, Default::default()).await?;
    let mut rows = Vec::new();
    for pool in config.pools.values() {
        for model in pool.models.keys() {
            let Some(quota) = pool.model_quota(model) else {
                continue;
            };
            let usage = limiter.usage(&pool.key(model), &quota).await?;
            rows.push((pool.name.clone(), model.clone(), usage));
        }
    }
    if args.json {
        let out: Vec<_> = rows
            .iter()
            .map(|(pool, model, u)| serde_json::json!({"pool": pool, "model": model, "usage": u}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:<28} {:<26} {:>13} {:>17} {:>11} {:>17} {:>11} {:>9}",
        "POOL", "MODEL", "REQUESTS", "INPUT TOKENS", "IMAGES", "SPEND (µ$)", "TODAY", "COOLDOWN"
    );
    for (pool, model, u) in rows {
        let dim = |i: usize| {
            u.dimensions
                .get(i)
                .map(|d| match d.limit {
                    Some(l) => format!("{}/{l}", d.used),
                    None => format!("{}/-", d.used),
                })
                .unwrap_or_default()
        };
        let today = match u.daily_limit {
            Some(l) => format!("{}/{l}", u.daily_used),
            None => format!("{}/-", u.daily_used),
        };
        println!(
            "{:<28} {:<26} {:>13} {:>17} {:>11} {:>17} {:>11} {:>8.1}s",
            pool,
            model,
            dim(0),
            dim(1),
            dim(2),
            dim(3),
            today,
            u.cooldown_remaining.as_secs_f64()
        );
    }
    Ok(())
}

/// Debug output never shows the Redis URL (it may hold a password).
impl std::fmt::Debug for ApplyArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyArgs")
            .field("file", &self.file)
            .field("redis_url", &"<set>")
            .field("namespace", &self.namespace)
            .field("dry_run", &self.dry_run)
            .finish()
    }
}

/// Debug output never shows the Redis URL (it may hold a password).
impl std::fmt::Debug for UsageArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageArgs")
            .field("redis_url", &"<set>")
            .field("json", &self.json)
            .finish()
    }
}
