//! Gemini's JSON, as sent and received (`generateContent`, v1 and v1beta).
//!
//! Every field of an answer is optional: Google adds fields and omits empty ones, and the
//! decoders in [`super::decode`] must never fail on a shape they did not expect.
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::models::ImageSize;

/// `POST /{version}/models/{model}:generateContent` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct GenerateContentRequest {
    pub contents: Vec<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_config: Option<GenerationConfig>,
    /// `flex`, `standard` or `priority`; absent: standard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct GenerationConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_modalities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_config: Option<ImageConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aspect_ratio: Option<String>,
    /// Sent as Google spells it (`512`, `1K`, `2K`, `4K`): Pacer's input alias `0.5K`, which
    /// Google refuses with 400, was read into the same [`ImageSize`] and goes out as `512`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<ImageSize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Content {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default)]
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Part {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline_data: Option<Blob>,
    /// Set on the model's reasoning parts, which are not part of the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thought: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Blob {
    #[serde(default)]
    pub mime_type: String,
    /// Standard base64.
    #[serde(default)]
    pub data: String,
}

/// `generateContent` answer (also one chunk of `streamGenerateContent`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct GenerateContentResponse {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<Candidate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_feedback: Option<PromptFeedback>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_metadata: Option<UsageMetadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PromptFeedback {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_reason_message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct UsageMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidates_token_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thoughts_token_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_token_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_tokens_details: Vec<ModalityTokenCount>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates_tokens_details: Vec<ModalityTokenCount>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModalityTokenCount {
    #[serde(default)]
    pub modality: String,
    #[serde(default)]
    pub token_count: u64,
}

/// Every non-200 answer: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ErrorBody {
    #[serde(default)]
    pub code: u16,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub status: String,
    /// `google.rpc.*` messages, each tagged by `@type`, in no fixed order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<Value>,
}

/// The `@type` prefix of every detail.
pub const TYPE_PREFIX: &str = "type.googleapis.com/";
pub const HELP: &str = "google.rpc.Help";
pub const QUOTA_FAILURE: &str = "google.rpc.QuotaFailure";
pub const RETRY_INFO: &str = "google.rpc.RetryInfo";
pub const BAD_REQUEST: &str = "google.rpc.BadRequest";
pub const ERROR_INFO: &str = "google.rpc.ErrorInfo";

/// `google.rpc.QuotaFailure`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct QuotaFailure {
    #[serde(default)]
    pub violations: Vec<QuotaFailureViolation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct QuotaFailureViolation {
    #[serde(default)]
    pub quota_metric: String,
    #[serde(default)]
    pub quota_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_dimensions: Option<QuotaDimensions>,
    /// A decimal string; left out when the limit is 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_value: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct QuotaDimensions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// `google.rpc.RetryInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RetryInfo {
    /// A protobuf `Duration` in JSON: `"40s"`, `"45.837906927s"`.
    #[serde(default)]
    pub retry_delay: String,
}

/// `google.rpc.BadRequest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct BadRequest {
    #[serde(default)]
    pub field_violations: Vec<BadRequestFieldViolation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BadRequestFieldViolation {
    #[serde(default)]
    pub field: String,
    #[serde(default)]
    pub description: String,
}

/// `google.rpc.ErrorInfo` (e.g. `reason: API_KEY_INVALID`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ErrorInfo {
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub domain: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(size: ImageSize) -> Value {
        let config = ImageConfig {
            aspect_ratio: None,
            image_size: Some(size),
        };
        serde_json::to_value(&config).expect("serializes")["imageSize"].clone()
    }

    #[test]
    fn image_sizes_go_out_as_google_spells_them() {
        // Google takes "512", "1K", "2K", "4K" and refuses "0.5K" with 400.
        assert_eq!(sent(ImageSize::Half), "512");
        assert_eq!(sent(ImageSize::K1), "1K");
        assert_eq!(sent(ImageSize::K4), "4K");
        let none = serde_json::to_value(ImageConfig::default()).expect("serializes");
        assert_eq!(none, serde_json::json!({}));
    }
}
