//! Jobs: the queue semantics (claim, lease, heartbeat, cancel, resume, reaper) and the runner
//! that drives a `Trainer` for each claimed job.

pub mod device;
pub mod observer;
pub mod qlora;
pub mod reaper;
pub mod runner;
pub mod trainer;

pub use reaper::Reaper;
pub use runner::{Runner, RunnerConfig};
pub use trainer::{TrainError, TrainOutcome, TrainRequest, Trainer};
