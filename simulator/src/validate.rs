//! Request validation with Google's answers: unknown field names and bad enum values get
//! `400 INVALID_ARGUMENT` with a `BadRequest` field violation naming the path, in the
//! snake_case Google uses (`generation_config.image_config`). Both JSON spellings
//! (`generationConfig`, `generation_config`) are accepted, as protobuf's JSON mapping does.
use serde_json::{Map, Value};

use crate::{
    models::ModelSpec,
    wire::{GenerateContentRequest, GenerationConfig},
};

/// A rejected request: the message and the field it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub message: String,
}

/// What the simulator needs of a valid request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub prompt: String,
    pub text_too: bool,
    pub aspect_ratio: Option<String>,
    pub image_size: Option<String>,
    /// `serviceTier: flex`: billed at half the standard rates.
    pub flex: bool,
}

/// `serviceTier` values, as Google's SDKs send them (the enum's names are read too).
const SERVICE_TIERS: &[&str] = &["unspecified", "standard", "flex", "priority"];

/// The request's service tier, checked.
fn service_tier(value: &Value) -> Result<Option<String>, Violation> {
    let Some(v) = value
        .get("serviceTier")
        .or_else(|| value.get("service_tier"))
    else {
        return Ok(None);
    };
    v.as_str()
        .map(str::to_ascii_lowercase)
        .filter(|t| SERVICE_TIERS.contains(&t.as_str()))
        .map(Some)
        .ok_or_else(|| invalid("service_tier", "ServiceTier", v))
}

const TOP: &[&str] = &[
    "contents",
    "generation_config",
    "safety_settings",
    "system_instruction",
    "tools",
    "tool_config",
    "cached_content",
    "model",
    "service_tier",
];
const CONTENT: &[&str] = &["role", "parts"];
const PART: &[&str] = &[
    "text",
    "inline_data",
    "file_data",
    "thought",
    "thought_signature",
    "function_call",
    "function_response",
    "executable_code",
    "code_execution_result",
    "video_metadata",
    "media_resolution",
    "part_metadata",
];
const GENERATION_CONFIG: &[&str] = &[
    "temperature",
    "top_p",
    "top_k",
    "candidate_count",
    "max_output_tokens",
    "stop_sequences",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_mime_type",
    "response_schema",
    "response_json_schema",
    "response_modalities",
    "response_logprobs",
    "logprobs",
    "media_resolution",
    "speech_config",
    "thinking_config",
    "image_config",
    "enable_enhanced_civic_answers",
];
const IMAGE_CONFIG: &[&str] = &["aspect_ratio", "image_size"];
const MODALITIES: &[&str] = &["MODALITY_UNSPECIFIED", "TEXT", "IMAGE", "AUDIO"];

fn snake(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn unknown(path: &str, key: &str) -> Violation {
    let message = if path.is_empty() {
        format!("Invalid JSON payload received. Unknown name \"{key}\": Cannot find field.")
    } else {
        format!(
            "Invalid JSON payload received. Unknown name \"{key}\" at '{path}': Cannot find field."
        )
    };
    Violation {
        field: path.to_owned(),
        message,
    }
}

fn invalid(path: &str, proto: &str, value: &Value) -> Violation {
    Violation {
        field: path.to_owned(),
        message: format!(
            "Invalid value at '{path}' (type.googleapis.com/google.ai.generativelanguage.v1beta.{proto}), {value}"
        ),
    }
}

/// The object's fields by snake_case name, or the first unknown one.
fn fields<'a>(
    value: &'a Value,
    path: &str,
    allowed: &[&str],
    proto: &str,
) -> Result<Vec<(String, &'a Value)>, Violation> {
    let obj: &Map<String, Value> = value
        .as_object()
        .ok_or_else(|| invalid(path, proto, value))?;
    obj.iter()
        .map(|(k, v)| {
            let name = snake(k);
            if allowed.contains(&name.as_str()) {
                Ok((name, v))
            } else {
                Err(unknown(path, k))
            }
        })
        .collect()
}

fn array<'a>(value: &'a Value, path: &str, proto: &str) -> Result<&'a Vec<Value>, Violation> {
    value.as_array().ok_or_else(|| invalid(path, proto, value))
}

fn string<'a>(value: &'a Value, path: &str, proto: &str) -> Result<&'a str, Violation> {
    value.as_str().ok_or_else(|| invalid(path, proto, value))
}

/// Refuses unknown field names anywhere the simulator reads, as protobuf's JSON parser
/// does, naming the path.
fn check_names(value: &Value) -> Result<(), Violation> {
    for (name, v) in fields(value, "", TOP, "GenerateContentRequest")? {
        match name.as_str() {
            "contents" => {
                for (i, content) in array(v, "contents", "Content")?.iter().enumerate() {
                    let path = format!("contents[{i}]");
                    for (name, v) in fields(content, &path, CONTENT, "Content")? {
                        if name != "parts" {
                            continue;
                        }
                        let parts_path = join(&path, "parts");
                        for (j, part) in array(v, &parts_path, "Part")?.iter().enumerate() {
                            let part_path = format!("{parts_path}[{j}]");
                            for (name, v) in fields(part, &part_path, PART, "Part")? {
                                if name == "text" {
                                    string(v, &join(&part_path, "text"), "Part")?;
                                }
                            }
                        }
                    }
                }
            }
            "generation_config" => {
                let path = "generation_config";
                for (name, v) in fields(v, path, GENERATION_CONFIG, "GenerationConfig")? {
                    let here = join(path, &name);
                    match name.as_str() {
                        "response_modalities" => {
                            for (i, m) in array(v, &here, "GenerationConfig.Modality")?
                                .iter()
                                .enumerate()
                            {
                                m.as_str()
                                    .filter(|m| MODALITIES.contains(m))
                                    .ok_or_else(|| {
                                        invalid(
                                            &format!("{here}[{i}]"),
                                            "GenerationConfig.Modality",
                                            m,
                                        )
                                    })?;
                            }
                        }
                        "image_config" => {
                            for (name, v) in fields(v, &here, IMAGE_CONFIG, "ImageConfig")? {
                                string(v, &join(&here, &name), "ImageConfig")?;
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Validates a `generateContent` body for `model`: names first (Google's parser), then the
/// values, read through the simulator's own wire types.
pub fn generate_content(body: &[u8], model: &ModelSpec) -> Result<Parsed, Violation> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Violation {
        field: String::new(),
        message: format!("Invalid JSON payload received. {e}"),
    })?;
    check_names(&value)?;
    let tier = service_tier(&value)?;
    let request: GenerateContentRequest = serde_json::from_value(value).map_err(|e| Violation {
        field: String::new(),
        message: format!("Invalid JSON payload received. {e}"),
    })?;
    let prompt: Vec<&str> = request
        .contents
        .iter()
        .flat_map(|c| &c.parts)
        .filter_map(|p| p.text.as_deref())
        .collect();
    if prompt.is_empty() {
        return Err(Violation {
            field: "contents".to_owned(),
            message: "* GenerateContentRequest.contents: contents is not specified\n".to_owned(),
        });
    }
    let mut parsed = Parsed {
        prompt: prompt.join("\n"),
        text_too: true,
        aspect_ratio: None,
        image_size: None,
        flex: tier.as_deref() == Some("flex"),
    };
    if let Some(config) = &request.generation_config {
        generation_config(config, model, &mut parsed)?;
    }
    Ok(parsed)
}

fn generation_config(
    config: &GenerationConfig,
    model: &ModelSpec,
    parsed: &mut Parsed,
) -> Result<(), Violation> {
    if let Some(modalities) = &config.response_modalities {
        if !modalities.iter().any(|m| m == "IMAGE") {
            return Err(Violation {
                field: "generation_config.response_modalities".to_owned(),
                message: format!(
                    "Model {} does not support the requested response modalities: only TEXT,IMAGE or IMAGE",
                    model.name
                ),
            });
        }
        parsed.text_too = modalities.iter().any(|m| m == "TEXT");
    }
    if config.candidate_count.is_some_and(|n| n > 1) {
        return Err(Violation {
            field: "generation_config.candidate_count".to_owned(),
            message: format!(
                "Multiple candidates is not enabled for models/{}",
                model.name
            ),
        });
    }
    let Some(image) = &config.image_config else {
        return Ok(());
    };
    if let Some(ratio) = &image.aspect_ratio {
        if !model.takes_ratio(ratio) {
            return Err(Violation {
                field: "generation_config.image_config.aspect_ratio".to_owned(),
                message: format!(
                    "* GenerateContentRequest.generation_config.image_config.aspect_ratio: unsupported aspect ratio \"{ratio}\" for {}; supported: {}\n",
                    model.name,
                    model.ratios().join(", ")
                ),
            });
        }
        parsed.aspect_ratio = Some(ratio.clone());
    }
    if let Some(size) = &image.image_size {
        // Google's values are "512", "1K", "2K", "4K"; "0.5K" is not one of them.
        if model.cost(Some(size)).is_none() {
            return Err(Violation {
                field: "generation_config.image_config.image_size".to_owned(),
                message: format!(
                    "* GenerateContentRequest.generation_config.image_config.image_size: unsupported image size \"{size}\" for {}; supported: {}\n",
                    model.name,
                    model.size_names().join(", ")
                ),
            });
        }
        parsed.image_size = Some(size.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::builtin;

    fn pro() -> ModelSpec {
        builtin()
            .into_iter()
            .find(|m| m.name == "gemini-3-pro-image")
            .expect("pro")
    }

    #[test]
    fn accepts_both_spellings() {
        let body = br#"{"contents":[{"role":"user","parts":[{"text":"a cat"}]}],
            "generation_config":{"responseModalities":["IMAGE"],"image_config":{"aspectRatio":"16:9","imageSize":"2K"}}}"#;
        let p = generate_content(body, &pro()).expect("valid");
        assert_eq!(p.prompt, "a cat");
        assert_eq!(p.aspect_ratio.as_deref(), Some("16:9"));
        assert!(!p.text_too);
    }

    #[test]
    fn the_flex_tier_is_read_and_a_bad_tier_refused() {
        let body = br#"{"contents":[{"parts":[{"text":"a"}]}],"serviceTier":"flex"}"#;
        assert!(generate_content(body, &pro()).expect("flex").flex);
        let body = br#"{"contents":[{"parts":[{"text":"a"}]}],"serviceTier":"standard"}"#;
        assert!(!generate_content(body, &pro()).expect("standard").flex);
        let body = br#"{"contents":[{"parts":[{"text":"a"}]}],"serviceTier":"cheap"}"#;
        let v = generate_content(body, &pro()).expect_err("bad tier");
        assert_eq!(v.field, "service_tier");
    }

    #[test]
    fn unknown_names_and_bad_enums() {
        let body = br#"{"contents":[{"parts":[{"text":"a"}]}],"generationConfig":{"imageConfig":{"aspect":"1:1"}}}"#;
        let v = generate_content(body, &pro()).expect_err("unknown");
        assert_eq!(v.field, "generation_config.image_config");
        assert!(v.message.contains("Unknown name \"aspect\""));
        let body = br#"{"contents":[{"parts":[{"text":"a"}]}],"generationConfig":{"responseModalities":["PICTURE"]}}"#;
        let v = generate_content(body, &pro()).expect_err("enum");
        assert_eq!(v.field, "generation_config.response_modalities[0]");
        let body = br#"{"contents":[{"parts":[{"text":"a"}]}],"generationConfig":{"imageConfig":{"aspectRatio":"7:3"}}}"#;
        assert!(generate_content(body, &pro()).is_err());
        assert!(generate_content(b"{}", &pro()).is_err());
        assert!(generate_content(b"not json", &pro()).is_err());
    }

    fn flash() -> ModelSpec {
        builtin()
            .into_iter()
            .find(|m| m.name == "gemini-3.1-flash-image")
            .expect("flash")
    }

    fn sized(size: &str) -> Vec<u8> {
        format!(
            r#"{{"contents":[{{"parts":[{{"text":"a"}}]}}],"generationConfig":{{"imageConfig":{{"imageSize":"{size}"}}}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn image_sizes_as_google_takes_them() {
        // "512" on 3.1 flash only; "0.5K" nowhere (Google's 400 names the field).
        let p = generate_content(&sized("512"), &flash()).expect("flash takes 512");
        assert_eq!(p.image_size.as_deref(), Some("512"));
        for model in [flash(), pro()] {
            let v = generate_content(&sized("0.5K"), &model).expect_err("0.5K");
            assert_eq!(v.field, "generation_config.image_config.image_size");
            assert!(v.message.contains("\"0.5K\""), "{}", v.message);
        }
        let v = generate_content(&sized("512"), &pro()).expect_err("pro has no 512");
        assert_eq!(v.field, "generation_config.image_config.image_size");
        assert!(generate_content(&sized("4K"), &pro()).is_ok());
        assert!(generate_content(&sized("4k"), &pro()).is_err());
    }

    #[test]
    fn ratios_per_model() {
        let body = br#"{"contents":[{"parts":[{"text":"a"}]}],"generationConfig":{"imageConfig":{"aspectRatio":"1:8"}}}"#;
        assert!(generate_content(body, &flash()).is_ok());
        let v = generate_content(body, &pro()).expect_err("pro has no 1:8");
        assert_eq!(v.field, "generation_config.image_config.aspect_ratio");
    }

    #[test]
    fn candidate_count_above_one_is_refused() {
        let body =
            br#"{"contents":[{"parts":[{"text":"a"}]}],"generationConfig":{"candidateCount":2}}"#;
        let v = generate_content(body, &pro()).expect_err("two candidates");
        assert_eq!(v.field, "generation_config.candidate_count");
    }
}
