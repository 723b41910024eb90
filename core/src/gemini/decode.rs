//! From bytes on the wire to [`ImageResponse`] or [`ProviderError`].
//!
//! Total functions: any status and any bytes give an answer, never a panic (a proptest
//! checks this). Details of an error are found by `@type`, whatever their order.
use std::time::Duration;

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::wire::{self, ErrorBody, ErrorEnvelope, GenerateContentResponse};
use crate::provider::{
    BlockReason, FieldViolation, Image, ImageResponse, ProviderError, QuotaDimension,
    QuotaViolation, Usage,
};

/// Longest body excerpt carried into an error message.
const EXCERPT: usize = 300;

/// Decodes a 200 answer of `generateContent`.
pub fn decode_response(body: &[u8]) -> Result<ImageResponse, ProviderError> {
    let parsed: GenerateContentResponse =
        serde_json::from_slice(body).map_err(|e| ProviderError::ServerError {
            status: 200,
            message: format!("undecodable response ({e}): {}", excerpt(body)),
        })?;
    from_wire(parsed)
}

/// Turns a decoded answer into images, or the block that withheld them.
pub fn from_wire(resp: GenerateContentResponse) -> Result<ImageResponse, ProviderError> {
    if let Some(reason) = resp
        .prompt_feedback
        .as_ref()
        .and_then(|f| f.block_reason.clone())
        .filter(|r| !r.is_empty() && r != "BLOCK_REASON_UNSPECIFIED")
    {
        let message = resp
            .prompt_feedback
            .as_ref()
            .and_then(|f| f.block_reason_message.clone())
            .unwrap_or_default();
        return Err(ProviderError::Blocked {
            reason: BlockReason::Prompt(reason),
            message,
        });
    }
    let mut images = Vec::new();
    let mut texts = Vec::new();
    let finish_reason = resp
        .candidates
        .first()
        .and_then(|c| c.finish_reason.clone());
    for part in resp
        .candidates
        .iter()
        .filter_map(|c| c.content.as_ref())
        .flat_map(|c| c.parts.iter())
    {
        if part.thought == Some(true) {
            continue;
        }
        if let Some(blob) = &part.inline_data {
            let data = base64::engine::general_purpose::STANDARD
                .decode(blob.data.as_bytes())
                .map_err(|e| ProviderError::ServerError {
                    status: 200,
                    message: format!("image data is not base64: {e}"),
                })?;
            images.push(Image {
                mime_type: blob.mime_type.clone(),
                data,
            });
        } else if let Some(text) = &part.text {
            texts.push(text.clone());
        }
    }
    if images.is_empty() {
        let reason = match finish_reason.as_deref() {
            None if resp.candidates.is_empty() => "NO_CANDIDATES".to_owned(),
            // A model that answers in words only (often a refusal) produced no image.
            None | Some("STOP") | Some("FINISH_REASON_UNSPECIFIED") => "NO_IMAGE".to_owned(),
            Some(other) => other.to_owned(),
        };
        return Err(ProviderError::Blocked {
            reason: BlockReason::Finish(reason),
            message: texts.join(" "),
        });
    }
    let usage = resp.usage_metadata.map(|u| {
        let modality_sum = |name: &str| {
            u.candidates_tokens_details
                .iter()
                .filter(|d| d.modality.eq_ignore_ascii_case(name))
                .fold(0u64, |acc, d| acc.saturating_add(d.token_count))
        };
        Usage {
            prompt_tokens: u.prompt_token_count.unwrap_or(0),
            candidate_tokens: u.candidates_token_count.unwrap_or(0),
            image_tokens: modality_sum("IMAGE"),
            thought_tokens: u.thoughts_token_count.unwrap_or(0),
            total_tokens: u.total_token_count.unwrap_or(0),
        }
    });
    Ok(ImageResponse {
        images,
        texts,
        finish_reason,
        usage,
        model_version: resp.model_version,
        response_id: resp.response_id,
    })
}

/// Decodes a non-200 answer. `model` is the one requested (named by a 404);
/// `retry_after` is a `Retry-After` header, which Gemini never sends but proxies might.
pub fn decode_error(
    status: u16,
    body: &[u8],
    model: &str,
    retry_after: Option<Duration>,
) -> ProviderError {
    let error = serde_json::from_slice::<ErrorEnvelope>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| ErrorBody {
            code: status,
            message: excerpt(body),
            ..ErrorBody::default()
        });
    let message = error.message.clone();
    match status {
        429 => {
            // RetryInfo is often whole seconds, truncated ("40s") while the message says
            // "Please retry in 40.216546s": take the longer, so a retry is not early.
            let info = detail::<wire::RetryInfo>(&error, wire::RETRY_INFO)
                .and_then(|r| parse_proto_duration(&r.retry_delay));
            let retry_delay = match (info, retry_in_message(&message)) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            }
            .or(retry_after);
            let violations: Vec<QuotaViolation> =
                detail::<wire::QuotaFailure>(&error, wire::QUOTA_FAILURE)
                    .map(|q| q.violations)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|v| QuotaViolation {
                        dimension: QuotaDimension::from_quota_id(&v.quota_id, &v.quota_metric),
                        model: v.quota_dimensions.and_then(|d| d.model),
                        limit: v.quota_value.and_then(|s| s.trim().parse().ok()),
                        quota_id: v.quota_id,
                        quota_metric: v.quota_metric,
                    })
                    .collect();
            // Spent prepaid credit, answered as a 429 (reported in 2026 next to the 402):
            // no quota frees it, so retrying at the quota's pace would go on forever.
            if violations.is_empty() && credit_depleted(&message) {
                return ProviderError::CreditExhausted { message };
            }
            // The per-day quota binds longest; otherwise the first one named.
            let binding = violations
                .iter()
                .find(|v| v.dimension.is_per_day())
                .or(violations.first())
                .cloned();
            match binding {
                Some(b) => ProviderError::RateLimited {
                    quota: b.dimension,
                    quota_id: b.quota_id,
                    model: b.model,
                    retry_delay,
                    violations,
                    message,
                },
                None => ProviderError::RateLimitedBare {
                    retry_delay,
                    message,
                },
            }
        }
        400 => {
            let key_invalid = detail::<wire::ErrorInfo>(&error, wire::ERROR_INFO)
                .is_some_and(|i| i.reason == "API_KEY_INVALID");
            // FAILED_PRECONDITION is the account, not the request: billing not enabled
            // where the free tier is not offered, a region the API does not serve.
            if key_invalid || error.status == "FAILED_PRECONDITION" {
                return ProviderError::Unauthorized { status, message };
            }
            let violations = detail::<wire::BadRequest>(&error, wire::BAD_REQUEST)
                .map(|b| b.field_violations)
                .unwrap_or_default()
                .into_iter()
                .map(|v| FieldViolation {
                    field: v.field,
                    description: v.description,
                })
                .collect();
            ProviderError::Invalid {
                message,
                violations,
            }
        }
        401 | 403 => ProviderError::Unauthorized { status, message },
        402 => ProviderError::CreditExhausted { message },
        404 => ProviderError::ModelNotFound {
            model: model.to_owned(),
            message,
        },
        408 | 504 => ProviderError::ServerError { status, message },
        503 => ProviderError::Overloaded { message },
        s if s >= 500 => ProviderError::ServerError { status, message },
        _ => ProviderError::Invalid {
            message: format!("HTTP {status}: {message}"),
            violations: Vec::new(),
        },
    }
}

/// Whether a refusal's message says the project's prepaid credit is spent.
fn credit_depleted(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    (m.contains("prepayment") || m.contains("prepaid")) && m.contains("credit")
}

/// The first detail of type `name`, decoded; `None` if absent or malformed.
fn detail<T: DeserializeOwned>(error: &ErrorBody, name: &str) -> Option<T> {
    error.details.iter().find_map(|d| {
        let ty = d.get("@type").and_then(Value::as_str)?;
        let ty = ty.strip_prefix(wire::TYPE_PREFIX).unwrap_or(ty);
        if ty == name {
            serde_json::from_value(d.clone()).ok()
        } else {
            None
        }
    })
}

/// Parses a protobuf `Duration` in its JSON form: `"40s"`, `"45.837906927s"`, `"0.5s"`.
pub fn parse_proto_duration(s: &str) -> Option<Duration> {
    let secs = s.trim().strip_suffix('s')?;
    let (whole, frac) = secs.split_once('.').unwrap_or((secs, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 9 {
        return None;
    }
    let whole: u64 = whole.parse().ok()?;
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    Some(Duration::new(whole, nanos))
}

/// Formats a duration as a protobuf `Duration` in JSON (`"45.837906927s"`, `"40s"`).
pub fn format_proto_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        let frac = format!("{:09}", d.subsec_nanos());
        format!("{}.{}s", d.as_secs(), frac.trim_end_matches('0'))
    }
}

/// Parses a Go `time.Duration` string as Google writes it in messages: `"45.837906927s"`,
/// `"1m5s"`, `"500ms"`, `"1h0m0s"`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Formats a duration the way Go's `time.Duration.String` does for the delays Google
/// quotes (`"45.837906927s"`, `"1m5.5s"`, `"1h0m0s"`).
pub fn format_go_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    if secs == 0 && nanos == 0 {
        return "0s".to_owned();
    }
    if secs == 0 {
        if nanos.is_multiple_of(1_000_000) {
            return format!("{}ms", nanos / 1_000_000);
        }
        let frac = format!("{:06}", nanos % 1_000_000);
        return format!("{}.{}ms", nanos / 1_000_000, frac.trim_end_matches('0'));
    }
    let frac = if nanos == 0 {
        String::new()
    } else {
        format!(".{}", format!("{nanos:09}").trim_end_matches('0'))
    };
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}{frac}s")
    } else if m > 0 {
        format!("{m}m{s}{frac}s")
    } else {
        format!("{s}{frac}s")
    }
}

/// The delay in "Please retry in 45.837906927s." when RetryInfo is missing.
fn retry_in_message(message: &str) -> Option<Duration> {
    let at = message.find("retry in ")?;
    let tail = &message[at + "retry in ".len()..];
    let end = tail
        .find(|c: char| c.is_whitespace() || c == ',')
        .unwrap_or(tail.len());
    parse_go_duration(tail[..end].trim_end_matches('.'))
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut end = text.len().min(EXCERPT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_durations() {
        assert_eq!(parse_proto_duration("40s"), Some(Duration::from_secs(40)));
        assert_eq!(
            parse_proto_duration("45.837906927s"),
            Some(Duration::new(45, 837_906_927))
        );
        assert_eq!(
            parse_proto_duration("0.5s"),
            Some(Duration::from_millis(500))
        );
        for bad in ["", "s", "40", "-1s", "1.2.3s", "1.0000000001s", "x1s"] {
            assert_eq!(parse_proto_duration(bad), None, "{bad}");
        }
        let d = Duration::new(45, 837_906_927);
        assert_eq!(parse_proto_duration(&format_proto_duration(d)), Some(d));
        assert_eq!(format_proto_duration(Duration::from_secs(40)), "40s");
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1m5s"), Some(Duration::from_secs(65)));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1h0m0s"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_go_duration("abc"), None);
        assert_eq!(
            format_go_duration(Duration::new(45, 837_906_927)),
            "45.837906927s"
        );
        assert_eq!(format_go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(format_go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_go_duration(Duration::from_millis(250)), "250ms");
        let d = Duration::new(3725, 5_000_000);
        assert_eq!(
            parse_go_duration(&format_go_duration(d)).map(|x| x.as_millis()),
            Some(d.as_millis())
        );
    }
}
