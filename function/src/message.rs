//! The generation request: the JSON body of one SQS message (DESIGN.md section 5).
//!
//! Parsing is strict (unknown fields are rejected) and every problem names the field and
//! the fix, because a malformed message can never succeed: it gets a failed result with
//! that reason instead of a retry.
use jiff::Timestamp;
use pacer_core::models::{self, ImageSize, ModelInfo};
use serde::{Deserialize, Deserializer, Serialize};

/// The longest prompt accepted, in characters.
pub const MAX_PROMPT_CHARS: usize = 30_000;
/// The most images one request may ask for (each costs one provider request).
pub const MAX_IMAGES: u32 = 4;
/// The longest request id, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// One request to generate images.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GenerationRequest {
    /// The idempotency key: one output and one result per id, however often it is delivered.
    pub id: String,
    /// The chain to use, `namespace/name` (a name alone means namespace `default`).
    pub chain: String,
    /// What to draw.
    pub prompt: String,
    /// For example `16:9`; the model's default when absent. One of the ratios some model of
    /// the table takes, and one a model of the chain takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aspect_ratio: Option<String>,
    /// `512` (or `0.5K`), `1K`, `2K` or `4K`; the model's default (1K) when absent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "image_size"
    )]
    pub image_size: Option<ImageSize>,
    /// How many images (each is one provider request).
    #[serde(default = "one")]
    pub images: u32,
    /// Its priority class, -1000 to 1000 (absent: its chain's): behind a queue, a request
    /// books ahead of the bookings of lower classes that have not started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// After this instant the request is failed instead of generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timestamp>,
    /// Where to store the image (a key in the sink); `<id>.png` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_key: Option<String>,
    /// The team the request books for: one of the pool's `spec.tenants` (`default` when
    /// absent; ignored by a pool that declares none; its chain's tenant when the chain
    /// pins one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

fn one() -> u32 {
    1
}

/// Reads `imageSize` with an error that names the field and the sizes there are (serde's
/// own names neither).
fn image_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ImageSize>, D::Error> {
    let Some(name) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    ImageSize::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(&name))
        .map(Some)
        .map_err(|_| {
            serde::de::Error::custom(format!(
                "field `imageSize`: {name:?} is not an image size; use one of {:?}",
                size_names(&models::any_model_image_sizes())
            ))
        })
}

fn size_names(sizes: &[ImageSize]) -> Vec<&'static str> {
    sizes.iter().map(|s| s.name()).collect()
}

/// A message that can never be processed, with the field at fault and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid request: field `{field}`: {problem}")]
pub struct MessageError {
    /// The JSON field at fault (`body` when the whole body is unreadable).
    pub field: String,
    /// What is wrong and what to send instead.
    pub problem: String,
}

impl MessageError {
    fn new(field: &str, problem: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            problem: problem.into(),
        }
    }
}

impl GenerationRequest {
    /// Parses and validates one message body.
    pub fn parse(body: &str) -> Result<Self, MessageError> {
        let req: Self = serde_json::from_str(body).map_err(|e| {
            // serde_json names the unknown or mistyped field in its message.
            let text = e.to_string();
            // A field's own reader (`image_size`) starts its message with the field; the
            // position serde_json appends means nothing to a sender who names the field.
            if let Some((field, problem)) = text
                .strip_prefix("field `")
                .and_then(|rest| rest.split_once("`: "))
            {
                let at = format!(" at line {} column {}", e.line(), e.column());
                return MessageError::new(field, problem.strip_suffix(&at).unwrap_or(problem));
            }
            let field = text
                .split('`')
                .nth(1)
                .filter(|_| text.starts_with("unknown field") || text.starts_with("missing field"))
                .unwrap_or("body");
            MessageError::new(
                field,
                format!("{text}; see the request schema in the README"),
            )
        })?;
        req.validate()?;
        Ok(req)
    }

    /// Checks every field's bounds.
    pub fn validate(&self) -> Result<(), MessageError> {
        if self.id.is_empty() || self.id.len() > MAX_ID_LEN {
            return Err(MessageError::new(
                "id",
                format!("must be 1 to {MAX_ID_LEN} bytes"),
            ));
        }
        if !self
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return Err(MessageError::new(
                "id",
                "may hold only letters, digits and - _ . :",
            ));
        }
        if self.chain.is_empty() || self.chain.len() > 253 {
            return Err(MessageError::new(
                "chain",
                "must name a ModelChain as namespace/name",
            ));
        }
        if self.prompt.trim().is_empty() {
            return Err(MessageError::new("prompt", "is empty"));
        }
        let chars = self.prompt.chars().count();
        if chars > MAX_PROMPT_CHARS {
            return Err(MessageError::new(
                "prompt",
                format!("is {chars} characters; the limit is {MAX_PROMPT_CHARS}"),
            ));
        }
        // Before the chain is known: what some model takes ([`Self::check_models`] checks
        // against the chain's models once it is).
        if let Some(r) = &self.aspect_ratio {
            let ratios = models::any_model_aspect_ratios();
            if !ratios.contains(&r.as_str()) {
                return Err(MessageError::new(
                    "aspectRatio",
                    format!("{r:?} is not an aspect ratio; use one of {ratios:?}"),
                ));
            }
        }
        if self.images == 0 || self.images > MAX_IMAGES {
            return Err(MessageError::new(
                "images",
                format!("must be 1 to {MAX_IMAGES}"),
            ));
        }
        if let Some(key) = &self.output_key
            && (key.is_empty() || key.len() > 512 || key.starts_with('/') || key.contains(".."))
        {
            return Err(MessageError::new(
                "outputKey",
                "must be a relative key of 1 to 512 bytes without `..`",
            ));
        }
        if let Some(p) = self.priority
            && !(-1000..=1000).contains(&p)
        {
            return Err(MessageError::new(
                "priority",
                format!("is {p}; it must be -1000 to 1000"),
            ));
        }
        if let Some(t) = &self.tenant
            && (t.is_empty()
                || t.len() > 63
                || t.starts_with('-')
                || t.ends_with('-')
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
        {
            return Err(MessageError::new(
                "tenant",
                format!("{t:?} is not a tenant name: lowercase letters, digits and -, 1 to 63"),
            ));
        }
        Ok(())
    }

    /// The tenant this request books as on `chain` and `pool`: the chain's when it pins
    /// one (a message naming another is refused), else the message's, else `default`; it
    /// must be one of the pool's tenants when the pool declares any.
    pub fn tenant_on(
        &self,
        chain: &pacer_core::config::CompiledChain,
        pool: &pacer_core::config::CompiledPool,
    ) -> Result<String, MessageError> {
        let mine = self.tenant.as_deref();
        let tenant = match (&chain.tenant, mine) {
            (Some(pinned), Some(own)) if pinned != own => {
                return Err(MessageError::new(
                    "tenant",
                    format!(
                        "is {own:?}, but chain {} books as tenant {pinned:?}: leave it out or use that chain's tenant",
                        chain.name
                    ),
                ));
            }
            (Some(pinned), _) => pinned.as_str(),
            (None, Some(own)) => own,
            (None, None) => pacer_core::quota::DEFAULT_TENANT,
        };
        if !pool.tenants.is_empty() && !pool.tenants.iter().any(|t| t.name == tenant) {
            let known: Vec<&str> = pool.tenants.iter().map(|t| t.name.as_str()).collect();
            return Err(MessageError::new(
                "tenant",
                format!(
                    "{tenant:?} is not one of pool {}'s tenants {known:?}: send one of those (or declare it in the QuotaPool's spec.tenants)",
                    pool.name
                ),
            ));
        }
        Ok(tenant.to_owned())
    }

    /// Checks the aspect ratio and image size against the models that may serve the
    /// request (a chain's steps): at least one must take each. A model the table does not
    /// know (another provider's) may take anything, so it passes the request.
    pub fn check_models<'a>(
        &self,
        models: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), MessageError> {
        let mut known: Vec<&ModelInfo> = Vec::new();
        for model in models {
            match models::model_info(model) {
                Some(info) => known.push(info),
                None => return Ok(()),
            }
        }
        if known.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = known.iter().map(|m| m.id).collect();
        if let Some(r) = &self.aspect_ratio
            && !known.iter().any(|m| m.takes_ratio(r))
        {
            let mut ratios: Vec<&str> = known.iter().flat_map(|m| m.aspect_ratios()).collect();
            dedup_in_order(&mut ratios);
            return Err(MessageError::new(
                "aspectRatio",
                format!("{r:?} is not taken by the chain's models {ids:?}; use one of {ratios:?}"),
            ));
        }
        if let Some(s) = self.image_size
            && !known.iter().any(|m| m.takes_size(s))
        {
            let mut sizes: Vec<ImageSize> = known.iter().flat_map(|m| m.image_sizes()).collect();
            sizes.sort();
            sizes.dedup();
            return Err(MessageError::new(
                "imageSize",
                format!(
                    "{:?} is not offered by the chain's models {ids:?}; use one of {:?}",
                    s.name(),
                    size_names(&sizes)
                ),
            ));
        }
        Ok(())
    }

    /// The chain's full name: `namespace/name`.
    pub fn chain_name(&self) -> String {
        if self.chain.contains('/') {
            self.chain.clone()
        } else {
            format!("default/{}", self.chain)
        }
    }

    /// The sink key of image `index` (0-based): the output key, or `<id>.png`; further images
    /// get `~1`, `~2`, … before the extension. Ids never hold `~` (nor `/`), so no default
    /// key of one request is another's.
    pub fn output_key(&self, index: u32) -> String {
        let base = self
            .output_key
            .clone()
            .unwrap_or_else(|| format!("{}.png", self.id));
        if index == 0 {
            return base;
        }
        match base.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() && !ext.contains('/') => {
                format!("{stem}~{index}.{ext}")
            }
            _ => format!("{base}~{index}"),
        }
    }

    /// Some id from a body that failed to parse, so its failed result can be recorded.
    pub fn salvage_id(body: &str) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        let id = v.get("id")?.as_str()?;
        let ok = !id.is_empty()
            && id.len() <= MAX_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        ok.then(|| id.to_owned())
    }
}

fn dedup_in_order<T: PartialEq + Copy>(items: &mut Vec<T>) {
    let mut seen: Vec<T> = Vec::with_capacity(items.len());
    items.retain(|x| {
        let new = !seen.contains(x);
        if new {
            seen.push(*x);
        }
        new
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> MessageError {
        GenerationRequest::parse(body).expect_err("should be rejected")
    }

    #[test]
    fn parses_a_full_request() {
        let r = GenerationRequest::parse(
            r#"{"id":"r-1","chain":"team/images","prompt":"a red fox","aspectRatio":"16:9",
                "imageSize":"2K","images":2,"priority":3,"deadline":"2030-01-01T00:00:00Z",
                "outputKey":"foxes/r-1.png"}"#,
        )
        .unwrap();
        assert_eq!(r.images, 2);
        assert_eq!(r.chain_name(), "team/images");
        assert_eq!(r.output_key(0), "foxes/r-1.png");
        assert_eq!(r.output_key(1), "foxes/r-1~1.png");
    }

    #[test]
    fn defaults_apply() {
        let r = GenerationRequest::parse(r#"{"id":"a","chain":"c","prompt":"p"}"#).unwrap();
        assert_eq!(
            (r.images, r.chain_name(), r.output_key(0)),
            (1, "default/c".into(), "a.png".into())
        );
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            err(r#"{"id":"a","chain":"c","prompt":"p","colour":1}"#).field,
            "colour"
        );
        assert_eq!(err(r#"{"id":"a","prompt":"p"}"#).field, "chain");
        assert_eq!(err(r#"{"id":"a b","chain":"c","prompt":"p"}"#).field, "id");
        assert_eq!(
            err(r#"{"id":"a","chain":"c","prompt":"  "}"#).field,
            "prompt"
        );
        assert_eq!(
            err(r#"{"id":"a","chain":"c","prompt":"p","aspectRatio":"7:3"}"#).field,
            "aspectRatio"
        );
        let e = err(r#"{"id":"a","chain":"c","prompt":"p","imageSize":"8K"}"#);
        assert_eq!(e.field, "imageSize");
        assert_eq!(
            e.problem,
            r#""8K" is not an image size; use one of ["512", "1K", "2K", "4K"]"#
        );
        let e = err(r#"{"id":"a","chain":"c","prompt":"p","aspectRatio":"7:3"}"#);
        assert!(e.problem.contains(r#""1:8""#), "{e}");
        assert_eq!(
            err(r#"{"id":"a","chain":"c","prompt":"p","images":9}"#).field,
            "images"
        );
        assert_eq!(
            err(r#"{"id":"a","chain":"c","prompt":"p","outputKey":"../x"}"#).field,
            "outputKey"
        );
        assert_eq!(err("not json").field, "body");
        let long = "x".repeat(MAX_PROMPT_CHARS + 1);
        let e = err(&format!(r#"{{"id":"a","chain":"c","prompt":"{long}"}}"#));
        assert_eq!(e.field, "prompt");
        assert!(e.problem.contains("30000"), "{e}");
    }

    #[test]
    fn both_spellings_of_the_smallest_size_parse() {
        for size in ["512", "0.5K"] {
            let r = GenerationRequest::parse(&format!(
                r#"{{"id":"a","chain":"c","prompt":"p","imageSize":"{size}"}}"#
            ))
            .unwrap();
            assert_eq!(r.image_size, Some(ImageSize::Half));
            let json = serde_json::to_value(&r).expect("serializes");
            assert_eq!(json["imageSize"], "512");
        }
    }

    #[test]
    fn options_are_checked_against_the_chain_s_models() {
        let req = |extra: &str| {
            GenerationRequest::parse(&format!(r#"{{"id":"a","chain":"c","prompt":"p"{extra}}}"#))
                .expect("valid before the chain is known")
        };
        let pro = ["gemini-3-pro-image"];
        let both = ["gemini-3-pro-image", "gemini-3.1-flash-image"];
        let extreme = req(r#","aspectRatio":"1:8""#);
        let e = extreme.check_models(pro).expect_err("pro has no 1:8");
        assert_eq!(e.field, "aspectRatio");
        assert!(e.problem.contains(r#""21:9"]"#), "{e}");
        assert!(extreme.check_models(both).is_ok());
        // A model outside the table may take it.
        assert!(extreme.check_models(["gpt-image-1"]).is_ok());
        let half = req(r#","imageSize":"0.5K""#);
        let e = half.check_models(pro).expect_err("pro has no 512");
        assert_eq!(e.field, "imageSize");
        assert!(e.problem.contains(r#"["1K", "2K", "4K"]"#), "{e}");
        assert!(half.check_models(both).is_ok());
    }

    #[test]
    fn salvages_the_id_of_a_bad_message() {
        assert_eq!(
            GenerationRequest::salvage_id(r#"{"id":"r-9","x":1}"#),
            Some("r-9".into())
        );
        assert_eq!(GenerationRequest::salvage_id("garbage"), None);
    }
}
