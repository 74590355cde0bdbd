//! Constrained decoding: over a byte-level BPE vocabulary and a character vocabulary, with the
//! logits of a "model" that writes anything (seeded random logits), every output of a JSON
//! schema constraint parses and validates against the schema, greedy and sampled; regex and
//! choice constraints match; a schema llguidance cannot compile is an error saying so.

mod common;

use common::fixture;
use lmstack_core::sampling::SamplingParams;
use lmstack_core::{Constrainer, Decoding, Grammar, StopConditions, Tokenizer};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Decodes under `grammar` with random logits until the constraint ends the output (or 600
/// tokens pass: `None`).
fn run_to(tok: &Tokenizer, c: &Constrainer, grammar: &Grammar, params: SamplingParams, seed: u64) -> Option<String> {
    let vocab = tok.vocab_size();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let stop = StopConditions::max_tokens(600);
    let mut dec =
        Decoding::new(tok, params, &[0], 0, stop, true).unwrap().with_constraint(Some(c.constraint(grammar).unwrap()));
    let mut text = String::new();
    for _ in 0..600 {
        let logits: Vec<f32> = (0..vocab).map(|_| rng.random_range(-4.0..4.0)).collect();
        let step = dec.step(&logits).unwrap();
        text.push_str(&step.text);
        match step.finish {
            Some(lmstack_core::Finish::Stop) => {
                text.push_str(&dec.finish());
                return Some(text);
            }
            Some(lmstack_core::Finish::Length) => return None,
            None => {}
        }
    }
    None
}

/// As [`run_to`], for grammars whose outputs are bounded: they must end.
fn run(tok: &Tokenizer, c: &Constrainer, grammar: &Grammar, params: SamplingParams, seed: u64) -> String {
    run_to(tok, c, grammar, params, seed).expect("the output ends within 600 tokens")
}

fn schemas() -> Vec<Value> {
    vec![
        json!({"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
               "kind": {"enum": ["cat", "dog", "bird"]}, "version": {"const": 2},
               "score": {"type": "number", "minimum": -1, "maximum": 1},
               "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,5}$"}, "minItems": 1, "maxItems": 3},
               "note": {"type": "string", "maxLength": 6}},
               "required": ["kind", "version", "tags"], "additionalProperties": false}),
        json!({"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
               "required": ["x", "y"], "additionalProperties": false}},
               "type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 1, "maxItems": 4}),
        json!({"anyOf": [{"type": "boolean"}, {"type": "null"},
               {"type": "object", "properties": {"ville": {"enum": ["Zürich", "Kraków", "東京"]}}, "required": ["ville"],
                "additionalProperties": false}]}),
    ]
}

#[test]
fn json_schema_outputs_always_validate() {
    // A byte-level BPE trained here (every byte has a token, as in GPT-2's vocabulary).
    let dir = std::env::temp_dir().join(format!("lmstack-constraint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corpus = dir.join("corpus.txt");
    let text = std::fs::read_to_string(common::repo_data("tinyshakespeare.txt")).unwrap();
    std::fs::write(&corpus, &text[..40_000]).unwrap();
    let byte_level = Tokenizer::train_bpe(&[&corpus], 600, &["<|endoftext|>"]).unwrap();
    let chars =
        Tokenizer::from_chars(" {}[]\":,.-0123456789abcdefghijklmnopqrstuvwxyzéü東京Zürichaków\\".chars()).unwrap();
    for (name, tok) in [("byte-level BPE", &byte_level), ("characters", &chars)] {
        let c = Constrainer::new(tok, tok.vocab_size()).unwrap();
        for (i, schema) in schemas().iter().enumerate() {
            let grammar = Grammar::json_schema(schema);
            let validator = jsonschema::validator_for(schema).unwrap();
            for seed in 0..6 {
                let params = if seed == 0 {
                    SamplingParams::greedy()
                } else {
                    SamplingParams { temperature: 1.0, seed: Some(seed), ..Default::default() }
                };
                let out = run(tok, &c, &grammar, params, seed);
                let v: Value =
                    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{name}, schema {i}: {out:?}: {e}"));
                assert!(validator.is_valid(&v), "{name}, schema {i}, seed {seed}: {out}");
            }
        }
        // Any object (random logits may write one string for ever: what ends is an object), a
        // regular expression, a choice.
        for seed in 0..4 {
            let params = SamplingParams { temperature: 1.0, seed: Some(seed), ..Default::default() };
            if let Some(out) = run_to(tok, &c, &Grammar::json_object(), params, seed) {
                // JSON allows numbers past f64 (1e999), which serde_json will not read.
                match serde_json::from_str::<Value>(&out) {
                    Ok(v) => assert!(v.is_object(), "{out}"),
                    Err(e) => assert!(e.to_string().contains("number out of range"), "{out}: {e}"),
                }
            }
        }
        let rx = regex_match(&run(tok, &c, &Grammar::Regex(r"[0-9]{3}-[a-z]{2}".into()), SamplingParams::greedy(), 2));
        assert!(rx, "regex");
        let choice = Grammar::Choice(vec!["yes".into(), "no".into(), "maybe so".into()]);
        for seed in 0..5 {
            let params = SamplingParams { temperature: 1.0, seed: Some(seed), ..Default::default() };
            let out = run(tok, &c, &choice, params, seed);
            assert!(["yes", "no", "maybe so"].contains(&out.as_str()), "{name}: {out:?}");
        }
    }
}

fn regex_match(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 6 && b[..3].iter().all(u8::is_ascii_digit) && b[3] == b'-' && b[4..].iter().all(u8::is_ascii_lowercase)
}

#[test]
fn a_schema_that_cannot_compile_is_an_error() {
    let tok = Tokenizer::from_dir(&fixture("tiny-gpt2")).unwrap();
    let c = Constrainer::new(&tok, tok.vocab_size()).unwrap();
    let bad = Grammar::json_schema(
        &json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}),
    );
    let e = c.constraint(&bad).unwrap_err().to_string();
    assert!(e.contains("grammar"), "{e}");
    let e = c.constraint(&Grammar::Regex("(unclosed".into())).unwrap_err().to_string();
    assert!(e.contains("grammar"), "{e}");
}

#[test]
fn a_grammar_the_vocabulary_cannot_spell_is_refused_at_once() {
    let tok = Tokenizer::from_chars("abc".chars()).unwrap();
    let c = Constrainer::new(&tok, tok.vocab_size()).unwrap();
    let e = c.constraint(&Grammar::json_object()).unwrap_err().to_string();
    assert!(e.contains("no token of the vocabulary can begin"), "{e}");
    assert!(c.constraint(&Grammar::Regex("[ab]+c".into())).is_ok());
}

/// Where the grammar allows one continuation only, the tokens are forced: the first mask
/// allows only the first of them, and `Decoding::forced` hands out the rest at once (fed
/// without asking the model), ending the output when the grammar is complete.
#[test]
fn forced_tokens_are_fast_forwarded() {
    let tok = Tokenizer::from_chars("abcdefghijklmnopqrstuvwxyz {}\":,".chars()).unwrap();
    let c = Constrainer::new(&tok, tok.vocab_size()).unwrap();
    let grammar = Grammar::json_schema(&json!({"type": "object", "properties": {"colour": {"enum": ["red", "green"]}},
                                                 "required": ["colour"], "additionalProperties": false}));
    let mut dec = Decoding::new(&tok, SamplingParams::greedy(), &[0], 0, StopConditions::max_tokens(100), true)
        .unwrap()
        .with_constraint(Some(c.constraint(&grammar).unwrap()));
    // The model wants `z` everywhere; the grammar allows `{` only.
    let z = tok.encode("z", false).unwrap()[0] as usize;
    let mut logits = vec![0.0f32; tok.vocab_size()];
    logits[z] = 10.0;
    let first = dec.step(&logits).unwrap();
    assert_eq!(first.text, "{");
    let forced = dec.forced(100).unwrap();
    let text: String = forced.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(text, "\"colour\": \"");
    assert!(forced.iter().all(|s| s.finish.is_none() && s.sampled.logprob == 0.0));
    // A choice: `r` or `g`; then the rest of the value and the object's end are forced.
    let g = tok.encode("g", false).unwrap()[0] as usize;
    logits[g] = 20.0;
    assert_eq!(dec.step(&logits).unwrap().text, "g");
    let rest = dec.forced(100).unwrap();
    let text: String = rest.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(text, "reen\"}");
    assert_eq!(rest.last().unwrap().finish, Some(lmstack_core::Finish::Stop));
    assert_eq!(dec.generated(), 1 + 11 + 1 + 6);
    // A limit: at most that many are handed out.
    let mut dec = Decoding::new(&tok, SamplingParams::greedy(), &[0], 0, StopConditions::max_tokens(5), true)
        .unwrap()
        .with_constraint(Some(c.constraint(&grammar).unwrap()));
    dec.step(&logits).unwrap();
    let two = dec.forced(2).unwrap();
    assert_eq!(two.len(), 2);
    let capped = dec.forced(100).unwrap();
    assert_eq!(capped.len(), 2, "max_tokens 5: one sampled, four forced");
    assert_eq!(capped.last().unwrap().finish, Some(lmstack_core::Finish::Length));
}
