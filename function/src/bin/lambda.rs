//! The Lambda entry point (`cargo lambda build --bin pacer-lambda`). Settings come from the
//! environment (the `PACER_*` variables of `pacer worker`); the Redis URL (it carries the
//! password), the API key and each pool's key (`<NAME>_SECRET_ARN` for a QuotaPool's
//! `apiKeyEnv: NAME`) may instead name Secrets Manager secrets, read once at start, so none
//! sits in the function's configuration.
use clap::Parser;
use pacer_function::{lambda, runtime::RuntimeArgs};

#[derive(Parser, Debug)]
struct Settings {
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// A Secrets Manager secret (ARN or name) whose string is the Redis URL, used when
    /// `PACER_REDIS_URL` is not set.
    #[arg(long, env = "PACER_REDIS_URL_SECRET_ARN")]
    redis_url_secret_arn: Option<String>,
    /// A Secrets Manager secret (ARN or name) whose string is the records' Redis URL, used
    /// when `PACER_RECORDS_REDIS_URL` is not set.
    #[arg(long, env = "PACER_RECORDS_REDIS_URL_SECRET_ARN")]
    records_redis_url_secret_arn: Option<String>,
    /// A Secrets Manager secret (ARN or name) whose string is the Gemini API key, used when
    /// `PACER_GEMINI_API_KEY` is not set.
    #[arg(long, env = "PACER_GEMINI_API_KEY_SECRET_ARN")]
    gemini_api_key_secret_arn: Option<String>,
}

/// Reads one secret's string.
async fn secret(
    client: &aws_sdk_secretsmanager::Client,
    id: &str,
    setting: &str,
) -> Result<String, String> {
    let out = client
        .get_secret_value()
        .secret_id(id)
        .send()
        .await
        .map_err(|e| {
            format!(
                "{setting}: reading secret {id} failed (the function's role needs \
                 secretsmanager:GetSecretValue on it): {}",
                aws_sdk_secretsmanager::error::DisplayErrorContext(e)
            )
        })?;
    out.secret_string()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| format!("{setting}: secret {id} holds no string"))
}

/// Pools' key secrets: every `<NAME>_SECRET_ARN` variable beyond the settings above
/// whose `<NAME>` is not set itself (`<NAME>` is what a QuotaPool's `apiKeyEnv` names).
fn pool_key_secrets() -> Vec<(String, String)> {
    std::env::vars()
        .filter_map(|(var, arn)| {
            let name = var.strip_suffix("_SECRET_ARN")?;
            let own = matches!(
                name,
                "PACER_REDIS_URL" | "PACER_RECORDS_REDIS_URL" | "PACER_GEMINI_API_KEY"
            );
            (!own && !arn.trim().is_empty() && std::env::var_os(name).is_none())
                .then(|| (name.to_owned(), arn))
        })
        .collect()
}

/// Fills the settings the secrets hold.
async fn resolve_secrets(s: &mut Settings) -> Result<(), String> {
    let pool_keys = pool_key_secrets();
    let wanted = (s.runtime.redis_url.is_none() && s.redis_url_secret_arn.is_some())
        || (s.runtime.records_redis_url.is_none() && s.records_redis_url_secret_arn.is_some())
        || (s.runtime.gemini_api_key.is_none() && s.gemini_api_key_secret_arn.is_some())
        || !pool_keys.is_empty();
    if !wanted {
        return Ok(());
    }
    let aws = aws_config::load_from_env().await;
    let client = aws_sdk_secretsmanager::Client::new(&aws);
    if s.runtime.redis_url.is_none()
        && let Some(id) = &s.redis_url_secret_arn
    {
        s.runtime.redis_url = Some(secret(&client, id, "PACER_REDIS_URL_SECRET_ARN").await?);
    }
    if s.runtime.records_redis_url.is_none()
        && let Some(id) = &s.records_redis_url_secret_arn
    {
        s.runtime.records_redis_url =
            Some(secret(&client, id, "PACER_RECORDS_REDIS_URL_SECRET_ARN").await?);
    }
    if s.runtime.gemini_api_key.is_none()
        && let Some(id) = &s.gemini_api_key_secret_arn
    {
        s.runtime.gemini_api_key =
            Some(secret(&client, id, "PACER_GEMINI_API_KEY_SECRET_ARN").await?);
    }
    for (name, id) in pool_keys {
        let value = secret(&client, &id, &format!("{name}_SECRET_ARN")).await?;
        s.runtime.pool_keys.insert(name, value);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    pacer_core::process::init_tracing();
    let mut settings = Settings::parse();
    resolve_secrets(&mut settings).await?;
    lambda::serve(&settings.runtime).await
}
