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
    check(r#"{"model_type":"mistral","hidden_size":16,"num_attention_heads":4,"num_key_value_heads":2}"#, "");
    check(
        r#"{"model_type":"mistral","hidden_size":16,"num_attention_heads":4,"sliding_window":null}"#,
        "num_key_value_heads",
    );
    check(r#"{"model_type":"qwen2","hidden_size":16,"num_attention_heads":4,"use_sliding_window":true}"#, "");
    check(r#"{"model_type":"qwen3","hidden_size":16,"num_attention_heads":4,"head_dim":6}"#, "");
    check(r#"{"model_type":"qwen2","use_sliding_window":"yes"}"#, "use_sliding_window");
    check(r#"{"model_type":"qwen2","max_window_layers":-1}"#, "max_window_layers");
    check(r#"{"model_type":"mistral","num_attention_heads":8,"sliding_window":0}"#, "sliding_window");
    check(r#"{"model_type":"gemma2","hidden_size":64,"num_attention_heads":4,"num_key_value_heads":2}"#, "");
    check(r#"{"model_type":"gemma2","attn_logit_softcapping":-1.0}"#, "attn_logit_softcapping");
    check(r#"{"model_type":"gemma3_text","use_bidirectional_attention":true}"#, "use_bidirectional_attention");
    check(r#"{"model_type":"gemma3","vision_config":{}}"#, "text_config");
    check(r#"{"model_type":"gemma3","text_config":{"model_type":"llama"}}"#, "text_config.model_type");
    check(r#"{"model_type":"gemma3","text_config":{"hidden_size":64,"num_attention_heads":4}}"#, "");
    check(r#"{"model_type":"llama","final_logit_softcapping":30.0}"#, "final_logit_softcapping");
    check(r#"{"model_type":"phi3","partial_rotary_factor":0.75,"resid_pdrop":0.0}"#, "");
    check(r#"{"model_type":"phi3","resid_pdrop":0.1}"#, "resid_pdrop");
    check(r#"{"model_type":"phi3","partial_rotary_factor":0.01}"#, "partial_rotary_factor");
    check(r#"{"model_type":"qwen2","resid_pdrop":0.0}"#, "resid_pdrop");
    check(
        r#"{"model_type":"phi3","rope_scaling":{"type":"longrope","short_factor":[1.0],"long_factor":[2.0]}}"#,
        "rope_scaling.rope_type",
    );
    check(r#"{"model_type":"phi3","rope_scaling":{"type":"su","short_factor":[1.0]}}"#, "rope_scaling.rope_type");
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
    check(r#"{"model_type":"llama","rope_scaling":{"type":"linear","factor":2.0}}"#, "");
    check(r#"{"model_type":"llama","rope_scaling":{"type":"linear","factor":-2.0}}"#, "rope_scaling.factor");
    check(r#"{"model_type":"llama","rope_scaling":{"type":"linear"}}"#, "rope_scaling.factor");
    check(
        r#"{"model_type":"llama","rope_scaling":{"rope_type":"llama3","factor":8.0}}"#,
        "rope_scaling.low_freq_factor",
    );
    check(
        r#"{"model_type":"llama","rope_scaling":{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,
        "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
        "",
    );
    check(r#"{"model_type":"llama","rope_scaling":{"rope_type":"yarn","factor":4.0,"magic":1}}"#, "rope_scaling.magic");
    check(r#"{"model_type":"llama","rope_scaling":{"rope_type":"longrope","factor":4.0}}"#, "rope_scaling.rope_type");
    check(r#"{"model_type":"llama","rope_scaling":{"rope_type":"dynamic","factor":4.0}}"#, "rope_scaling.rope_type");
    check(r#"{"model_type":"llama","rope_scaling":"linear"}"#, "rope_scaling");
    check(r#"{"model_type":"llama","rope_scaling":{"rope_type":"default"}}"#, "");
    check(r#"{"model_type":"llama","rope_interleaved":true}"#, "rope_interleaved");
    check(r#"{"model_type":"llama","quantization_config":{"quant_method":"gptq"}}"#, "quantization_config");
    check(
        r#"{"model_type":"llama","num_hidden_layers":2,"layer_types":["full_attention","chunked"]}"#,
        "layer_types[1]",
    );
    check(r#"{"model_type":"llama","num_hidden_layers":2,"layer_types":["full_attention"]}"#, "layer_types");
    check(
        r#"{"model_type":"llama","max_position_embeddings":4096,"sliding_window":1024,"use_sliding_window":false}"#,
        "",
    );
    check(r#"{"model_type":"gpt2","_model_name_or_path":"x","unk_token_id":0,"_commit_hash":"abc"}"#, "");
    check(r#"{"model_type":"llama","rope_parameters":{"rope_type":"su"}}"#, "rope_parameters.rope_type");
    check(r#"{"model_type":"llama","rope_parameters":{"rope_type":"yarn","factor":4.0,"rope_theta":1e6}}"#, "");
    check(r#"{"model_type":"mistral","max_position_embeddings":4096,"sliding_window":1024}"#, "");
    check(r#"{"model_type":"llama","max_position_embeddings":4096,"sliding_window":1024}"#, "sliding_window");
    check(r#"{"model_type":"llama","pretraining_tp":2}"#, "pretraining_tp");
    check(r#"{"model_type":"bert","position_embedding_type":"relative_key"}"#, "position_embedding_type");
    check(r#"{"model_type":"bert","hidden_size":10,"num_attention_heads":3}"#, "hidden_size");
}

/// SmolLM2-135M-Instruct's `config.json` as the Hub publishes it, plus what `transformers` 5
/// adds when it saves the model again: it loads, and its bookkeeping survives a round trip.
#[test]
fn hub_configs_load() {
    let hub = r#"{
      "_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
      "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": true,
      "max_position_embeddings": 8192, "mlp_bias": false, "model_type": "llama",
      "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
      "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": false,
      "rope_scaling": null, "rope_theta": 100000, "tie_word_embeddings": true,
      "torch_dtype": "bfloat16", "dtype": "bfloat16", "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16"}},
      "transformers_version": "5.0.0", "unk_token_id": 0, "use_cache": true, "vocab_size": 49152,
      "max_new_tokens": 256, "do_sample": false
    }"#;
    let cfg = ModelConfig::from_json(hub, "config.json").unwrap();
    assert_eq!(cfg.kv_shape(), (3, 64));
    assert_eq!(cfg.token_id("unk_token_id"), Some(0));
    let again = ModelConfig::from_value(cfg.to_value(), "again").unwrap();
    assert_eq!(cfg.to_value(), again.to_value());
}

/// Which layers slide, and by how much, as `transformers` decides it for each family.
#[test]
fn layer_windows_follow_transformers() {
    let windows = |json: &str| -> Vec<Option<usize>> {
        let ModelConfig::Llama(c) = ModelConfig::from_json(json, "config.json").unwrap() else { panic!() };
        (0..c.num_hidden_layers).map(|i| c.layer_window(i)).collect()
    };
    let base = r#""num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":64"#;
    // Mistral: every layer; a window as long as the context is none.
    assert_eq!(windows(&format!(r#"{{"model_type":"mistral",{base},"sliding_window":8}}"#)), [Some(8); 3]);
    assert_eq!(windows(&format!(r#"{{"model_type":"mistral",{base},"sliding_window":64}}"#)), [None; 3]);
    assert_eq!(windows(&format!(r#"{{"model_type":"mistral",{base},"sliding_window":null}}"#)), [None; 3]);
    // Qwen2 as the Hub publishes Qwen2.5 (a window given, switched off), switched on from
    // layer `max_window_layers`, and as transformers 5 saves it (`layer_types`).
    let qwen = |extra: &str| windows(&format!(r#"{{"model_type":"qwen2",{base},"sliding_window":8,{extra}}}"#));
    assert_eq!(qwen(r#""use_sliding_window":false,"max_window_layers":1"#), [None; 3]);
    assert_eq!(qwen(r#""use_sliding_window":true,"max_window_layers":1"#), [None, Some(8), Some(8)]);
    assert_eq!(
        qwen(r#""use_sliding_window":true,"layer_types":["sliding_attention","full_attention","sliding_attention"]"#),
        [Some(8), None, Some(8)]
    );
    // Llama has no window.
    assert_eq!(windows(&format!(r#"{{"model_type":"llama",{base}}}"#)), [None; 3]);
}

#[test]
fn fixture_configs_round_trip() {
    for name in common::all_fixtures() {
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
