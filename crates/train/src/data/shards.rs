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
    let mut buf = TokenBuf::new(width);
    buf.push_all(tokens)?;
    Ok(buf.shard(0..buf.len()))
}

/// Token ids held at a shard's width, 2 or 4 bytes each: a dataset being prepared takes half
/// the memory of `u32`s when its vocabulary allows.
#[derive(Debug, Clone)]
pub enum TokenBuf {
    /// Ids below 65,536.
    U16(Vec<u16>),
    /// Any ids.
    U32(Vec<u32>),
}

impl TokenBuf {
    /// An empty buffer of `width` bytes per token (2, else 4).
    pub fn new(width: u32) -> Self {
        if width == 2 {
            TokenBuf::U16(Vec::new())
        } else {
            TokenBuf::U32(Vec::new())
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        match self {
            TokenBuf::U16(v) => v.len(),
            TokenBuf::U32(v) => v.len(),
        }
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `ids`; an id too large for the width is an error.
    pub fn push_all(&mut self, ids: &[u32]) -> Result<()> {
        match self {
            TokenBuf::U16(v) => {
                v.reserve(ids.len());
                for &t in ids {
                    v.push(u16::try_from(t).map_err(|_| Error::Msg(format!("token {t} does not fit in u16")))?);
                }
            }
            TokenBuf::U32(v) => v.extend_from_slice(ids),
        }
        Ok(())
    }

    /// Moves the tokens from `at` on into a new buffer.
    pub fn split_off(&mut self, at: usize) -> Self {
        match self {
            TokenBuf::U16(v) => TokenBuf::U16(v.split_off(at)),
            TokenBuf::U32(v) => TokenBuf::U32(v.split_off(at)),
        }
    }

    /// The bytes of a shard holding tokens `range`: the header, then the tokens little-endian.
    pub fn shard(&self, range: std::ops::Range<usize>) -> Vec<u8> {
        let width = match self {
            TokenBuf::U16(_) => 2u32,
            TokenBuf::U32(_) => 4,
        };
        let mut bytes = Vec::with_capacity(HEADER + range.len() * width as usize);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&width.to_le_bytes());
        bytes.extend_from_slice(&(range.len() as u64).to_le_bytes());
        match self {
            TokenBuf::U16(v) => v[range].iter().for_each(|t| bytes.extend_from_slice(&t.to_le_bytes())),
            TokenBuf::U32(v) => v[range].iter().for_each(|t| bytes.extend_from_slice(&t.to_le_bytes())),
        }
        bytes
    }
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
