//! Pacer's core: everything that decides or describes, with no Kubernetes, Lambda or AWS
//! SDK in sight (those live at the edges and speak these types).
//!
//! - [`config`]: the compiled configuration (pools and chains) and its layout in Redis,
//!   written by the operator or `pacer apply` and watched by every replica.
//! - [`connection`]: the one way into Redis: a standalone server or a Redis Cluster,
//!   detected from any node's URL.
//! - [`keys`]: every Redis key Pacer writes and the hash tag that keeps the keys of one
//!   script or transaction in one Cluster slot.
//! - [`pacific`]: the provider's calendar day (requests per day reset at midnight in
//!   America/Los_Angeles), with 23 h and 25 h days computed from the tz database.
//! - [`provider`]: the [`provider::ImageProvider`] trait every backend implements, its
//!   request and response, and [`provider::ProviderError`], whose variants say whether to
//!   retry, fall through to the next model, fail the request or alert an operator.
//! - [`gemini`]: the Gemini `generateContent` client, its wire types and total decoders.
//! - [`openai`]: an OpenAI-compatible images endpoint behind the same trait.
//! - [`models`]: the one table of model facts: sizes, aspect ratios, tokens and prices per
//!   size, default limits per tier, retirement dates. Everything that judges or prices a
//!   request reads it.
//! - [`quota`]: the quota model: dimensions, limits and windows, tiers, and headroom
//!   (applied once, when a pool's limits become a [`quota::ModelQuota`]).
//! - [`limiter`]: the global limiter every replica books capacity in before it calls the
//!   provider: the [`limiter::Limiter`] trait, its Redis implementation (one Lua script per
//!   decision), its in-memory twin on an injected clock, and the failure modes for when
//!   Redis is unreachable.
//! - [`measure`]: the most in any window, windows over a limit, percentiles (benchmarks,
//!   `pacer loadtest` and the tests count the same way).
//! - [`process`]: one tracing set-up and one shutdown signal for every binary.
//! - [`sync`]: locking that survives a panicking holder.
pub mod config;
pub mod connection;
pub mod gemini;
pub mod keys;
pub mod limiter;
pub mod measure;
pub mod models;
pub mod openai;
pub mod pacific;
pub mod process;
pub mod provider;
pub mod quota;
pub mod sync;
