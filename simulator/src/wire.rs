//! Gemini's JSON as the simulator reads and writes it, written from Google's documented
//! shapes and captured answers, and deliberately not shared with Pacer's client
//! (`pacer_core::gemini`): a wire mistake the two shared would pass every test.
//!
//! - Requests: `GenerateContentRequest` (`contents[].parts[].text`,
//!   `generationConfig.{responseModalities,candidateCount,imageConfig{aspectRatio,imageSize}}`),
//!   in both JSON spellings protobuf accepts (`generationConfig`, `generation_config`).
//! - Answers: `GenerateContentResponse` (`candidates[].content.parts[].inlineData`,
//!   `finishReason`, `promptFeedback.blockReason`, `usageMetadata`).
//! - Errors: `{"error": {"code", "message", "status", "details": [...]}}`, each detail a
//!   `google.rpc.*` message tagged by `@type`, and the two duration spellings Google uses:
//!   protobuf `Duration` in `RetryInfo.retryDelay` (`"40s"`, `"45.837906927s"`) and Go's
//!   `time.Duration` in messages (`"Please retry in 1m5.5s."`).
use std::{collections::BTreeMap, fmt, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

// ---- requests ------------------------------------------------------------------------

/// `POST /{version}/models/{model}:generateContent` (and `streamGenerateContent`). Only the
/// fields the simulator acts on are typed; [`crate::validate`] has already refused unknown
/// names, so the rest are known fields it ignores.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerateContentRequest {
    #[serde(default)]
    pub contents: Vec<Content>,
    #[serde(default, alias = "generation_config")]
    pub generation_config: Option<GenerationConfig>,
}

/// `GenerationConfig`, the fields image models read.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerationConfig {
    #[serde(default, alias = "response_modalities")]
    pub response_modalities: Option<Vec<String>>,
    #[serde(default, alias = "candidate_count")]
    pub candidate_count: Option<u32>,
    #[serde(default, alias = "image_config")]
    pub image_config: Option<ImageConfig>,
}

/// `ImageConfig`: `aspectRatio` (`"16:9"`) and `imageSize` (`"512"`, `"1K"`, `"2K"`, `"4K"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    #[serde(default, alias = "aspect_ratio")]
    pub aspect_ratio: Option<String>,
    #[serde(default, alias = "image_size")]
    pub image_size: Option<String>,
}

// ---- request and answer ----------------------------------------------------------------

/// `Content`: a turn (`role` `user` or `model`) and its parts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Content {
    #[serde(default)]
    pub parts: Vec<Part>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// `Part`: text or inline bytes (other kinds are ignored when read, never written).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Part {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(
        default,
        alias = "inline_data",
        skip_serializing_if = "Option::is_none"
    )]
    pub inline_data: Option<Blob>,
}

/// `Blob`: a MIME type and standard base64 data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Blob {
    #[serde(default, alias = "mime_type")]
    pub mime_type: String,
    #[serde(default)]
    pub data: String,
}

// ---- answers -------------------------------------------------------------------------

/// The answer of `generateContent` (and each chunk of `streamGenerateContent`), fields in
/// the order Google writes them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerateContentResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<Candidate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_feedback: Option<PromptFeedback>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_metadata: Option<UsageMetadata>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_id: Option<String>,
}

/// `Candidate`: the content and why generation stopped (`STOP`, `IMAGE_SAFETY`, ...).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    pub content: Content,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    pub index: u32,
}

/// `PromptFeedback`: a blocked prompt has a `blockReason` and no candidates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PromptFeedback {
    pub block_reason: String,
}

/// `UsageMetadata`. Google leaves out counts that are zero.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageMetadata {
    pub prompt_token_count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidates_token_count: Option<u64>,
    pub total_token_count: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prompt_tokens_details: Vec<ModalityTokenCount>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub candidates_tokens_details: Vec<ModalityTokenCount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thoughts_token_count: Option<u64>,
}

/// `ModalityTokenCount`: `modality` is `TEXT`, `IMAGE`, `AUDIO` or `VIDEO`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModalityTokenCount {
    pub modality: &'static str,
    pub token_count: u64,
}

/// Imagen's `:predict` answer (served only to say the route is gone: its models are
/// retired, so the simulator answers 404 before it would write one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PredictResponse {
    pub predictions: Vec<Prediction>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Prediction {
    pub bytes_base64_encoded: String,
    pub mime_type: String,
}

// ---- errors --------------------------------------------------------------------------

/// Every non-200 answer: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: Status,
}

/// `google.rpc.Status` in JSON: the HTTP code, the message, the canonical status name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub code: u16,
    pub message: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<Detail>,
}

/// The `google.rpc` detail messages the simulator writes, tagged by `@type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "@type")]
pub enum Detail {
    #[serde(rename = "type.googleapis.com/google.rpc.ErrorInfo")]
    ErrorInfo(ErrorInfo),
    #[serde(rename = "type.googleapis.com/google.rpc.Help")]
    Help(Help),
    #[serde(rename = "type.googleapis.com/google.rpc.QuotaFailure")]
    QuotaFailure(QuotaFailure),
    #[serde(rename = "type.googleapis.com/google.rpc.RetryInfo")]
    RetryInfo(RetryInfo),
    #[serde(rename = "type.googleapis.com/google.rpc.BadRequest")]
    BadRequest(BadRequest),
}

/// `google.rpc.ErrorInfo` (`reason: API_KEY_INVALID`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub reason: String,
    pub domain: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// `google.rpc.Help`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Help {
    pub links: Vec<Link>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub description: String,
    pub url: String,
}

/// `google.rpc.QuotaFailure`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaFailure {
    pub violations: Vec<QuotaViolation>,
}

/// One exceeded quota. `quotaValue` is the limit as a decimal string, left out when the
/// limit is 0 (a free-tier project on an image model).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaViolation {
    pub quota_metric: String,
    pub quota_id: String,
    pub quota_dimensions: QuotaDimensions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_value: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaDimensions {
    pub location: String,
    pub model: String,
}

/// `google.rpc.RetryInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryInfo {
    pub retry_delay: ProtoDuration,
}

/// `google.rpc.BadRequest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BadRequest {
    pub field_violations: Vec<FieldViolation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldViolation {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub field: String,
    pub description: String,
}

// ---- durations -----------------------------------------------------------------------

/// A protobuf `google.protobuf.Duration` in its JSON form: seconds with an `s` suffix and
/// 0, 3, 6 or 9 fractional digits (`"40s"`, `"1.500s"`, `"45.837906927s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProtoDuration(pub Duration);

impl fmt::Display for ProtoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (secs, nanos) = (self.0.as_secs(), self.0.subsec_nanos());
        if nanos == 0 {
            write!(f, "{secs}s")
        } else if nanos.is_multiple_of(1_000_000) {
            write!(f, "{secs}.{:03}s", nanos / 1_000_000)
        } else if nanos.is_multiple_of(1_000) {
            write!(f, "{secs}.{:06}s", nanos / 1_000)
        } else {
            write!(f, "{secs}.{nanos:09}s")
        }
    }
}

impl std::str::FromStr for ProtoDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<ProtoDuration, String> {
        let bad = || format!("not a protobuf duration: {s:?}");
        let body = s.strip_suffix('s').ok_or_else(bad)?;
        let (whole, frac) = body.split_once('.').unwrap_or((body, ""));
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let secs: u64 = whole.parse().map_err(|_| bad())?;
        let nanos: u32 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<9}").parse().map_err(|_| bad())?
        };
        Ok(ProtoDuration(Duration::new(secs, nanos)))
    }
}

impl Serialize for ProtoDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ProtoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ProtoDuration, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A duration as Go's `time.Duration.String()` writes it, which is how Google's 429
/// messages say when to retry: `"45.837906927s"`, `"1m5s"`, `"1h0m0s"`, `"500ms"`.
pub fn go_duration(d: Duration) -> String {
    let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
    // Trailing zeros of a fraction are dropped, and the point with them.
    let fraction = |value: u64, digits: usize| -> String {
        let s = format!("{value:0digits$}");
        let s = s.trim_end_matches('0');
        if s.is_empty() {
            String::new()
        } else {
            format!(".{s}")
        }
    };
    if secs == 0 {
        let n = u64::from(nanos);
        return match n {
            0 => "0s".to_owned(),
            1..=999 => format!("{n}ns"),
            1_000..=999_999 => format!("{}{}µs", n / 1_000, fraction(n % 1_000, 3)),
            _ => format!("{}{}ms", n / 1_000_000, fraction(n % 1_000_000, 6)),
        };
    }
    let s = format!("{}{}s", secs % 60, fraction(u64::from(nanos), 9));
    match (secs / 3600, (secs / 60) % 60) {
        (0, 0) => s,
        (0, m) => format!("{m}m{s}"),
        (h, m) => format!("{h}h{m}m{s}"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn proto_durations_round_trip() {
        for (d, s) in [
            (Duration::from_secs(40), "40s"),
            (Duration::from_millis(1500), "1.500s"),
            (Duration::from_micros(2_000_001), "2.000001s"),
            (Duration::new(45, 837_906_927), "45.837906927s"),
            (Duration::ZERO, "0s"),
        ] {
            assert_eq!(ProtoDuration(d).to_string(), s);
            assert_eq!(s.parse::<ProtoDuration>(), Ok(ProtoDuration(d)));
        }
        assert_eq!(
            "0.5s".parse::<ProtoDuration>(),
            Ok(ProtoDuration(Duration::from_millis(500)))
        );
        for bad in ["40", "s", "-1s", "1.2.3s", "1.0000000001s", "1m"] {
            assert!(bad.parse::<ProtoDuration>().is_err(), "{bad}");
        }
    }

    #[test]
    fn go_durations_as_go_writes_them() {
        for (d, s) in [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(5), "5ns"),
            (Duration::from_nanos(1_500), "1.5µs"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_micros(1_250), "1.25ms"),
            (Duration::new(45, 837_906_927), "45.837906927s"),
            (Duration::from_secs(65), "1m5s"),
            (Duration::from_millis(65_500), "1m5.5s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_secs(90_061), "25h1m1s"),
        ] {
            assert_eq!(go_duration(d), s, "{d:?}");
        }
    }

    #[test]
    fn error_details_are_tagged_by_type() {
        let body = ErrorResponse {
            error: Status {
                code: 429,
                message: "m".into(),
                status: "RESOURCE_EXHAUSTED".into(),
                details: vec![
                    Detail::RetryInfo(RetryInfo {
                        retry_delay: ProtoDuration(Duration::from_secs(40)),
                    }),
                    Detail::QuotaFailure(QuotaFailure {
                        violations: vec![QuotaViolation {
                            quota_metric: "metric".into(),
                            quota_id: "id".into(),
                            quota_dimensions: QuotaDimensions {
                                location: "global".into(),
                                model: "m".into(),
                            },
                            quota_value: None,
                        }],
                    }),
                ],
            },
        };
        let v = serde_json::to_value(&body).expect("serializes");
        assert_eq!(
            v,
            json!({"error": {"code": 429, "message": "m", "status": "RESOURCE_EXHAUSTED",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "40s"},
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                    {"quotaMetric": "metric", "quotaId": "id",
                     "quotaDimensions": {"location": "global", "model": "m"}}]}
            ]}})
        );
        let back: ErrorResponse = serde_json::from_value(v).expect("reads back");
        assert_eq!(back, body);
        // `@type` comes first, as in Google's bodies.
        let text = serde_json::to_string(&body.error.details[0]).expect("serializes");
        assert!(text.starts_with(r#"{"@type":"#), "{text}");
    }

    #[test]
    fn requests_in_both_spellings() {
        let camel: GenerateContentRequest = serde_json::from_str(
            r#"{"contents":[{"role":"user","parts":[{"text":"a cat"}]}],
                "generationConfig":{"responseModalities":["IMAGE"],
                "imageConfig":{"aspectRatio":"16:9","imageSize":"512"}}}"#,
        )
        .expect("camelCase");
        let snake: GenerateContentRequest = serde_json::from_str(
            r#"{"contents":[{"role":"user","parts":[{"text":"a cat"}]}],
                "generation_config":{"response_modalities":["IMAGE"],
                "image_config":{"aspect_ratio":"16:9","image_size":"512"}}}"#,
        )
        .expect("snake_case");
        assert_eq!(camel, snake);
        let image = camel
            .generation_config
            .and_then(|g| g.image_config)
            .expect("image config");
        assert_eq!(image.image_size.as_deref(), Some("512"));
        assert_eq!(camel.contents[0].parts[0].text.as_deref(), Some("a cat"));
    }

    #[test]
    fn answers_leave_empty_fields_out() {
        let r = GenerateContentResponse {
            candidates: vec![Candidate {
                content: Content {
                    parts: vec![Part {
                        inline_data: Some(Blob {
                            mime_type: "image/png".into(),
                            data: "iVBO".into(),
                        }),
                        ..Part::default()
                    }],
                    role: Some("model".into()),
                },
                finish_reason: Some("STOP".into()),
                index: 0,
            }],
            usage_metadata: Some(UsageMetadata {
                prompt_token_count: 3,
                candidates_token_count: Some(1120),
                total_token_count: 1123,
                candidates_tokens_details: vec![ModalityTokenCount {
                    modality: "IMAGE",
                    token_count: 1120,
                }],
                ..UsageMetadata::default()
            }),
            ..GenerateContentResponse::default()
        };
        assert_eq!(
            serde_json::to_value(&r).expect("serializes"),
            json!({"candidates": [{"content": {"parts": [{"inlineData":
                    {"mimeType": "image/png", "data": "iVBO"}}], "role": "model"},
                    "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1120,
                    "totalTokenCount": 1123, "candidatesTokensDetails":
                    [{"modality": "IMAGE", "tokenCount": 1120}]}})
        );
    }
}
