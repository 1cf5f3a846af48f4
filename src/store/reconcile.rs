//! The start-up check of the database against the files on disk.
//!
//! Every file is written under a temporary name and renamed into place, so a crash can leave
//! two things behind: a temporary file or directory (`*.tmp`) nobody will finish, and (if a
//! file was removed by hand or a disk was restored from an older copy) rows whose files are
//! gone. On start the service:
//! - flags checkpoint rows whose directory is missing (`file_missing_at`; a resuming job skips
//!   them, the checkpoint list shows them as missing);
//! - logs dataset and adapter rows whose files are missing (they answer 404/errors on use);
//! - removes orphan temporary entries: any under the work directory of a job that is not
//!   running, and any other one older than [`ORPHAN_AGE`] (another process sharing the data
//!   directory may be writing a young one right now).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::files::DataDir;
use super::{Result, Store};

/// A temporary entry older than this, outside the work directory of a running job, is an
/// orphan of an interrupted write.
pub const ORPHAN_AGE: Duration = Duration::from_secs(10 * 60);

/// What the check found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub checkpoints_flagged: usize,
    pub datasets_missing: usize,
    pub adapters_missing: usize,
    pub temp_removed: usize,
}

impl Store {
    /// Compares rows with files and removes orphan temporary entries; see the module docs.
    pub async fn reconcile(&self, dirs: &DataDir, now: i64) -> Result<Reconciled> {
        let mut out = Reconciled::default();
        for (id, path) in self.unflagged_checkpoint_paths().await? {
            if !tokio::fs::try_exists(&path).await.unwrap_or(true) {
                tracing::warn!(checkpoint_id = %id, path, "checkpoint directory is missing; flagged");
                self.flag_checkpoint_missing(&id, now).await?;
                out.checkpoints_flagged += 1;
            }
        }
        let datasets: Vec<(String, String)> =
            sqlx::query_as("SELECT id, path FROM datasets").fetch_all(&self.pool).await?;
        for (id, path) in datasets {
            if !tokio::fs::try_exists(&path).await.unwrap_or(true) {
                tracing::warn!(dataset_id = %id, path, "dataset file is missing; jobs on it will fail");
                out.datasets_missing += 1;
            }
        }
        for a in self.list_adapters().await? {
            if !tokio::fs::try_exists(&a.path).await.unwrap_or(true) {
                tracing::warn!(adapter_id = %a.id, path = a.path, "adapter directory is missing");
                out.adapters_missing += 1;
            }
        }
        let running: HashSet<String> =
            sqlx::query_as::<_, (String,)>("SELECT id FROM jobs WHERE status = 'running'")
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .map(|(id,)| id)
                .collect();
        let root = dirs.root().to_path_buf();
        out.temp_removed = tokio::task::spawn_blocking(move || remove_orphans(&root, &running, SystemTime::now()))
            .await
            .unwrap_or(0);
        Ok(out)
    }
}

/// Removes orphan temporary entries under the data directory; returns how many.
fn remove_orphans(root: &Path, running: &HashSet<String>, now: SystemTime) -> usize {
    let mut removed = 0;
    for dir in ["datasets", "adapters"] {
        for tmp in temp_entries(&root.join(dir), 1) {
            if older_than(&tmp, ORPHAN_AGE, now) {
                removed += remove(&tmp);
            }
        }
    }
    let Ok(jobs) = std::fs::read_dir(root.join("jobs")) else { return removed };
    for job in jobs.flatten() {
        let idle = !running.contains(job.file_name().to_string_lossy().as_ref());
        for tmp in temp_entries(&job.path(), 3) {
            if idle || older_than(&tmp, ORPHAN_AGE, now) {
                removed += remove(&tmp);
            }
        }
    }
    removed
}

/// Entries named `*.tmp` under `dir`, looking `depth` levels down (not into the temporaries).
fn temp_entries(dir: &Path, depth: usize) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for e in entries.flatten() {
        let path = e.path();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if e.file_name().to_string_lossy().ends_with(".tmp") {
            found.push(path);
        } else if is_dir && depth > 1 {
            found.extend(temp_entries(&path, depth - 1));
        }
    }
    found
}

fn older_than(path: &Path, age: Duration, now: SystemTime) -> bool {
    std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| now.duration_since(t).is_ok_and(|d| d >= age))
}

fn remove(path: &Path) -> usize {
    let is_dir = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
    let done = if is_dir { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    match done {
        Ok(()) => {
            tracing::info!(path = %path.display(), "removed an orphan temporary file");
            1
        }
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "could not remove an orphan temporary file");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn young_temporaries_stay_unless_their_job_is_idle() {
        let root = tempfile::tempdir().unwrap();
        let d = DataDir::new(root.path());
        d.create().unwrap();
        let young_dataset = d.datasets().join("x.jsonl.abc.tmp");
        std::fs::write(&young_dataset, b"partial").unwrap();
        let kept = d.datasets().join("y.jsonl");
        std::fs::write(&kept, b"{}").unwrap();
        let idle_ckpt = d.job_dir("idle").join("checkpoints").join("step-00000001.tmp");
        let busy_ckpt = d.job_dir("busy").join("checkpoints").join("step-00000001.tmp");
        std::fs::create_dir_all(&idle_ckpt).unwrap();
        std::fs::create_dir_all(&busy_ckpt).unwrap();
        let running: HashSet<String> = ["busy".to_string()].into();

        assert_eq!(remove_orphans(root.path(), &running, SystemTime::now()), 1);
        assert!(!idle_ckpt.exists() && busy_ckpt.exists() && young_dataset.exists() && kept.exists());

        // An hour later every temporary is an orphan; finished files stay.
        let later = SystemTime::now() + Duration::from_secs(3600);
        assert_eq!(remove_orphans(root.path(), &running, later), 2);
        assert!(!busy_ckpt.exists() && !young_dataset.exists() && kept.exists());
    }
}
