//! [`GeminiClient`]: `POST {base}/{version}/models/{model}:generateContent`, key in
//! `x-goog-api-key` (never in the URL, so it cannot reach a log line through an error), the
//! call's limiter booking in [`TICKET_HEADER`]. On Vertex AI ([`GeminiConfig::vertex`]) the
//! same body goes to the project's route with an OAuth access token instead of a key.
use std::{sync::Arc, time::Duration};

use async_trait::async_trait;

use super::{
    decode::{decode_error, decode_response},
    vertex::{self, AccessTokens, VertexTarget},
    wire::{Content, GenerateContentRequest, GenerationConfig, ImageConfig, Part},
};
use crate::provider::{
    ApiKey, ImageProvider, ImageRequest, ImageResponse, Modalities, ProviderError, Result,
    TICKET_HEADER,
};

/// Google's public endpoint.
pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";

/// The API version in the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiVersion {
    V1,
    #[default]
    V1Beta,
}

impl ApiVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiVersion::V1 => "v1",
            ApiVersion::V1Beta => "v1beta",
        }
    }
}

/// How to reach Gemini (or the simulator, or a proxy speaking Gemini).
#[derive(Debug, Clone)]
pub struct GeminiConfig {
    /// Scheme, host and optional path prefix, without the version: the simulator's
    /// `http://127.0.0.1:PORT`, or a gateway's Gemini route.
    pub base_url: String,
    pub api_key: ApiKey,
    pub api_version: ApiVersion,
    /// Whole-request timeout; the answer of an image model takes 5 to 40 s.
    pub timeout: Duration,
    /// Vertex AI: the project's route and an access token (the key is not sent).
    pub vertex: Option<VertexTarget>,
}

impl GeminiConfig {
    pub fn new(api_key: ApiKey) -> GeminiConfig {
        GeminiConfig {
            base_url: DEFAULT_BASE_URL.to_owned(),
            api_key,
            api_version: ApiVersion::default(),
            timeout: Duration::from_secs(120),
            vertex: None,
        }
    }

    /// Gemini on Vertex AI for `project` in `location`, authorized by `tokens`: Vertex's
    /// endpoint for the location and its `v1` API.
    pub fn vertex(
        project: impl Into<String>,
        location: impl Into<String>,
        tokens: Arc<AccessTokens>,
    ) -> GeminiConfig {
        let location = location.into();
        GeminiConfig {
            base_url: vertex::base_url(&location),
            api_key: ApiKey::new(""),
            api_version: ApiVersion::V1,
            timeout: Duration::from_secs(120),
            vertex: Some(VertexTarget {
                project: project.into(),
                location,
                tokens,
            }),
        }
    }

    pub fn base_url(mut self, url: impl Into<String>) -> GeminiConfig {
        self.base_url = url.into();
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> GeminiConfig {
        self.timeout = timeout;
        self
    }

    pub fn api_version(mut self, version: ApiVersion) -> GeminiConfig {
        self.api_version = version;
        self
    }
}

/// A Gemini client; cheap to clone (one connection pool inside).
#[derive(Debug, Clone)]
pub struct GeminiClient {
    http: reqwest::Client,
    config: GeminiConfig,
}

impl GeminiClient {
    pub fn new(config: GeminiConfig) -> Result<GeminiClient> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| ProviderError::Transport {
                message: format!("building the HTTP client: {e}"),
            })?;
        Ok(GeminiClient { http, config })
    }

    /// The request body for one image.
    pub fn request_body(req: &ImageRequest) -> GenerateContentRequest {
        let modalities = match req.modalities {
            Modalities::Image => vec!["IMAGE".to_owned()],
            Modalities::TextAndImage => vec!["TEXT".to_owned(), "IMAGE".to_owned()],
        };
        let image_config =
            (req.aspect_ratio.is_some() || req.image_size.is_some()).then(|| ImageConfig {
                aspect_ratio: req.aspect_ratio.clone(),
                image_size: req.image_size,
            });
        GenerateContentRequest {
            contents: vec![Content {
                role: Some("user".to_owned()),
                parts: vec![Part {
                    text: Some(req.prompt.clone()),
                    ..Part::default()
                }],
            }],
            generation_config: Some(GenerationConfig {
                response_modalities: Some(modalities),
                candidate_count: None,
                image_config,
            }),
            service_tier: req.service_tier.map(|t| t.as_str().to_owned()),
        }
    }

    fn url(&self, model: &str) -> Result<String> {
        let model = model.strip_prefix("models/").unwrap_or(model);
        let valid = !model.is_empty()
            && model
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !valid {
            return Err(ProviderError::Invalid {
                message: format!("not a model name: {model:?}"),
                violations: Vec::new(),
            });
        }
        let base = self.config.base_url.trim_end_matches('/');
        let version = self.config.api_version.as_str();
        Ok(match &self.config.vertex {
            Some(target) => format!(
                "{base}/{}:generateContent",
                target.model_path(version, model)?
            ),
            None => format!("{base}/{version}/models/{model}:generateContent"),
        })
    }

    fn transport(&self, e: reqwest::Error) -> ProviderError {
        if e.is_timeout() {
            ProviderError::Timeout {
                after: self.config.timeout,
            }
        } else {
            // The chain of sources says what broke (reset, refused, truncated body).
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message.push_str(": ");
                message.push_str(&s.to_string());
                source = s.source();
            }
            ProviderError::Transport { message }
        }
    }
}

#[async_trait]
impl ImageProvider for GeminiClient {
    async fn generate(&self, model: &str, req: &ImageRequest) -> Result<ImageResponse> {
        let url = self.url(model)?;
        let mut call = self.http.post(url);
        call = match &self.config.vertex {
            Some(target) => call.bearer_auth(target.tokens.token().await?),
            None => call.header("x-goog-api-key", self.config.api_key.expose()),
        };
        if let Some(ticket) = req.ticket_header() {
            call = call.header(TICKET_HEADER, ticket);
        }
        let resp = call
            .json(&Self::request_body(req))
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = resp.bytes().await.map_err(|e| self.transport(e))?;
        if status == 200 {
            decode_response(&body)
        } else {
            Err(decode_error(status, &body, model, retry_after))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// Answers one HTTP request with `status` and `body`; returns the request's head.
    pub(crate) async fn one_shot(
        status: &'static str,
        body: &'static str,
    ) -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            // The head, then as much body as Content-Length says.
            loop {
                let n = sock.read(&mut buf).await.expect("read");
                seen.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&seen).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if seen.len() >= end + 4 + len || n == 0 {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            sock.write_all(answer.as_bytes()).await.expect("write");
            String::from_utf8_lossy(&seen).to_string()
        });
        (base, task)
    }

    #[tokio::test]
    async fn the_ticket_travels_as_a_header_never_in_the_body() {
        let (base, seen) = one_shot(
            "200 OK",
            r#"{"candidates":[{"content":{"parts":[{"inlineData":{"mimeType":"image/png","data":"iVBORw0KGgo="}}]},"finishReason":"STOP"}]}"#,
        )
        .await;
        let client =
            GeminiClient::new(GeminiConfig::new(ApiKey::new("k")).base_url(base)).expect("client");
        let req = ImageRequest::new("a fox").ticket("r1:0:m:tok:1@1800000000000000");
        client
            .generate("gemini-3-pro-image", &req)
            .await
            .expect("image");
        let seen = seen.await.expect("server");
        let head = seen.to_ascii_lowercase();
        assert!(
            head.contains("x-pacer-ticket: r1:0:m:tok:1@1800000000000000\r\n"),
            "{seen}"
        );
        let body = &seen[seen.find("\r\n\r\n").expect("head ends") + 4..];
        assert!(!body.contains("1800000000000000"), "{body}");
    }

    #[tokio::test]
    async fn no_ticket_no_header() {
        let (base, seen) = one_shot(
            "503 Service Unavailable",
            r#"{"error":{"code":503,"message":"overloaded","status":"UNAVAILABLE"}}"#,
        )
        .await;
        let client =
            GeminiClient::new(GeminiConfig::new(ApiKey::new("k")).base_url(base)).expect("client");
        let err = client
            .generate("gemini-3-pro-image", &ImageRequest::new("a fox"))
            .await
            .expect_err("503");
        assert!(matches!(err, ProviderError::Overloaded { .. }), "{err:?}");
        assert!(
            !seen
                .await
                .expect("server")
                .to_ascii_lowercase()
                .contains("x-pacer-ticket")
        );
    }
}
