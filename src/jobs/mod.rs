//! jobs
pub mod trainer;
pub mod qlora;
