//! Arbiter: an HTTP training-and-inference service for pairwise preference prediction.

pub mod bench;
pub mod config;
pub mod data;
pub mod http;
pub mod jobs;
pub mod ml;
pub mod store;
