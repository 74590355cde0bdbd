//! Finetuning: LoRA adapters (untrained = no change; base + adapter = merged model, for GPT-2's
//! transposed Conv1D weights and Llama's plain ones; gradients reach every adapter and only
//! adapters; a finite-difference check), and `finetune::run` end to end (loss falls, PEFT
//! layout, a crash-and-resume run equals the uninterrupted one, full finetuning writes a model
//! directory carrying its chat template).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lmstack_core::lora::{self, LoraConfig, TargetModules};
use lmstack_core::params::ParamStore;
use lmstack_core::{Model, ModelConfig, Pretrained, Tokenizer};
use lmstack_train::batches::batch_loss;
use lmstack_train::finetune::{self, FinetuneConfig, Method, Task};
use lmstack_train::sft::{self, ChatFormat, Example};
use lmstack_train::trainer::RunOptions;

/// How the tests drive a run: resumed or not, with a stop flag, quietly.
fn opts(resume: bool, stop: Arc<AtomicBool>) -> RunOptions {
    RunOptions { resume, stop, ..Default::default() }
}

const CHARS: &str = "abcdefghijklmnopqrstuvwxyz :.?\n";

fn tiny(dir: &Path, arch: &str, seed: u64) -> Pretrained {
    let tok = Tokenizer::from_chars(CHARS.chars()).unwrap();
    let v = tok.vocab_size();
    let cfg = match arch {
        "gpt2" => format!(
            r#"{{"model_type": "gpt2", "n_embd": 16, "n_head": 2, "n_layer": 2, "n_positions": 48, "vocab_size": {v}}}"#
        ),
        _ => format!(
            r#"{{"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 48, "vocab_size": {v}, "tie_word_embeddings": false}}"#
        ),
    };
    let model = Model::init(ModelConfig::from_json(&cfg, "t").unwrap(), seed, DType::F32, &Device::Cpu).unwrap();
    let p = Pretrained { model, tokenizer: tok, dir: None };
    p.save(dir).unwrap();
    Pretrained::load(dir, DType::F32, &Device::Cpu).unwrap()
}

fn lora_cfg(targets: TargetModules) -> LoraConfig {
    serde_json::from_value(serde_json::json!({"r": 4, "lora_alpha": 8.0, "target_modules": targets})).unwrap()
}

/// Uniform values in ±`r`, from a seed (candle's `randn` is not seedable on the CPU).
fn seeded(shape: (usize, usize), seed: u64, r: f32) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-r..r)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn logits(m: &Model) -> Vec<f32> {
    let ids = Tensor::new(&[[3u32, 7, 1, 0, 12, 5, 9, 2]], &Device::Cpu).unwrap();
    m.forward(&ids, None).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn adapters_merge_exactly_and_untrained_ones_change_nothing() {
    for arch in ["gpt2", "llama"] {
        let dir = tempfile::tempdir().unwrap();
        let base_dir = dir.path().join("base");
        let mut p = tiny(&base_dir, arch, 3);
        let before = logits(&p.model);
        let cfg = lora_cfg(TargetModules::Special("all-linear".into()));
        let mut adapters = BTreeMap::new();
        let mut zero = BTreeMap::new();
        for (k, lin) in p.model.linears_mut().into_iter().enumerate() {
            if !cfg.targets(lin.path()).unwrap() {
                continue;
            }
            let (i, o) = lin.dims();
            let a = seeded((4, i), 2 * k as u64, 0.3);
            let b = seeded((o, 4), 2 * k as u64 + 1, 0.3);
            zero.insert(lin.path().to_owned(), (a.clone(), b.zeros_like().unwrap()));
            adapters.insert(lin.path().to_owned(), (a, b));
        }
        // B = 0: the base model's logits, exactly.
        lora::save_peft(&dir.path().join("zero"), &cfg, &zero, &Default::default()).unwrap();
        lora::load_peft(&mut p.model, &dir.path().join("zero")).unwrap();
        assert_eq!(logits(&p.model), before, "{arch}: an untrained adapter changed the logits");

        let ad = dir.path().join("adapter");
        lora::save_peft(&ad, &cfg, &adapters, &Default::default()).unwrap();
        let n = lora::load_peft(&mut p.model, &ad).unwrap();
        assert!(n >= 8, "{arch}: {n} adapters");
        let with_adapter = logits(&p.model);
        assert!(max_diff(&with_adapter, &before) > 1e-2, "{arch}: the adapter should matter");

        finetune::merge(&base_dir, &ad, &dir.path().join("merged")).unwrap();
        let merged = Pretrained::load(&dir.path().join("merged"), DType::F32, &Device::Cpu).unwrap();
        let d = max_diff(&logits(&merged.model), &with_adapter);
        assert!(d < 1e-5, "{arch}: merged vs base + adapter differ by {d}");
    }
}

#[test]
fn gradients_reach_every_adapter_and_match_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path(), "gpt2", 5);
    let weights = p.model.params().tensors().into_iter().collect();
    let store = ParamStore::frozen(weights, "base");
    let mut model = Model::new(p.model.config().clone(), &store, DType::F32, &Device::Cpu).unwrap();
    let cfg = lora_cfg(TargetModules::List(vec!["c_attn".into(), "c_fc".into()]));
    let training = Arc::new(AtomicBool::new(false));
    let vars = finetune::attach_lora(&mut model, &cfg, 1, Arc::new(AtomicU64::new(0)), training).unwrap();
    assert_eq!(vars.len(), 2 * 2 * 2, "A and B on c_attn and c_fc of 2 layers");
    // Give B values so A gets gradient too (a fresh B = 0 blocks A's gradient, as in PEFT).
    for (k, v) in &vars {
        if k.ends_with("lora_B.weight") {
            v.set(&seeded(v.dims2().unwrap(), 99, 0.5)).unwrap();
        }
    }
    let tok = &p.tokenizer;
    let fmt = ChatFormat::from_spec("plain", tok).unwrap();
    let ex = Example::Completion { prompt: "copy: cat dog".into(), completion: "cat dog".into() };
    let t = sft::tokenize(&ex, tok, &fmt, false).unwrap();
    let b = sft::batch(&[&t], 48, 0, &Device::Cpu).unwrap();
    let batch = b.into_batch();
    let (loss, _) = batch_loss(&model, &batch).unwrap();
    let grads = loss.backward().unwrap();
    for (k, v) in &vars {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{k}: no gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "{k}: zero gradient");
    }
    // The frozen base has no variables at all.
    assert!(model.params().vars().is_empty());
    // Evaluating (gradients off), nothing builds a graph: the loss is the same and tracks
    // nothing; the base's weights got no gradient above either (nothing is kept for them).
    let (eval_loss, _) = lmstack_core::grad::no_grad(|| batch_loss(&model, &batch)).unwrap();
    assert!(!eval_loss.track_op(), "evaluation built a graph");
    let same = (eval_loss.to_scalar::<f32>().unwrap() - loss.to_scalar::<f32>().unwrap()).abs();
    assert!(same < 1e-6, "{same}");
    for (_, w) in model.params().tensors() {
        assert!(grads.get(&w).is_none(), "a frozen weight got a gradient");
    }
    // Finite differences on one element of one A and one B.
    for key in ["transformer.h.0.attn.c_attn.lora_A.weight", "transformer.h.1.mlp.c_fc.lora_B.weight"] {
        let v = &vars[&format!("base_model.model.{key}")];
        let g: Vec<f32> = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let orig = v.as_tensor().copy().unwrap();
        let flat: Vec<f32> = orig.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-2f32;
        let at = |delta: f32| -> f64 {
            let mut w = flat.clone();
            w[1] += delta;
            v.set(&Tensor::from_vec(w, orig.shape(), &Device::Cpu).unwrap()).unwrap();
            batch_loss(&model, &batch).unwrap().0.to_scalar::<f32>().unwrap() as f64
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        v.set(&orig).unwrap();
        assert!((fd - g[1] as f64).abs() < 2e-3 + 0.02 * fd.abs(), "{key}: analytic {} vs numeric {fd}", g[1]);
    }
}

/// Activation checkpointing (blocks rerun in the backward pass, the loss in chunks of rows)
/// changes memory and time, never the loss or a gradient: LoRA with dropout on (the rerun must
/// draw the same masks) and full finetuning, GPT-2 and Llama, padded batches.
#[test]
fn checkpointing_gives_the_loss_and_gradients_of_the_plain_graph() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["gpt2", "llama"] {
        for method in [Method::Lora, Method::Full] {
            let p = tiny(&dir.path().join(arch), arch, 9);
            let weights = p.model.params().tensors().into_iter().collect();
            let (mut model, vars) = match method {
                Method::Lora => {
                    let store = ParamStore::frozen(weights, "base");
                    let mut m = Model::new(p.model.config().clone(), &store, DType::F32, &Device::Cpu).unwrap();
                    // Every projection and the output head (whose adapter runs in the loss's chunks).
                    let names: &[&str] = match arch {
                        "gpt2" => &["c_attn", "c_proj", "c_fc", "lm_head"],
                        _ => &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
                    };
                    let mut cfg = lora_cfg(TargetModules::List(names.iter().map(|n| n.to_string()).collect()));
                    cfg.lora_dropout = 0.3;
                    let training = Arc::new(AtomicBool::new(true));
                    let vars = finetune::attach_lora(&mut m, &cfg, 1, Arc::new(AtomicU64::new(3)), training).unwrap();
                    for (k, v) in &vars {
                        if k.ends_with("lora_B.weight") {
                            v.set(&seeded(v.dims2().unwrap(), 7, 0.5)).unwrap();
                        }
                    }
                    (m, vars.into_values().collect::<Vec<_>>())
                }
                Method::Full => {
                    let store = ParamStore::trainable(weights, "base", None);
                    let m = Model::new(p.model.config().clone(), &store, DType::F32, &Device::Cpu).unwrap();
                    let vars = m.params().vars().into_values().collect();
                    (m, vars)
                }
            };
            let tok = &p.tokenizer;
            let fmt = ChatFormat::from_spec("plain", tok).unwrap();
            let exs = [
                Example::Completion { prompt: "copy: cat dog".into(), completion: "cat dog".into() },
                Example::Completion { prompt: "say: sun".into(), completion: "sun sea owl".into() },
            ];
            let ts: Vec<_> = exs.iter().map(|e| sft::tokenize(e, tok, &fmt, false).unwrap()).collect();
            let b = sft::batch(&ts.iter().collect::<Vec<_>>(), 48, 0, &Device::Cpu).unwrap();
            let batch = b.into_batch();
            let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let mut run = |on: bool| {
                model.set_gradient_checkpointing(on).unwrap();
                model.set_loss_chunk_rows(Some(3));
                let (loss, _) = batch_loss(&model, &batch).unwrap();
                let g = lmstack_core::grad::backward(&loss, &tensors).unwrap();
                (loss.to_scalar::<f32>().unwrap(), g)
            };
            let (l0, g0) = run(false);
            let (l1, g1) = run(true);
            assert!((l0 - l1).abs() < 1e-5, "{arch} {method:?}: loss {l0} vs {l1}");
            for (i, v) in tensors.iter().enumerate() {
                let a: Vec<f32> = g0.get(v).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f32> = g1
                    .get(v)
                    .unwrap_or_else(|| panic!("{arch} {method:?}: var {i} lost its gradient"))
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(scale > 0.0 || method == Method::Lora, "{arch} {method:?}: var {i} has a zero gradient");
                let d = max_diff(&a, &b);
                assert!(d <= 1e-5 * scale.max(1.0), "{arch} {method:?}: var {i} differs by {d} (of {scale})");
            }
        }
    }
}

/// A padding-free batch (examples packed end to end, a row per slice) has the loss and
/// gradients of the padded one, alone and under checkpointing.
#[test]
fn padding_free_batches_give_the_loss_and_gradients_of_padded_ones() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["gpt2", "llama"] {
        let p = tiny(&dir.path().join(arch), arch, 4);
        let store = ParamStore::frozen(p.model.params().tensors().into_iter().collect(), "base");
        let mut model = Model::new(p.model.config().clone(), &store, DType::F32, &Device::Cpu).unwrap();
        let training = Arc::new(AtomicBool::new(true));
        let mut cfg = lora_cfg(TargetModules::Special("all-linear".into()));
        // Without dropout: a row's mask is drawn from its values, which packing changes in the
        // last bits (other matrix shapes), so the two batches would draw other masks.
        cfg.lora_dropout = 0.0;
        let vars = finetune::attach_lora(&mut model, &cfg, 1, Arc::new(AtomicU64::new(1)), training).unwrap();
        for (k, v) in &vars {
            if k.ends_with("lora_B.weight") {
                v.set(&seeded(v.dims2().unwrap(), 3, 0.5)).unwrap();
            }
        }
        let tok = &p.tokenizer;
        let fmt = ChatFormat::from_spec("plain", tok).unwrap();
        let exs = [
            Example::Completion { prompt: "copy: cat dog".into(), completion: "cat dog".into() },
            Example::Completion { prompt: "say: sun".into(), completion: "sun sea owl oak".into() },
            Example::Completion { prompt: "a".into(), completion: "b".into() },
        ];
        let ts: Vec<_> = exs.iter().map(|e| sft::tokenize(e, tok, &fmt, false).unwrap()).collect();
        let refs: Vec<_> = ts.iter().collect();
        let tensors: Vec<Tensor> = vars.values().map(|v| v.as_tensor().clone()).collect();
        let padded = sft::batch(&refs, 48, 0, &Device::Cpu).unwrap();
        let packed = sft::packed(&refs, 2, 48, 0, &Device::Cpu).unwrap();
        assert_eq!(padded.n_scored, packed.n_scored);
        assert_eq!(packed.inputs.dims()[0], 2);
        assert!(packed.inputs.elem_count() < padded.inputs.elem_count(), "packing saved no padding");
        let mut run = |b: sft::SftBatch, ckpt: bool| {
            model.set_gradient_checkpointing(ckpt).unwrap();
            let (loss, _) = batch_loss(&model, &b.into_batch()).unwrap();
            let g = lmstack_core::grad::backward(&loss, &tensors).unwrap();
            let g: Vec<Vec<f32>> =
                tensors.iter().map(|v| g.get(v).unwrap().flatten_all().unwrap().to_vec1().unwrap()).collect();
            (loss.to_scalar::<f32>().unwrap(), g)
        };
        let (l0, g0) = run(padded, false);
        for ckpt in [false, true] {
            let (l1, g1) = run(sft::packed(&refs, 2, 48, 0, &Device::Cpu).unwrap(), ckpt);
            assert!((l0 - l1).abs() < 1e-5, "{arch}: loss {l0} vs {l1}");
            for (a, b) in g0.iter().zip(&g1) {
                let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
                let d = max_diff(a, b);
                assert!(d <= 1e-5 * scale.max(1.0), "{arch}: a gradient differs by {d} (of {scale})");
            }
        }
    }
}

fn write_data(dir: &Path) -> std::path::PathBuf {
    let words = ["cat", "dog", "sun", "sea", "owl", "fig", "oak", "elk"];
    let mut s = String::new();
    for i in 0..64 {
        let (a, b) = (words[i % 8], words[(i / 8) % 8]);
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": format!("copy: {a} {b}")},
            {"role": "assistant", "content": format!("{a} {b}")}]});
        s.push_str(&line.to_string());
        s.push('\n');
    }
    let p = dir.join("train.jsonl");
    std::fs::write(&p, s).unwrap();
    p
}

fn cfg(dir: &Path, method: Method, out: &str, steps: u64) -> FinetuneConfig {
    FinetuneConfig {
        base: dir.join("base"),
        data: dir.join("train.jsonl"),
        out_dir: dir.join(out),
        method,
        max_steps: steps,
        batch_size: 8,
        lr: 1e-2,
        min_lr: 1e-3,
        warmup_steps: 2,
        eval_interval: 10,
        checkpoint_interval: 10,
        val_fraction: 0.125,
        ..Default::default()
    }
}

#[test]
fn lora_finetuning_learns_resumes_exactly_and_writes_peft() {
    let dir = tempfile::tempdir().unwrap();
    tiny(&dir.path().join("base"), "gpt2", 7);
    write_data(dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let c = FinetuneConfig {
        lora_r: 2,
        // A random base's tied embeddings keep every logit near zero; an adapter on the head
        // lets the loss move in a few steps (the real base learns through all-linear).
        target_modules: vec!["c_attn".into(), "c_fc".into(), "lm_head".into()],
        ..cfg(dir.path(), Method::Lora, "lora", 20)
    };
    let s = finetune::run(&c, &opts(false, stop.clone())).unwrap();
    let (before, after) = (s.val_loss.0, s.val_loss.1.unwrap());
    assert!(after < before - 0.3, "validation loss {before} → {after}");
    assert!(s.trainable_parameters * 5 < s.base_parameters, "{s:?}");
    let ad = dir.path().join("lora/adapter");
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ad.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg_json["peft_type"].as_str(), cfg_json["r"].as_u64()), (Some("LORA"), Some(2)));
    let t = candle_core::safetensors::load(ad.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert!(t.contains_key("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"), "{:?}", t.keys());
    assert!(t.keys().all(
        |k| k.starts_with("base_model.model.") && (k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))
    ));
    // data_order.jsonl: the held-out examples, then the examples of each step (for a peer run
    // on the same order), indices into the data file.
    let order = |dir: &Path| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(dir.join("data_order.jsonl")).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let lines = order(&dir.path().join("lora"));
    assert_eq!(lines[0]["val"].as_array().unwrap().len(), s.examples.1, "{}", lines[0]);
    assert_eq!(lines.len(), 21);
    for (i, l) in lines[1..].iter().enumerate() {
        assert_eq!(l["step"].as_u64(), Some(i as u64));
        let ex = l["examples"].as_array().unwrap();
        assert_eq!(ex.len(), c.batch_size.min(s.examples.0));
        assert!(ex.iter().all(|e| e.as_u64().unwrap() < 64 && !lines[0]["val"].as_array().unwrap().contains(e)));
    }

    // A crash after step 10: drop the step-20 checkpoint, resume, and get the same adapter.
    let copy = dir.path().join("lora-crashed");
    common::crashed_copy(&dir.path().join("lora"), &copy, 10, &["data_order.jsonl"]);
    let c2 = FinetuneConfig { out_dir: copy.clone(), ..c.clone() };
    finetune::run(&c2, &opts(true, stop.clone())).unwrap();
    let t2 = candle_core::safetensors::load(copy.join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
    for (k, a) in &t {
        let d =
            max_diff(&a.flatten_all().unwrap().to_vec1().unwrap(), &t2[k].flatten_all().unwrap().to_vec1().unwrap());
        assert_eq!(d, 0.0, "{k} differs after resuming");
    }
    // The resumed run logged steps 10.. again, drawing the same examples.
    let resumed = order(&copy);
    assert_eq!(resumed.len(), 31);
    assert_eq!(&resumed[21..], &lines[11..]);
    // Changing a setting on resume is refused; a second fresh run over a run is refused.
    let c3 = FinetuneConfig { lr: 0.5, ..c2 };
    assert!(finetune::run(&c3, &opts(true, stop.clone())).unwrap_err().to_string().contains("--resume"));
    assert!(finetune::run(&c, &opts(false, stop.clone())).unwrap_err().to_string().contains("already holds"));
    // --overwrite starts again from step 0.
    let again = RunOptions { overwrite: true, ..opts(false, stop) };
    let s2 = finetune::run(&FinetuneConfig { max_steps: 4, ..c.clone() }, &again).unwrap();
    assert_eq!(s2.steps, 4);
}

#[test]
fn full_finetuning_writes_a_model_with_its_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    tiny(&dir.path().join("base"), "llama", 9);
    write_data(dir.path());
    let c = cfg(dir.path(), Method::Full, "full", 12);
    let s = finetune::run(&c, &opts(false, Arc::new(AtomicBool::new(false)))).unwrap();
    assert!(s.val_loss.1.unwrap() < s.val_loss.0, "{s:?}");
    assert_eq!(s.trainable_parameters, s.base_parameters);
    let m = Pretrained::load(&dir.path().join("full/model"), DType::F32, &Device::Cpu).unwrap();
    let rendered =
        m.tokenizer.apply_chat_template(&serde_json::json!([{"role": "user", "content": "copy: cat"}]), true).unwrap();
    assert_eq!(rendered, "user: copy: cat\nassistant:");
    // Bad data is reported with its line.
    std::fs::write(dir.path().join("bad.jsonl"), "{\"messages\": []}\n").unwrap();
    let bad = FinetuneConfig { data: dir.path().join("bad.jsonl"), out_dir: dir.path().join("bad"), ..c };
    let e = finetune::run(&bad, &opts(false, Arc::new(AtomicBool::new(false)))).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl:1") && e.contains("empty"), "{e}");
}

fn tiny_bert(dir: &Path) {
    let mut tok = Tokenizer::from_chars(CHARS.chars()).unwrap();
    tok.add_special_tokens(&["[MASK]"]);
    let mut sp = tok.special_tokens().clone();
    sp.mask = Some("[MASK]".into());
    tok.set_special_tokens(sp).unwrap();
    let cfg = format!(
        r#"{{"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32, "vocab_size": {}, "architectures": ["BertForMaskedLM"]}}"#,
        tok.vocab_size()
    );
    let model = Model::init(ModelConfig::from_json(&cfg, "t").unwrap(), 4, DType::F32, &Device::Cpu).unwrap();
    Pretrained { model, tokenizer: tok, dir: None }.save(dir).unwrap();
}

#[test]
fn a_masked_lm_learns_to_classify_and_fills_masks() {
    use lmstack_train::classify;
    let dir = tempfile::tempdir().unwrap();
    tiny_bert(&dir.path().join("base"));
    // Questions start with "why" or "how"; statements do not.
    let mut train = String::new();
    let mut test = String::new();
    let words = ["cat", "dog", "sun", "sea", "owl", "fig", "oak", "elk", "ram", "bee"];
    for i in 0..120 {
        let (a, b) = (words[i % 10], words[(i / 10) % 10]);
        let (text, label) = if i % 2 == 0 {
            (format!("{} is the {a} {b}", if i % 4 == 0 { "why" } else { "how" }), "question")
        } else {
            (format!("the {a} is {b}"), "statement")
        };
        let line = serde_json::json!({"text": text, "label": label}).to_string() + "\n";
        if i < 100 {
            train.push_str(&line)
        } else {
            test.push_str(&line)
        }
    }
    std::fs::write(dir.path().join("train.jsonl"), train).unwrap();
    std::fs::write(dir.path().join("test.jsonl"), test).unwrap();
    let c = FinetuneConfig {
        task: Task::Classify,
        val_data: Some(dir.path().join("test.jsonl")),
        lr: 3e-3,
        min_lr: 3e-4,
        max_steps: 40,
        method: Method::Full,
        ..cfg(dir.path(), Method::Full, "cls", 40)
    };
    let s = classify::run(&c, &opts(false, Arc::new(AtomicBool::new(false)))).unwrap();
    assert_eq!(s.labels, ["question", "statement"]);
    assert!(s.accuracy.1.unwrap() >= 0.95, "{s:?}");
    // Resumed for more steps, the run reports the accuracy before training, not at the resume.
    let longer = FinetuneConfig { max_steps: 44, ..c.clone() };
    let s2 = classify::run(&longer, &opts(true, Arc::new(AtomicBool::new(false)))).unwrap();
    assert_eq!((s2.steps, s2.accuracy.0), (44, s.accuracy.0), "{s2:?}");
    // A run saved before `task` was recorded resumes as the task it is given.
    let saved = dir.path().join("cls/finetune.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("task");
    std::fs::write(&saved, json.to_string()).unwrap();
    let s3 =
        classify::run(&FinetuneConfig { max_steps: 46, ..c.clone() }, &opts(true, Arc::new(AtomicBool::new(false))))
            .unwrap();
    assert_eq!(s3.steps, 46);
    let m = Pretrained::load(&dir.path().join("cls/model"), DType::F32, &Device::Cpu).unwrap();
    let p = classify::predict(&m, &["why is the owl sea", "the fig is oak"]).unwrap();
    assert_eq!((p[0][0].0.as_str(), p[1][0].0.as_str()), ("question", "statement"));
    assert!((p[0].iter().map(|x| x.1).sum::<f32>() - 1.0).abs() < 1e-5);

    // Fill-in-the-blank on the masked LM: k tokens per mask, probabilities in order.
    let base = Pretrained::load(&dir.path().join("base"), DType::F32, &Device::Cpu).unwrap();
    let top = classify::fill_mask(&base, "the c[MASK]t is [MASK]", 3).unwrap();
    assert_eq!(top.len(), 2);
    assert!(top.iter().all(|t| t.len() == 3 && t[0].1 >= t[1].1 && t[1].1 >= t[2].1));
    assert!(classify::fill_mask(&base, "no mask here", 3).unwrap_err().to_string().contains("[MASK]"));
    // A causal model is refused as a classification base, naming the flag.
    tiny(&dir.path().join("gpt"), "gpt2", 1);
    let bad = FinetuneConfig { base: dir.path().join("gpt"), out_dir: dir.path().join("bad"), ..c };
    let e = classify::run(&bad, &opts(false, Arc::new(AtomicBool::new(false)))).unwrap_err().to_string();
    assert!(e.contains("--base") && e.contains("bert"), "{e}");
}

#[test]
fn chatml_grows_the_vocabulary_for_full_finetuning_only() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny(&dir.path().join("base"), "gpt2", 2);
    let v = base.tokenizer.vocab_size();
    write_data(dir.path());
    let c = FinetuneConfig { chat_template: "chatml".into(), ..cfg(dir.path(), Method::Full, "chatml", 4) };
    finetune::run(&c, &opts(false, Arc::new(AtomicBool::new(false)))).unwrap();
    let m = Pretrained::load(&dir.path().join("chatml/model"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.tokenizer.vocab_size(), v + 2);
    assert_eq!(m.model.config().vocab_size(), v + 2);
    assert_eq!(m.tokenizer.eos_id(), m.tokenizer.token_to_id("<|im_end|>"));
    let text = m.tokenizer.apply_chat_template(&serde_json::json!([{"role": "user", "content": "hi"}]), true).unwrap();
    assert_eq!(text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    let lora = FinetuneConfig { method: Method::Lora, out_dir: dir.path().join("chatml-lora"), ..c };
    let e = finetune::run(&lora, &opts(false, Arc::new(AtomicBool::new(false)))).unwrap_err().to_string();
    assert!(e.contains("--method full"), "{e}");
}
