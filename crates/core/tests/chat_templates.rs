//! Chat templates render exactly as `transformers.apply_chat_template` rendered them
//! (`tests/data/chat_templates.json`, from `make_chat_golden.py`): ChatML, Llama-3, Zephyr,
//! Mistral (including its `raise_exception` on a system message) and a template using
//! `tojson(indent=…)`, dict methods, filters in loops and `{% continue %}`.

mod common;

use lmstack_core::chat::ChatTemplate;
use lmstack_core::SpecialTokens;
use serde_json::{Map, Value};

#[test]
fn templates_render_as_transformers_does() {
    let text = std::fs::read_to_string(common::fixture("chat_templates.json")).unwrap();
    let golden: Value = serde_json::from_str(&text).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    let mut checked = 0;
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let conv = case["conversation"].as_str().unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let tmpl = ChatTemplate::new(golden["templates"][name].as_str().unwrap()).unwrap();
        let special = SpecialTokens {
            bos: case["bos_token"].as_str().map(str::to_owned),
            eos: case["eos_token"].as_str().map(str::to_owned),
            ..Default::default()
        };
        let mut extra = Map::new();
        if !case["tools"].is_null() {
            extra.insert("tools".into(), case["tools"].clone());
        }
        let got = tmpl.render(&golden["conversations"][conv], gen, &special, &extra);
        let what = format!("{name} / {conv} / add_generation_prompt={gen}");
        match (&case["expected"], &case["error"]) {
            (Value::String(exp), _) => assert_eq!(got.unwrap(), *exp, "{what}"),
            (_, Value::String(err)) => {
                let e = got.unwrap_err().to_string();
                assert!(e.contains(err.as_str()), "{what}: expected error `{err}`, got `{e}`");
            }
            _ => panic!("{what}: case has neither expected nor error"),
        }
        checked += 1;
    }
    assert_eq!(checked, cases.len());
}
