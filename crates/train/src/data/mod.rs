//! Dataset engineering: ingest → clean → deduplicate → filter → split → tokenize → pack.
//!
//! `train data` runs the whole pipeline and writes a dataset directory:
//! - `manifest.json`: shards per split, dtype, vocabulary size, and the statistics;
//! - `stats.json`: what each step removed (also printed as a table);
//! - `tokenizer/`: the tokenizer the tokens were made with (trained on the cleaned corpus
//!   when asked for `char` or `bpe:N`);
//! - `train-NNNNN.bin`, `val-NNNNN.bin`: token shards (see [`shards`]).
//!
//! `train pretrain --data DIR` reads such a directory through memory maps.

pub mod clean;
pub mod dedup;
pub mod filter;
pub mod shards;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lmstack_core::Tokenizer;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};
use filter::Filters;
use shards::{Shard, ShardEntry, TokenBuf};

/// How text files are cut into documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DocSplit {
    /// One document per file (JSONL: per record).
    File,
    /// One document per blank-line-separated paragraph.
    Paragraphs,
}

/// Settings of the pipeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataConfig {
    /// Files or directories (walked recursively for `.txt`, `.jsonl`, `.json`).
    pub inputs: Vec<PathBuf>,
    /// The JSONL field holding the text.
    pub text_field: String,
    /// Output directory.
    pub out: PathBuf,
    /// `char`, `bpe:VOCAB_SIZE`, or a directory with `tokenizer.json`.
    pub tokenizer: String,
    /// Fraction of documents (or, for a single document, of tokens) held out.
    pub val_fraction: f64,
    /// Seed of the split and of MinHash.
    pub seed: u64,
    /// Normalise text (NFC, control characters, whitespace).
    pub clean: bool,
    /// Drop exact duplicates.
    pub exact_dedup: bool,
    /// Jaccard threshold for near-duplicates (0 = off).
    pub near_dup_threshold: f64,
    /// MinHash permutations.
    pub num_perm: usize,
    /// Quality filters.
    pub filters: Filters,
    /// How text files become documents.
    pub doc_split: DocSplit,
    /// Maximum tokens per shard.
    pub shard_tokens: usize,
    /// Count and skip malformed JSONL lines (and documents over `max_doc_bytes`) instead of
    /// stopping at the first.
    pub skip_bad_lines: bool,
    /// Documents longer than this many bytes are refused (naming file:line), 0 = no limit.
    /// Every step works a document at a time, so memory grows with the largest one.
    #[serde(default = "default_max_doc_bytes")]
    pub max_doc_bytes: usize,
}

/// The default bound on one document: 32 MiB (a long book is 1–5 MB).
pub const DEFAULT_MAX_DOC_BYTES: usize = 32 << 20;

fn default_max_doc_bytes() -> usize {
    DEFAULT_MAX_DOC_BYTES
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            inputs: Vec::new(),
            text_field: "text".into(),
            out: PathBuf::from("data/prepared"),
            tokenizer: "char".into(),
            val_fraction: 0.1,
            seed: 1337,
            clean: true,
            exact_dedup: true,
            near_dup_threshold: 0.8,
            num_perm: 128,
            filters: Filters::default(),
            doc_split: DocSplit::File,
            shard_tokens: 1 << 24,
            skip_bad_lines: false,
            max_doc_bytes: DEFAULT_MAX_DOC_BYTES,
        }
    }
}

/// What each step did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Files read.
    pub files: usize,
    /// Documents read.
    pub documents: usize,
    /// Malformed JSONL lines and documents over `max_doc_bytes` skipped (with
    /// `skip_bad_lines`).
    pub bad_lines: usize,
    /// Files skipped because they hold nothing but whitespace.
    #[serde(default)]
    pub empty_files: usize,
    /// Characters read.
    pub chars_in: usize,
    /// Documents empty after cleaning.
    pub empty_after_cleaning: usize,
    /// Exact duplicates removed.
    pub exact_duplicates: usize,
    /// Near-duplicates removed.
    pub near_duplicates: usize,
    /// Removals per quality rule.
    pub filtered: BTreeMap<String, usize>,
    /// Documents kept.
    pub kept: usize,
    /// Characters kept.
    pub chars_out: usize,
    /// Documents per split.
    pub train_documents: usize,
    /// Documents per split.
    pub val_documents: usize,
    /// Tokens per split.
    pub train_tokens: usize,
    /// Tokens per split.
    pub val_tokens: usize,
    /// `documents` (split by document) or `tail` (one document: last tokens held out).
    pub split: String,
}

/// `manifest.json` of a prepared dataset.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// Tokenizer directory, relative to the manifest.
    pub tokenizer: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Bytes per token in the shards.
    pub token_bytes: u32,
    /// Tokens placed between documents: the end-of-sequence token, or a blank line for
    /// tokenizers without one.
    pub separator: Vec<u32>,
    /// Training shards.
    pub train: Vec<ShardEntry>,
    /// Validation shards.
    pub val: Vec<ShardEntry>,
    /// Pipeline statistics.
    pub stats: Stats,
    /// The settings used.
    pub config: DataConfig,
}

fn collect_files(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|e| Error::Msg(format!("reading directory {}: {e}", p.display())))?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for e in entries {
            if e.is_dir() {
                collect_files(&e, out)?;
            } else if e.extension().is_some_and(|x| x == "txt" || x == "jsonl" || x == "json") {
                out.push(e);
            }
        }
        Ok(())
    } else if p.is_file() {
        out.push(p.to_owned());
        Ok(())
    } else {
        Err(Error::Msg(format!("{}: no such file or directory", p.display())))
    }
}

/// Reads a UTF-8 text file; invalid bytes are an error with the file, line and byte offset.
pub fn read_utf8(f: &Path) -> Result<String> {
    let bytes = std::fs::read(f).map_err(|e| Error::Msg(format!("reading {}: {e}", f.display())))?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::Msg(format!("{}:{line}: not valid UTF-8 (byte offset {at})", f.display()))
    })
}

/// Reads every document of the inputs, in order.
pub fn ingest(cfg: &DataConfig, stats: &mut Stats) -> Result<Vec<String>> {
    let mut files = Vec::new();
    for p in &cfg.inputs {
        collect_files(p, &mut files)?;
    }
    if files.is_empty() {
        return Err(Error::Msg("no input files (.txt, .jsonl, .json) found".into()));
    }
    stats.files = files.len();
    let mut docs = Vec::new();
    let mut empty = Vec::new();
    for f in &files {
        let text = read_utf8(f)?;
        if text.trim().is_empty() {
            eprintln!("warning: {}: the file is empty; skipped", f.display());
            empty.push(f.display().to_string());
            continue;
        }
        // A document over the bound: refused naming where it is, or skipped (counted: 1).
        let too_large = |line: usize, len: usize| -> Result<usize> {
            if !cfg.skip_bad_lines {
                return Err(Error::Msg(format!(
                    "{}:{line}: a document of {len} bytes, over --max-doc-bytes {} (raise it, or pass --skip-bad-lines to skip such documents)",
                    f.display(),
                    cfg.max_doc_bytes
                )));
            }
            Ok(1)
        };
        let over = |len: usize| cfg.max_doc_bytes > 0 && len > cfg.max_doc_bytes;
        let is_jsonl = f.extension().is_some_and(|x| x == "jsonl" || x == "json");
        if is_jsonl {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let r: std::result::Result<String, String> = match serde_json::from_str::<serde_json::Value>(line) {
                    Err(e) => Err(format!("not valid JSON: {e}")),
                    Ok(serde_json::Value::Object(mut m)) => match m.remove(&cfg.text_field) {
                        Some(serde_json::Value::String(s)) => Ok(s),
                        Some(other) => {
                            Err(format!("field `{}` is not a string (found {})", cfg.text_field, kind(&other)))
                        }
                        None => Err(format!("no field `{}`", cfg.text_field)),
                    },
                    Ok(other) => Err(format!("not a JSON object (found {})", kind(&other))),
                };
                match r {
                    Ok(s) if over(s.len()) => stats.bad_lines += too_large(i + 1, s.len())?,
                    Ok(s) => docs.push(s),
                    Err(_) if cfg.skip_bad_lines => stats.bad_lines += 1,
                    Err(m) => {
                        return Err(Error::Msg(format!(
                            "{}:{}: {m} (pass --skip-bad-lines to skip such lines)",
                            f.display(),
                            i + 1
                        )))
                    }
                }
            }
        } else {
            match cfg.doc_split {
                DocSplit::File if over(text.len()) => stats.bad_lines += too_large(1, text.len())?,
                DocSplit::File => docs.push(text),
                DocSplit::Paragraphs => {
                    let norm = text.replace("\r\n", "\n");
                    drop(text);
                    let mut line = 1;
                    for p in norm.split("\n\n") {
                        if over(p.len()) {
                            stats.bad_lines += too_large(line + p.len() - p.trim_start_matches('\n').len(), p.len())?;
                        } else if !p.trim().is_empty() {
                            docs.push(p.to_owned());
                        }
                        line += p.matches('\n').count() + 2;
                    }
                }
            }
        }
    }
    stats.empty_files = empty.len();
    stats.documents = docs.len();
    stats.chars_in = docs.iter().map(|d| d.chars().count()).sum();
    if docs.is_empty() {
        let why = match empty.as_slice() {
            [] => String::new(),
            [one] => format!(": {one} is empty"),
            [first, ..] => format!(": {first} and {} more input files are empty", empty.len() - 1),
        };
        return Err(Error::Msg(format!("the inputs hold no documents{why}")));
    }
    Ok(docs)
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn retain(docs: Vec<String>, keep: &[bool]) -> Vec<String> {
    docs.into_iter().zip(keep).filter(|(_, &k)| k).map(|(d, _)| d).collect()
}

/// Cleans, deduplicates and filters documents, counting each removal.
pub fn curate(cfg: &DataConfig, docs: Vec<String>, stats: &mut Stats) -> Vec<String> {
    let mut docs: Vec<String> = if cfg.clean { docs.par_iter().map(|d| clean::clean(d)).collect() } else { docs };
    let before = docs.len();
    docs.retain(|d| !d.trim().is_empty());
    stats.empty_after_cleaning = before - docs.len();
    if cfg.exact_dedup {
        let keep = dedup::exact(&docs);
        stats.exact_duplicates = keep.iter().filter(|k| !**k).count();
        docs = retain(docs, &keep);
    }
    if cfg.near_dup_threshold > 0.0 {
        let mh = dedup::MinHasher::new(cfg.num_perm, cfg.near_dup_threshold, cfg.seed);
        let keep = mh.dedup(&docs);
        stats.near_duplicates = keep.iter().filter(|k| !**k).count();
        docs = retain(docs, &keep);
    }
    let verdicts: Vec<Option<filter::Rule>> = docs.par_iter().map(|d| cfg.filters.check(d)).collect();
    for r in [filter::Rule::TooShort, filter::Rule::TooLong, filter::Rule::Symbols, filter::Rule::RepeatedLines] {
        stats.filtered.insert(r.name().into(), verdicts.iter().filter(|v| **v == Some(r)).count());
    }
    let keep: Vec<bool> = verdicts.iter().map(Option::is_none).collect();
    docs = retain(docs, &keep);
    stats.kept = docs.len();
    stats.chars_out = docs.iter().map(|d| d.chars().count()).sum();
    docs
}

/// Builds the tokenizer a `--tokenizer` value names: `char` (every character of `all`),
/// `bpe:N` (byte-level BPE of N tokens learnt on `train`, through a scratch file in
/// `scratch_dir`), or a directory holding `tokenizer.json`.
pub fn tokenizer_from_spec(spec: &str, all: &[&str], train: &[&str], scratch_dir: &Path) -> Result<Tokenizer> {
    if spec == "char" {
        return Ok(Tokenizer::from_chars(all.iter().flat_map(|d| d.chars()))?);
    }
    let Some(n) = spec.strip_prefix("bpe:") else {
        return Ok(Tokenizer::from_dir(Path::new(spec))?);
    };
    let n: usize = n.parse().map_err(|_| Error::Msg(format!("tokenizer `{spec}`: expected bpe:VOCAB_SIZE")))?;
    std::fs::create_dir_all(scratch_dir).map_err(|e| Error::Msg(format!("creating {}: {e}", scratch_dir.display())))?;
    let tmp = scratch_dir.join(".tokenizer-text.tmp");
    std::fs::write(&tmp, train.join("\n\n")).map_err(|e| Error::Msg(format!("writing {}: {e}", tmp.display())))?;
    let r = Tokenizer::train_bpe(&[&tmp], n, &["<|endoftext|>"]);
    let _ = std::fs::remove_file(&tmp);
    Ok(r?)
}

/// Text tokenized at once in `prepare`: a group of documents of about this many bytes.
const ENCODE_GROUP_BYTES: usize = 8 << 20;
/// A long document is tokenized a piece of about this many bytes at a time.
const ENCODE_PIECE_BYTES: usize = 64 << 10;

/// Runs the whole pipeline and writes the dataset directory.
pub fn prepare(cfg: &DataConfig) -> Result<Manifest> {
    if !(cfg.val_fraction > 0.0 && cfg.val_fraction < 1.0) {
        return Err(Error::Msg(format!("--val-fraction {} is outside (0, 1)", cfg.val_fraction)));
    }
    if !(0.0..=1.0).contains(&cfg.near_dup_threshold) {
        return Err(Error::Msg(format!("--near-dup-threshold {} is outside [0, 1]", cfg.near_dup_threshold)));
    }
    if cfg.shard_tokens == 0 || cfg.num_perm == 0 {
        return Err(Error::Msg("--shard-tokens and --num-perm must be at least 1".into()));
    }
    let mut stats = Stats::default();
    let docs = ingest(cfg, &mut stats)?;
    let docs = curate(cfg, docs, &mut stats);
    if docs.is_empty() {
        return Err(Error::Msg("every document was removed; loosen the filters".into()));
    }
    // Split by document (seeded hash of the position), or by token tail for one document.
    let by_doc = docs.len() >= 2;
    let mut is_val: Vec<bool> =
        (0..docs.len()).map(|i| (dedup::hash64(&(cfg.seed, i)) as f64 / u64::MAX as f64) < cfg.val_fraction).collect();
    if by_doc {
        if !is_val.contains(&true) {
            *is_val.last_mut().expect("non-empty") = true;
        }
        if !is_val.contains(&false) {
            is_val[0] = false;
        }
    }
    // Every file of the dataset is staged and renamed into place together at the end, so a
    // failure (a full disk) leaves no partial dataset, nor a mix of an older one's files.
    let mut files = lmstack_core::io::FileSet::in_dir(&cfg.out)?;
    let all: Vec<&str> = docs.iter().map(String::as_str).collect();
    let train_docs: Vec<&str> = all.iter().zip(&is_val).filter(|(_, v)| !by_doc || !**v).map(|(d, _)| *d).collect();
    let tok = tokenizer_from_spec(&cfg.tokenizer, &all, &train_docs, &cfg.out)?;
    let tok_dir = cfg.out.join("tokenizer");
    files.add_dir(&tok_dir)?;
    tok.stage(&tok_dir, &mut files)?;
    let sep: Vec<u32> = match tok.eos_id() {
        Some(e) => vec![e],
        None => tok.encode("\n\n", false)?,
    };
    // Tokenized a group of documents at a time (in parallel within a group) and long documents
    // a piece at a time, so the tokenizer's working memory stays bounded whatever the corpus;
    // the tokens are kept at the shards' width (half the memory of u32 ids for vocabularies up
    // to 65,536), and a document alone in its group goes straight into them, piece by piece.
    let width = shards::width_for(tok.vocab_size());
    let (mut train, mut val) = (TokenBuf::new(width), TokenBuf::new(width));
    let mut first = 0;
    while first < docs.len() {
        let mut last = first + 1;
        let mut bytes = docs[first].len();
        while last < docs.len() && bytes + docs[last].len() <= ENCODE_GROUP_BYTES {
            bytes += docs[last].len();
            last += 1;
        }
        let to = |i: usize| by_doc && is_val[i];
        if last == first + 1 {
            let dst = if to(first) { &mut val } else { &mut train };
            tok.encode_pieces(&docs[first], ENCODE_PIECE_BYTES, |ids| dst.push_all(&ids))?;
            dst.push_all(&sep)?;
        } else {
            let ids: Vec<Vec<u32>> = docs[first..last]
                .par_iter()
                .map(|d| tok.encode_long(d, ENCODE_PIECE_BYTES))
                .collect::<lmstack_core::Result<_>>()?;
            for (i, d) in (first..last).zip(ids) {
                let dst = if to(i) { &mut val } else { &mut train };
                dst.push_all(&d)?;
                dst.push_all(&sep)?;
            }
        }
        if by_doc {
            let held_out = is_val[first..last].iter().filter(|&&v| v).count();
            stats.val_documents += held_out;
            stats.train_documents += last - first - held_out;
        }
        first = last;
    }
    if !by_doc {
        let n = (train.len() as f64 * (1.0 - cfg.val_fraction)) as usize;
        val = train.split_off(n);
        stats.train_documents = 1;
        stats.split = "tail".into();
    } else {
        stats.split = "documents".into();
    }
    stats.train_tokens = train.len();
    stats.val_tokens = val.len();
    let mut write = |name: &str, tokens: &TokenBuf| -> Result<Vec<ShardEntry>> {
        (0..tokens.len())
            .step_by(cfg.shard_tokens)
            .enumerate()
            .map(|(i, at)| {
                let file = format!("{name}-{i:05}.bin");
                let range = at..(at + cfg.shard_tokens).min(tokens.len());
                let n = range.len();
                files.write(&cfg.out.join(&file), &tokens.shard(range))?;
                Ok(ShardEntry { file, tokens: n })
            })
            .collect()
    };
    let manifest = Manifest {
        version: shards::VERSION,
        tokenizer: "tokenizer".into(),
        vocab_size: tok.vocab_size(),
        token_bytes: width,
        separator: sep,
        train: write("train", &train)?,
        val: write("val", &val)?,
        stats: stats.clone(),
        config: cfg.clone(),
    };
    files.write_json(&cfg.out.join("stats.json"), &stats)?;
    files.write_json(&cfg.out.join("manifest.json"), &manifest)?;
    files.commit()?;
    remove_stale_shards(&cfg.out, &manifest);
    Ok(manifest)
}

/// Removes shard files an earlier, larger dataset left in `dir` that `manifest` does not list
/// (only names `prepare` writes: `train-NNNNN.bin`, `val-NNNNN.bin`).
fn remove_stale_shards(dir: &Path, manifest: &Manifest) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let listed: std::collections::HashSet<&str> =
        manifest.train.iter().chain(&manifest.val).map(|e| e.file.as_str()).collect();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = ["train-", "val-"].iter().any(|p| {
            name.strip_prefix(p)
                .and_then(|r| r.strip_suffix(".bin"))
                .is_some_and(|n| n.len() == 5 && n.bytes().all(|b| b.is_ascii_digit()))
        });
        if ours && !listed.contains(name.as_str()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A stream of token ids that batches can be cut from.
pub trait Tokens: Sync {
    /// Number of tokens.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Appends tokens `start..start + n` to `out`.
    fn extend_into(&self, start: usize, n: usize, out: &mut Vec<u32>);
}

impl Tokens for Vec<u32> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn extend_into(&self, start: usize, n: usize, out: &mut Vec<u32>) {
        out.extend_from_slice(&self[start..start + n]);
    }
}

/// Several shards read as one stream.
#[derive(Debug)]
pub struct ShardSet {
    shards: Vec<Shard>,
    starts: Vec<usize>,
    len: usize,
}

impl ShardSet {
    /// Maps the shards listed for one split.
    pub fn open(dir: &Path, entries: &[ShardEntry], vocab_size: usize) -> Result<Self> {
        let mut shards = Vec::new();
        let mut starts = Vec::new();
        let mut len = 0;
        for e in entries {
            let s = Shard::open(&dir.join(&e.file))?;
            if s.len() != e.tokens {
                return Err(Error::Msg(format!("{}: {} tokens, the manifest says {}", e.file, s.len(), e.tokens)));
            }
            if let Some(bad) =
                (0..s.len()).step_by((s.len() / 1024).max(1)).map(|i| s.get(i)).find(|&t| t as usize >= vocab_size)
            {
                return Err(Error::Msg(format!("{}: token {bad} is outside the vocabulary of {vocab_size}", e.file)));
            }
            starts.push(len);
            len += s.len();
            shards.push(s);
        }
        Ok(Self { shards, starts, len })
    }
}

impl Tokens for ShardSet {
    fn len(&self) -> usize {
        self.len
    }
    fn extend_into(&self, mut start: usize, mut n: usize, out: &mut Vec<u32>) {
        let mut i = self.starts.partition_point(|&s| s <= start) - 1;
        while n > 0 {
            let s = &self.shards[i];
            let off = start - self.starts[i];
            let take = n.min(s.len() - off);
            s.extend(off, take, out);
            start += take;
            n -= take;
            i += 1;
        }
    }
}

/// A prepared dataset opened for training.
#[derive(Debug)]
pub struct Dataset {
    /// The manifest.
    pub manifest: Manifest,
    /// Training tokens.
    pub train: ShardSet,
    /// Validation tokens.
    pub val: ShardSet,
    /// The dataset's tokenizer.
    pub tokenizer: Tokenizer,
}

impl Dataset {
    /// Opens a directory written by [`prepare`].
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest: Manifest = lmstack_core::io::read_json(&dir.join("manifest.json"))?;
        if manifest.version != shards::VERSION {
            return Err(Error::Msg(format!(
                "{}: version {}, expected {}",
                dir.join("manifest.json").display(),
                manifest.version,
                shards::VERSION
            )));
        }
        let tokenizer = Tokenizer::from_dir(&dir.join(&manifest.tokenizer))?;
        if tokenizer.vocab_size() != manifest.vocab_size {
            return Err(Error::Msg(format!(
                "{}: the tokenizer has {} tokens, the manifest says {}",
                dir.display(),
                tokenizer.vocab_size(),
                manifest.vocab_size
            )));
        }
        let train = ShardSet::open(dir, &manifest.train, manifest.vocab_size)?;
        let val = ShardSet::open(dir, &manifest.val, manifest.vocab_size)?;
        Ok(Self { manifest, train, val, tokenizer })
    }
}

/// The statistics as a table for the terminal.
pub fn report(s: &Stats) -> String {
    let mut t = String::new();
    t += &format!("files read                {:>10}\n", s.files);
    t += &format!("documents read            {:>10}   ({} characters)\n", s.documents, s.chars_in);
    if s.bad_lines > 0 {
        t += &format!("bad JSONL lines skipped   {:>10}\n", s.bad_lines);
    }
    if s.empty_files > 0 {
        t += &format!("empty files skipped       {:>10}\n", s.empty_files);
    }
    t += &format!("  - empty after cleaning  {:>10}\n", s.empty_after_cleaning);
    t += &format!("  - exact duplicates      {:>10}\n", s.exact_duplicates);
    t += &format!("  - near duplicates       {:>10}\n", s.near_duplicates);
    for (rule, n) in &s.filtered {
        t += &format!("  - filter {rule:<15}{n:>10}\n");
    }
    t += &format!("documents kept            {:>10}   ({} characters)\n", s.kept, s.chars_out);
    t += &format!("train                     {:>10} documents, {} tokens\n", s.train_documents, s.train_tokens);
    t += &format!(
        "validation                {:>10} documents, {} tokens (split by {})\n",
        s.val_documents, s.val_tokens, s.split
    );
    t
}
