//! Files next to the database: dataset rows (JSONL of `ArenaRow`), job work directories and
//! adapter directories, all under the data directory. Writes are atomic: a temporary file in
//! the same directory, fsync, rename.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::data::ArenaRow;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} line {line}: not a stored dataset row: {source}")]
    Corrupt { path: PathBuf, line: usize, source: serde_json::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io { path: path.to_path_buf(), source }
}

/// The layout of the data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the directory tree.
    pub fn create(&self) -> Result<(), FileError> {
        for dir in [self.root.clone(), self.datasets(), self.root.join("jobs"), self.root.join("adapters")] {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        Ok(())
    }

    pub fn datasets(&self) -> PathBuf {
        self.root.join("datasets")
    }

    pub fn dataset_file(&self, id: &str) -> PathBuf {
        self.datasets().join(format!("{id}.jsonl"))
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.root.join("jobs").join(id)
    }

    pub fn adapter_dir(&self, id: &str) -> PathBuf {
        self.root.join("adapters").join(id)
    }
}

/// Writes rows as JSONL to `path` atomically; returns the size in bytes.
pub fn write_rows_atomic(path: &Path, rows: &[ArenaRow]) -> Result<u64, FileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = path.with_extension(format!("jsonl.{}.tmp", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut out = std::io::BufWriter::new(file);
        for row in rows {
            serde_json::to_writer(&mut out, row).map_err(|e| FileError::Io { path: tmp.clone(), source: e.into() })?;
            out.write_all(b"\n").map_err(io(&tmp))?;
        }
        let file = out.into_inner().map_err(|e| FileError::Io { path: tmp.clone(), source: e.into_error() })?;
        file.sync_all().map_err(io(&tmp))?;
        let bytes = file.metadata().map_err(io(&tmp))?.len();
        std::fs::rename(&tmp, path).map_err(io(path))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(bytes)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads rows written by `write_rows_atomic`.
pub fn read_rows(path: &Path) -> Result<Vec<ArenaRow>, FileError> {
    let file = std::fs::File::open(path).map_err(io(path))?;
    let mut rows = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str(&line)
            .map_err(|source| FileError::Corrupt { path: path.to_path_buf(), line: i + 1, source })?;
        rows.push(row);
    }
    Ok(rows)
}

/// Moves a directory into place: a rename, or a recursive copy then removal across devices.
pub fn move_dir(from: &Path, to: &Path) -> Result<(), FileError> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    copy_dir(from, to)?;
    std::fs::remove_dir_all(from).map_err(io(from))
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), FileError> {
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let target = to.join(entry.file_name());
        if entry.file_type().map_err(io(&entry.path()))?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(io(&target))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Label;

    #[test]
    fn rows_round_trip_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let rows = vec![ArenaRow {
            id: "1".into(),
            prompt: vec!["hi \"there\"\n".into()],
            response_a: vec!["a".into()],
            response_b: vec!["b".into()],
            label: Some(Label::WinnerTie),
        }];
        let bytes = write_rows_atomic(&path, &rows).unwrap();
        assert!(bytes > 0);
        assert_eq!(read_rows(&path).unwrap(), rows);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    }
}
