//! Binary token shards: a 24-byte header (magic `LMSTOKS\0`, format version u32, bytes per
//! token u32 — 2 or 4 —, token count u64, little-endian) followed by the tokens. Shards are
//! written atomically and read through a memory map; `manifest.json` lists them.
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// File magic.
pub const MAGIC: &[u8; 8] = b"LMSTOKS\0";
/// Shard format version.
pub const VERSION: u32 = 1;
const HEADER: usize = 24;

/// Bytes per token for a vocabulary: u16 when every id fits.
pub fn width_for(vocab_size: usize) -> u32 {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// Writes `tokens` as a shard of `width` bytes per token.
pub fn write(path: &Path, tokens: &[u32], width: u32) -> Result<()> {
    lmstack_core::io::write_atomic(path, &encode(tokens, width)?)?;
    Ok(())
}

/// A shard's bytes: the header, then `tokens` at `width` bytes each.
pub fn encode(tokens: &[u32], width: u32) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(HEADER + tokens.len() * width as usize);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&width.to_le_bytes());
    bytes.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    for &t in tokens {
        match width {
            2 => bytes.extend_from_slice(
                &u16::try_from(t).map_err(|_| Error::Msg(format!("token {t} does not fit in u16")))?.to_le_bytes(),
            ),
            _ => bytes.extend_from_slice(&t.to_le_bytes()),
        }
    }
    Ok(bytes)
}

/// A memory-mapped shard.
#[derive(Debug)]
pub struct Shard {
    map: memmap2::Mmap,
    width: usize,
    len: usize,
    path: PathBuf,
}

impl Shard {
    /// Maps a shard and checks its header against the file size.
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::Msg(format!("opening {}: {e}", path.display())))?;
        // SAFETY: shards are written once (to a temporary name, then renamed) and never
        // modified in place, so the mapped bytes do not change while mapped.
        let map =
            unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::Msg(format!("mapping {}: {e}", path.display())))?;
        let bad = |m: String| Error::Msg(format!("{}: {m}", path.display()));
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(bad("not an lmstack token shard (bad magic)".into()));
        }
        let version = u32::from_le_bytes(map[8..12].try_into().expect("4 bytes"));
        let width = u32::from_le_bytes(map[12..16].try_into().expect("4 bytes")) as usize;
        let len = u64::from_le_bytes(map[16..24].try_into().expect("8 bytes")) as usize;
        if version != VERSION {
            return Err(bad(format!("shard version {version}, expected {VERSION}")));
        }
        if width != 2 && width != 4 {
            return Err(bad(format!("{width} bytes per token; expected 2 or 4")));
        }
        if map.len() != HEADER + len * width {
            return Err(bad(format!(
                "truncated or corrupt: header says {len} tokens, the file holds {} bytes",
                map.len()
            )));
        }
        Ok(Self { map, width, len, path: path.to_owned() })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the shard holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Token `i`.
    pub fn get(&self, i: usize) -> u32 {
        let o = HEADER + i * self.width;
        match self.width {
            2 => u16::from_le_bytes([self.map[o], self.map[o + 1]]) as u32,
            _ => u32::from_le_bytes(self.map[o..o + 4].try_into().expect("4 bytes")),
        }
    }

    /// Appends tokens `start..start + n` to `out`.
    pub fn extend(&self, start: usize, n: usize, out: &mut Vec<u32>) {
        out.extend((start..start + n).map(|i| self.get(i)));
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A shard as listed in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name, relative to the manifest.
    pub file: String,
    /// Tokens in it.
    pub tokens: usize,
}
