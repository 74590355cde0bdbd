//! Reward models (`finetune --task reward`): a score head on a causal LM learns a held-out
//! preference with the Bradley–Terry loss, logs TRL's figures, and is saved as a
//! `…ForSequenceClassification` directory that scores texts (`train sample --reward`).

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
    // LoRA is refused with the reason.
    let c = FinetuneConfig {
        base: dir.path().join("gpt2"),
        data: dir.path().join("pairs.jsonl"),
        out_dir: dir.path().join("lora"),
        ..FinetuneConfig::for_task(Task::Reward, Some(Method::Lora))
    };
    let e = reward::run(&c, &RunOptions::default()).unwrap_err().to_string();
    assert!(e.contains("--method full"), "{e}");
}
