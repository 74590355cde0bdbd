//! Preference tuning (`finetune --task dpo`): the DPO loss through LoRA against the base with its
//! adapters off (gradients match finite differences), and `dpo::run` end to end: the held-out
//! preference is learned, TRL's metrics are logged, a crash-and-resume run equals the
//! uninterrupted one, ties and over-long pairs are counted, bad settings are refused.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lmstack_core::lora::{LoraConfig, TargetModules};
use lmstack_core::{Model, ModelConfig, Pretrained, Tokenizer};
use lmstack_train::dpo;
use lmstack_train::finetune::{self, FinetuneConfig, LossType, Method, Task, TruncationMode};
use lmstack_train::preference::{self, PairLogps, PreferenceLoss};
use lmstack_train::sft::{self, ChatFormat};
use lmstack_train::trainer::RunOptions;

const CHARS: &str = "abcdefghijklmnopqrstuvwxyz :.?\n";

fn tiny(dir: &Path, arch: &str, seed: u64, chars: &str) -> Pretrained {
    let tok = Tokenizer::from_chars(chars.chars()).unwrap();
    let v = tok.vocab_size();
    let cfg = match arch {
        "gpt2" => format!(
            r#"{{"model_type": "gpt2", "n_embd": 16, "n_head": 2, "n_layer": 2, "n_positions": 32, "vocab_size": {v}}}"#
        ),
        _ => format!(
            r#"{{"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32, "vocab_size": {v}, "tie_word_embeddings": false}}"#
        ),
    };
    let model = Model::init(ModelConfig::from_json(&cfg, "t").unwrap(), seed, DType::F32, &Device::Cpu).unwrap();
    Pretrained { model, tokenizer: tok, dir: None }.save(dir).unwrap();
    Pretrained::load(dir, DType::F32, &Device::Cpu).unwrap()
}

/// 64 pairs "copy: a b" → chosen "a b.", rejected "a b?" (a preference that carries over to
/// held-out prompts); then a tie and a pair longer than the context of 32.
fn write_pairs(dir: &Path) {
    let words = ["cat", "dog", "sun", "sea", "owl", "fig", "oak", "elk"];
    let mut s = String::new();
    for i in 0..64 {
        let (a, b) = (words[i % 8], words[(i % 8 + 1 + (i / 8) % 7) % 8]);
        let line = serde_json::json!({"prompt": format!("copy: {a} {b}\n"), "chosen": format!("{a} {b}."), "rejected": format!("{a} {b}?")});
        s.push_str(&format!("{line}\n"));
    }
    s.push_str("{\"prompt\": \"copy: owl owl\\n\", \"chosen\": \"owl owl\", \"rejected\": \"owl owl\"}\n");
    s.push_str(&format!("{}\n", serde_json::json!({"prompt": "copy: ".repeat(8), "chosen": "a", "rejected": "b"})));
    std::fs::write(dir.join("pairs.jsonl"), s).unwrap();
}

fn cfg(dir: &Path, method: Method, out: &str, steps: u64) -> FinetuneConfig {
    FinetuneConfig {
        target_modules: vec!["c_attn".into(), "c_fc".into(), "lm_head".into()],
        beta: 0.1,
        sft_weight: 0.0,
        ..common::small_run(&dir.join("base"), &dir.join("pairs.jsonl"), &dir.join(out), steps, Task::Dpo, method)
    }
}

fn opts(resume: bool) -> RunOptions {
    RunOptions { resume, ..Default::default() }
}

/// The DPO loss of a LoRA model against the same model with its adapters off: the reference is
/// the base exactly (a model without adapters gives the same log-probabilities), and the
/// gradients in A and B agree with finite differences.
#[test]
fn dpo_through_lora_against_the_base_matches_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path(), "llama", 3, CHARS);
    let tok = p.tokenizer.clone();
    let plain = Pretrained::load(dir.path(), DType::F32, &Device::Cpu).unwrap().model;
    let mut model = p.model;
    let lora: LoraConfig = serde_json::from_value(
        serde_json::json!({"r": 2, "lora_alpha": 4.0, "target_modules": TargetModules::Special("all-linear".into())}),
    )
    .unwrap();
    let vars =
        finetune::attach_lora(&mut model, &lora, 1, Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)))
            .unwrap();
    // B ≠ 0, so the policy differs from the reference and A gets gradients.
    for (k, v) in &vars {
        if k.ends_with("lora_B.weight") {
            let (o, r) = v.dims2().unwrap();
            let vals: Vec<f32> = (0..o * r).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.05).collect();
            v.set(&Tensor::from_vec(vals, (o, r), &Device::Cpu).unwrap()).unwrap();
        }
    }
    let fmt = ChatFormat::from_spec("plain", &tok).unwrap();
    let pairs: Vec<_> = [("copy: cat dog\n", "cat dog", "dog cat"), ("copy: sun\n", "sun", "sea oak")]
        .iter()
        .map(|(p, c, r)| {
            let pair = preference::Pair {
                prompt: preference::Turns::Text(p.to_string()),
                chosen: preference::Turns::Text(c.to_string()),
                rejected: preference::Turns::Text(r.to_string()),
            };
            preference::tokenize_pair(&pair, &tok, &fmt).unwrap()
        })
        .collect();
    let rows: Vec<&sft::Tokenized> = pairs.iter().map(|p| &p.0).chain(pairs.iter().map(|p| &p.1)).collect();
    let b = sft::batch(&rows, 32, 0, &Device::Cpu).unwrap();
    let (reference, counts) = lmstack_core::grad::no_grad(|| {
        lmstack_core::nn::without_adapters(|| model.sequence_logps(&b.inputs, &b.labels, None))
    })
    .unwrap();
    let (base, _) = plain.sequence_logps(&b.inputs, &b.labels, None).unwrap();
    let (r, bv): (Vec<f32>, Vec<f32>) = (reference.to_vec1().unwrap(), base.to_vec1().unwrap());
    assert!(r.iter().zip(&bv).all(|(a, b)| (a - b).abs() < 1e-5), "adapters off {r:?} vs base {bv:?}");
    let loss_of = |kind: PreferenceLoss| -> Tensor {
        let (s, _) = model.sequence_logps(&b.inputs, &b.labels, None).unwrap();
        let (lc, lr) = (counts[..2].to_vec(), counts[2..].to_vec());
        preference::preference_loss(
            kind,
            0.5,
            preference::FDivergence::ReverseKl,
            PairLogps {
                policy_chosen: &s.narrow(0, 0, 2).unwrap(),
                policy_rejected: &s.narrow(0, 2, 2).unwrap(),
                ref_chosen: &reference.narrow(0, 0, 2).unwrap(),
                ref_rejected: &reference.narrow(0, 2, 2).unwrap(),
                len_chosen: &lc,
                len_rejected: &lr,
            },
        )
        .unwrap()
        .loss
    };
    for kind in [PreferenceLoss::Sigmoid, PreferenceLoss::Ipo] {
        let loss = loss_of(kind);
        let grads = loss.backward().unwrap();
        for key in [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight",
        ] {
            let v = &vars[key];
            let g: Vec<f32> = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert!(g.iter().any(|x| *x != 0.0), "{kind:?} {key}: zero gradient");
            let orig = v.as_tensor().copy().unwrap();
            let flat: Vec<f32> = orig.flatten_all().unwrap().to_vec1().unwrap();
            let i = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap().0;
            let eps = 1e-2f32;
            let at = |delta: f32| -> f64 {
                let mut w = flat.clone();
                w[i] += delta;
                v.set(&Tensor::from_vec(w, orig.shape(), &Device::Cpu).unwrap()).unwrap();
                loss_of(kind).to_scalar::<f32>().unwrap() as f64
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            v.set(&orig).unwrap();
            assert!(
                (fd - g[i] as f64).abs() < 1e-3 + 0.03 * fd.abs(),
                "{kind:?} {key}: analytic {} vs numeric {fd}",
                g[i]
            );
        }
    }
}

#[test]
fn lora_dpo_learns_the_preference_logs_trl_metrics_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    tiny(&dir.path().join("base"), "gpt2", 7, CHARS);
    write_pairs(dir.path());
    let c = FinetuneConfig { precompute_ref_log_probs: true, ..cfg(dir.path(), Method::Lora, "lora", 20) };
    let s = dpo::run(&c, &opts(false)).unwrap();
    // The tie and the pair longer than the context are left out and reported.
    assert_eq!(s.left_out.0.len(), 1, "{s:?}");
    assert!(s.left_out.0[0].ends_with("pairs.jsonl:65"), "{s:?}");
    assert_eq!(s.left_out.1, 1, "{s:?}");
    assert_eq!(s.pairs, (48, 16));
    // Before training the policy is the reference: DPO's loss is ln 2.
    assert!((s.val_loss.0 - std::f64::consts::LN_2).abs() < 1e-6, "{s:?}");
    let after = s.val_loss.1.unwrap();
    assert!(after < 0.5, "held-out loss {} → {after}", s.val_loss.0);
    assert!(s.reward_accuracy.unwrap() >= 0.9, "{s:?}");
    // TRL's metrics in every training record and in the evaluations.
    let log = std::fs::read_to_string(dir.path().join("lora/metrics.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for r in &records {
        for k in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
        ] {
            assert!(r[k].as_f64().is_some_and(f64::is_finite), "{k} missing from {r}");
        }
        let (m, c, rj) = (
            r["rewards/margins"].as_f64().unwrap(),
            r["rewards/chosen"].as_f64().unwrap(),
            r["rewards/rejected"].as_f64().unwrap(),
        );
        assert!((m - (c - rj)).abs() < 1e-9, "{r}");
    }
    let last_train = records.iter().rev().find(|r| r["split"] == "train").unwrap();
    assert!(last_train["rewards/margins"].as_f64().unwrap() > 0.5, "{last_train}");
    assert!(dir.path().join("lora/adapter/adapter_model.safetensors").is_file());
    assert!(dir.path().join("lora/reference_logps.json").is_file());
    // `data_order.jsonl`: the held-out pairs, then the 8 training pairs of each of the 20
    // steps, by 0-based line of the data file (the tie on line 65 and the long pair on 66 never).
    let order: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("lora/data_order.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let held: Vec<u64> = order[0]["val"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!((held.len(), order.len()), (16, 21));
    for (i, l) in order[1..].iter().enumerate() {
        assert_eq!(l["step"].as_u64(), Some(i as u64));
        let ex = l["examples"].as_array().unwrap();
        assert_eq!(ex.len(), 8);
        assert!(ex.iter().all(|e| e.as_u64().unwrap() < 64 && !held.contains(&e.as_u64().unwrap())), "{l}");
    }
    // The loss plot has the margins and accuracies below the loss.
    let svg = std::fs::read_to_string(dir.path().join("lora/loss.svg")).unwrap();
    assert!(svg.contains(">rewards/margins<") && svg.contains(">rewards/accuracies<"), "{svg}");
    assert_eq!(svg.matches("<polyline").count(), 6, "train and validation lines of 3 panels");

    // A crash after step 10: the step-10 checkpoint alone, resumed, gives the same adapter.
    let copy = dir.path().join("crashed");
    common::crashed_copy(&dir.path().join("lora"), &copy, 10, &["reference_logps.json"]);
    let c2 = FinetuneConfig { out_dir: copy.clone(), ..c.clone() };
    dpo::run(&c2, &opts(true)).unwrap();
    let load =
        |d: &Path| candle_core::safetensors::load(d.join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
    let (a, b) = (load(&dir.path().join("lora")), load(&copy));
    for (k, t) in &a {
        let d = (t - &b[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{k} differs after resuming");
    }
}

/// Online references give the precomputed reference's result: LoRA with adapters off, full
/// finetuning with a frozen copy of the base.
#[test]
fn online_and_precomputed_references_train_alike() {
    let dir = tempfile::tempdir().unwrap();
    tiny(&dir.path().join("base"), "llama", 5, CHARS);
    write_pairs(dir.path());
    for method in [Method::Lora, Method::Full] {
        let lr = if method == Method::Full { 5e-3 } else { 2e-2 };
        let online = cfg(dir.path(), method, &format!("{method:?}-online"), 6);
        let online = FinetuneConfig { lr, min_lr: lr / 10.0, ..online };
        let pre = FinetuneConfig {
            precompute_ref_log_probs: true,
            out_dir: dir.path().join(format!("{method:?}-pre")),
            ..online.clone()
        };
        let a = dpo::run(&online, &opts(false)).unwrap();
        let b = dpo::run(&pre, &opts(false)).unwrap();
        let (la, lb) = (a.val_loss.1.unwrap(), b.val_loss.1.unwrap());
        assert!((la - lb).abs() < 1e-4, "{method:?}: online {la} vs precomputed {lb}");
        assert!(la < a.val_loss.0, "{method:?}: {a:?}");
    }
}

#[test]
fn bad_settings_and_a_reference_with_another_tokenizer_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    tiny(&dir.path().join("base"), "gpt2", 7, CHARS);
    tiny(&dir.path().join("other"), "gpt2", 7, "abcdefghijklmnopqrstuvwxyz :.?\n!");
    write_pairs(dir.path());
    let c = cfg(dir.path(), Method::Lora, "bad", 2);
    let err = |c: FinetuneConfig| dpo::run(&c, &opts(false)).unwrap_err().to_string();
    let e = err(FinetuneConfig { ref_model: Some(dir.path().join("other")), ..c.clone() });
    assert!(e.contains("--ref-model") && e.contains("other") && e.contains("base"), "{e}");
    let e = err(FinetuneConfig { beta: 0.0, ..c.clone() });
    assert!(e.contains("--beta"), "{e}");
    let e = err(FinetuneConfig { label_smoothing: 0.1, ..c.clone() });
    assert!(e.contains("--label-smoothing") && e.contains("robust"), "{e}");
    let e = err(FinetuneConfig { label_smoothing: 0.6, loss_type: LossType::Robust, ..c.clone() });
    assert!(e.contains("--label-smoothing"), "{e}");
    // A bad line names file:line and the field.
    std::fs::write(dir.path().join("bad.jsonl"), "{\"prompt\": \"a\", \"chosen\": \"b\"}\n").unwrap();
    let e = err(FinetuneConfig { data: dir.path().join("bad.jsonl"), ..c.clone() });
    assert!(e.contains("bad.jsonl:1") && e.contains("rejected"), "{e}");
    // The chosen answers' NLL adds to the loss (a random model's is about ln 31 a token).
    let s = dpo::run(
        &FinetuneConfig { sft_weight: 1.0, out_dir: dir.path().join("sft"), max_steps: 4, ..c.clone() },
        &opts(false),
    )
    .unwrap();
    assert!(s.val_loss.0 > std::f64::consts::LN_2 + 2.0, "{s:?}");
    let e = err(FinetuneConfig { sft_weight: -1.0, ..c.clone() });
    assert!(e.contains("--sft-weight"), "{e}");
    // Over-long sequences are cut as TRL cuts them (`max_length`, `truncation_mode`): each
    // pair is 22 tokens ("copy: cat dog\n" then "cat dog."), the last one's prompt alone 48.
    let cut = |max_length: usize, truncation_mode: TruncationMode, name: &str| {
        let c = FinetuneConfig {
            max_length: Some(max_length),
            truncation_mode,
            out_dir: dir.path().join(name),
            max_steps: 1,
            ..c.clone()
        };
        dpo::run(&c, &opts(false))
    };
    let s = cut(18, TruncationMode::KeepStart, "keep-start").unwrap();
    assert_eq!((s.truncated, s.left_out.1, s.pairs.0 + s.pairs.1), (64, 1, 64), "{s:?}");
    let s = cut(12, TruncationMode::KeepEnd, "keep-end").unwrap();
    assert_eq!((s.truncated, s.left_out.1, s.pairs.0 + s.pairs.1), (65, 0, 65), "{s:?}");
    let e = cut(12, TruncationMode::KeepStart, "prompt-fills").unwrap_err().to_string();
    assert!(e.contains("no pair has an answer within 12 tokens (65 left out)"), "{e}");
    let e = cut(34, TruncationMode::KeepStart, "too-long").unwrap_err().to_string();
    assert!(e.contains("--max-length 34") && e.contains("at most 33 tokens"), "{e}");
    let e = finetune::run(&FinetuneConfig { task: Task::Sft, max_length: Some(20), ..c.clone() }, &opts(false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("belong to --task dpo and kto"), "{e}");
    // Robust DPO, IPO, hinge and ORPO train too (finite, falling losses).
    let e = err(FinetuneConfig { loss_type: LossType::Orpo, precompute_ref_log_probs: true, ..c.clone() });
    assert!(e.contains("ORPO has no reference"), "{e}");
    let e = err(FinetuneConfig { loss_type: LossType::Orpo, sft_weight: 1.0, ..c.clone() });
    assert!(e.contains("--sft-weight"), "{e}");
    for loss_type in [LossType::Robust, LossType::Ipo, LossType::Hinge, LossType::Orpo] {
        let c = FinetuneConfig {
            loss_type,
            label_smoothing: if loss_type == LossType::Robust { 0.1 } else { 0.0 },
            out_dir: dir.path().join(format!("{loss_type:?}")),
            max_steps: 8,
            ..c.clone()
        };
        let s = dpo::run(&c, &opts(false)).unwrap();
        let (before, after) = (s.val_loss.0, s.val_loss.1.unwrap());
        assert!(after.is_finite() && after < before, "{loss_type:?}: {before} → {after}");
    }
}

/// QLoRA DPO on a quantized GGUF base: the reference (the base with the adapters off, without
/// gradients) computes what the policy does, so before any update the logged rewards are 0
/// (TRL's), online or precomputed.
#[test]
fn a_quantized_base_is_its_own_exact_reference() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = Tokenizer::from_chars(CHARS.chars()).unwrap();
    let config = format!(
        r#"{{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32, "vocab_size": {}, "tie_word_embeddings": false}}"#,
        tokenizer.vocab_size()
    );
    let model = Model::init(ModelConfig::from_json(&config, "t").unwrap(), 3, DType::F32, &Device::Cpu).unwrap();
    let gguf = dir.path().join("base.gguf");
    lmstack_core::gguf::write_model(&model, &tokenizer, &gguf, lmstack_core::gguf::WriteType::Q8_0).unwrap();
    write_pairs(dir.path());
    for precompute in [false, true] {
        let out = format!("q-{precompute}");
        let c = FinetuneConfig {
            base: gguf.clone(),
            target_modules: vec!["all-linear".into()],
            precompute_ref_log_probs: precompute,
            ..cfg(dir.path(), Method::Lora, &out, 1)
        };
        dpo::run(&c, &opts(false)).unwrap();
        let log = std::fs::read_to_string(dir.path().join(&out).join("metrics.jsonl")).unwrap();
        let first: serde_json::Value = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .find(|r: &serde_json::Value| r["split"] == "train")
            .unwrap();
        for k in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"] {
            assert_eq!(first[k].as_f64(), Some(0.0), "precompute {precompute}: {k} in {first}");
        }
    }
}

/// KTO (`--task kto`) on the pairs split into desirable and undesirable answers, and on
/// TRL's unpaired lines: the held-out margin opens, `kl` is logged, bad lines are named.
#[test]
fn kto_learns_from_unpaired_answers() {
    let dir = tempfile::tempdir().unwrap();
    tiny(&dir.path().join("base"), "llama", 5, CHARS);
    write_pairs(dir.path());
    let c = FinetuneConfig {
        out_dir: dir.path().join("kto"),
        ..FinetuneConfig { task: Task::Kto, beta: 0.1, ..cfg(dir.path(), Method::Lora, "kto", 20) }
    };
    let s = lmstack_train::kto::run(&c, &opts(false)).unwrap();
    // 64 pairs give 128 examples, half desirable; the tie is left out, and the over-long
    // pair's two answers.
    assert_eq!(s.ties.len(), 1, "{s:?}");
    assert_eq!(s.too_long, 2, "{s:?}");
    assert_eq!(s.examples.0 + s.examples.1, 128, "{s:?}");
    assert!(s.val_loss.1.unwrap() < s.val_loss.0, "{s:?}");
    assert!(s.margin.unwrap() > 0.0, "{s:?}");
    let log = std::fs::read_to_string(dir.path().join("kto/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    for k in ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"] {
        assert!(last[k].as_f64().is_some_and(f64::is_finite), "{k} missing from {last}");
    }
    // TRL's unpaired shape; a missing label is named.
    let lines = "{\"prompt\": \"copy: cat dog\\n\", \"completion\": \"cat dog.\", \"label\": true}\n\
                 {\"prompt\": \"copy: cat dog\\n\", \"completion\": \"cat dog?\"}\n";
    std::fs::write(dir.path().join("unpaired.jsonl"), lines).unwrap();
    let bad = FinetuneConfig { data: dir.path().join("unpaired.jsonl"), out_dir: dir.path().join("bad"), ..c.clone() };
    let e = lmstack_train::kto::run(&bad, &opts(false)).unwrap_err().to_string();
    assert!(e.contains("unpaired.jsonl:2") && e.contains("label"), "{e}");
    let e = lmstack_train::kto::run(&FinetuneConfig { undesirable_weight: 0.0, ..c.clone() }, &opts(false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--undesirable-weight"), "{e}");

    // Precomputed reference log-probabilities (answers and KL pairs) train as the online
    // reference does, LoRA (adapters off) and full (a frozen base); a resumed run reads them back.
    for method in [Method::Lora, Method::Full] {
        let lr = if method == Method::Full { 5e-3 } else { 2e-2 };
        let online = FinetuneConfig {
            task: Task::Kto,
            beta: 0.1,
            lr,
            min_lr: lr / 10.0,
            ..cfg(dir.path(), method, &format!("kto-{method:?}"), 6)
        };
        let pre = FinetuneConfig {
            precompute_ref_log_probs: true,
            out_dir: dir.path().join(format!("kto-{method:?}-pre")),
            ..online.clone()
        };
        let a = lmstack_train::kto::run(&online, &opts(false)).unwrap();
        let b = lmstack_train::kto::run(&pre, &opts(false)).unwrap();
        let (la, lb) = (a.val_loss.1.unwrap(), b.val_loss.1.unwrap());
        assert!((la - lb).abs() < 1e-4, "{method:?}: online {la} vs precomputed {lb}");
        assert!((a.val_loss.0 - b.val_loss.0).abs() < 1e-6, "{a:?} vs {b:?}");
        assert!(pre.out_dir.join("reference_logps.json").is_file());
        let more = FinetuneConfig { max_steps: 8, ..pre.clone() };
        let r = lmstack_train::kto::run(&more, &opts(true)).unwrap();
        assert_eq!(r.steps, 8);
    }
}

/// Padding-free batches (TRL's `padding_free`: the sequences packed end to end, each attending
/// only within itself) train DPO and KTO as padded ones do.
#[test]
fn padding_free_preference_runs_equal_padded_ones() {
    let dir = tempfile::tempdir().unwrap();
    tiny(&dir.path().join("base"), "llama", 5, CHARS);
    write_pairs(dir.path());
    for task in [Task::Dpo, Task::Kto] {
        let padded = FinetuneConfig { task, ..cfg(dir.path(), Method::Lora, &format!("{task:?}-padded"), 6) };
        let packed = FinetuneConfig {
            padding_free: true,
            out_dir: dir.path().join(format!("{task:?}-packed")),
            ..padded.clone()
        };
        let losses = |c: &FinetuneConfig| match task {
            Task::Dpo => {
                let s = dpo::run(c, &opts(false)).unwrap();
                (s.val_loss.0, s.val_loss.1.unwrap())
            }
            _ => {
                let s = lmstack_train::kto::run(c, &opts(false)).unwrap();
                (s.val_loss.0, s.val_loss.1.unwrap())
            }
        };
        let (a, b) = (losses(&padded), losses(&packed));
        assert!((a.0 - b.0).abs() < 1e-5 && (a.1 - b.1).abs() < 1e-4, "{task:?}: padded {a:?} vs packed {b:?}");
        assert!(a.1 < a.0, "{task:?}: {a:?}");
    }
    let reward = FinetuneConfig { task: Task::Reward, padding_free: true, ..cfg(dir.path(), Method::Full, "r", 2) };
    let e = lmstack_train::reward::run(&reward, &opts(false)).unwrap_err().to_string();
    assert!(e.contains("--padding-free"), "{e}");
}

/// Each KTO example's KL pair is its prompt with another prompt's answer, fixed when the data
/// are read: the previous example's within its block (TRL's +1 offset), passing over the other
/// half of its own pair.
#[test]
fn kto_kl_pairs_mismatch_prompts_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(&dir.path().join("base"), "gpt2", 7, CHARS);
    write_pairs(dir.path());
    let fmt = ChatFormat::from_spec("plain", &p.tokenizer).unwrap();
    let (examples, _) = preference::read_unpaired(&dir.path().join("pairs.jsonl")).unwrap();
    let mut items: Vec<lmstack_train::kto::KtoItem> = examples[..16]
        .iter()
        .map(|ex| {
            let tokens = preference::tokenize_answer(&ex.prompt, &ex.completion, &p.tokenizer, &fmt).unwrap();
            lmstack_train::kto::KtoItem { ex: ex.clone(), tokens, kl: Default::default() }
        })
        .collect();
    lmstack_train::kto::assign_kl_pairs(&mut items, 8, &p.tokenizer, &fmt).unwrap();
    let text = |t: &sft::Tokenized| p.tokenizer.decode(&t.ids, false).unwrap();
    let turns = |t: &preference::Turns| match t {
        preference::Turns::Text(s) => s.clone(),
        preference::Turns::Chat(_) => unreachable!("the test's pairs are text"),
    };
    for (j, item) in items.iter().enumerate() {
        let (block, k) = (j / 8 * 8, j % 8);
        // Items come in (chosen, rejected) pairs of one prompt: the previous item in the block
        // with another prompt is two back for a rejected answer's pair, one back for a chosen one.
        let back = if k % 2 == 1 { 2 } else { 1 };
        let other = &items[block + (k + 8 - back) % 8];
        assert_ne!(other.ex.prompt, item.ex.prompt);
        let want = format!("{}{}", turns(&item.ex.prompt), turns(&other.ex.completion));
        assert_eq!(text(&item.kl), want, "item {j}");
    }
}
