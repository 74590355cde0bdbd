//! Checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! A checkpoint is a directory `checkpoints/step-NNNNNNN/` holding `model.safetensors` (the
//! weights, Hugging Face names), `optimizer.safetensors` (AdamW moments), `state.json` (step,
//! data RNG state, best validation loss) and `manifest.json` (the size and CRC-32 of each of the
//! other three). It is written completely, each file atomically, before `checkpoints/latest` is
//! switched to it (itself an atomic rename), so a crash mid-write leaves the previous checkpoint
//! in force. Loading verifies every file against the manifest and refuses a truncated, corrupt
//! or edited checkpoint naming the file; [`resume`] can fall back to the newest checkpoint that
//! verifies. (Checkpoints of format 1, without a manifest, verify their tensor files against
//! `state.json`'s own records.)

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use lmstack_core::io::write_atomic;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Format version of `state.json` (2: the checkpoint has a `manifest.json` covering every file).
pub const VERSION: u32 = 2;

/// `manifest.json`: every other file of the checkpoint with its size and CRC-32.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    files: BTreeMap<String, (u64, u32)>,
}

/// The files a checkpoint must hold (besides its manifest).
const FILES: [&str; 3] = ["model.safetensors", "optimizer.safetensors", "state.json"];

/// The small state saved beside the tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Format version.
    pub version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// RNG that draws training batches (its position in the stream included).
    pub data_rng: ChaCha8Rng,
    /// RNG that draws validation batches.
    pub eval_rng: ChaCha8Rng,
    /// Lowest validation loss seen, and its step.
    pub best_val: Option<(u64, f64)>,
    /// Training tokens consumed.
    pub tokens_seen: u64,
    /// Each file's `(size, crc32)`.
    pub files: BTreeMap<String, (u64, u32)>,
}

impl TrainerState {
    /// A fresh run's state: step 0, the batch RNG seeded with `data_seed` and the evaluation
    /// RNG with `eval_seed`.
    pub fn fresh(data_seed: u64, eval_seed: u64) -> TrainerState {
        use rand::SeedableRng;
        TrainerState {
            version: VERSION,
            step: 0,
            data_rng: ChaCha8Rng::seed_from_u64(data_seed),
            eval_rng: ChaCha8Rng::seed_from_u64(eval_seed),
            best_val: None,
            tokens_seen: 0,
            files: Default::default(),
        }
    }
}

/// The contents of a loaded checkpoint.
#[derive(Debug)]
pub struct Loaded {
    /// Where it was loaded from.
    pub dir: PathBuf,
    /// The small state.
    pub state: TrainerState,
    /// Model weights by name.
    pub weights: HashMap<String, Tensor>,
    /// Optimizer moments by name.
    pub optimizer: HashMap<String, Tensor>,
}

fn crc(bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(bytes);
    h.finalize()
}

/// Writes a checkpoint for `state.step` under `root` (the run's `checkpoints/` directory) and
/// points `latest` at it; keeps the newest `keep` checkpoints.
pub fn save(
    root: &Path,
    mut state: TrainerState,
    weights: &BTreeMap<String, Tensor>,
    optimizer: &BTreeMap<String, Tensor>,
    keep: usize,
) -> Result<PathBuf> {
    state.version = VERSION;
    let name = format!("step-{:07}", state.step);
    let dir = root.join(&name);
    // The three files appear together or (a full disk) not at all; `latest` moves after.
    let mut files = lmstack_core::io::FileSet::in_dir(&dir)?;
    state.files.clear();
    for (file, tensors) in [("model.safetensors", weights), ("optimizer.safetensors", optimizer)] {
        let path = dir.join(file);
        let bytes = lmstack_core::models::safetensors_bytes(tensors, &path)?;
        files.write(&path, &bytes)?;
        state.files.insert(file.to_owned(), (bytes.len() as u64, crc(&bytes)));
    }
    let state_bytes = serde_json::to_vec_pretty(&state)
        .map_err(|e| Error::Msg(format!("serializing {}: {e}", dir.join("state.json").display())))?;
    files.write(&dir.join("state.json"), &state_bytes)?;
    let mut manifest = Manifest { files: state.files.clone() };
    manifest.files.insert("state.json".into(), (state_bytes.len() as u64, crc(&state_bytes)));
    files.write_json(&dir.join("manifest.json"), &manifest)?;
    files.commit()?;
    write_atomic(&root.join("latest"), format!("{name}\n").as_bytes())?;
    prune(root, &name, keep);
    Ok(dir)
}

fn prune(root: &Path, current: &str, keep: usize) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    let mut dirs: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("step-") && n.as_str() <= current)
        .collect();
    dirs.sort();
    let n = dirs.len();
    for d in dirs.into_iter().take(n.saturating_sub(keep)) {
        let _ = std::fs::remove_dir_all(root.join(d));
    }
}

/// The checkpoint `latest` points at, if any.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    let p = root.join("latest");
    if !p.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&p).map_err(|e| Error::Msg(format!("reading {}: {e}", p.display())))?;
    let name = name.trim();
    if name.is_empty() || name.contains('/') || name.contains("..") {
        return Err(Error::Msg(format!("{}: `{name}` is not a checkpoint name", p.display())));
    }
    Ok(Some(root.join(name)))
}

/// Whether `root` (a run's `checkpoints/`) holds any checkpoint, with or without `latest`.
pub fn holds_checkpoints(root: &Path) -> Result<bool> {
    Ok(root.join("latest").exists() || !step_dirs(root)?.is_empty())
}

/// The `step-*` directories under `root`, oldest first.
fn step_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Msg(format!("reading {}: {e}", root.display()))),
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.path().is_dir() && e.file_name().to_str().is_some_and(|n| n.starts_with("step-")))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// Removes what an interrupted write left behind under `root`: temporary files
/// (`latest.<pid>.tmp`, `step-*/<file>.<pid>.tmp`) that were never renamed into place.
pub fn clean_leftovers(root: &Path) -> Result<()> {
    let mut dirs = vec![root.to_owned()];
    dirs.extend(step_dirs(root)?);
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let pid_tmp = name
                .strip_suffix(".tmp")
                .and_then(|n| n.rsplit_once('.'))
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
            if pid_tmp && e.path().is_file() {
                std::fs::remove_file(e.path())
                    .map_err(|err| Error::Msg(format!("removing {}: {err}", e.path().display())))?;
            }
        }
    }
    Ok(())
}

/// The checkpoint to resume a run from: the one `latest` points at, verified. If it does not
/// verify, the error names the file and the newest checkpoint that does, which `fall_back`
/// takes instead (saying so on stderr).
pub fn resume(root: &Path, fall_back: bool) -> Result<Loaded> {
    let latest = latest(root)?;
    let failed = match &latest {
        Some(dir) => match load(dir) {
            Ok(l) => return Ok(l),
            Err(e) => e,
        },
        None if step_dirs(root)?.is_empty() => {
            return Err(Error::Msg(format!("--resume: no checkpoint in {} (start without --resume)", root.display())))
        }
        None => Error::Msg(format!("{}: missing", root.join("latest").display())),
    };
    let older = step_dirs(root)?.into_iter().rev().filter(|d| Some(d) != latest.as_ref()).find_map(|d| load(&d).ok());
    match older {
        Some(l) if fall_back => {
            eprintln!(
                "{failed}\nresuming from {} (step {}), the newest checkpoint that verifies",
                l.dir.display(),
                l.state.step
            );
            Ok(l)
        }
        Some(l) => Err(Error::Msg(format!(
            "{failed}\nthe newest checkpoint that verifies is {} (step {}): pass --resume-verified to continue from it",
            l.dir.display(),
            l.state.step
        ))),
        None => Err(Error::Msg(format!("{failed}\nno other checkpoint in {} verifies", root.display()))),
    }
}

/// Reads `file` of checkpoint `dir` and checks it against its recorded size and CRC-32.
fn read_verified(dir: &Path, file: &str, record: Option<&(u64, u32)>, listed_in: &Path) -> Result<Vec<u8>> {
    let path = dir.join(file);
    let (size, sum) = *record.ok_or_else(|| Error::Msg(format!("{}: no record of {file}", listed_in.display())))?;
    let bytes = std::fs::read(&path).map_err(|e| Error::Msg(format!("reading {}: {e}", path.display())))?;
    if bytes.len() as u64 != size {
        return Err(Error::Msg(format!(
            "{}: checkpoint is truncated or corrupt ({} bytes, {size} were written); refusing to load it",
            path.display(),
            bytes.len()
        )));
    }
    if crc(&bytes) != sum {
        return Err(Error::Msg(format!(
            "{}: checksum mismatch, the checkpoint is corrupt or was edited; refusing to load it",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Loads and verifies a checkpoint directory.
pub fn load(dir: &Path) -> Result<Loaded> {
    let state_path = dir.join("state.json");
    let manifest_path = dir.join("manifest.json");
    let manifest: Option<Manifest> =
        if manifest_path.exists() { Some(lmstack_core::io::read_json(&manifest_path)?) } else { None };
    let state: TrainerState = match &manifest {
        Some(m) => {
            let bytes = read_verified(dir, "state.json", m.files.get("state.json"), &manifest_path)?;
            serde_json::from_slice(&bytes).map_err(|e| Error::Msg(format!("{}: {e}", state_path.display())))?
        }
        None => lmstack_core::io::read_json(&state_path)?,
    };
    match (&manifest, state.version) {
        (Some(_), VERSION) | (None, 1) => {}
        (None, v) if v >= 2 => {
            return Err(Error::Msg(format!(
                "{}: missing (format {v} checkpoints list every file there); refusing to load the checkpoint",
                manifest_path.display()
            )))
        }
        (_, v) => return Err(Error::Msg(format!("{}: version {v} is not {VERSION}", state_path.display()))),
    }
    // Format 1 recorded the tensor files in `state.json` itself.
    let (records, listed_in) = match &manifest {
        Some(m) => (&m.files, manifest_path.as_path()),
        None => (&state.files, state_path.as_path()),
    };
    let read = |file: &str| -> Result<HashMap<String, Tensor>> {
        let bytes = read_verified(dir, file, records.get(file), listed_in)?;
        let path = dir.join(file);
        candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
    };
    let weights = read(FILES[0])?;
    let optimizer = read(FILES[1])?;
    Ok(Loaded { dir: dir.to_owned(), state, weights, optimizer })
}
