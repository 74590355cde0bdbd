//! Chat templates render exactly as `transformers.apply_chat_template` rendered them
//! (`tests/data/chat_templates.json`, from `make_chat_golden.py`): ChatML, Llama-3, Zephyr,
//! Mistral (including its `raise_exception` on a system message), Qwen2.5 (tools and tool calls)
//! and a template using `tojson(indent=…)`, dict methods, filters in loops and `{% continue %}`.

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

/// A conversation with tool calls as OpenAI's API sends it (arguments as JSON text, call ids),
/// prepared by `tools::messages_for_template`, renders through Qwen2.5's template exactly as
/// `transformers` rendered it from arguments given as dicts; Qwen2.5's template is told apart
/// as one that renders tools itself, the others are not.
#[test]
fn openai_tool_calls_render_through_a_template_that_takes_tools() {
    let text = std::fs::read_to_string(common::fixture("chat_templates.json")).unwrap();
    let golden: Value = serde_json::from_str(&text).unwrap();
    for (name, src) in golden["templates"].as_object().unwrap() {
        let t = ChatTemplate::new(src.as_str().unwrap()).unwrap();
        assert_eq!(t.renders_tool_calls(), name == "qwen2_5", "{name}");
    }
    let qwen = ChatTemplate::new(golden["templates"]["qwen2_5"].as_str().unwrap()).unwrap();
    let mut messages = vec![
        serde_json::json!({"role": "user", "content": "Weather in Paris and Oslo?"}),
        serde_json::json!({"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"unit\": \"c\"}"}}]}),
        serde_json::json!({"role": "tool", "tool_call_id": "call_1", "content": "18 C"}),
        serde_json::json!({"role": "tool", "tool_call_id": "call_2", "content": "9 C"}),
    ];
    lmstack_core::tools::messages_for_template(&mut messages).unwrap();
    let case = golden["cases"].as_array().unwrap().iter().find(|c| c["template"] == "qwen2_5").unwrap();
    let tools = lmstack_core::tools::tools_from_openai(Some(&case["tools"])).unwrap();
    let tools = lmstack_core::tools::template_tools(&tools);
    let mut extra = Map::new();
    extra.insert("tools".into(), tools);
    let special = SpecialTokens { bos: Some("<s>".into()), eos: Some("</s>".into()), ..Default::default() };
    let got = qwen.render(&Value::Array(messages), true, &special, &extra).unwrap();
    let want = golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["template"] == "qwen2_5" && c["conversation"] == "tool_use" && c["add_generation_prompt"] == true)
        .unwrap()["expected"]
        .as_str()
        .unwrap();
    assert_eq!(got, want);
}
