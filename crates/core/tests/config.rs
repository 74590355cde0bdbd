//! `config.json` parsing: real Hugging Face files read, and every bad field is an error that
//! names the field. One line per case.

mod common;

use lmstack_core::ModelConfig;

/// Parses `json` and checks the error names `field` (or succeeds when `field` is empty).
fn check(json: &str, field: &str) {
    match ModelConfig::from_json(json, "config.json") {
        Ok(_) => assert!(field.is_empty(), "expected an error naming `{field}` for {json}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!field.is_empty(), "unexpected error {msg} for {json}");
            assert!(msg.contains(&format!("`{field}`")), "error `{msg}` does not name `{field}`");
            assert!(msg.starts_with("config.json"), "error `{msg}` does not name the file");
        }
    }
}

#[test]
fn config_cases() {
    check(r#"{"model_type":"gpt2","n_embd":16,"n_head":2,"n_layer":1}"#, "");
    check(r#"{"model_type":"llama","hidden_size":16,"num_attention_heads":4,"num_key_value_heads":2}"#, "");
    check(r#"{"model_type":"mistral","hidden_size":16,"num_attention_heads":4,"sliding_window":null}"#, "");
    check(r#"{"model_type":"bert","hidden_size":16,"num_attention_heads":2}"#, "");
    check(r#"{"n_embd":16}"#, "model_type");
    check(r#"{"model_type":"t5"}"#, "model_type");
    check(r#"{"model_type":7}"#, "model_type");
    check(r#"{"model_type":"gpt2","n_embd":"wide"}"#, "n_embd");
    check(r#"{"model_type":"gpt2","n_embd":10,"n_head":3}"#, "n_embd");
    check(r#"{"model_type":"gpt2","n_layer":0}"#, "n_layer");
    check(r#"{"model_type":"gpt2","n_ctx":512,"n_positions":1024}"#, "n_ctx");
    check(r#"{"model_type":"gpt2","activation_function":"swoosh"}"#, "activation_function");
    check(r#"{"model_type":"gpt2","flash_magic":true}"#, "flash_magic");
    check(
        r#"{"model_type":"llama","hidden_size":16,"num_attention_heads":4,"num_key_value_heads":3}"#,
        "num_key_value_heads",
    );
    check(r#"{"model_type":"llama","rope_scaling":{"type":"linear","factor":2.0}}"#, "rope_scaling");
    check(r#"{"model_type":"llama","rope_parameters":{"rope_type":"yarn"}}"#, "rope_parameters.rope_type");
    check(r#"{"model_type":"mistral","max_position_embeddings":4096,"sliding_window":1024}"#, "sliding_window");
    check(r#"{"model_type":"llama","pretraining_tp":2}"#, "pretraining_tp");
    check(r#"{"model_type":"bert","position_embedding_type":"relative_key"}"#, "position_embedding_type");
    check(r#"{"model_type":"bert","hidden_size":10,"num_attention_heads":3}"#, "hidden_size");
}

#[test]
fn fixture_configs_round_trip() {
    for name in ["tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-bert-cls"] {
        let cfg = ModelConfig::from_file(&common::fixture(name).join("config.json")).unwrap();
        let again = ModelConfig::from_value(cfg.to_value(), name).unwrap();
        assert_eq!(cfg.to_value(), again.to_value(), "{name}");
    }
    let llama = ModelConfig::from_file(&common::fixture("tiny-llama").join("config.json")).unwrap();
    let lmstack_core::ModelConfig::Llama(c) = &llama else { panic!() };
    assert_eq!(c.rope_theta(), 500000.0);
    assert_eq!(llama.kv_shape(), (2, 8));
}

#[test]
fn malformed_json_names_line() {
    let dir = std::env::temp_dir().join(format!("lmstack-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("config.json");
    std::fs::write(&p, "{\n  \"model_type\": \"gpt2\",\n  oops\n}").unwrap();
    let e = ModelConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("config.json:3:"), "{e}");
}
