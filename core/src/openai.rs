//! An OpenAI-compatible images endpoint (`POST {base}/images/generations`, `b64_json`
//! answers) behind the same [`ImageProvider`] trait, so a chain can fall back to a gateway.
//!
//! Unlike Gemini, these gateways send their delay in `Retry-After` (seconds or an HTTP
//! date) or `retry-after-ms`, and report spent credit as a 429 `insufficient_quota`.
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::provider::{
    ApiKey, BlockReason, Image, ImageProvider, ImageRequest, ImageResponse, ProviderError,
    QuotaDimension, Result, TICKET_HEADER, Usage,
};

/// How to reach the gateway.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Up to and including the version, e.g. `https://gateway.example/v1`.
    pub base_url: String,
    pub api_key: ApiKey,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
struct GenerationRequest<'a> {
    model: &'a str,
    prompt: &'a str,
    n: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<&'static str>,
    response_format: &'static str,
}

#[derive(Debug, Clone, Deserialize, Default)]
struct GenerationResponse {
    #[serde(default)]
    data: Vec<GeneratedImage>,
    #[serde(default)]
    usage: Option<GenerationUsage>,
}

#[derive(Debug, Clone, Deserialize, Default)]
struct GeneratedImage {
    #[serde(default)]
    b64_json: Option<String>,
    #[serde(default)]
    revised_prompt: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
struct GenerationUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    total_tokens: u64,
}

#[derive(Debug, Clone, Deserialize, Default)]
struct ErrorEnvelope {
    #[serde(default)]
    error: ErrorBody,
}

#[derive(Debug, Clone, Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    message: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

/// The OpenAI-compatible provider.
#[derive(Debug, Clone)]
pub struct OpenAiClient {
    http: reqwest::Client,
    config: OpenAiConfig,
}

impl OpenAiClient {
    pub fn new(config: OpenAiConfig) -> Result<OpenAiClient> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| ProviderError::Transport {
                message: format!("building the HTTP client: {e}"),
            })?;
        Ok(OpenAiClient { http, config })
    }
}

/// Maps an aspect ratio to the nearest of the sizes such endpoints accept.
fn size_for(aspect_ratio: Option<&str>) -> Option<&'static str> {
    let (w, h) = aspect_ratio?.split_once(':')?;
    let (w, h): (f64, f64) = (w.trim().parse().ok()?, h.trim().parse().ok()?);
    if !(w > 0.0 && h > 0.0) {
        return None;
    }
    let r = w / h;
    Some(if r > 1.2 {
        "1536x1024"
    } else if r < 1.0 / 1.2 {
        "1024x1536"
    } else {
        "1024x1024"
    })
}

/// Parses `Retry-After` (delta seconds) or `retry-after-ms`.
pub fn parse_retry_after(
    retry_after: Option<&str>,
    retry_after_ms: Option<&str>,
) -> Option<Duration> {
    if let Some(d) = retry_after_ms
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok())
    {
        return Some(d);
    }
    let v = retry_after?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    // An HTTP date: the delay is its distance from now.
    let at = jiff::fmt::rfc2822::parse(v).ok()?.timestamp();
    let now = jiff::Timestamp::now();
    Some(at.duration_since(now).try_into().unwrap_or(Duration::ZERO))
}

/// Decodes a 200 answer.
pub fn decode_response(body: &[u8]) -> Result<ImageResponse> {
    let parsed: GenerationResponse =
        serde_json::from_slice(body).map_err(|e| ProviderError::ServerError {
            status: 200,
            message: format!("undecodable response: {e}"),
        })?;
    let mut images = Vec::new();
    let mut texts = Vec::new();
    for item in parsed.data {
        if let Some(b64) = item.b64_json {
            let data = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| ProviderError::ServerError {
                    status: 200,
                    message: format!("image data is not base64: {e}"),
                })?;
            images.push(Image {
                mime_type: "image/png".to_owned(),
                data,
            });
        }
        texts.extend(item.revised_prompt);
    }
    if images.is_empty() {
        return Err(ProviderError::Blocked {
            reason: BlockReason::Finish("NO_IMAGE".to_owned()),
            message: "the answer held no b64_json image".to_owned(),
        });
    }
    let usage = parsed.usage.map(|u| Usage {
        prompt_tokens: u.input_tokens,
        candidate_tokens: u.output_tokens,
        image_tokens: u.output_tokens,
        thought_tokens: 0,
        total_tokens: u.total_tokens,
    });
    Ok(ImageResponse {
        images,
        texts,
        finish_reason: None,
        usage,
        model_version: None,
        response_id: None,
    })
}

/// The Google error inside an answer from Gemini's own OpenAI-compatible endpoint: a JSON
/// array holding Google's envelope (`[{"error": {"code", "message", "status", "details"}}]`,
/// `RetryInfo` and `QuotaFailure` in the details), or that envelope alone.
fn google_error(body: &[u8]) -> Option<Vec<u8>> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let envelope = match value {
        serde_json::Value::Array(mut items) if !items.is_empty() => items.swap_remove(0),
        other => other,
    };
    let error = envelope.get("error")?;
    let google = error
        .get("status")
        .is_some_and(serde_json::Value::is_string)
        || error
            .get("details")
            .is_some_and(serde_json::Value::is_array);
    google.then(|| serde_json::to_vec(&envelope).unwrap_or_default())
}

/// Decodes a non-200 answer. Google's own errors (Gemini's OpenAI-compatible endpoint)
/// are read as the Gemini client reads them, so its retry delay, the quota it names and
/// the per-day signal are kept.
pub fn decode_error(
    status: u16,
    body: &[u8],
    model: &str,
    retry_delay: Option<Duration>,
) -> ProviderError {
    if let Some(envelope) = google_error(body) {
        return crate::gemini::decode_error(status, &envelope, model, retry_delay);
    }
    let error = serde_json::from_slice::<ErrorEnvelope>(body)
        .map(|e| e.error)
        .unwrap_or_default();
    let code = match &error.code {
        Some(serde_json::Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let kind = error.kind.clone().unwrap_or_default();
    let message = if error.message.is_empty() {
        String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned()
    } else {
        error.message.clone()
    };
    let is = |name: &str| code == name || kind == name;
    match status {
        429 if is("insufficient_quota") => ProviderError::CreditExhausted { message },
        429 if message.is_empty() && code.is_empty() => ProviderError::RateLimitedBare {
            retry_delay,
            message,
        },
        429 => {
            let lower = message.to_ascii_lowercase();
            let quota = if lower.contains("per day") || lower.contains("(rpd)") {
                QuotaDimension::RequestsPerDay
            } else if lower.contains("token") {
                QuotaDimension::InputTokensPerMinute
            } else if lower.contains("image") {
                QuotaDimension::ImagesPerMinute
            } else if lower.contains("request") {
                QuotaDimension::RequestsPerMinute
            } else {
                QuotaDimension::Other
            };
            ProviderError::RateLimited {
                quota,
                quota_id: if code.is_empty() { kind } else { code },
                model: None,
                retry_delay,
                violations: Vec::new(),
                message,
            }
        }
        400 if is("content_policy_violation") || is("moderation_blocked") => {
            ProviderError::Blocked {
                reason: BlockReason::Prompt(if code.is_empty() { kind } else { code }),
                message,
            }
        }
        400 | 413 | 422 => ProviderError::Invalid {
            message,
            violations: Vec::new(),
        },
        401 | 403 => ProviderError::Unauthorized { status, message },
        402 => ProviderError::CreditExhausted { message },
        404 => ProviderError::ModelNotFound {
            model: model.to_owned(),
            message,
        },
        503 => ProviderError::Overloaded { message },
        s if s >= 500 => ProviderError::ServerError { status, message },
        _ => ProviderError::Invalid {
            message: format!("HTTP {status}: {message}"),
            violations: Vec::new(),
        },
    }
}

#[async_trait]
impl ImageProvider for OpenAiClient {
    async fn generate(&self, model: &str, req: &ImageRequest) -> Result<ImageResponse> {
        let url = format!(
            "{}/images/generations",
            self.config.base_url.trim_end_matches('/')
        );
        let body = GenerationRequest {
            model,
            prompt: &req.prompt,
            n: 1,
            size: size_for(req.aspect_ratio.as_deref()),
            response_format: "b64_json",
        };
        let timeout = self.config.timeout;
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                ProviderError::Timeout { after: timeout }
            } else {
                ProviderError::Transport {
                    message: e.to_string(),
                }
            }
        };
        let mut call = self
            .http
            .post(url)
            .bearer_auth(self.config.api_key.expose());
        if let Some(ticket) = req.ticket_header() {
            call = call.header(TICKET_HEADER, ticket);
        }
        let resp = call.json(&body).send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let retry_delay = parse_retry_after(
            header("retry-after").as_deref(),
            header("retry-after-ms").as_deref(),
        );
        let bytes = resp.bytes().await.map_err(transport)?;
        if status == 200 {
            decode_response(&bytes)
        } else {
            Err(decode_error(status, &bytes, model, retry_delay))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_with_retry_after() {
        let body = br#"{"error":{"message":"Rate limit reached for gpt-image-1 on images per minute (IPM): Limit 5, Used 5.","type":"requests","code":"rate_limit_exceeded"}}"#;
        let delay = parse_retry_after(Some("7"), None);
        let e = decode_error(429, body, "gpt-image-1", delay);
        assert!(matches!(
            e,
            ProviderError::RateLimited { quota: QuotaDimension::ImagesPerMinute, retry_delay: Some(d), .. } if d == Duration::from_secs(7)
        ));
        // The policy cools the model down for the provider's delay and falls through.
        assert!(matches!(
            e.disposition(&crate::provider::CallContext::first_call()),
            crate::provider::Disposition::Penalize { cooldown, .. } if cooldown == Duration::from_secs(7)
        ));
    }

    #[test]
    fn insufficient_quota_is_credit() {
        let body = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert!(matches!(
            decode_error(429, body, "m", None),
            ProviderError::CreditExhausted { .. }
        ));
        assert!(matches!(
            decode_error(429, b"", "m", None),
            ProviderError::RateLimitedBare { .. }
        ));
    }

    /// Issue 13, item 7: Gemini's OpenAI-compatible endpoint answers a 429 as a JSON array
    /// holding Google's envelope; its `RetryInfo` and per-day quota are kept.
    #[test]
    fn google_errors_in_an_array_keep_their_retry_delay_and_quota() {
        let body = br#"[{"error": {"code": 429, "message": "You exceeded your current quota. Please retry in 21.5s.", "status": "RESOURCE_EXHAUSTED", "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_paid_tier_requests", "quotaId": "GenerateRequestsPerDayPerProjectPerModel", "quotaDimensions": {"model": "gemini-3.1-flash-image", "location": "global"}, "quotaValue": "250"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "21s"}]}}]"#;
        match decode_error(429, body, "gemini-3.1-flash-image", None) {
            ProviderError::RateLimited {
                quota,
                retry_delay,
                model,
                ..
            } => {
                assert_eq!(quota, QuotaDimension::RequestsPerDay);
                assert_eq!(model.as_deref(), Some("gemini-3.1-flash-image"));
                assert!(
                    retry_delay.is_some_and(|d| d >= Duration::from_secs(21)),
                    "{retry_delay:?}"
                );
            }
            other => panic!("expected a named quota, got {other:?}"),
        }
        let minute = br#"[{"error": {"code": 429, "message": "Resource exhausted.", "status": "RESOURCE_EXHAUSTED", "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]}}]"#;
        assert_eq!(
            decode_error(429, minute, "m", None).retry_delay(),
            Some(Duration::from_secs(7))
        );
        let key = br#"[{"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}}]"#;
        assert!(matches!(
            decode_error(400, key, "m", None),
            ProviderError::Unauthorized { .. }
        ));
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            parse_retry_after(None, Some("1500")),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after(Some("2"), None),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse_retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT"), None),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(Some("soon"), None), None);
    }

    #[tokio::test]
    async fn the_ticket_travels_as_a_header() {
        let (base, seen) = crate::gemini::client::tests::one_shot(
            "200 OK",
            r#"{"created":1,"data":[{"b64_json":"iVBORw0KGgo="}]}"#,
        )
        .await;
        let client = OpenAiClient::new(OpenAiConfig {
            base_url: format!("{base}/v1"),
            api_key: ApiKey::new("k"),
            timeout: Duration::from_secs(5),
        })
        .expect("client");
        let req = ImageRequest::new("a fox").ticket("r1@42");
        client.generate("gpt-image-1", &req).await.expect("image");
        let seen = seen.await.expect("server").to_ascii_lowercase();
        assert!(seen.contains("x-pacer-ticket: r1@42\r\n"), "{seen}");
    }

    #[test]
    fn b64_json_decodes() {
        let body = br#"{"created":1,"data":[{"b64_json":"iVBORw0KGgo="}],"usage":{"input_tokens":10,"output_tokens":1056,"total_tokens":1066}}"#;
        let r = decode_response(body).expect("decodes");
        assert_eq!(r.images[0].data[..4], [0x89, b'P', b'N', b'G']);
        assert_eq!(r.usage.map(|u| u.image_tokens), Some(1056));
        assert_eq!(size_for(Some("16:9")), Some("1536x1024"));
    }
}
