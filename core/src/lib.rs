//! Pacer's core: everything that decides or describes, with no Kubernetes, Lambda or AWS
//! SDK in sight (those live at the edges and speak these types).
//!
//! - [`config`]: the compiled configuration (pools and chains) and its layout in Redis,
//!   written by the operator or `pacer apply` and watched by every replica.
//! - [`pacific`]: the provider's calendar day (requests per day reset at midnight in
//!   America/Los_Angeles), with 23 h and 25 h days computed from the tz database.
pub mod config;
pub mod pacific;
