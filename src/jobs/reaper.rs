//! Expired leases go back to the queue (or fail once a job's attempts are spent), and workers
//! silent for long are forgotten. This runs on a task of its own in every process, API nodes
//! without a worker included: a worker busy with a job of hours still reaps the leases of
//! workers that died meanwhile.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::runner::record_event;
use crate::store::{now_ms, JobStatus, Store};

pub struct Reaper {
    store: Store,
    lease_ms: i64,
    poll: Duration,
}

impl Reaper {
    /// Reaps every `poll`, leases of `lease` as the workers hold them.
    pub fn new(store: Store, lease: Duration, poll: Duration) -> Reaper {
        Reaper { store, lease_ms: lease.as_millis().min(i64::MAX as u128) as i64, poll }
    }

    /// Runs until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        let mut forgot_at: Option<Instant> = None;
        loop {
            self.reap().await;
            if forgot_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                self.forget_silent_workers().await;
                forgot_at = Some(Instant::now());
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
    }

    async fn reap(&self) {
        let reaped = match self.store.reap_expired_jobs(now_ms()).await {
            Ok(reaped) => reaped,
            Err(e) => return tracing::warn!(error = %e, "reaping expired leases failed"),
        };
        for r in reaped {
            let failed = r.status == JobStatus::Failed.as_str();
            let msg = if failed {
                format!(
                    "lease of attempt {} expired; no attempts left ({} lost leases allowed, {} attempts given back at a shutdown): failed",
                    r.attempt, r.max_attempts, r.released_attempts
                )
            } else {
                format!("lease of attempt {} expired (worker silent); back in the queue", r.attempt)
            };
            tracing::warn!(job_id = %r.id, attempt = r.attempt, status = %r.status, "reaped expired lease");
            record_event(&self.store, &r.id, r.attempt, if failed { "error" } else { "warn" }, msg).await;
        }
    }

    /// Drops the registrations of workers gone silent for ten leases (at least ten minutes).
    async fn forget_silent_workers(&self) {
        let stale = self.lease_ms.saturating_mul(10).max(600_000);
        if let Err(e) = self.store.forget_workers(now_ms() - stale).await {
            tracing::warn!(error = %e, "forgetting silent workers failed");
        }
    }
}
