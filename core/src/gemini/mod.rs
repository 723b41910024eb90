//! The Gemini API client for image generation (`generateContent`).
//!
//! - [`wire`]: the JSON types, as Google sends and takes them.
//! - [`decode`]: total decoders from status and bytes to a response or a
//!   [`ProviderError`](crate::provider::ProviderError), plus the duration formats Google
//!   uses (`RetryInfo`'s protobuf durations, Go durations in messages).
//! - [`client`]: [`GeminiClient`], one HTTP call per `generate`, no retries inside.
//! - [`vertex`]: the same calls on Vertex AI (project route, OAuth access tokens).
pub mod client;
pub mod decode;
pub mod vertex;
pub mod wire;

pub use client::{ApiVersion, GeminiClient, GeminiConfig};
pub use decode::{decode_error, decode_response};
