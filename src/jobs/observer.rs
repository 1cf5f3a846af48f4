//! The runner's `TrainObserver`: the trainer calls it on its blocking thread; every call
//! becomes a message to an async task that writes job events, progress and checkpoint rows.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::trainer::{EvalMetrics, TrainObserver};
use crate::store::artifacts::Artifacts;
use crate::store::{now_ms, NewEvent, Store};

#[derive(Debug)]
pub(crate) enum Report {
    Step { step: u64, total_steps: u64, epoch: f64, loss: f64, learning_rate: f64 },
    Eval { step: u64, metrics: EvalMetrics },
    Checkpoint { step: u64, path: PathBuf, metrics: Option<EvalMetrics> },
    Log(String),
}

/// Why the trainer should stop. Set by the heartbeat (lease lost, job cancelled), by the report
/// writer (an update found the lease gone) or by shutdown.
#[derive(Debug, Default)]
pub(crate) struct StopFlags {
    pub lease_lost: AtomicBool,
}

pub(crate) struct JobObserver {
    pub tx: mpsc::UnboundedSender<Report>,
    pub flags: Arc<StopFlags>,
    pub shutdown: CancellationToken,
}

impl JobObserver {
    fn send(&self, r: Report) {
        // The writer lives until every observer is dropped; a send error means it failed and
        // was already logged.
        let _ = self.tx.send(r);
    }
}

impl TrainObserver for JobObserver {
    fn on_step(&self, step: u64, total_steps: u64, epoch: f64, loss: f64, learning_rate: f64) {
        self.send(Report::Step { step, total_steps, epoch, loss, learning_rate });
    }
    fn on_eval(&self, step: u64, metrics: &EvalMetrics) {
        self.send(Report::Eval { step, metrics: *metrics });
    }
    fn on_checkpoint(&self, step: u64, path: &Path, metrics: Option<&EvalMetrics>) {
        self.send(Report::Checkpoint { step, path: path.to_path_buf(), metrics: metrics.copied() });
    }
    fn on_log(&self, message: &str) {
        self.send(Report::Log(message.to_string()));
    }
    fn should_stop(&self) -> bool {
        self.shutdown.is_cancelled() || self.flags.lease_lost.load(Ordering::Relaxed)
    }
}

/// Turns a finite float into JSON, non-finite values into null.
fn num(x: f64) -> serde_json::Value {
    serde_json::Number::from_f64(x).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
}

fn eval_json(step: u64, m: &EvalMetrics) -> serde_json::Value {
    json!({
        "step": step,
        "log_loss": num(m.log_loss),
        "accuracy": num(m.accuracy),
        "balanced_accuracy": num(m.balanced_accuracy),
        "rows": m.rows,
    })
}

/// Writes reports until every sender is gone. Store errors are logged, not fatal: losing one
/// progress line must not kill a training run; a lost lease stops it. Every write says which
/// worker makes it, so once the lease is lost (reaped, or the job cancelled) nothing more is
/// written: no step after the cancel in the job's log, no checkpoint row of a stale attempt.
pub(crate) async fn write_reports(
    store: Store,
    artifacts: Artifacts,
    job_id: String,
    worker: String,
    attempt: i64,
    flags: Arc<StopFlags>,
    mut rx: mpsc::UnboundedReceiver<Report>,
) {
    let event = |level: &'static str, kind: &'static str, message: String, data: Option<serde_json::Value>| NewEvent {
        job_id: job_id.clone(),
        attempt,
        level,
        kind,
        message,
        data,
    };
    let lost = || flags.lease_lost.store(true, std::sync::atomic::Ordering::Relaxed);
    // a report of a worker that no longer holds the job: nothing was written
    let held = |written: Option<i64>| {
        if written.is_none() {
            lost();
        }
        written.is_some()
    };
    while let Some(report) = rx.recv().await {
        let now = now_ms();
        let result = match report {
            Report::Step { step, total_steps, epoch, loss, learning_rate } => {
                let data = json!({
                    "step": step, "total_steps": total_steps, "epoch": num(epoch),
                    "loss": num(loss), "learning_rate": num(learning_rate),
                });
                let msg = format!("step {step}/{total_steps} loss {loss:.4} lr {learning_rate:.3e}");
                match store.insert_event_held(&event("info", "train_step", msg, Some(data)), &worker, now).await {
                    Ok(written) if !held(written) => Ok(()),
                    Ok(_) => {
                        let metrics = json!({ "train_loss": num(loss), "learning_rate": num(learning_rate) });
                        store
                            .update_job_progress(&job_id, &worker, step as i64, total_steps as i64, epoch, &metrics, now)
                            .await
                            .map(|still| {
                                if !still {
                                    lost();
                                }
                            })
                    }
                    Err(e) => Err(e),
                }
            }
            Report::Eval { step, metrics } => {
                let msg = format!(
                    "eval at step {step}: log loss {:.4}, accuracy {:.3}, balanced accuracy {:.3} ({} rows)",
                    metrics.log_loss, metrics.accuracy, metrics.balanced_accuracy, metrics.rows
                );
                let latest = json!({
                    "eval_step": step,
                    "eval_log_loss": num(metrics.log_loss),
                    "eval_accuracy": num(metrics.accuracy),
                    "eval_balanced_accuracy": num(metrics.balanced_accuracy),
                });
                let r = store.insert_event_held(&event("info", "eval", msg, Some(eval_json(step, &metrics))), &worker, now).await;
                match r {
                    Ok(written) if !held(written) => Ok(()),
                    Ok(_) => store.merge_job_metrics(&job_id, &worker, &latest, now).await.map(|_| ()),
                    Err(e) => Err(e),
                }
            }
            Report::Checkpoint { step, path, metrics } => {
                // Not shared once the job is known to have moved on (the next attempt writes the
                // same keys); this narrows the window, the row's insert below closes it. A store
                // error here decides nothing.
                match store.get_job(&job_id).await {
                    Ok(Some(j)) if j.lock_by.as_deref() == Some(worker.as_str()) && j.status == "running" => {}
                    Ok(_) => {
                        lost();
                        continue;
                    }
                    Err(e) => tracing::warn!(error = %e, "could not check the lease before sharing a checkpoint"),
                }
                // Shared before it is recorded: a recorded checkpoint can be resumed anywhere.
                if let Err(e) = artifacts.publish(&path).await {
                    tracing::warn!(error = %e, step, "could not publish the checkpoint; not recording it");
                    continue;
                }
                let m = metrics.as_ref().map(|m| eval_json(step, m));
                let path_str = path.to_string_lossy().into_owned();
                match store.insert_checkpoint_held(&job_id, &worker, attempt, step as i64, &path_str, m.as_ref(), now).await {
                    Ok(None) => {
                        lost();
                        Ok(())
                    }
                    Ok(Some(c)) => {
                        let data = Some(json!({ "step": step, "checkpoint_id": c.id }));
                        let e = event("info", "checkpoint", format!("checkpoint at step {step}"), data);
                        store.insert_event_held(&e, &worker, now).await.map(|w| {
                            held(w);
                        })
                    }
                    Err(e) => Err(e),
                }
            }
            Report::Log(message) => store.insert_event_held(&event("info", "log", message, None), &worker, now).await.map(|w| {
                held(w);
            }),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not record training report");
        }
    }
}
