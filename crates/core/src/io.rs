//! File helpers shared by every writer in lmstack: atomic writes (temporary file, fsync,
//! rename) and JSON reading with file:line:column errors.

use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Writes `bytes` to `path` atomically: a temporary file beside it is written, fsynced and
/// renamed over `path`, so a reader sees either the old file or the whole new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Like [`write_atomic`], with the content produced by `write` into the temporary file.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
    let mut one = FileSet::default();
    one.write_with(path, write)?;
    one.commit()
}

/// Several files that change together, as a model directory's `config.json`, weights and
/// tokenizer do: each is written to a temporary name beside its target and fsynced, and only
/// when every one is complete does [`FileSet::commit`] rename them into place. A failure before
/// that (a full disk) leaves the targets as they were: dropping an uncommitted set removes its
/// temporary files, and the directories it created if they are left empty.
#[derive(Debug, Default)]
pub struct FileSet {
    staged: Vec<(std::path::PathBuf, std::path::PathBuf)>,
    created: Vec<std::path::PathBuf>,
}

impl FileSet {
    /// A set of files in `dir`, which is created (with its parents) if missing.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let mut set = Self::default();
        set.add_dir(dir)?;
        Ok(set)
    }

    /// Creates `dir` (with its parents) if missing, for files of the set; an uncommitted set
    /// removes it again if it is left empty.
    pub fn add_dir(&mut self, dir: &Path) -> Result<()> {
        if !dir.exists() {
            self.created.push(dir.to_owned());
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))
    }

    /// Stages `bytes` as the next content of `path`.
    pub fn write(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        self.write_with(path, |f| f.write_all(bytes))
    }

    /// Stages `value` as pretty JSON (as [`write_json`] writes it) as the next content of `path`.
    pub fn write_json<T: serde::Serialize>(&mut self, path: &Path, value: &T) -> Result<()> {
        self.write(path, json_text(path, value)?.as_bytes())
    }

    /// Stages the content `write` produces as the next content of `path`.
    pub fn write_with(
        &mut self,
        path: &Path,
        write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
    ) -> Result<()> {
        let tmp = tmp_path(path);
        let res = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            write(&mut f)?;
            f.sync_all()
        })();
        match res {
            Ok(()) => {
                self.staged.push((tmp, path.to_owned()));
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(Error::io("writing", path, e))
            }
        }
    }

    /// Renames every staged file into place, in the order staged.
    pub fn commit(mut self) -> Result<()> {
        let staged = std::mem::take(&mut self.staged);
        let mut dirs: Vec<&Path> = Vec::new();
        for (i, (tmp, path)) in staged.iter().enumerate() {
            if let Err(e) = std::fs::rename(tmp, path) {
                // Those not renamed yet are removed on drop.
                self.staged = staged[i..].to_vec();
                return Err(Error::io("writing", path, e));
            }
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !dirs.contains(d)) {
                dirs.push(dir);
            }
        }
        for dir in dirs {
            // Persist the renames themselves; not every platform can open a directory.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.created.clear();
        Ok(())
    }
}

impl Drop for FileSet {
    fn drop(&mut self) {
        for (tmp, _) in &self.staged {
            let _ = std::fs::remove_file(tmp);
        }
        for dir in self.created.iter().rev() {
            // Only an empty directory goes: never anything else found there.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The temporary path [`write_atomic`] writes before renaming.
pub fn tmp_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Reads and parses a JSON file; errors name the file, line and column.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::json(path, &e))
}

/// Writes `value` as pretty JSON to `path` atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(path, json_text(path, value)?.as_bytes())
}

/// `value` as pretty JSON with a final newline; `path` names the target in errors.
fn json_text<T: serde::Serialize>(path: &Path, value: &T) -> Result<String> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::json(path, &e))?;
    text.push('\n');
    Ok(text)
}
