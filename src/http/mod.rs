//! http
pub mod dashboard;
