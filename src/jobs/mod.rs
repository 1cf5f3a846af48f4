//! jobs
pub mod trainer;
