//! The Lambda entry point (`cargo lambda build --bin pacer-lambda`). Settings come from the
//! environment (the `PACER_*` variables of `pacer worker`); the Redis URL (it carries the
//! password) and the API key may instead name Secrets Manager secrets, read once at start,
//! so neither sits in the function's configuration.
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

/// Fills the settings the secrets hold.
async fn resolve_secrets(s: &mut Settings) -> Result<(), String> {
    let wanted = (s.runtime.redis_url.is_none() && s.redis_url_secret_arn.is_some())
        || (s.runtime.gemini_api_key.is_none() && s.gemini_api_key_secret_arn.is_some());
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
    if s.runtime.gemini_api_key.is_none()
        && let Some(id) = &s.gemini_api_key_secret_arn
    {
        s.runtime.gemini_api_key =
            Some(secret(&client, id, "PACER_GEMINI_API_KEY_SECRET_ARN").await?);
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
