//! The training forward is differentiable end to end: every trainable parameter of every
//! architecture receives a non-zero gradient, and analytic gradients agree with finite
//! differences on a tiny f64 model. Guards against candle's fused ops, which have no backward
//! pass and would silently give zero gradients (candle issue 2168).

use candle_core::{DType, Device, Tensor, D};
use lmstack_core::{Model, ModelConfig};

fn config(json: &str) -> ModelConfig {
    ModelConfig::from_json(json, "test").unwrap()
}

fn gpt2() -> ModelConfig {
    config(r#"{"model_type":"gpt2","vocab_size":37,"n_positions":16,"n_embd":12,"n_layer":2,"n_head":3}"#)
}

fn llama(tied: bool) -> ModelConfig {
    config(&format!(
        r#"{{"model_type":"llama","vocab_size":37,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,
        "num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":16,"tie_word_embeddings":{tied}}}"#
    ))
}

/// The families of the Llama block: Qwen2's biases, Qwen3's head norms (with head_dim apart
/// from the width), Mistral's window; windows of 4 and 3 are shorter than the batch's 9 tokens.
fn family(model_type: &str) -> ModelConfig {
    let extra = match model_type {
        "qwen2" => {
            r#""num_attention_heads":4,"num_key_value_heads":2,"use_sliding_window":true,"sliding_window":4,"max_window_layers":1"#
        }
        "qwen3" => {
            r#""num_attention_heads":4,"num_key_value_heads":1,"head_dim":6,"attention_bias":true,"use_sliding_window":true,"sliding_window":4,"max_window_layers":0"#
        }
        "gemma2" => {
            r#""num_attention_heads":4,"num_key_value_heads":2,"head_dim":6,"sliding_window":3,"query_pre_attn_scalar":8,"attn_logit_softcapping":0.5,"final_logit_softcapping":2.0,"initializer_range":0.5"#
        }
        "gemma3_text" => {
            r#""num_attention_heads":4,"num_key_value_heads":1,"head_dim":8,"sliding_window":3,"sliding_window_pattern":2"#
        }
        "phi3" => r#""num_attention_heads":4,"num_key_value_heads":2,"sliding_window":3,"partial_rotary_factor":0.5"#,
        _ => r#""num_attention_heads":4,"num_key_value_heads":2,"sliding_window":3"#,
    };
    config(&format!(
        r#"{{"model_type":"{model_type}","vocab_size":37,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,
        "max_position_embeddings":16,{extra}}}"#
    ))
}

fn bert(classifier: bool) -> ModelConfig {
    let arch = if classifier { "BertForSequenceClassification" } else { "BertForMaskedLM" };
    config(&format!(
        r#"{{"model_type":"bert","vocab_size":37,"hidden_size":12,"num_hidden_layers":2,"num_attention_heads":3,
        "intermediate_size":20,"max_position_embeddings":16,"architectures":["{arch}"],"id2label":{{"0":"a","1":"b"}}}}"#
    ))
}

fn batch(dev: &Device) -> (Tensor, Tensor) {
    let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 5 + 3) % 37).collect();
    let ids = Tensor::from_vec(ids, (2, 9), dev).unwrap();
    let mask = Tensor::new(&[[1u32; 9], [1, 1, 1, 1, 1, 1, 0, 0, 0]], dev).unwrap();
    (ids, mask)
}

/// Mean cross-entropy of the model's natural objective on a fixed batch.
fn loss(m: &Model, ids: &Tensor, mask: &Tensor) -> Tensor {
    let (b, t) = ids.dims2().unwrap();
    if let Some(bert) = m.as_bert() {
        if bert.heads().classifier.is_some() {
            let logits = m.classify(ids, Some(mask), None).unwrap();
            let labels = Tensor::new(&[0u32, 1], ids.device()).unwrap();
            return candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
        }
        let logits = m.forward(ids, Some(mask)).unwrap();
        let v = logits.dim(D::Minus1).unwrap();
        return candle_nn::loss::cross_entropy(&logits.reshape((b * t, v)).unwrap(), &ids.flatten_all().unwrap())
            .unwrap();
    }
    let logits = m.forward(ids, Some(mask)).unwrap();
    let v = logits.dim(D::Minus1).unwrap();
    let inputs = logits.narrow(1, 0, t - 1).unwrap().reshape((b * (t - 1), v)).unwrap();
    let targets = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    candle_nn::loss::cross_entropy(&inputs, &targets).unwrap()
}

/// GPT-2, Llama and the families of its block, by name.
fn causal_models() -> Vec<(&'static str, ModelConfig)> {
    vec![
        ("gpt2", gpt2()),
        ("llama", llama(false)),
        ("qwen2", family("qwen2")),
        ("qwen3", family("qwen3")),
        ("mistral", family("mistral")),
        ("gemma2", family("gemma2")),
        ("gemma3", family("gemma3_text")),
        ("phi3", family("phi3")),
    ]
}

#[test]
fn every_parameter_gets_a_nonzero_gradient() {
    let dev = Device::Cpu;
    let (ids, mask) = batch(&dev);
    let others = [("llama-tied", llama(true)), ("bert-mlm", bert(false)), ("bert-cls", bert(true))];
    for (name, cfg) in causal_models().into_iter().chain(others) {
        let m = Model::init(cfg, 7, DType::F32, &dev).unwrap();
        let vars = m.params().vars();
        assert!(!vars.is_empty());
        assert_eq!(vars.values().map(|v| v.elem_count()).sum::<usize>(), m.num_parameters());
        let grads = loss(&m, &ids, &mask).backward().unwrap();
        for (pname, var) in &vars {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient of {pname} is {norm}");
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let (ids, mask) = batch(&dev);
    for (name, cfg) in causal_models().into_iter().chain([("bert-mlm", bert(false))]) {
        let m = Model::init(cfg, 3, DType::F64, &dev).unwrap();
        let grads = loss(&m, &ids, &mask).backward().unwrap();
        for (pname, var) in m.params().vars() {
            let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let orig = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            // Check the element with the largest gradient and one fixed element.
            let big = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap().0;
            for idx in [big, orig.len() / 2] {
                let eps = 1e-6;
                let eval = |delta: f64| {
                    let mut v = orig.clone();
                    v[idx] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &dev).unwrap()).unwrap();
                    loss(&m, &ids, &mask).to_scalar::<f64>().unwrap()
                };
                let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
                var.set(&Tensor::from_vec(orig.clone(), var.shape(), &dev).unwrap()).unwrap();
                let err = (fd - g[idx]).abs() / (fd.abs().max(g[idx].abs()).max(1e-8));
                assert!(
                    err < 1e-4 || (fd - g[idx]).abs() < 1e-9,
                    "{name}: {pname}[{idx}] analytic {} vs numeric {fd}",
                    g[idx]
                );
            }
        }
    }
}

#[test]
fn frozen_models_have_no_trainable_parameters() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-gpt2");
    let m = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert!(m.params().vars().is_empty());
    let t = Model::load_trainable(&dir, DType::F32, &Device::Cpu, None).unwrap();
    assert_eq!(t.params().vars().len(), t.params().params().len());
}
