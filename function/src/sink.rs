//! Where images go: an S3 bucket (any S3-compatible endpoint) or a local folder.
//!
//! A sink is also half of idempotency: before calling the provider the handler asks
//! whether the image already exists, so a redelivered message is acknowledged without
//! generating it twice.
use std::path::PathBuf;

use async_trait::async_trait;

/// A failure to store or look up an image. Always retryable: the message is deferred.
#[derive(Debug, thiserror::Error)]
#[error("sink {location}: {message}")]
pub struct SinkError {
    /// The object the operation was about.
    pub location: String,
    /// What went wrong.
    pub message: String,
}

/// A place images are stored.
#[async_trait]
pub trait Sink: Send + Sync {
    /// The location of `key` if an object is already stored there.
    async fn existing(&self, key: &str) -> Result<Option<String>, SinkError>;
    /// Stores `data` at `key` and returns its location (`s3://bucket/key` or a path).
    async fn put(&self, key: &str, data: &[u8], mime_type: &str) -> Result<String, SinkError>;
}

/// Parses a sink URL: `s3://bucket/prefix` or `file:///path` (or a bare path).
pub async fn from_url(url: &str) -> Result<Box<dyn Sink>, SinkError> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(SinkError {
                location: url.to_owned(),
                message: "no bucket: use s3://BUCKET/optional/prefix".into(),
            });
        }
        let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        // Path-style addressing works with every S3-compatible endpoint (moto, MinIO).
        let s3 = aws_sdk_s3::config::Builder::from(&conf)
            .force_path_style(true)
            .build();
        Ok(Box::new(S3Sink {
            client: aws_sdk_s3::Client::from_conf(s3),
            bucket: bucket.to_owned(),
            prefix: prefix.trim_end_matches('/').to_owned(),
        }))
    } else {
        let path = url.strip_prefix("file://").unwrap_or(url);
        Ok(Box::new(LocalSink::new(path)))
    }
}

/// A local folder.
#[derive(Debug, Clone)]
pub struct LocalSink {
    root: PathBuf,
}

impl LocalSink {
    /// A sink writing below `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
}

#[async_trait]
impl Sink for LocalSink {
    async fn existing(&self, key: &str) -> Result<Option<String>, SinkError> {
        let path = self.root.join(key);
        Ok(tokio::fs::try_exists(&path)
            .await
            .unwrap_or(false)
            .then(|| path.display().to_string()))
    }

    async fn put(&self, key: &str, data: &[u8], _mime_type: &str) -> Result<String, SinkError> {
        let path = self.root.join(key);
        let location = path.display().to_string();
        let err = |e: std::io::Error| SinkError {
            location: location.clone(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(err)?;
        }
        // Write then rename, so a crash never leaves a partial file that looks stored.
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        tokio::fs::write(&tmp, data).await.map_err(err)?;
        tokio::fs::rename(&tmp, &path).await.map_err(err)?;
        Ok(location)
    }
}

/// An S3 bucket (or any S3-compatible store; `AWS_ENDPOINT_URL` selects it).
pub struct S3Sink {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

impl S3Sink {
    /// A sink over an existing client.
    pub fn new(client: aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Self {
        Self {
            client,
            bucket: bucket.to_owned(),
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn location(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.key(key))
    }
}

#[async_trait]
impl Sink for S3Sink {
    async fn existing(&self, key: &str) -> Result<Option<String>, SinkError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .send()
            .await
        {
            Ok(_) => Ok(Some(self.location(key))),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(SinkError {
                location: self.location(key),
                message: aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
            }),
        }
    }

    async fn put(&self, key: &str, data: &[u8], mime_type: &str) -> Result<String, SinkError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .content_type(mime_type)
            .body(data.to_vec().into())
            .send()
            .await
            .map_err(|e| SinkError {
                location: self.location(key),
                message: aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
            })?;
        Ok(self.location(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_sink_stores_and_finds() {
        let dir = std::env::temp_dir().join(format!("pacer-sink-{}", std::process::id()));
        let sink = LocalSink::new(&dir);
        assert_eq!(sink.existing("a/b.png").await.unwrap(), None);
        let loc = sink.put("a/b.png", b"png", "image/png").await.unwrap();
        assert_eq!(sink.existing("a/b.png").await.unwrap(), Some(loc.clone()));
        assert_eq!(std::fs::read(&loc).unwrap(), b"png");
        let _ = std::fs::remove_dir_all(dir);
    }
}
