//! Tool calling: under each `tool_choice`, whatever a "model" writes (seeded random logits, or
//! logits that follow a script and then turn random) reads as calls of the given tools whose
//! arguments validate against the tools' parameter schemas; read as it streams, the answer
//! reassembles to the same calls.

mod common;

use lmstack_core::sampling::SamplingParams;
use lmstack_core::tools::{self, Tool, ToolCallReader, ToolChoice};
use lmstack_core::{Constrainer, Decoding, Finish, StopConditions, Tokenizer};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn byte_level() -> Tokenizer {
    let dir = std::env::temp_dir().join(format!("lmstack-tools-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corpus = dir.join("corpus.txt");
    let text = std::fs::read_to_string(common::repo_data("tinyshakespeare.txt")).unwrap();
    std::fs::write(&corpus, &text[..40_000]).unwrap();
    Tokenizer::train_bpe(&[&corpus], 600, &["<|endoftext|>"]).unwrap()
}

fn tools() -> Vec<Tool> {
    tools::tools_from_openai(Some(&json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
         "parameters": {"type": "object", "properties": {
             "city": {"type": "string", "maxLength": 10},
             "unit": {"enum": ["celsius", "fahrenheit"]}},
          "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
             "a": {"type": "integer", "minimum": -100, "maximum": 100}, "b": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["a", "b"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "plan", "parameters": {"type": "object",
         "$defs": {"step": {"type": "object", "properties": {"do": {"type": "string", "maxLength": 6}},
                            "required": ["do"], "additionalProperties": false}},
         "properties": {"steps": {"type": "array", "items": {"$ref": "#/$defs/step"}, "minItems": 1, "maxItems": 2}},
         "required": ["steps"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {},
          "additionalProperties": false}}}
    ])))
    .unwrap()
}

/// Decodes under `grammar`: logits follow `script` while the text so far is a prefix of it
/// (its next token gets +30), then are random. Returns the text, whether it ended (not by
/// length), and what a streaming reader made of it.
fn run(
    tok: &Tokenizer,
    pieces: &[String],
    c: &Constrainer,
    grammar: &lmstack_core::Grammar,
    script: &str,
    seed: u64,
) -> (String, bool, Vec<tools::ToolEvent>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let params = if seed == 0 {
        SamplingParams::greedy()
    } else {
        SamplingParams { temperature: 1.0, seed: Some(seed), ..Default::default() }
    };
    let mut dec = Decoding::new(tok, params, &[0], 0, StopConditions::max_tokens(400), true)
        .unwrap()
        .with_constraint(Some(c.constraint(grammar).unwrap()));
    let (mut text, mut reader, mut events) = (String::new(), ToolCallReader::new(), Vec::new());
    loop {
        let mut logits: Vec<f32> = (0..pieces.len()).map(|_| rng.random_range(-4.0..4.0)).collect();
        if let Some(rest) = script.strip_prefix(text.as_str()) {
            for (i, p) in pieces.iter().enumerate() {
                if !p.is_empty() && rest.starts_with(p.as_str()) {
                    logits[i] += 30.0 + p.len() as f32;
                }
            }
        }
        let step = dec.step(&logits).unwrap();
        text.push_str(&step.text);
        events.extend(reader.push(&step.text));
        if let Some(f) = step.finish {
            let tail = dec.finish();
            text.push_str(&tail);
            events.extend(reader.push(&tail));
            events.extend(reader.finish());
            return (text, f == Finish::Stop, events);
        }
    }
}

/// Checks every call names a tool and its arguments validate; returns how many.
fn check_calls(calls: &[(String, String)], tools: &[Tool], ended: bool, text: &str) -> usize {
    for (k, (name, args)) in calls.iter().enumerate() {
        let tool = tools.iter().find(|t| &t.name == name).unwrap_or_else(|| panic!("unknown tool {name}: {text}"));
        if !ended && k + 1 == calls.len() {
            continue; // cut by length mid-call
        }
        let v: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{name}: {args:?}: {e}\n{text}"));
        let validator = jsonschema::validator_for(&tool.parameters).unwrap();
        assert!(validator.is_valid(&v), "{name}: {args}\n{text}");
    }
    calls.len()
}

#[test]
fn every_call_validates_under_each_tool_choice() {
    let tok = byte_level();
    let pieces: Vec<String> =
        (0..tok.vocab_size() as u32).map(|t| tok.decode(&[t], false).unwrap_or_default()).collect();
    let c = Constrainer::new(&tok, tok.vocab_size()).unwrap();
    let tools = tools();
    let choices = [
        (ToolChoice::Required, true),
        (ToolChoice::Required, false),
        (ToolChoice::Function("plan".into()), true),
        (ToolChoice::Function("now".into()), true),
    ];
    for (choice, parallel) in &choices {
        let g = tools::grammar(&tools, choice, *parallel).unwrap();
        for seed in 0..5 {
            let (text, ended, events) = run(&tok, &pieces, &c, &g, "", seed);
            let (content, calls) = tools::read_answer(&text);
            assert_eq!(tools::collect(events), (content.clone(), calls.clone()), "streamed: {text}");
            assert_eq!(content, None, "{choice:?}: no text besides calls: {text:?}");
            let n = check_calls(&calls, &tools, ended, &text);
            assert!(n >= 1, "{choice:?}: {text}");
            if !parallel || matches!(choice, ToolChoice::Function(_)) {
                assert_eq!(n, 1, "{choice:?}: {text}");
            }
            if let ToolChoice::Function(f) = choice {
                assert_eq!(&calls[0].0, f);
            }
        }
    }
    // `auto`: text, then the model opens a call (the script) and writes anything: the call is
    // still valid. Without the script the model writes text that holds no call.
    for parallel in [true, false] {
        let g = tools::grammar(&tools, &ToolChoice::Auto, parallel).unwrap();
        for (seed, script) in [
            "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa",
            "<tool_call>\n{\"na",
        ]
        .iter()
        .enumerate()
        {
            let (text, ended, events) = run(&tok, &pieces, &c, &g, script, seed as u64 + 1);
            let (content, calls) = tools::read_answer(&text);
            assert_eq!(tools::collect(events), (content.clone(), calls.clone()), "streamed: {text}");
            assert!(check_calls(&calls, &tools, ended, &text) >= 1, "{text}");
            if seed == 0 {
                // (What follows the call, with parallel calls, is random text.)
                assert!(content.as_deref().is_some_and(|c| c.starts_with("Let me look.")), "{text}");
            }
            if !parallel {
                assert_eq!(calls.len(), 1, "{text}");
                assert!(!ended || text.trim_end().ends_with(tools::CALL_CLOSE), "nothing after the call: {text}");
            }
        }
        let (text, _, _) = run(&tok, &pieces, &c, &g, "", 7);
        assert!(!text.contains(tools::CALL_OPEN) && !text.is_empty(), "{text:?}");
        assert!(tools::read_answer(&text).1.is_empty());
    }
    assert!(tools::grammar(&tools, &ToolChoice::None, true).is_none());
}
