//! Model directories: save and reload give identical logits, files are in the Hugging Face
//! layout, corrupt checkpoints are refused with a clear error, and adapters hook into every
//! named projection.

mod common;

use std::sync::Arc;

use common::{fixture, max_diff};
use lmstack_core::nn::LinearAdapter;
use lmstack_core::{DType, Device, Model, ModelConfig, Pretrained, Tensor, Tokenizer};

fn tmp(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("lmstack-dir-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn ids() -> Tensor {
    Tensor::new(&[[1u32, 5, 9, 2, 7, 3, 3, 8]], &Device::Cpu).unwrap()
}

#[test]
fn save_and_reload_gives_identical_logits() {
    for name in common::all_fixtures() {
        let m = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let dir = tmp(name);
        m.save(&dir).unwrap();
        let back = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back.num_parameters(), m.num_parameters());
        let (a, b) = match m.as_bert() {
            Some(bert) if bert.heads().classifier.is_some() => {
                (m.classify(&ids(), None, None).unwrap(), back.classify(&ids(), None, None).unwrap())
            }
            _ if m.is_scorer() => (m.score(&ids()).unwrap(), back.score(&ids()).unwrap()),
            _ => (m.forward(&ids(), None).unwrap(), back.forward(&ids(), None).unwrap()),
        };
        assert_eq!(max_diff(&a, &b), 0.0, "{name}");
        // Same tensor names as transformers wrote (tied weights are not duplicated).
        let orig = lmstack_core::models::read_safetensors(&fixture(name).join("model.safetensors")).unwrap();
        let ours = lmstack_core::models::read_safetensors(&dir.join("model.safetensors")).unwrap();
        let mut k1: Vec<_> = orig.keys().collect();
        let mut k2: Vec<_> = ours.keys().collect();
        k1.sort();
        k2.sort();
        assert_eq!(k1, k2, "{name}");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        // The family and its class as transformers wrote them (a Qwen2 model stays `qwen2`).
        let theirs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["model_type"], theirs["model_type"], "{name}");
        assert_eq!(cfg["architectures"], theirs["architectures"], "{name}");
    }
}

#[test]
fn pretrained_dir_round_trips_with_tokenizer() {
    let p = Pretrained::load(&fixture("tiny-gpt2"), DType::F32, &Device::Cpu).unwrap();
    let dir = tmp("pretrained");
    p.save(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let back = Pretrained::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        back.tokenizer.encode("hear me speak", false).unwrap(),
        p.tokenizer.encode("hear me speak", false).unwrap()
    );
    assert_eq!(back.tokenizer.chat_template(), p.tokenizer.chat_template());
}

#[test]
fn bf16_model_saves_bf16() {
    let m = Model::load(&fixture("tiny-llama"), DType::BF16, &Device::Cpu).unwrap();
    let dir = tmp("bf16");
    m.save(&dir).unwrap();
    let t = lmstack_core::models::read_safetensors(&dir.join("model.safetensors")).unwrap();
    assert!(t.values().all(|t| t.dtype() == DType::BF16));
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(cfg.contains("\"torch_dtype\": \"bfloat16\""), "{cfg}");
    Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
}

#[test]
fn corrupt_or_mismatched_checkpoints_are_refused() {
    let dir = tmp("corrupt");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("tiny-gpt2/config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(fixture("tiny-gpt2/model.safetensors")).unwrap();
    // Truncated file.
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = Model::load(&dir, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");
    // Cut inside the header, a header length past the end, a byte too many, a header that is
    // not JSON: each refused, never a panic.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    let mut longer = bytes.clone();
    longer.push(0);
    let mut not_json = bytes.clone();
    not_json[8] = b'#';
    for (what, b) in [
        ("cut header", bytes[..8 + n / 2].to_vec()),
        ("huge header", huge),
        ("trailing byte", longer),
        ("not JSON", not_json),
    ] {
        std::fs::write(dir.join("model.safetensors"), &b).unwrap();
        let e = Model::load(&dir, DType::F32, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{what}: {e}");
    }
    // Missing file.
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = Model::load(&dir, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    // Config that disagrees with the weights: the error names the tensor and both shapes.
    std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
    let cfg =
        std::fs::read_to_string(fixture("tiny-gpt2/config.json")).unwrap().replace("\"n_embd\": 16", "\"n_embd\": 32");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let e = Model::load(&dir, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("transformer.wte.weight") && e.contains("shape"), "{e}");
    // A missing tensor is named.
    let mut t = lmstack_core::models::read_safetensors(&fixture("tiny-gpt2/model.safetensors")).unwrap();
    t.remove("transformer.h.1.mlp.c_fc.weight");
    lmstack_core::models::save_safetensors(&dir.join("model.safetensors"), &t.into_iter().collect()).unwrap();
    std::fs::copy(fixture("tiny-gpt2/config.json"), dir.join("config.json")).unwrap();
    let e = Model::load(&dir, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("transformer.h.1.mlp.c_fc.weight") && e.contains("missing"), "{e}");
}

/// A LoRA-shaped adapter: `scale · B(A x)`.
#[derive(Debug)]
struct LowRank {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl LinearAdapter for LowRank {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.broadcast_matmul(&self.a.t()?)?.broadcast_matmul(&self.b.t()?)? * self.scale
    }
}

#[test]
fn adapters_attach_to_named_projections() {
    // Phi-3's fused projections are targets under PEFT's names too.
    for (name, targets) in [
        ("tiny-llama", ["q_proj", "v_proj"]),
        ("tiny-gpt2", ["c_attn", "c_fc"]),
        ("tiny-phi3", ["qkv_proj", "gate_up_proj"]),
    ] {
        let base = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let reference = base.forward(&ids(), None).unwrap();
        let mut m = base.clone();
        let mut wrapped = 0;
        let mut first_path = String::new();
        for lin in m.linears_mut() {
            if targets.iter().any(|t| lin.path().ends_with(t)) {
                let (i, o) = lin.dims();
                let a = Tensor::randn(0f32, 0.5, (4, i), &Device::Cpu).unwrap();
                let b = Tensor::zeros((o, 4), DType::F32, &Device::Cpu).unwrap();
                if first_path.is_empty() {
                    first_path = lin.path().to_owned();
                }
                lin.set_adapter(Some(Arc::new(LowRank { a, b, scale: 2.0 })));
                wrapped += 1;
            }
        }
        assert_eq!(wrapped, 4, "{name}: two layers × two targets");
        assert!(
            first_path.starts_with("model.layers.0.") || first_path.starts_with("transformer.h.0."),
            "{first_path}"
        );
        // B = 0: logits unchanged.
        assert_eq!(max_diff(&m.forward(&ids(), None).unwrap(), &reference), 0.0);
        // A non-zero B changes them, and merging W + scale·BA into the weight reproduces it.
        let mut merged = base.clone();
        for lin in m.linears_mut() {
            if targets.iter().any(|t| lin.path().ends_with(t)) {
                let (i, o) = lin.dims();
                let a = Tensor::randn(0f32, 0.5, (4, i), &Device::Cpu).unwrap();
                let b = Tensor::randn(0f32, 0.1, (o, 4), &Device::Cpu).unwrap();
                let delta = (b.matmul(&a).unwrap() * 2.0).unwrap();
                let target = merged.linears_mut().into_iter().find(|l| l.path() == lin.path()).unwrap();
                let w = (target.weight() + &delta).unwrap();
                target.set_weight(w).unwrap();
                lin.set_adapter(Some(Arc::new(LowRank { a, b, scale: 2.0 })));
            }
        }
        let with_adapter = m.forward(&ids(), None).unwrap();
        assert!(max_diff(&with_adapter, &reference) > 1e-3, "{name}: adapter had no effect");
        let d = max_diff(&with_adapter, &merged.forward(&ids(), None).unwrap());
        assert!(d < 1e-5, "{name}: merged differs by {d}");
    }
}

/// Writes an lmstack-initialised model directory plus expected logits for the reverse check
/// in Python (`make_fixtures.py --verify DIR`); see docs/ARCHITECTURE.md.
#[test]
fn lmstack_written_dirs_carry_expected_logits() {
    let base = std::env::var_os("LMSTACK_EXPORT_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| tmp("export"));
    let configs = [
        ("gpt2", r#"{"model_type":"gpt2","vocab_size":66,"n_positions":32,"n_embd":16,"n_layer":2,"n_head":2}"#),
        (
            "llama",
            r#"{"model_type":"llama","vocab_size":66,"hidden_size":32,"intermediate_size":40,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":32,"rope_theta":10000.0}"#,
        ),
        (
            "qwen2",
            r#"{"model_type":"qwen2","vocab_size":66,"hidden_size":24,"intermediate_size":40,"num_hidden_layers":2,
            "num_attention_heads":6,"num_key_value_heads":2,"max_position_embeddings":32,"use_sliding_window":true,
            "sliding_window":4,"max_window_layers":1,"tie_word_embeddings":true,
            "rope_scaling":{"type":"yarn","factor":2.0,"original_max_position_embeddings":16}}"#,
        ),
        (
            "qwen3",
            r#"{"model_type":"qwen3","vocab_size":66,"hidden_size":32,"intermediate_size":40,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":1,"head_dim":12,"max_position_embeddings":32}"#,
        ),
        (
            "mistral",
            r#"{"model_type":"mistral","vocab_size":66,"hidden_size":24,"intermediate_size":40,"num_hidden_layers":2,
            "num_attention_heads":6,"num_key_value_heads":2,"max_position_embeddings":32,"sliding_window":4,
            "rope_scaling":{"rope_type":"llama3","factor":4.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":16}}"#,
        ),
        (
            "gemma2",
            r#"{"model_type":"gemma2","vocab_size":66,"hidden_size":32,"intermediate_size":40,"num_hidden_layers":3,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":12,"max_position_embeddings":32,
            "sliding_window":4,"query_pre_attn_scalar":16,"attn_logit_softcapping":1.0,
            "final_logit_softcapping":2.0,"initializer_range":0.3}"#,
        ),
        (
            "gemma3",
            r#"{"model_type":"gemma3_text","vocab_size":66,"hidden_size":32,"intermediate_size":40,
            "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":16,
            "max_position_embeddings":32,"sliding_window":4,"sliding_window_pattern":3,"rope_theta":100000.0,
            "rope_local_base_freq":5000.0,"rope_scaling":{"rope_type":"linear","factor":4.0},"initializer_range":0.3}"#,
        ),
        (
            "phi3",
            r#"{"model_type":"phi3","vocab_size":66,"hidden_size":48,"intermediate_size":40,"num_hidden_layers":2,
            "num_attention_heads":3,"num_key_value_heads":1,"max_position_embeddings":32,
            "original_max_position_embeddings":32,"sliding_window":5,"partial_rotary_factor":0.5}"#,
        ),
        (
            "bert",
            r#"{"model_type":"bert","vocab_size":66,"hidden_size":16,"num_hidden_layers":2,"num_attention_heads":2,
            "intermediate_size":32,"max_position_embeddings":32,"architectures":["BertForMaskedLM"]}"#,
        ),
    ];
    let tok = Tokenizer::train_chars(&[&common::repo_data("tinyshakespeare.txt")]).unwrap();
    for (name, json) in configs {
        let cfg = ModelConfig::from_json(json, name).unwrap();
        let model = Model::init(cfg, 11, DType::F32, &Device::Cpu).unwrap();
        let dir = base.join(name);
        let p = Pretrained { model, tokenizer: tok.clone(), dir: None };
        p.save(&dir).unwrap();
        let text = "ROMEO:\nBut soft";
        let ids_v = tok.encode(text, false).unwrap();
        let ids = Tensor::new(ids_v.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = p.model.forward(&ids, None).unwrap().to_vec3::<f32>().unwrap();
        let exp = serde_json::json!({
            "input_ids": [ids_v], "attention_mask": [vec![1; ids_v.len()]], "logits": logits,
            "num_parameters": p.model.num_parameters(),
            "tokenizer_cases": [{"text": text, "ids": ids_v}],
        });
        std::fs::write(dir.join("expected.json"), exp.to_string()).unwrap();
        let back = Pretrained::load(&dir, DType::F32, &Device::Cpu).unwrap();
        // The reloaded model is frozen (fused kernels), the initialised one trainable (composed ops).
        assert!(max_diff(&back.model.forward(&ids, None).unwrap(), &p.model.forward(&ids, None).unwrap()) < 1e-5);
    }
}

#[test]
fn files_of_a_set_change_together_or_not_at_all() {
    use lmstack_core::io::FileSet;
    let dir = tmp("fileset");
    // A write that fails (as on a full disk) after another was staged: nothing appears, not
    // even the directory the set created, and no temporary file is left behind.
    let mut files = FileSet::in_dir(&dir).unwrap();
    files.write(&dir.join("config.json"), b"{}\n").unwrap();
    let err = files
        .write_with(&dir.join("model.safetensors"), |_| Err(std::io::Error::other("No space left on device")))
        .unwrap_err();
    assert!(err.to_string().contains("model.safetensors") && err.to_string().contains("No space"), "{err}");
    drop(files);
    assert!(!dir.exists(), "an uncommitted set leaves no directory behind");
    // Committed: both files; a later failed set leaves them as they were.
    let mut files = FileSet::in_dir(&dir).unwrap();
    files.write(&dir.join("a.txt"), b"one").unwrap();
    files.write_json(&dir.join("b.json"), &serde_json::json!({"v": 1})).unwrap();
    files.commit().unwrap();
    let mut files = FileSet::in_dir(&dir).unwrap();
    files.write(&dir.join("a.txt"), b"two").unwrap();
    assert!(files.write_with(&dir.join("b.json"), |_| Err(std::io::Error::other("disk full"))).is_err());
    drop(files);
    assert_eq!(std::fs::read_to_string(dir.join("a.txt")).unwrap(), "one");
    assert_eq!(std::fs::read_to_string(dir.join("b.json")).unwrap(), "{\n  \"v\": 1\n}\n");
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["a.txt", "b.json"], "no temporary files left");
    let _ = std::fs::remove_dir_all(&dir);
}
