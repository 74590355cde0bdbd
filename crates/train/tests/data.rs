//! Dataset engineering: each step removes what it should and counts it, bad input names the
//! file and line, shards round-trip and refuse corruption, and pretraining reads a prepared
//! dataset.

use std::path::{Path, PathBuf};

use lmstack_train::data::{self, filter::Filters, shards, DataConfig, DocSplit, ShardSet, Tokens};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lmstack-data-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn jsonl(dir: &Path, name: &str, texts: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let lines: Vec<String> = texts.iter().map(|t| serde_json::json!({ "text": t, "id": 1 }).to_string()).collect();
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

/// 150 pseudo-random words from a 500-word vocabulary (so 5-gram shingles are distinct).
fn long_doc(seed: u64) -> String {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..150)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            format!("w{}", (x >> 33) % 500)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `doc` with word `i` replaced.
fn edit(doc: &str, i: usize) -> String {
    let mut w: Vec<&str> = doc.split(' ').collect();
    w[i] = "changed";
    w.join(" ")
}

#[test]
fn each_step_removes_and_counts() {
    let dir = tmp("steps");
    let base = long_doc(1);
    let near = edit(&base, 60); // one word of 150 differs
    let other = long_doc(2);
    let input = jsonl(
        &dir,
        "docs.jsonl",
        &[
            &base,
            &base,                                    // exact duplicate
            &near,                                    // near duplicate
            &other,                                   // distinct
            "Caf\u{e9}\u{200b}  \r\n",                // cleaned, kept
            "   \u{0} \n ",                           // empty after cleaning
            "hi",                                     // too short
            "#$%^&*()!@#$%^&* x",                     // symbols
            "same line\nsame line\nsame line\nother", // repeated lines
        ],
    );
    let cfg = DataConfig {
        inputs: vec![input],
        out: dir.join("out"),
        filters: Filters { min_chars: 3, max_chars: 0, max_symbol_ratio: 1.0, max_repeated_lines: 0.3 },
        ..DataConfig::default()
    };
    let m = data::prepare(&cfg).unwrap();
    let s = &m.stats;
    assert_eq!(s.documents, 9);
    assert_eq!(s.empty_after_cleaning, 1);
    assert_eq!(s.exact_duplicates, 1);
    assert_eq!(s.near_duplicates, 1);
    assert_eq!(s.filtered["too_short"], 1);
    assert_eq!(s.filtered["symbol_ratio"], 1);
    assert_eq!(s.filtered["repeated_lines"], 1);
    assert_eq!(s.kept, 3);
    assert_eq!(s.train_documents + s.val_documents, 3);
    assert!(s.val_documents >= 1 && s.train_documents >= 1);
    assert!(data::report(s).contains("near duplicates"));
    // The same settings give the same dataset.
    let again = data::prepare(&DataConfig { out: dir.join("out2"), ..cfg.clone() }).unwrap();
    assert_eq!(again.stats, m.stats);
    let a = std::fs::read(dir.join("out/train-00000.bin")).unwrap();
    let b = std::fs::read(dir.join("out2/train-00000.bin")).unwrap();
    assert_eq!(a, b);
}

#[test]
fn minhash_threshold_separates_similar_from_different() {
    let mh = data::dedup::MinHasher::new(128, 0.8, 7);
    let a = long_doc(3);
    let b = edit(&edit(&a, 20), 100);
    let c = long_doc(4);
    let sig = |t: &str| mh.signature(&data::dedup::MinHasher::shingles(t));
    let (sa, sb, sc) = (sig(&a), sig(&b), sig(&c));
    // Streamed over the shingles (as dedup does), the same signature; short texts too.
    assert_eq!(mh.signature_of(&a), sa);
    for t in ["", "abc", "abcdefgh", "a b c d", "a b c d e f"] {
        assert_eq!(mh.signature_of(t), sig(t), "{t:?}");
    }
    assert!(data::dedup::MinHasher::similarity(&sa, &sb) > 0.8);
    assert!(data::dedup::MinHasher::similarity(&sa, &sc) < 0.5);
    assert_eq!(mh.dedup(&[a.clone(), b, c]), vec![true, false, true]);
    let (bands, rows) = mh.bands();
    assert_eq!(bands * rows, 128);
}

#[test]
fn bad_jsonl_lines_name_file_and_line() {
    let dir = tmp("jsonl");
    let cases = [
        ("{\"text\": \"ok\"}\n[1, 2]\n", "not a JSON object (found an array)", 2),
        ("{\"text\": \"ok\"}\n\n{\"body\": \"x\"}\n", "no field `text`", 3),
        ("{\"text\": 5}\n", "field `text` is not a string (found a number)", 1),
        ("{\"text\": \"ok\"}\n{oops\n", "not valid JSON", 2),
    ];
    for (i, (content, want, line)) in cases.iter().enumerate() {
        let p = dir.join(format!("bad{i}.jsonl"));
        std::fs::write(&p, content).unwrap();
        let cfg = DataConfig { inputs: vec![p.clone()], out: dir.join(format!("o{i}")), ..DataConfig::default() };
        let e = data::prepare(&cfg).unwrap_err().to_string();
        assert!(e.contains(&format!("bad{i}.jsonl:{line}:")) && e.contains(want), "case {i}: {e}");
        assert!(!dir.join(format!("o{i}/manifest.json")).exists(), "no output on error");
    }
    // With skipping, bad lines are counted instead.
    let p = dir.join("mixed.jsonl");
    std::fs::write(&p, "{\"text\": \"first document here\"}\n[1]\n{\"text\": \"second document here\"}\n7\n").unwrap();
    let cfg = DataConfig { inputs: vec![p], out: dir.join("mixed"), skip_bad_lines: true, ..DataConfig::default() };
    let m = data::prepare(&cfg).unwrap();
    assert_eq!((m.stats.bad_lines, m.stats.documents), (2, 2));
    // Missing input, non-UTF-8 text, nothing left.
    let cfg = DataConfig { inputs: vec![dir.join("nope.txt")], out: dir.join("x"), ..DataConfig::default() };
    assert!(data::prepare(&cfg).unwrap_err().to_string().contains("nope.txt"));
    let bin = dir.join("bin.txt");
    std::fs::write(&bin, b"fine\n\xc3\x28 broken").unwrap();
    let cfg = DataConfig { inputs: vec![bin], out: dir.join("y"), ..DataConfig::default() };
    let e = data::prepare(&cfg).unwrap_err().to_string();
    assert!(e.contains("bin.txt:2") && e.contains("UTF-8"), "{e}");
    let short = jsonl(&dir, "short.jsonl", &["a", "b"]);
    let cfg = DataConfig {
        inputs: vec![short],
        out: dir.join("z"),
        filters: Filters { min_chars: 5, ..Filters::default() },
        ..DataConfig::default()
    };
    assert!(data::prepare(&cfg).unwrap_err().to_string().contains("every document was removed"));
    // An empty file is named when nothing else is left, and skipped and counted beside others.
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, " \n\n").unwrap();
    let cfg = DataConfig { inputs: vec![empty.clone()], out: dir.join("e1"), ..DataConfig::default() };
    let e = data::prepare(&cfg).unwrap_err().to_string();
    assert!(e.contains("no documents") && e.contains("empty.txt is empty"), "{e}");
    assert!(!dir.join("e1/manifest.json").exists(), "no output on error");
    let text = jsonl(&dir, "some.jsonl", &["a first document of some length", "and a second one, also long"]);
    let cfg = DataConfig { inputs: vec![empty, text], out: dir.join("e2"), ..DataConfig::default() };
    let m = data::prepare(&cfg).unwrap();
    assert_eq!((m.stats.files, m.stats.empty_files, m.stats.documents), (2, 1, 2));
}

#[test]
fn shards_round_trip_and_refuse_corruption() {
    let dir = tmp("shards");
    let a: Vec<u32> = (0..1000).map(|i| i * 37 % 65_000).collect();
    let b: Vec<u32> = (0..500).map(|i| i * 11).collect();
    shards::write(&dir.join("a.bin"), &a, 2).unwrap();
    shards::write(&dir.join("b.bin"), &b, 4).unwrap();
    let entries = vec![
        shards::ShardEntry { file: "a.bin".into(), tokens: 1000 },
        shards::ShardEntry { file: "b.bin".into(), tokens: 500 },
    ];
    let set = ShardSet::open(&dir, &entries, 65_536).unwrap();
    assert_eq!(set.len(), 1500);
    let all: Vec<u32> = a.iter().chain(&b).copied().collect();
    for (start, n) in [(0, 10), (995, 10), (990, 510), (1490, 10)] {
        let mut out = Vec::new();
        set.extend_into(start, n, &mut out);
        assert_eq!(out, &all[start..start + n], "window {start}+{n}");
    }
    assert!(shards::write(&dir.join("c.bin"), &[70_000], 2).is_err());
    // Out-of-vocabulary ids and truncation are refused.
    assert!(ShardSet::open(&dir, &entries, 1000).unwrap_err().to_string().contains("outside the vocabulary"));
    let bytes = std::fs::read(dir.join("b.bin")).unwrap();
    std::fs::write(dir.join("b.bin"), &bytes[..bytes.len() - 3]).unwrap();
    let e = shards::Shard::open(&dir.join("b.bin")).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    std::fs::write(dir.join("d.bin"), b"not a shard at all, really not").unwrap();
    assert!(shards::Shard::open(&dir.join("d.bin")).unwrap_err().to_string().contains("magic"));
}

#[test]
fn pretraining_reads_a_prepared_dataset() {
    let dir = tmp("e2e");
    let text: String = lmstack_train::corpus::TINY_SHAKESPEARE.chars().take(30_000).collect();
    let input = dir.join("plays.txt");
    std::fs::write(&input, text).unwrap();
    let cfg = DataConfig {
        inputs: vec![input],
        out: dir.join("ds"),
        tokenizer: "bpe:300".into(),
        doc_split: DocSplit::Paragraphs,
        shard_tokens: 2000,
        ..DataConfig::default()
    };
    // Prepared again into the same directory with fewer shards, the earlier dataset's extra
    // shards are removed: every shard file there is one the manifest lists.
    let one = DataConfig { shard_tokens: 1_000_000, ..cfg.clone() };
    data::prepare(&one).unwrap();
    let m = data::prepare(&cfg).unwrap();
    assert!(m.train.len() > 1, "expected several shards");
    assert_eq!(m.vocab_size, 300);
    let ds = data::Dataset::open(&dir.join("ds")).unwrap();
    assert_eq!(ds.train.len(), m.stats.train_tokens);
    data::prepare(&one).unwrap();
    let mut bins: Vec<String> = std::fs::read_dir(dir.join("ds"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".bin"))
        .collect();
    bins.sort();
    assert_eq!(bins, ["train-00000.bin", "val-00000.bin"]);
    let m = data::prepare(&cfg).unwrap();
    let pcfg = lmstack_train::config::PretrainConfig {
        out_dir: dir.join("run"),
        data: Some(dir.join("ds")),
        n_layer: 1,
        n_head: 2,
        n_embd: 16,
        block_size: 16,
        batch_size: 4,
        max_steps: 5,
        eval_interval: 5,
        eval_iters: 2,
        sample_tokens: 5,
        ..Default::default()
    };
    let opts = lmstack_train::trainer::RunOptions::default();
    let s = lmstack_train::pretrain::run(&pcfg, &opts).unwrap();
    assert_eq!(s.split_tokens, (m.stats.train_tokens, m.stats.val_tokens));
    let tok = lmstack_core::Tokenizer::from_dir(&dir.join("run/model")).unwrap();
    assert_eq!(tok.vocab_size(), 300);
    // The shards hold that tokenizer's ids: naming it again is fine, another one is refused.
    let same = lmstack_train::config::PretrainConfig {
        out_dir: dir.join("run-same"),
        tokenizer: dir.join("ds/tokenizer").display().to_string(),
        ..pcfg.clone()
    };
    lmstack_train::pretrain::run(&same, &opts).unwrap();
    let chars = dir.join("chars");
    lmstack_core::Tokenizer::from_chars("abc".chars()).unwrap().save(&chars).unwrap();
    for other in ["bpe:500".to_owned(), chars.display().to_string()] {
        let other_tok =
            lmstack_train::config::PretrainConfig { out_dir: dir.join("run-other"), tokenizer: other, ..pcfg.clone() };
        let e = lmstack_train::pretrain::run(&other_tok, &opts).unwrap_err().to_string();
        assert!(e.contains("`tokenizer`") && e.contains("leave --tokenizer out"), "{e}");
    }
}

/// A document over `max_doc_bytes` is refused naming file:line (JSONL line, text file, the
/// paragraph's first line), or skipped and counted with `skip_bad_lines`.
#[test]
fn documents_over_the_size_bound_are_refused_where_they_are() {
    let dir = tmp("maxdoc");
    let big = "word ".repeat(100);
    let j = jsonl(&dir, "docs.jsonl", &["a short one", &big, "another short one"]);
    let t = dir.join("book.txt");
    std::fs::write(&t, &big).unwrap();
    let p = dir.join("paras.txt");
    std::fs::write(&p, format!("first paragraph\nof two lines\n\n\n\n{big}\n\nlast one")).unwrap();
    let cfg = |input: &std::path::Path, split: DocSplit| DataConfig {
        inputs: vec![input.to_owned()],
        out: dir.join("out"),
        max_doc_bytes: 200,
        doc_split: split,
        ..DataConfig::default()
    };
    for (input, split, at) in [
        (&j, DocSplit::File, "docs.jsonl:2:"),
        (&t, DocSplit::File, "book.txt:1:"),
        (&p, DocSplit::Paragraphs, "paras.txt:6:"),
    ] {
        let e = data::prepare(&cfg(input, split)).unwrap_err().to_string();
        assert!(e.contains(at) && e.contains("500 bytes") && e.contains("--max-doc-bytes 200"), "{e}");
    }
    let m = data::prepare(&DataConfig { skip_bad_lines: true, ..cfg(&j, DocSplit::File) }).unwrap();
    assert_eq!((m.stats.bad_lines, m.stats.documents), (1, 2));
    let m = data::prepare(&DataConfig { skip_bad_lines: true, ..cfg(&p, DocSplit::Paragraphs) }).unwrap();
    assert_eq!((m.stats.bad_lines, m.stats.documents), (1, 2));
    // Unbounded (0), the long document is taken.
    let m = data::prepare(&DataConfig { max_doc_bytes: 0, ..cfg(&j, DocSplit::File) }).unwrap();
    assert_eq!((m.stats.bad_lines, m.stats.documents), (0, 3));
}
