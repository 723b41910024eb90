//! Request validation with Google's answers: unknown field names and bad enum values get
//! `400 INVALID_ARGUMENT` with a `BadRequest` field violation naming the path, in the
//! snake_case Google uses (`generation_config.image_config`). Both JSON spellings
//! (`generationConfig`, `generation_config`) are accepted, as protobuf's JSON mapping does.
use serde_json::{Map, Value};

use crate::models::{ASPECT_RATIOS, ModelSpec};

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

/// Validates a `generateContent` body for `model`.
pub fn generate_content(body: &[u8], model: &ModelSpec) -> Result<Parsed, Violation> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Violation {
        field: String::new(),
        message: format!("Invalid JSON payload received. {e}"),
    })?;
    let mut prompt = Vec::new();
    let mut parsed = Parsed {
        prompt: String::new(),
        text_too: true,
        aspect_ratio: None,
        image_size: None,
    };
    let mut saw_contents = false;
    for (name, v) in fields(&value, "", TOP, "GenerateContentRequest")? {
        match name.as_str() {
            "contents" => {
                saw_contents = true;
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
                                    prompt.push(string(v, &join(&part_path, "text"), "Part")?);
                                }
                            }
                        }
                    }
                }
            }
            "generation_config" => generation_config(v, model, &mut parsed)?,
            _ => {}
        }
    }
    if !saw_contents || prompt.is_empty() {
        return Err(Violation {
            field: "contents".to_owned(),
            message: "* GenerateContentRequest.contents: contents is not specified\n".to_owned(),
        });
    }
    parsed.prompt = prompt.join("\n");
    Ok(parsed)
}

fn generation_config(v: &Value, model: &ModelSpec, parsed: &mut Parsed) -> Result<(), Violation> {
    let path = "generation_config";
    for (name, v) in fields(v, path, GENERATION_CONFIG, "GenerationConfig")? {
        let here = join(path, &name);
        match name.as_str() {
            "response_modalities" => {
                let mut image = false;
                let mut text = false;
                for (i, m) in array(v, &here, "GenerationConfig.Modality")?
                    .iter()
                    .enumerate()
                {
                    let at = format!("{here}[{i}]");
                    let m = m
                        .as_str()
                        .filter(|m| MODALITIES.contains(m))
                        .ok_or_else(|| invalid(&at, "GenerationConfig.Modality", m))?;
                    image |= m == "IMAGE";
                    text |= m == "TEXT";
                }
                if !image {
                    return Err(Violation {
                        field: here,
                        message: format!(
                            "Model {} does not support the requested response modalities: only TEXT,IMAGE or IMAGE",
                            model.name
                        ),
                    });
                }
                parsed.text_too = text;
            }
            "candidate_count" if v.as_u64().is_some_and(|n| n > 1) => {
                return Err(Violation {
                    field: here,
                    message: format!(
                        "Multiple candidates is not enabled for models/{}",
                        model.name
                    ),
                });
            }
            "image_config" => {
                for (name, v) in fields(v, &here, IMAGE_CONFIG, "ImageConfig")? {
                    let at = join(&here, &name);
                    let s = string(v, &at, "ImageConfig")?;
                    if name == "aspect_ratio" {
                        if !ASPECT_RATIOS.contains(&s) {
                            return Err(Violation {
                                field: at,
                                message: format!(
                                    "* GenerateContentRequest.generation_config.image_config.aspect_ratio: unsupported aspect ratio \"{s}\"; supported: {}\n",
                                    ASPECT_RATIOS.join(", ")
                                ),
                            });
                        }
                        parsed.aspect_ratio = Some(s.to_owned());
                    } else {
                        if model.cost(Some(s)).is_none() {
                            return Err(Violation {
                                field: at,
                                message: format!(
                                    "* GenerateContentRequest.generation_config.image_config.image_size: unsupported image size \"{s}\" for {}\n",
                                    model.name
                                ),
                            });
                        }
                        parsed.image_size = Some(s.to_owned());
                    }
                }
            }
            _ => {}
        }
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
}
