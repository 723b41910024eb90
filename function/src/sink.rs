//! Where images go: an S3 bucket (any S3-compatible endpoint) or a local folder.
//!
//! A sink is also half of idempotency: before calling the provider the handler asks
//! whether the image already exists, so a redelivered message is acknowledged without
//! generating it twice. Every object carries the id of the request that stored it (S3
//! metadata `pacer-request-id`; a hidden `.<name>.pacer-id` file beside a local one), so
//! an object at the key is taken as this request's only when it carries this id: an
//! `outputKey` naming another request's image fails the request instead of passing
//! that image off as its own.
use std::path::{Path, PathBuf};

use async_trait::async_trait;

/// The S3 metadata key (and the local side file's content) naming the request an object
/// belongs to.
pub const OWNER_METADATA: &str = "pacer-request-id";

/// A failure to store or look up an image.
#[derive(Debug, thiserror::Error)]
#[error("sink {location}: {message}")]
pub struct SinkError {
    /// The object the operation was about.
    pub location: String,
    /// What went wrong.
    pub message: String,
    /// Whether trying again cannot help (no permission, a read-only folder): the request
    /// fails with this error instead of being generated again on every delivery.
    pub permanent: bool,
}

impl SinkError {
    fn io(location: &str, e: &std::io::Error) -> Self {
        use std::io::ErrorKind::{PermissionDenied, ReadOnlyFilesystem};
        SinkError {
            location: location.to_owned(),
            message: e.to_string(),
            permanent: matches!(e.kind(), PermissionDenied | ReadOnlyFilesystem),
        }
    }
}

/// What is stored at a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Nothing.
    Nothing,
    /// This request's image (a delivery stored it and stopped before its record): here.
    Ours(String),
    /// An object of another request (named, when the object says) or of someone else.
    Other(Option<String>),
}

/// A place images are stored.
#[async_trait]
pub trait Sink: Send + Sync {
    /// What is stored at `key`, judged for request `id`.
    async fn existing(&self, key: &str, id: &str) -> Result<Stored, SinkError>;
    /// Stores `data` at `key` for request `id` and returns its location (`s3://bucket/key`
    /// or a path).
    async fn put(
        &self,
        key: &str,
        data: &[u8],
        mime_type: &str,
        id: &str,
    ) -> Result<String, SinkError>;
}

/// Parses a sink URL: `s3://bucket/prefix` or `file:///path` (or a bare path).
pub async fn from_url(url: &str) -> Result<Box<dyn Sink>, SinkError> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(SinkError {
                location: url.to_owned(),
                message: "no bucket: use s3://BUCKET/optional/prefix".into(),
                permanent: true,
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

    /// The hidden file beside `path` naming its request.
    fn owner_file(path: &Path) -> PathBuf {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        path.with_file_name(format!(".{name}.pacer-id"))
    }
}

/// Writes `data` to `path` durably: a temporary file, synced, then renamed, so a crash
/// never leaves a partial file that looks stored.
async fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut file = tokio::fs::File::create(&tmp).await?;
    file.write_all(data).await?;
    file.sync_all().await?;
    drop(file);
    tokio::fs::rename(&tmp, path).await
}

#[async_trait]
impl Sink for LocalSink {
    async fn existing(&self, key: &str, id: &str) -> Result<Stored, SinkError> {
        let path = self.root.join(key);
        if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(Stored::Nothing);
        }
        let owner = tokio::fs::read_to_string(Self::owner_file(&path))
            .await
            .ok()
            .map(|o| o.trim().to_owned());
        Ok(match owner {
            Some(o) if o == id => Stored::Ours(path.display().to_string()),
            other => Stored::Other(other),
        })
    }

    async fn put(
        &self,
        key: &str,
        data: &[u8],
        _mime_type: &str,
        id: &str,
    ) -> Result<String, SinkError> {
        let path = self.root.join(key);
        let location = path.display().to_string();
        let err = |e: std::io::Error| SinkError::io(&location, &e);
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(err)?;
        }
        // The owner first: an image is never there without it.
        write_durably(&Self::owner_file(&path), id.as_bytes())
            .await
            .map_err(err)?;
        write_durably(&path, data).await.map_err(err)?;
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

    /// An S3 error, permanent when it is about permission or credentials (403s): a
    /// missing bucket stays transient (it may be being created).
    fn error<E, R>(&self, key: &str, e: aws_sdk_s3::error::SdkError<E, R>) -> SinkError
    where
        E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug,
    {
        let service = e.as_service_error();
        let code = service
            .and_then(|s| s.code())
            .unwrap_or_default()
            .to_owned();
        let permanent = matches!(
            code.as_str(),
            "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AllAccessDisabled"
        );
        // S3's own answer in a line (it lands in the request's result record); the whole
        // error chain only when S3 did not answer (a connection or timeout).
        let message = match service.map(|s| (s.code(), s.message())) {
            Some((Some(code), Some(text))) => format!("{code}: {text}"),
            Some((Some(code), None)) => code.to_owned(),
            _ => aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
        };
        SinkError {
            location: self.location(key),
            message,
            permanent,
        }
    }
}

#[async_trait]
impl Sink for S3Sink {
    async fn existing(&self, key: &str, id: &str) -> Result<Stored, SinkError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .send()
            .await
        {
            Ok(head) => {
                let owner = head.metadata().and_then(|m| m.get(OWNER_METADATA)).cloned();
                Ok(match owner {
                    Some(o) if o == id => Stored::Ours(self.location(key)),
                    other => Stored::Other(other),
                })
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(Stored::Nothing),
            Err(e) => Err(self.error(key, e)),
        }
    }

    async fn put(
        &self,
        key: &str,
        data: &[u8],
        mime_type: &str,
        id: &str,
    ) -> Result<String, SinkError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .content_type(mime_type)
            .metadata(OWNER_METADATA, id)
            .body(data.to_vec().into())
            .send()
            .await
            .map_err(|e| self.error(key, e))?;
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
        assert_eq!(
            sink.existing("a/b.png", "r1").await.unwrap(),
            Stored::Nothing
        );
        let loc = sink
            .put("a/b.png", b"png", "image/png", "r1")
            .await
            .unwrap();
        assert_eq!(
            sink.existing("a/b.png", "r1").await.unwrap(),
            Stored::Ours(loc.clone())
        );
        // Another request naming the same key does not take it for its own.
        assert_eq!(
            sink.existing("a/b.png", "r2").await.unwrap(),
            Stored::Other(Some("r1".into()))
        );
        assert_eq!(std::fs::read(&loc).unwrap(), b"png");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// No permission or a read-only folder is a permanent error (the request fails once
    /// with it); anything else is retried.
    #[test]
    fn io_errors_are_classified() {
        use std::io::{Error, ErrorKind};
        for (kind, permanent) in [
            (ErrorKind::PermissionDenied, true),
            (ErrorKind::ReadOnlyFilesystem, true),
            (ErrorKind::StorageFull, false),
            (ErrorKind::TimedOut, false),
        ] {
            assert_eq!(
                SinkError::io("x", &Error::from(kind)).permanent,
                permanent,
                "{kind:?}"
            );
        }
    }
}
