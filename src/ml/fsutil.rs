//! Atomic file and directory writes: temp name, fsync, rename, fsync of the parent.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::MlError;

/// Write `bytes` to `path` and fsync it.
pub fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<(), MlError> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Save tensors as safetensors at `path` and fsync the file.
pub fn save_safetensors_synced(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<(), MlError> {
    candle_core::safetensors::save(tensors, path)?;
    std::fs::File::open(path)?.sync_all()?;
    Ok(())
}

/// fsync a directory: its entries (files created or renamed in it) are durable.
pub fn sync_dir(dir: &Path) -> Result<(), MlError> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Suffix of directories being written; a leftover one is an interrupted write.
pub const TMP_SUFFIX: &str = ".tmp";

/// Build a directory under a temporary name with `fill`, fsync it, then rename it to `dir`
/// (replacing an older `dir`). Readers see either no directory or a complete one.
pub fn write_dir_atomically(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<(), MlError>,
) -> Result<(), MlError> {
    let parent = dir.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent)?;
    let name = dir
        .file_name()
        .ok_or_else(|| MlError::Io(std::io::Error::other(format!("{} has no file name", dir.display()))))?;
    let tmp = parent.join(format!("{}{TMP_SUFFIX}", name.to_string_lossy()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    fill(&tmp)?;
    sync_dir(&tmp)?;
    if dir.exists() {
        let old = parent.join(format!("{}.old{TMP_SUFFIX}", name.to_string_lossy()));
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(dir, &old)?;
        std::fs::rename(&tmp, dir)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&tmp, dir)?;
    }
    sync_dir(&parent)?;
    Ok(())
}
