//! Artifacts (dataset rows, checkpoints, adapters) behind one interface, so that API nodes and
//! workers on different machines share them.
//!
//! Every process works on files under its own data directory, as before. Without an artifact
//! store (the default) that directory is all there is, and the paths recorded in the database
//! are used as they are. With one (`--artifact-store s3://bucket/prefix`, `file:///shared/dir`,
//! or `memory://` within one process) every artifact a process writes is also published
//! under its path relative to the data directory (`datasets/ID.jsonl`, `adapters/ID/...`,
//! `jobs/ID/checkpoints/step-N/...`) before the row that names it is committed, and a process
//! that needs one it does not have downloads it into its own data directory first. Object keys
//! are derived from ids, never from the absolute paths another machine recorded. S3 settings
//! come from the usual `AWS_*` variables (`AWS_ENDPOINT` and `AWS_ALLOW_HTTP=true` for an
//! S3-compatible server).

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact store {url:?}: {reason}")]
    Config { url: String, reason: String },
    #[error("artifact store: {0}")]
    Remote(#[from] object_store::Error),
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} is not under the data directory")]
    Outside(PathBuf),
    #[error("artifact {0} is in neither the data directory nor the artifact store")]
    Missing(String),
}

type Result<T, E = ArtifactError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io { path: path.to_path_buf(), source }
}

#[derive(Clone)]
struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: Key,
    url: String,
}

/// The data directory, and the shared artifact store when one is configured.
#[derive(Clone)]
pub struct Artifacts {
    root: PathBuf,
    remote: Option<Remote>,
}

impl std::fmt::Debug for Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Artifacts").field("root", &self.root).field("store", &self.describe()).finish()
    }
}

impl Artifacts {
    /// Only the local data directory.
    pub fn local(root: impl Into<PathBuf>) -> Artifacts {
        Artifacts { root: root.into(), remote: None }
    }

    /// The data directory `root` plus the store at `url`: `s3://bucket[/prefix]`,
    /// `file:///directory` or `memory://`; None means local only.
    pub fn open(url: Option<&str>, root: impl Into<PathBuf>) -> Result<Artifacts> {
        let root = root.into();
        let Some(url) = url.filter(|u| !u.trim().is_empty()) else { return Ok(Artifacts::local(root)) };
        let config = |reason: String| ArtifactError::Config { url: url.to_string(), reason };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| config("expected scheme://...".into()))?;
        let (store, prefix): (Arc<dyn ObjectStore>, &str) = match scheme {
            "s3" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(config("no bucket named".into()));
                }
                let s3 = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| config(e.to_string()))?;
                (Arc::new(s3), prefix)
            }
            "file" => {
                if !rest.starts_with('/') {
                    return Err(config("a file:// store needs an absolute path".into()));
                }
                std::fs::create_dir_all(rest).map_err(|e| config(e.to_string()))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(rest).map_err(|e| config(e.to_string()))?;
                (Arc::new(fs), "")
            }
            "memory" => (Arc::new(object_store::memory::InMemory::new()), rest),
            other => return Err(config(format!("unsupported scheme {other:?}: use s3, file or memory"))),
        };
        let prefix = Key::parse(prefix.trim_matches('/')).map_err(|e| config(e.to_string()))?;
        Ok(Artifacts { root, remote: Some(Remote { store, prefix, url: url.to_string() }) })
    }

    pub fn is_shared(&self) -> bool {
        self.remote.is_some()
    }

    /// `local` or the store's URL, for logs.
    pub fn describe(&self) -> String {
        self.remote.as_ref().map_or_else(|| "local".to_string(), |r| r.url.clone())
    }

    /// The local copy of dataset `id`'s rows (`stored`: the path in its row).
    pub async fn dataset_file(&self, id: &str, stored: &str) -> Result<PathBuf> {
        if self.remote.is_none() {
            return Ok(PathBuf::from(stored));
        }
        let rel = format!("datasets/{id}.jsonl");
        self.fetch_file(&rel).await
    }

    /// The local copy of adapter `id`'s directory.
    pub async fn adapter_dir(&self, id: &str, stored: &str) -> Result<PathBuf> {
        if self.remote.is_none() {
            return Ok(PathBuf::from(stored));
        }
        self.fetch_dir(&format!("adapters/{id}")).await
    }

    /// The names of the files in adapter `id`'s directory (recorded at `stored`), read where
    /// they are: the local copy if this node has one, else a listing of the shared store, which
    /// downloads nothing.
    pub async fn adapter_file_names(&self, id: &str, stored: &str) -> Result<Vec<String>> {
        let local = self.adapter_local(id, stored);
        if let Ok(mut entries) = tokio::fs::read_dir(&local).await {
            let mut names = Vec::new();
            while let Some(e) = entries.next_entry().await.map_err(io(&local))? {
                if e.file_type().await.is_ok_and(|t| t.is_file()) {
                    names.push(e.file_name().to_string_lossy().into_owned());
                }
            }
            return Ok(names);
        }
        let Some(remote) = &self.remote else { return Err(ArtifactError::Missing(format!("adapters/{id}"))) };
        let prefix = self.key(remote, &format!("adapters/{id}"))?;
        let objects: Vec<_> = remote.store.list(Some(&prefix)).try_collect().await?;
        if objects.is_empty() {
            return Err(ArtifactError::Missing(format!("adapters/{id}")));
        }
        Ok(objects
            .iter()
            .filter_map(|m| {
                let parts: Vec<_> = m.location.prefix_match(&prefix)?.collect();
                (parts.len() == 1).then(|| parts[0].as_ref().to_string())
            })
            .collect())
    }

    /// The bytes of file `name` of adapter `id` (a small one: its config), read where it is
    /// without fetching the rest of the directory; None when the adapter has no such file.
    pub async fn adapter_file_bytes(&self, id: &str, stored: &str, name: &str) -> Result<Option<Vec<u8>>> {
        let local = self.adapter_local(id, stored);
        if tokio::fs::metadata(&local).await.is_ok_and(|m| m.is_dir()) || self.remote.is_none() {
            let path = local.join(name);
            return match tokio::fs::read(&path).await {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(ArtifactError::Io { path, source: e }),
            };
        }
        let Some(remote) = &self.remote else { return Ok(None) };
        match remote.store.get(&self.key(remote, &format!("adapters/{id}/{name}"))?).await {
            Ok(got) => Ok(Some(got.bytes().await?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Where adapter `id`'s directory is, or would be fetched to, on this node.
    fn adapter_local(&self, id: &str, stored: &str) -> PathBuf {
        if self.remote.is_none() {
            PathBuf::from(stored)
        } else {
            self.root.join("adapters").join(id)
        }
    }

    /// The local copy of a checkpoint directory of job `job_id` recorded at `stored`, if it
    /// exists anywhere.
    pub async fn checkpoint_dir(&self, job_id: &str, stored: &str) -> Result<Option<PathBuf>> {
        let stored_path = PathBuf::from(stored);
        if self.remote.is_none() {
            return Ok(stored_path.is_dir().then_some(stored_path));
        }
        // The part after `jobs/JOB_ID/` of the writer's path names the same place here.
        let parts: Vec<String> =
            stored_path.components().filter_map(|c| c.as_os_str().to_str().map(str::to_string)).collect();
        let Some(at) = parts.windows(2).rposition(|w| w[0] == "jobs" && w[1] == job_id) else {
            return Ok(None);
        };
        let rel = ["jobs", job_id].iter().map(|s| s.to_string()).chain(parts[at + 2..].iter().cloned()).collect::<Vec<_>>();
        match self.fetch_dir(&rel.join("/")).await {
            Ok(dir) => Ok(Some(dir)),
            Err(ArtifactError::Missing(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Publishes the file or directory tree at `local` (under the data directory) to the
    /// shared store; nothing to do without one.
    pub async fn publish(&self, local: &Path) -> Result<()> {
        let Some(remote) = &self.remote else { return Ok(()) };
        let rel = self.relative(local)?;
        let meta = tokio::fs::metadata(local).await.map_err(io(local))?;
        let files = if meta.is_dir() {
            let dir = local.to_path_buf();
            tokio::task::spawn_blocking(move || list_files(&dir))
                .await
                .map_err(|e| ArtifactError::Io { path: local.to_path_buf(), source: std::io::Error::other(e) })??
        } else {
            vec![local.to_path_buf()]
        };
        for file in files {
            let key = self.key(remote, &self.relative(&file)?)?;
            let bytes = tokio::fs::read(&file).await.map_err(io(&file))?;
            remote.store.put(&key, PutPayload::from(bytes)).await?;
        }
        tracing::debug!(artifact = %rel, "published");
        Ok(())
    }

    /// Removes the shared copy of the file or directory tree at `local`.
    pub async fn unpublish(&self, local: &Path) -> Result<()> {
        let Some(remote) = &self.remote else { return Ok(()) };
        let key = self.key(remote, &self.relative(local)?)?;
        // A directory is the objects under its key; a file is the object at it.
        let under: Vec<_> = remote.store.list(Some(&key)).try_collect().await?;
        if under.is_empty() {
            return match remote.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        for meta in under {
            remote.store.delete(&meta.location).await?;
        }
        Ok(())
    }

    fn key(&self, remote: &Remote, rel: &str) -> Result<Key> {
        let mut key = remote.prefix.clone();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            key = key.child(part);
        }
        Ok(key)
    }

    /// `local` relative to the data directory, `/`-separated; only plain components.
    fn relative(&self, local: &Path) -> Result<String> {
        let rest = local.strip_prefix(&self.root).map_err(|_| ArtifactError::Outside(local.to_path_buf()))?;
        let mut parts = Vec::new();
        for c in rest.components() {
            match c {
                Component::Normal(s) => parts.push(s.to_str().ok_or_else(|| ArtifactError::Outside(local.to_path_buf()))?),
                _ => return Err(ArtifactError::Outside(local.to_path_buf())),
            }
        }
        Ok(parts.join("/"))
    }

    /// The local copy of file `rel`, downloaded (to a temporary name, then renamed) when missing.
    async fn fetch_file(&self, rel: &str) -> Result<PathBuf> {
        let local = self.root.join(rel);
        if tokio::fs::metadata(&local).await.is_ok_and(|m| m.is_file()) {
            return Ok(local);
        }
        let Some(remote) = &self.remote else { return Err(ArtifactError::Missing(rel.to_string())) };
        let key = self.key(remote, rel)?;
        let bytes = match remote.store.get(&key).await {
            Ok(got) => got.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Err(ArtifactError::Missing(rel.to_string())),
            Err(e) => return Err(e.into()),
        };
        let tmp = temp_sibling(&local);
        let placed = match write_file(&tmp, &bytes).await {
            Ok(()) => tokio::fs::rename(&tmp, &local).await.map_err(io(&local)),
            Err(e) => Err(e),
        };
        if placed.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        placed.map(|()| local)
    }

    /// The local copy of directory `rel`, downloaded whole (into a temporary directory, then
    /// renamed into place) when missing.
    async fn fetch_dir(&self, rel: &str) -> Result<PathBuf> {
        let local = self.root.join(rel);
        if tokio::fs::metadata(&local).await.is_ok_and(|m| m.is_dir()) {
            return Ok(local);
        }
        let Some(remote) = &self.remote else { return Err(ArtifactError::Missing(rel.to_string())) };
        let prefix = self.key(remote, rel)?;
        let objects: Vec<_> = remote.store.list(Some(&prefix)).try_collect().await?;
        if objects.is_empty() {
            return Err(ArtifactError::Missing(rel.to_string()));
        }
        let tmp = temp_sibling(&local);
        let result = async {
            for meta in &objects {
                let Some(parts) = meta.location.prefix_match(&prefix) else { continue };
                let mut target = tmp.clone();
                for part in parts {
                    let part = part.as_ref();
                    if part.is_empty() || part == "." || part == ".." {
                        return Err(ArtifactError::Missing(rel.to_string()));
                    }
                    target.push(part);
                }
                let bytes = remote.store.get(&meta.location).await?.bytes().await?;
                write_file(&target, &bytes).await?;
            }
            match tokio::fs::rename(&tmp, &local).await {
                Ok(()) => Ok(()),
                // Another task put it in place first: theirs is complete too.
                Err(_) if tokio::fs::metadata(&local).await.is_ok_and(|m| m.is_dir()) => {
                    let _ = tokio::fs::remove_dir_all(&tmp).await;
                    Ok(())
                }
                Err(e) => Err(ArtifactError::Io { path: local.clone(), source: e }),
            }
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
        }
        result.map(|()| local)
    }
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.part", uuid::Uuid::new_v4().simple()))
}

async fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(io(parent))?;
    }
    let mut f = tokio::fs::File::create(path).await.map_err(io(path))?;
    tokio::io::AsyncWriteExt::write_all(&mut f, bytes).await.map_err(io(path))?;
    f.sync_all().await.map_err(io(path))
}

/// Every file under `dir`, recursively.
fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io(&d))? {
            let entry = entry.map_err(io(&d))?;
            let path = entry.path();
            if entry.file_type().map_err(io(&path))?.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_mode_uses_recorded_paths_and_publishes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = Artifacts::open(None, dir.path()).unwrap();
        assert!(!a.is_shared());
        assert_eq!(a.dataset_file("x", "/elsewhere/x.jsonl").await.unwrap(), PathBuf::from("/elsewhere/x.jsonl"));
        a.publish(Path::new("/not/even/there")).await.unwrap();
    }

    #[tokio::test]
    async fn a_second_data_directory_gets_what_the_first_published() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let shared = tempfile::tempdir().unwrap();
        let url = format!("file://{}", shared.path().display());
        let a = Artifacts::open(Some(&url), one.path()).unwrap();
        let b = Artifacts::open(Some(&url), two.path()).unwrap();

        let rows = one.path().join("datasets").join("d1.jsonl");
        std::fs::create_dir_all(rows.parent().unwrap()).unwrap();
        std::fs::write(&rows, "{}\n").unwrap();
        a.publish(&rows).await.unwrap();
        let ckpt = one.path().join("jobs/j1/checkpoints/step-2");
        std::fs::create_dir_all(ckpt.join("inner")).unwrap();
        std::fs::write(ckpt.join("state.json"), "s").unwrap();
        std::fs::write(ckpt.join("inner/w.bin"), [1u8, 2, 3]).unwrap();
        a.publish(&ckpt).await.unwrap();

        let got = b.dataset_file("d1", &rows.to_string_lossy()).await.unwrap();
        assert_eq!(got, two.path().join("datasets/d1.jsonl"));
        assert_eq!(std::fs::read_to_string(&got).unwrap(), "{}\n");
        let got = b.checkpoint_dir("j1", &ckpt.to_string_lossy()).await.unwrap().expect("found");
        assert_eq!(got, two.path().join("jobs/j1/checkpoints/step-2"));
        assert_eq!(std::fs::read(got.join("inner/w.bin")).unwrap(), [1, 2, 3]);
        assert!(b.checkpoint_dir("j1", "/x/jobs/j1/checkpoints/step-9").await.unwrap().is_none());
        assert!(matches!(b.adapter_dir("nope", "/x").await, Err(ArtifactError::Missing(_))));
        assert!(matches!(a.publish(Path::new("/etc/passwd")).await, Err(ArtifactError::Outside(_))));

        a.unpublish(&ckpt).await.unwrap();
        let three = tempfile::tempdir().unwrap();
        let c = Artifacts::open(Some(&url), three.path()).unwrap();
        assert!(c.checkpoint_dir("j1", &ckpt.to_string_lossy()).await.unwrap().is_none(), "removed");
        assert!(Artifacts::open(Some("ftp://x"), one.path()).is_err());
        assert!(Artifacts::open(Some("s3://"), one.path()).is_err());
    }
}
