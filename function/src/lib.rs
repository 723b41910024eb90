//! Pacer's function: the request handler shared by the SQS worker, the Lambda handler and
//! the `pacer` command line.
//!
//! - [`cli`]: the command line's arguments (one clap struct, every flag also an env var).
pub mod cli;
