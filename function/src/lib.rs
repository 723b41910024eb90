//! Pacer's request path: the handler shared by the SQS worker, the Lambda entry point
//! (`pacer-lambda`, built here) and the `pacer` command line (the `cli` crate). It takes a
//! compiled configuration and depends on `pacer-core` only.
//!
//! - [`message`]: the generation request (an SQS message body), parsed strictly.
//! - [`sink`]: where images are stored: S3 or a local folder.
//! - [`outcome`]: what became of a delivery, and so what the queue does with it.
//! - [`queue`]: the queue a worker polls: SQS, or an in-memory one with SQS's semantics.
//! - [`worker`]: the SQS worker: long polling, bounded concurrency, visibility, drain.
//! - [`handler`]: the request handler and chain executor every entry point shares.
//! - [`lambda`]: the Lambda handler: an SQS batch in, `batchItemFailures` out.
//! - [`metrics`]: Prometheus metrics and the health endpoint.
//! - [`runtime`]: assembling a replica (config source, limiter, providers, sink) from settings.
//! - [`record`]: result records and generation claims (idempotency), in Redis or memory.
pub mod handler;
pub mod lambda;
pub mod message;
pub mod metrics;
pub mod outcome;
pub mod queue;
pub mod record;
pub mod runtime;
pub mod sink;
pub mod worker;
