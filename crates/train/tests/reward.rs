//! Reward models (`finetune --task reward`): a score head on a causal LM learns a held-out
//! preference with the Bradley–Terry loss, logs TRL's figures, and is saved as a
//! `…ForSequenceClassification` directory that scores texts (`train sample --reward`).

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use lmstack_core::{Model, ModelConfig, Pretrained, Tokenizer};
use lmstack_train::finetune::{FinetuneConfig, Method, Task};
use lmstack_train::reward;
use lmstack_train::trainer::RunOptions;

fn tiny(dir: &Path, arch: &str) {
    let tok = Tokenizer::from_chars("abcdefghijklmnopqrstuvwxyz :.?\n".chars()).unwrap();
    let v = tok.vocab_size();
    let cfg = match arch {
        "gpt2" => format!(
            r#"{{"model_type": "gpt2", "n_embd": 16, "n_head": 2, "n_layer": 2, "n_positions": 32, "vocab_size": {v}}}"#
        ),
        _ => format!(
            r#"{{"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32, "vocab_size": {v}, "tie_word_embeddings": false}}"#
        ),
    };
    let model = Model::init(ModelConfig::from_json(&cfg, "t").unwrap(), 3, DType::F32, &Device::Cpu).unwrap();
    Pretrained { model, tokenizer: tok, dir: None }.save(dir).unwrap();
}

/// "copy: a b" → chosen "a b.", rejected "a b?".
fn write_pairs(path: &Path) {
    let words = ["cat", "dog", "sun", "sea", "owl", "fig", "oak", "elk"];
    let mut s = String::new();
    for i in 0..64 {
        let (a, b) = (words[i % 8], words[(i % 8 + 1 + (i / 8) % 7) % 8]);
        let line = serde_json::json!({"prompt": format!("copy: {a} {b}\n"), "chosen": format!("{a} {b}."), "rejected": format!("{a} {b}?")});
        s.push_str(&format!("{line}\n"));
    }
    std::fs::write(path, s).unwrap();
}

#[test]
fn a_reward_model_learns_the_preference_and_scores_texts() {
    let dir = tempfile::tempdir().unwrap();
    write_pairs(&dir.path().join("pairs.jsonl"));
    for arch in ["gpt2", "qwen2"] {
        tiny(&dir.path().join(arch), arch);
        let c = FinetuneConfig {
            base: dir.path().join(arch),
            data: dir.path().join("pairs.jsonl"),
            val_data: None,
            val_fraction: 0.25,
            out_dir: dir.path().join(format!("{arch}-reward")),
            max_steps: 30,
            batch_size: 8,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 2,
            eval_interval: 10,
            chat_template: "plain".into(),
            ..FinetuneConfig::for_task(Task::Reward, None)
        };
        let s = reward::run(&c, &RunOptions::default()).unwrap();
        assert!(s.accuracy.1.unwrap() >= 0.9, "{arch}: {s:?}");
        assert!(s.val_loss.1.unwrap() < s.val_loss.0, "{arch}: {s:?}");
        // TRL's figures in the log.
        let log = std::fs::read_to_string(c.out_dir.join("metrics.jsonl")).unwrap();
        let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
        for k in ["accuracy", "margin", "min_reward", "mean_reward", "max_reward"] {
            assert!(last[k].as_f64().is_some_and(f64::is_finite), "{arch}: {k} missing from {last}");
        }
        // A …ForSequenceClassification directory with one label and the pad token.
        let cfg: serde_json::Value = lmstack_core::io::read_json(&s.output.join("config.json")).unwrap();
        let class = if arch == "gpt2" { "GPT2ForSequenceClassification" } else { "Qwen2ForSequenceClassification" };
        assert_eq!(cfg["architectures"][0], class, "{cfg}");
        assert_eq!(cfg["id2label"].as_object().unwrap().len(), 1, "{cfg}");
        assert!(cfg["pad_token_id"].is_u64(), "{cfg}");
        let names = lmstack_core::models::read_safetensors(&s.output.join("model.safetensors")).unwrap();
        assert!(names.contains_key("score.weight") && !names.contains_key("lm_head.weight"), "{:?}", names.keys());
        // It scores a held-out-style pair the right way round, as `train sample --reward` does.
        let p = Pretrained::load(&s.output, DType::F32, &Device::Cpu).unwrap();
        let good = reward::score_text(&p, "copy: elk owl\nelk owl.").unwrap();
        let bad = reward::score_text(&p, "copy: elk owl\nelk owl?").unwrap();
        assert!(good > bad, "{arch}: {good} vs {bad}");
        // A language model is no reward model.
        let lm = Pretrained::load(&dir.path().join(arch), DType::F32, &Device::Cpu).unwrap();
        assert!(reward::score_text(&lm, "a").unwrap_err().to_string().contains("reward model"));
    }
}

/// A LoRA reward model (PEFT's `SEQ_CLS` with `modules_to_save=["score"]`): the base stays
/// frozen while the adapters and the whole new head train. The adapter holds the head under
/// PEFT's key; the run's `model/` and `train merge` both give a classifier that scores as the
/// base with the adapters and that head does; a crashed run resumes to the same adapter.
#[test]
fn a_lora_reward_model_trains_its_head_beside_the_adapters() {
    let dir = tempfile::tempdir().unwrap();
    write_pairs(&dir.path().join("pairs.jsonl"));
    let base = dir.path().join("base");
    tiny(&base, "qwen2");
    let c = common::small_run(
        &base,
        &dir.path().join("pairs.jsonl"),
        &dir.path().join("lora"),
        20,
        Task::Reward,
        Method::Lora,
    );
    let s = reward::run(&c, &RunOptions::default()).unwrap();
    assert!(s.accuracy.1.unwrap() >= 0.9, "{s:?}");
    let adapter = dir.path().join("lora/adapter");
    let ac: serde_json::Value = lmstack_core::io::read_json(&adapter.join("adapter_config.json")).unwrap();
    assert_eq!((ac["task_type"].as_str(), &ac["modules_to_save"]), (Some("SEQ_CLS"), &serde_json::json!(["score"])));
    let saved = lmstack_core::models::read_safetensors(&adapter.join("adapter_model.safetensors")).unwrap();
    assert!(saved.contains_key("base_model.model.score.weight"), "{:?}", saved.keys());
    assert!(saved.keys().any(|k| k.ends_with("lora_A.weight")), "{:?}", saved.keys());
    assert_eq!(s.output, dir.path().join("lora/model"));

    // Base + adapters + head, put together by hand, scores as the run's merged model does.
    let merged = Pretrained::load(&s.output, DType::F32, &Device::Cpu).unwrap();
    let a = lmstack_core::lora::read_peft(&adapter).unwrap();
    let b = Pretrained::load(&base, DType::F32, &Device::Cpu).unwrap();
    let mut weights: std::collections::HashMap<String, candle_core::Tensor> =
        b.model.params().tensors().into_iter().filter(|(k, _)| k != "lm_head.weight").collect();
    weights.insert("score.weight".into(), a.modules["score.weight"].clone());
    let store = lmstack_core::params::ParamStore::frozen(weights, "by hand");
    let mut by_hand = Model::new(merged.model.config().clone(), &store, DType::F32, &Device::Cpu).unwrap();
    let mut attached = 0;
    for lin in by_hand.linears_mut() {
        if let Some((la, lb)) = a.weights.get(lin.path()) {
            let lora = lmstack_core::lora::Lora { a: la.clone(), b: lb.clone(), scale: a.config.scale() };
            lin.set_adapter(Some(std::sync::Arc::new(lora)));
            attached += 1;
        }
    }
    assert!(attached > 0);
    let ids = candle_core::Tensor::new(&[[3u32, 9, 4, 12, 7, 1], [5, 2, 8, 8, 11, 6]], &Device::Cpu).unwrap();
    let (x, y) = (by_hand.score(&ids).unwrap(), merged.model.score(&ids).unwrap());
    let d = (x - &y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-5, "merged differs from base + adapter by {d}");
    // `train merge` makes the same model; an LM loader is told to merge.
    let again = dir.path().join("merged");
    lmstack_train::finetune::merge(&base, &adapter, &again).unwrap();
    let again = Pretrained::load(&again, DType::F32, &Device::Cpu).unwrap();
    let z = again.model.score(&ids).unwrap();
    assert_eq!((z - &y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    let mut lm = Pretrained::load(&base, DType::F32, &Device::Cpu).unwrap();
    let e = lmstack_core::lora::load_peft(&mut lm.model, &adapter).unwrap_err().to_string();
    assert!(e.contains("score.weight") && e.contains("train merge"), "{e}");
    let good = reward::score_text(&merged, "copy: elk owl\nelk owl.").unwrap();
    let bad = reward::score_text(&merged, "copy: elk owl\nelk owl?").unwrap();
    assert!(good > bad, "{good} vs {bad}");

    // A crash after step 10: the step-10 checkpoint alone, resumed, gives the same adapter.
    let copy = dir.path().join("crashed");
    common::crashed_copy(&dir.path().join("lora"), &copy, 10, &[]);
    let c2 = FinetuneConfig { out_dir: copy.clone(), ..c.clone() };
    reward::run(&c2, &RunOptions { resume: true, ..Default::default() }).unwrap();
    let resumed = lmstack_core::models::read_safetensors(&copy.join("adapter/adapter_model.safetensors")).unwrap();
    for (k, t) in &saved {
        let d = (t - &resumed[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{k} differs after resuming");
    }
}
