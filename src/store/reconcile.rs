//! The start-up check of the database against the files on disk.
//!
//! Every file is written under a temporary name and renamed into place, so a crash can leave
//! two things behind: a temporary file or directory (`*.tmp`, or `*.part` for a download from
//! the shared artifact store) nobody will finish, and (if a file was removed by hand or a disk
//! was restored from an older copy) rows whose files are gone. On start the service:
//! - flags checkpoint rows whose directory is missing (`file_missing_at`; a resuming job skips
//!   them, the checkpoint list shows them as missing);
//! - logs dataset and adapter rows whose files are missing (they answer 404/errors on use);
//! - removes orphan temporary entries: any under the work directory of a job that is not
//!   running, and any other one older than [`ORPHAN_AGE`] (another process sharing the data
//!   directory may be writing a young one right now);
//! - removes dataset files and adapter directories that no row names, older than
//!   [`ORPHAN_AGE`] (a crash between the rename and the insert; a young one may be an upload
//!   or a job finishing right now). Only names the service gives (an id) count: anything else
//!   put there by hand stays.
//!
//! With a shared artifact store the data directory is a working copy: only the temporaries are
//! removed ([`remove_temporaries`]).

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
    /// Dataset files and adapter directories without a row, removed.
    pub unreferenced_removed: usize,
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
        let sql = "SELECT id, path FROM datasets";
        let datasets: Vec<(String, String)> = with_pool!(self, pool => sqlx::query_as(sql).fetch_all(pool).await)?;
        let mut known: HashSet<String> = HashSet::new();
        for (id, path) in datasets {
            known.extend(file_name(&path));
            if !tokio::fs::try_exists(&path).await.unwrap_or(true) {
                tracing::warn!(dataset_id = %id, path, "dataset file is missing; jobs on it will fail");
                out.datasets_missing += 1;
            }
        }
        for a in self.list_adapters().await? {
            known.extend(file_name(&a.path));
            if !tokio::fs::try_exists(&a.path).await.unwrap_or(true) {
                tracing::warn!(adapter_id = %a.id, path = a.path, "adapter directory is missing");
                out.adapters_missing += 1;
            }
        }
        let running = self.running_job_ids().await?;
        let root = dirs.root().to_path_buf();
        let (temp, unreferenced) =
            tokio::task::spawn_blocking(move || remove_orphans(&root, &running, &known, SystemTime::now()))
                .await
                .unwrap_or((0, 0));
        out.temp_removed = temp;
        out.unreferenced_removed = unreferenced;
        Ok(out)
    }
}

fn file_name(path: &str) -> Option<String> {
    Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Removes the orphan temporary entries under the data directory `root` (see the module docs);
/// returns how many.
pub async fn remove_temporaries(store: &Store, root: &Path) -> Result<usize> {
    let running = store.running_job_ids().await?;
    let root = root.to_path_buf();
    Ok(tokio::task::spawn_blocking(move || remove_temp(&root, &running, SystemTime::now())).await.unwrap_or(0))
}

impl Store {
    async fn running_job_ids(&self) -> Result<HashSet<String>> {
        let sql = "SELECT id FROM jobs WHERE status = 'running'";
        Ok(with_pool!(self, pool => sqlx::query_as::<_, (String,)>(sql).fetch_all(pool).await)?
            .into_iter()
            .map(|(id,)| id)
            .collect())
    }
}

/// Whether `name` is one the service gives an entry of `dir`: `ID.jsonl` for a dataset, `ID`
/// for an adapter directory.
fn service_named(dir: &str, name: &str) -> bool {
    let id = if dir == "datasets" { name.strip_suffix(".jsonl") } else { Some(name) };
    id.is_some_and(|id| uuid::Uuid::try_parse(id).is_ok())
}

fn remove_temp(root: &Path, running: &HashSet<String>, now: SystemTime) -> usize {
    let mut temp = 0;
    for dir in ["datasets", "adapters"] {
        for tmp in temp_entries(&root.join(dir), 1) {
            if older_than(&tmp, ORPHAN_AGE, now) {
                temp += remove(&tmp);
            }
        }
    }
    if let Ok(jobs) = std::fs::read_dir(root.join("jobs")) {
        for job in jobs.flatten() {
            let idle = !running.contains(job.file_name().to_string_lossy().as_ref());
            for tmp in temp_entries(&job.path(), 3) {
                if idle || older_than(&tmp, ORPHAN_AGE, now) {
                    temp += remove(&tmp);
                }
            }
        }
    }
    temp
}

/// Removes orphan temporary entries, then old dataset files and adapter directories that no
/// row names (`known` holds the file names rows point at); returns how many of each.
fn remove_orphans(root: &Path, running: &HashSet<String>, known: &HashSet<String>, now: SystemTime) -> (usize, usize) {
    let temp = remove_temp(root, running, now);
    let mut unreferenced = 0;
    for dir in ["datasets", "adapters"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if service_named(dir, &name) && !known.contains(&name) && older_than(&e.path(), ORPHAN_AGE, now) {
                unreferenced += remove(&e.path());
            }
        }
    }
    (temp, unreferenced)
}

/// Temporary entries (`*.tmp`, `*.part`) under `dir`, looking `depth` levels down (not into
/// the temporaries).
fn temp_entries(dir: &Path, depth: usize) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for e in entries.flatten() {
        let path = e.path();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") || name.ends_with(".part") {
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

        let unnamed = d.datasets().join("z.jsonl");
        std::fs::write(&unnamed, b"{}").unwrap();
        let known: HashSet<String> = ["y.jsonl".to_string()].into();

        assert_eq!(remove_orphans(root.path(), &running, &known, SystemTime::now()), (1, 0));
        assert!(!idle_ckpt.exists() && busy_ckpt.exists() && young_dataset.exists() && kept.exists() && unnamed.exists());

        // An hour later every temporary is an orphan (a download's `.part` too), and so is a
        // file no row names if the service named it; files rows name stay, and so does what
        // was put there by hand.
        let download = d.datasets().join(".y.jsonl.0123abcd.part");
        std::fs::write(&download, b"half").unwrap();
        let own = uuid::Uuid::now_v7().to_string();
        std::fs::create_dir_all(d.adapter_dir(&own)).unwrap();
        let by_hand = d.adapter_dir("my-peft-adapter");
        std::fs::create_dir_all(&by_hand).unwrap();
        let later = SystemTime::now() + Duration::from_secs(3600);
        assert_eq!(remove_orphans(root.path(), &running, &known, later), (3, 1));
        assert!(!busy_ckpt.exists() && !young_dataset.exists() && !download.exists() && kept.exists());
        assert!(unnamed.exists(), "z.jsonl is no name the service gives");
        assert!(!d.adapter_dir(&own).exists() && by_hand.exists());
    }
}
