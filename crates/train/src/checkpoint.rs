//! Checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! A checkpoint is a directory `checkpoints/step-NNNNNNN/` holding `model.safetensors` (the
//! weights, Hugging Face names), `optimizer.safetensors` (AdamW moments) and `state.json`
//! (step, data RNG state, best validation loss, and the CRC-32 and size of each file). It is
//! written completely, each file atomically, before `checkpoints/latest` is switched to it
//! (itself an atomic rename), so a crash mid-write leaves the previous checkpoint in force.
//! Loading verifies sizes and checksums and refuses a truncated or corrupt checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use lmstack_core::io::write_atomic;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Format version of `state.json`.
pub const VERSION: u32 = 1;

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
    files.write_json(&dir.join("state.json"), &state)?;
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

/// Loads and verifies a checkpoint directory.
pub fn load(dir: &Path) -> Result<Loaded> {
    let state_path = dir.join("state.json");
    let state: TrainerState = lmstack_core::io::read_json(&state_path)?;
    if state.version != VERSION {
        return Err(Error::Msg(format!("{}: version {} is not {VERSION}", state_path.display(), state.version)));
    }
    let read = |file: &str| -> Result<HashMap<String, Tensor>> {
        let path = dir.join(file);
        let (size, sum) = *state
            .files
            .get(file)
            .ok_or_else(|| Error::Msg(format!("{}: no record of {file}", state_path.display())))?;
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
                "{}: checksum mismatch, the checkpoint is corrupt; refusing to load it",
                path.display()
            )));
        }
        candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
    };
    let weights = read("model.safetensors")?;
    let optimizer = read("optimizer.safetensors")?;
    Ok(Loaded { dir: dir.to_owned(), state, weights, optimizer })
}
