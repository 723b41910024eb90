//! Gemini on Vertex AI: the same request and answer as the Gemini API, another route
//! (`{base}/v1/projects/{project}/locations/{location}/publishers/google/models/{model}:generateContent`)
//! and another credential (an OAuth access token in `Authorization: Bearer`, never an API
//! key).
//!
//! Tokens come from a service-account key file when the pool names one, else from Google's
//! usual search (`GOOGLE_APPLICATION_CREDENTIALS`, the gcloud user's application default
//! credentials, the metadata server: workload identity on GKE, the attached service
//! account on Cloud Run or GCE). The provider is resolved on the first call, not at start,
//! so a replica with a broken credential still starts, defers that pool's work and says why.
use std::{fmt, path::PathBuf, sync::Arc};

use gcp_auth::TokenProvider;
use tokio::sync::OnceCell;

use crate::provider::ProviderError;

/// The scope Vertex AI's `generateContent` needs.
pub const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The location Vertex serves when a pool names none: the global endpoint, where Google
/// serves the Gemini image models first.
pub const DEFAULT_LOCATION: &str = "global";

/// Vertex's endpoint for `location`: `https://aiplatform.googleapis.com` for `global`,
/// `https://{location}-aiplatform.googleapis.com` for a region.
pub fn base_url(location: &str) -> String {
    if location == "global" {
        "https://aiplatform.googleapis.com".to_owned()
    } else {
        format!("https://{location}-aiplatform.googleapis.com")
    }
}

/// Where a Vertex pool's calls go and whom they bill.
#[derive(Clone)]
pub struct VertexTarget {
    /// The Google Cloud project id (in the path: the project billed and limited).
    pub project: String,
    /// `global` or a region such as `us-central1`.
    pub location: String,
    pub tokens: Arc<AccessTokens>,
}

impl fmt::Debug for VertexTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VertexTarget")
            .field("project", &self.project)
            .field("location", &self.location)
            .field("credentials", &self.tokens.source())
            .finish()
    }
}

impl VertexTarget {
    /// The path after the base URL, without the method: checked so nothing odd reaches
    /// the URL.
    pub(crate) fn model_path(&self, version: &str, model: &str) -> Result<String, ProviderError> {
        let safe = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        };
        if !safe(&self.project) || !safe(&self.location) {
            return Err(ProviderError::Invalid {
                message: format!(
                    "not a Vertex AI project and location: {:?} in {:?}",
                    self.project, self.location
                ),
                violations: Vec::new(),
            });
        }
        Ok(format!(
            "{version}/projects/{}/locations/{}/publishers/google/models/{model}",
            self.project, self.location
        ))
    }
}

/// OAuth access tokens for Vertex, from a service-account key file or Google's default
/// search; cached and refreshed by `gcp_auth` before they expire.
pub struct AccessTokens {
    file: Option<PathBuf>,
    provider: OnceCell<Arc<dyn TokenProvider>>,
}

impl AccessTokens {
    /// Tokens from this service-account key file (the JSON a key download gives; its
    /// `token_uri` says where tokens are fetched).
    pub fn from_key_file(path: impl Into<PathBuf>) -> AccessTokens {
        AccessTokens {
            file: Some(path.into()),
            provider: OnceCell::new(),
        }
    }

    /// Tokens from Google's default search: `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's
    /// application default credentials, the metadata server (workload identity).
    pub fn from_environment() -> AccessTokens {
        AccessTokens {
            file: None,
            provider: OnceCell::new(),
        }
    }

    fn source(&self) -> String {
        match &self.file {
            Some(path) => format!("key file {}", path.display()),
            None => "application default credentials".to_owned(),
        }
    }

    /// A current access token. Failures are account problems: no call can succeed until
    /// the credential is fixed, so the caller defers and alerts.
    pub async fn token(&self) -> Result<String, ProviderError> {
        let unauthorized = |what: String| ProviderError::Unauthorized {
            status: 401,
            message: format!(
                "getting a Vertex AI access token from {}: {what}",
                self.source()
            ),
        };
        let provider = self
            .provider
            .get_or_try_init(|| async {
                match &self.file {
                    Some(path) => gcp_auth::CustomServiceAccount::from_file(path)
                        .map(|p| Arc::new(p) as Arc<dyn TokenProvider>),
                    None => gcp_auth::provider().await,
                }
            })
            .await
            .map_err(|e| unauthorized(error_chain(&e)))?;
        let token = provider
            .token(&[SCOPE])
            .await
            .map_err(|e| unauthorized(error_chain(&e)))?;
        Ok(token.as_str().to_owned())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_and_regional_endpoints() {
        assert_eq!(base_url("global"), "https://aiplatform.googleapis.com");
        assert_eq!(
            base_url("us-central1"),
            "https://us-central1-aiplatform.googleapis.com"
        );
    }

    #[test]
    fn the_path_names_project_location_and_publisher() {
        let target = VertexTarget {
            project: "acme-images".into(),
            location: "global".into(),
            tokens: Arc::new(AccessTokens::from_environment()),
        };
        assert_eq!(
            target.model_path("v1", "gemini-3-pro-image").expect("path"),
            "v1/projects/acme-images/locations/global/publishers/google/models/gemini-3-pro-image"
        );
        let odd = VertexTarget {
            project: "a/../b".into(),
            ..target
        };
        assert!(odd.model_path("v1", "m").is_err());
    }

    #[tokio::test]
    async fn a_missing_key_file_is_an_account_problem_naming_the_file() {
        let tokens = AccessTokens::from_key_file("/nonexistent/pacer-sa.json");
        let err = tokens.token().await.expect_err("no file");
        match err {
            ProviderError::Unauthorized { status, message } => {
                assert_eq!(status, 401);
                assert!(message.contains("/nonexistent/pacer-sa.json"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
