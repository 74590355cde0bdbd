//! Tokenizers: files written by Python `tokenizers` load and encode identically; tokenizers
//! trained here round-trip text exactly and save/load; the incremental decoder never emits
//! broken UTF-8.

mod common;

use common::{fixture, repo_data};
use lmstack_core::Tokenizer;
use serde_json::Value;

/// Python-produced ids and decodings for each fixture tokenizer.
#[test]
fn hf_tokenizer_files_encode_like_python() {
    for name in ["tiny-gpt2", "tiny-bert"] {
        let tok = Tokenizer::from_dir(&fixture(name)).unwrap();
        let cases: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(fixture(name).join("tokenizer_cases.json")).unwrap())
                .unwrap();
        for c in cases {
            let text = c["text"].as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
            assert_eq!(tok.encode(text, true).unwrap(), want, "{name}: {text:?}");
            assert_eq!(tok.decode(&want, true).unwrap(), c["decoded"].as_str().unwrap(), "{name}: decode {text:?}");
        }
    }
    let bert = Tokenizer::from_dir(&fixture("tiny-bert")).unwrap();
    assert_eq!(bert.special_tokens().mask.as_deref(), Some("[MASK]"));
    assert!(bert.mask_id().is_some() && bert.pad_id().is_some());
    let gpt2 = Tokenizer::from_dir(&fixture("tiny-gpt2")).unwrap();
    assert_eq!(gpt2.eos_id(), Some(0));
    assert!(gpt2.chat_template().unwrap().contains("messages"));
}

fn shakespeare_excerpt(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo_data("tinyshakespeare.txt")).unwrap();
    let cut = text.char_indices().nth(60_000).unwrap().0;
    let p = dir.join("corpus.txt");
    std::fs::write(&p, &text[..cut]).unwrap();
    p
}

const SAMPLES: &[&str] = &[
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nnewlines\n\n",
    "Multi-byte: café, naïve, 日本語, emoji 😀🎭, combining é",
    "",
];

#[test]
fn trained_bpe_round_trips_and_reloads() {
    let dir = tempdir("bpe");
    let corpus = shakespeare_excerpt(&dir);
    let tok = Tokenizer::train_bpe(&[&corpus], 400, &["<|endoftext|>"]).unwrap();
    assert_eq!(tok.vocab_size(), 400);
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    for s in SAMPLES {
        let ids = tok.encode(s, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), *s, "round trip of {s:?}");
    }
    // Common words merge into fewer tokens than characters.
    let ids = tok.encode("the king and the queen", false).unwrap();
    assert!(ids.len() < 22, "no merges learned: {ids:?}");
    tok.save(&dir).unwrap();
    let back = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(back.encode(SAMPLES[0], false).unwrap(), tok.encode(SAMPLES[0], false).unwrap());
    assert_eq!(back.eos_id(), Some(0));
    let batch = back.encode_batch(&SAMPLES[..3], false).unwrap();
    assert_eq!(batch[1], tok.encode(SAMPLES[1], false).unwrap());
    let e = Tokenizer::train_bpe(&[&corpus], 100, &[]).unwrap_err();
    assert!(e.to_string().contains("vocab_size"), "{e}");
}

#[test]
fn char_tokenizer_matches_nanogpt_vocabulary() {
    let tok = Tokenizer::train_chars(&[&repo_data("tinyshakespeare.txt")]).unwrap();
    // nanoGPT's 65 characters, sorted, plus <unk> for characters never seen.
    assert_eq!(tok.vocab_size(), 66);
    assert_eq!(tok.encode("\n", false).unwrap(), vec![0]);
    assert_eq!(tok.encode(" ", false).unwrap(), vec![1]);
    assert_eq!(tok.encode("a", false).unwrap(), vec![39]);
    let s = "First Citizen:\nBefore we proceed any further, hear me speak.";
    let ids = tok.encode(s, false).unwrap();
    assert_eq!(ids.len(), s.chars().count());
    assert_eq!(tok.decode(&ids, false).unwrap(), s);
    // Unseen characters become <unk> instead of vanishing.
    let ids = tok.encode("a{b", false).unwrap();
    assert_eq!(ids, vec![39, 65, 40]);
    let dir = tempdir("chars");
    tok.save(&dir).unwrap();
    assert_eq!(Tokenizer::from_dir(&dir).unwrap().encode(s, false).unwrap(), tok.encode(s, false).unwrap());
}

#[test]
fn incremental_decoder_emits_only_whole_characters() {
    let dir = tempdir("inc");
    let corpus = shakespeare_excerpt(&dir);
    let bpe = Tokenizer::train_bpe(&[&corpus], 300, &["<|endoftext|>"]).unwrap();
    let hf = Tokenizer::from_dir(&fixture("tiny-gpt2")).unwrap();
    let chars = Tokenizer::from_chars("abc 日本語😀é".chars()).unwrap();
    let text = "Caf\u{e9} 日本語 😀🎭 and e\u{301} — done";
    for tok in [&bpe, &hf, &chars] {
        let ids = tok.encode(text, false).unwrap();
        let mut dec = tok.incremental_decoder(false);
        let mut out = String::new();
        for &id in &ids {
            if let Some(piece) = dec.push(id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "emitted a broken character: {piece:?}");
                out.push_str(&piece);
            }
        }
        if let Some(rest) = dec.finish().unwrap() {
            out.push_str(&rest);
        }
        assert_eq!(out, tok.decode(&ids, false).unwrap());
    }
    // Byte-level tokens split multi-byte characters: the untrained BPE has only bytes there.
    let ids = bpe.encode("😀", false).unwrap();
    assert!(ids.len() > 1, "expected the emoji to span several byte tokens");
    let mut dec = bpe.incremental_decoder(false);
    let pieces: Vec<Option<String>> = ids.iter().map(|&i| dec.push(i).unwrap()).collect();
    assert!(pieces[..ids.len() - 1].iter().all(Option::is_none), "{pieces:?}");
    assert_eq!(pieces.last().unwrap().as_deref(), Some("😀"));
}

#[test]
fn bad_tokenizer_files_are_clear_errors() {
    let dir = tempdir("bad");
    std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
    let e = Tokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    let good = Tokenizer::from_chars("ab".chars()).unwrap();
    good.save(&dir).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "</s>"}"#).unwrap();
    let e = Tokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("eos_token") && e.contains("</s>"), "{e}");
    let e = Tokenizer::from_dir(&dir.join("missing")).unwrap_err().to_string();
    assert!(e.contains("missing"), "{e}");
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("lmstack-tok-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `encode_long` (a piece at a time, cut only where the tokenizer allows) gives `encode`'s ids
/// for character, byte-level BPE, WordPiece and SentencePiece-style tokenizers; for the last,
/// cutting before spaces would change the ids, so it is encoded whole.
#[test]
fn long_texts_encode_in_pieces_like_whole() {
    let dir = tempdir("long");
    let corpus = shakespeare_excerpt(&dir);
    let text = std::fs::read_to_string(&corpus).unwrap();
    let text = format!("{text}  double  spaces,\ttabs\t and café naïve 日本語 😀 at the end");
    let chars = Tokenizer::from_chars(text.chars()).unwrap();
    let bpe = Tokenizer::train_bpe(&[&corpus], 400, &["<|endoftext|>"]).unwrap();
    let gpt2 = Tokenizer::from_dir(&fixture("tiny-gpt2")).unwrap();
    let bert = Tokenizer::from_dir(&fixture("tiny-bert")).unwrap();
    // Llama 2's shape: a normaliser that prepends "▁" and replaces spaces, no pre-tokenizer.
    let mut vocab = serde_json::Map::new();
    for (i, c) in text.chars().chain(['▁']).collect::<std::collections::BTreeSet<char>>().into_iter().enumerate() {
        vocab.insert(c.to_string(), i.into());
    }
    let n = vocab.len();
    vocab.insert("▁t".into(), n.into());
    vocab.insert("▁th".into(), (n + 1).into());
    let spm = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": [["▁", "t"], ["▁t", "h"]]}
    });
    std::fs::write(dir.join("tokenizer.json"), spm.to_string()).unwrap();
    let spm = Tokenizer::from_dir(&dir).unwrap();
    for (name, tok) in [("chars", &chars), ("bpe", &bpe), ("gpt2", &gpt2), ("bert", &bert), ("spm", &spm)] {
        let whole = tok.encode(&text, false).unwrap();
        for piece in [1, 100, 5000] {
            assert_eq!(tok.encode_long(&text, piece).unwrap(), whole, "{name}, pieces of {piece} bytes");
        }
    }
    // What makes the last one different: cut before a space, it gains a "▁" per piece.
    let cut = text[1000..].find(' ').unwrap() + 1000;
    let mut pieces = spm.encode(&text[..cut], false).unwrap();
    pieces.extend(spm.encode(&text[cut..], false).unwrap());
    assert_ne!(pieces, spm.encode(&text, false).unwrap());
}
