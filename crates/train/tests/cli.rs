//! The `train` binary as a user runs it: Ctrl-C (SIGINT) checkpoints and exits 130, `--resume`
//! finishes the run, `sample` generates from the result, and bad flags fail with one line.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lmstack-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn train() -> Command {
    Command::new(env!("CARGO_BIN_EXE_train"))
}

const TINY: &[&str] = &[
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "16",
    "--block-size",
    "16",
    "--batch-size",
    "4",
    "--eval-interval",
    "50",
    "--eval-iters",
    "2",
    "--log-interval",
    "1",
    "--checkpoint-interval",
    "0",
    "--sample-tokens",
    "10",
    "--quiet",
];

#[test]
fn ctrl_c_checkpoints_and_resume_finishes() {
    let dir = tmp("sigint");
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, lmstack_train::corpus::TINY_SHAKESPEARE.chars().take(20_000).collect::<String>()).unwrap();
    let out = dir.join("run");
    let child = train()
        .args(["--out-dir", out.to_str().unwrap(), "--data", corpus.to_str().unwrap(), "--max-steps", "100000"])
        .args(TINY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until a few steps are logged, then interrupt as Ctrl-C would.
    let start = Instant::now();
    while !std::fs::read_to_string(out.join("metrics.jsonl")).map(|s| s.lines().count() >= 3).unwrap_or(false) {
        assert!(start.elapsed() < Duration::from_secs(120), "training never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let res = child.wait_with_output().unwrap();
    assert_eq!(res.status.code(), Some(130), "stderr: {}", String::from_utf8_lossy(&res.stderr));
    let ckpt = lmstack_train::checkpoint::latest(&out.join("checkpoints")).unwrap().expect("a checkpoint on Ctrl-C");
    let state = lmstack_train::checkpoint::load(&ckpt).unwrap().state;
    assert!(state.step >= 3);
    // Resume to a nearby end, as the interrupted run's last line says: `--resume --out-dir`
    // alone takes the model, data and settings the run saved (only the end is changed here).
    let end = (state.step + 5).to_string();
    let res = train()
        .args(["--resume", "--out-dir", out.to_str().unwrap(), "--max-steps", &end, "--quiet"])
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(stdout.contains(&format!("done: {end} steps")), "{stdout}");
    // The result samples.
    let res = train()
        .args([
            "sample",
            "--model",
            out.join("model").to_str().unwrap(),
            "--prompt",
            "ROMEO:",
            "--max-tokens",
            "8",
            "--seed",
            "1",
        ])
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    assert!(String::from_utf8_lossy(&res.stdout).starts_with("ROMEO:"));
    // A prompt longer than the context continues from its end, as nanoGPT crops it.
    let long = "ROMEO: ".repeat(300);
    let model = out.join("model");
    let res = train().args(["sample", "--max-tokens", "4", "--prompt", &long, "--model"]).arg(&model).output().unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    assert!(String::from_utf8_lossy(&res.stdout).starts_with(&long));
    assert!(String::from_utf8_lossy(&res.stderr).contains("more than the model's context"));
}

#[test]
fn bad_flags_fail_with_one_clear_line() {
    for (args, want) in [
        (vec!["--n-head", "3"], "n_embd"),
        (vec!["--arch", "t5"], "arch"),
        (vec!["sample", "--model", "/nonexistent/model"], "/nonexistent/model"),
        (vec!["data", "--input", "/nonexistent/in.txt", "--out", "/tmp/x"], "/nonexistent/in.txt"),
        (vec!["--lr", "abc"], "invalid value"),
        (vec!["--init-std", "inf"], "init_std"),
        // Attention scores of terabytes: refused up front, not killed by the kernel later.
        (vec!["--block-size", "100000", "--out-dir", "/tmp/lmstack-cli-huge-block"], "`block_size` = 100000"),
    ] {
        let res = train().args(&args).output().unwrap();
        assert!(!res.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn tokenizer_command_trains_on_cleaned_text() {
    let dir = tmp("tok");
    let input = dir.join("in.txt");
    let text: String = lmstack_train::corpus::TINY_SHAKESPEARE.chars().take(20_000).collect();
    std::fs::write(&input, text.replace('\n', "\r\n")).unwrap();
    let out = dir.join("tok");
    let res = train()
        .args(["tokenizer", "--input", input.to_str().unwrap(), "--kind", "char", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let tok = lmstack_core::Tokenizer::from_dir(&out).unwrap();
    assert!(tok.token_to_id("\r").is_none(), "cleaning should have turned \\r\\n into \\n");
    assert!(tok.token_to_id("\n").is_some());
    assert!(!out.join(".clean-inputs.tmp").exists());
    let res = train()
        .args([
            "tokenizer",
            "--input",
            input.to_str().unwrap(),
            "--kind",
            "bpe",
            "--vocab-size",
            "300",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    assert_eq!(lmstack_core::Tokenizer::from_dir(&out).unwrap().vocab_size(), 300);
    let res = train()
        .args(["tokenizer", "--input", input.to_str().unwrap(), "--kind", "wordpiece", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!res.status.success() && String::from_utf8_lossy(&res.stderr).contains("wordpiece"));
}

/// Adaptation as a user runs it: synthetic data, a LoRA finetune of a tiny pretrained model,
/// merging the adapter, and sampling from the merged model; bad inputs fail with one line.
#[test]
fn synth_finetune_merge_and_sample_from_the_command_line() {
    let d = tmp("adapt");
    let base_run = d.join("base");
    let base_s = base_run.display().to_string();
    let mut args: Vec<&str> = TINY.to_vec();
    let at = args.iter().position(|a| *a == "--block-size").unwrap();
    args[at + 1] = "48"; // room for a prompt and its answer
    args.extend(["--max-steps", "20", "--out-dir", &base_s]);
    let o = train().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let synth = d.join("synth");
    let o = train()
        .args(["data", "synth", "--train", "64", "--test", "8", "--tasks", "copy,reverse", "--out"])
        .arg(&synth)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(synth.join("test.jsonl")).unwrap().lines().count(), 8);
    let ft = d.join("ft");
    let o = train()
        .args(["finetune", "--max-steps", "4", "--batch-size", "4", "--quiet", "--base"])
        .arg(base_run.join("model"))
        .arg("--data")
        .arg(synth.join("train.jsonl"))
        .arg("--out-dir")
        .arg(&ft)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("LoRA finetuning") && out.contains("validation loss"), "{out}");
    let before = |out: &str| out.split("validation loss before: ").nth(1).map(|s| s[..6].to_owned());
    let first_before = before(&out).expect("a validation loss before finetuning");
    // `--resume --out-dir` alone continues with the run's saved settings (base, data, batch
    // size); a setting that differs is named, with both values.
    let o =
        train().args(["finetune", "--resume", "--max-steps", "6", "--quiet", "--out-dir"]).arg(&ft).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("done: 6 steps"), "{out}{}", String::from_utf8_lossy(&o.stderr));
    // Its "before" is the base's loss, not that of the model it resumed.
    assert_eq!(before(&out), Some(first_before), "{out}");
    let o = train()
        .args(["finetune", "--resume", "--max-steps", "8", "--batch-size", "2", "--out-dir"])
        .arg(&ft)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--batch-size (4 there, 2 here)"), "{err}");
    let merged = d.join("merged");
    let o = train()
        .args(["merge", "--base"])
        .arg(base_run.join("model"))
        .arg("--adapter")
        .arg(ft.join("adapter"))
        .arg("--out")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = train()
        .args(["sample", "--max-tokens", "5", "--prompt", "user: copy: cat", "--model"])
        .arg(&merged)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // On-policy pairs from the merged model's answers to the SFT lines' conversations: pairs
    // where its answers are right and wrong, or the count of prompts without any; every
    // answer is written either way.
    let o = train()
        .args(["data", "pairs", "--n", "4", "--max-tokens", "8", "--model"])
        .arg(&merged)
        .arg("--prompts")
        .arg(synth.join("test.jsonl"))
        .arg("--out")
        .arg(d.join("pairs.jsonl"))
        .arg("--samples")
        .arg(d.join("samples.jsonl"))
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("from 8 prompts × 4 answers") || err.contains("no pairs: all 4 answers to each of the 8 prompts"),
        "{out}{err}"
    );
    let samples = std::fs::read_to_string(d.join("samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 32);
    let first: serde_json::Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    assert_eq!(first["prompt"][0]["role"], "user", "{first}");
    assert!(first["label"].is_boolean() && first["completion"][0]["role"] == "assistant", "{first}");

    // Text the base's vocabulary cannot encode, a missing base, a bert-only flag on a causal model.
    let o = train()
        .args(["data", "synth", "--tasks", "add", "--train", "8", "--test", "2", "--out"])
        .arg(&synth)
        .output()
        .unwrap();
    assert!(o.status.success());
    for (extra, needle) in [
        (vec!["--base", base_run.join("model").to_str().unwrap()], "no token for"),
        (vec!["--base", "/nonexistent/model"], "no model directory"),
    ] {
        let o = train()
            .args(["finetune", "--max-steps", "2", "--quiet", "--out-dir"])
            .arg(d.join(format!("bad-{}", needle.len())))
            .arg("--data")
            .arg(synth.join("train.jsonl"))
            .args(&extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{err}");
    }
    let o = train().args(["sample", "--fill", "a [MASK]", "--model"]).arg(base_run.join("model")).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("mask"));
    let _ = std::fs::remove_dir_all(&d);
}

/// `train export` writes a Llama directory with a byte-level BPE tokenizer as GGUF; the file
/// loads back with its tokenizer and close logits, and an unknown `--type` or a model GGUF
/// cannot hold fails with one line.
#[test]
fn export_writes_a_gguf_that_loads_back() {
    use lmstack_core::{DType, Device, Model, ModelConfig, Pretrained, Tensor, Tokenizer};
    let d = tmp("export");
    let corpus = d.join("corpus.txt");
    std::fs::write(&corpus, "the quick brown fox jumps over the lazy dog 0123456789\n".repeat(50)).unwrap();
    let tok = Tokenizer::train_bpe(&[corpus.as_path()], 280, &["<|endoftext|>"]).unwrap();
    let cfg = format!(
        r#"{{"model_type":"llama","vocab_size":{},"hidden_size":64,"intermediate_size":128,"num_hidden_layers":1,
        "num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":32}}"#,
        tok.vocab_size()
    );
    let model = Model::init(ModelConfig::from_json(&cfg, "t").unwrap(), 3, DType::F32, &Device::Cpu).unwrap();
    Pretrained { model, tokenizer: tok, dir: None }.save(&d.join("model")).unwrap();
    let out = d.join("model.gguf");
    let o = train()
        .args([
            "export",
            "--model",
            d.join("model").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--type",
            "q8_0",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = Pretrained::load(&d.join("model"), DType::F32, &Device::Cpu).unwrap();
    let b = Pretrained::load(&out, DType::F32, &Device::Cpu).unwrap();
    let text = "the lazy fox 42";
    let ids = a.tokenizer.encode(text, false).unwrap();
    assert_eq!(b.tokenizer.encode(text, false).unwrap(), ids);
    let t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let (la, lb) = (a.model.forward(&t, None).unwrap(), b.model.forward(&t, None).unwrap());
    let diff = (la - lb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 0.05, "q8_0 logits differ by {diff}");

    let bad = train().args(["export", "--model", "x", "--out", "y.gguf", "--type", "q3"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("`q3` is not one of"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    // lmstack's default GPT-2 architecture is written too (its 16-wide rows as f16) and loads
    // back with the same logits; BERT is refused, saying so in one line.
    let gpt2 = d.join("gpt2");
    let cfg = format!(
        r#"{{"model_type":"gpt2","vocab_size":{},"n_embd":16,"n_head":2,"n_layer":1,"n_positions":16}}"#,
        a.tokenizer.vocab_size()
    );
    let m = Model::init(ModelConfig::from_json(&cfg, "t").unwrap(), 3, DType::F32, &Device::Cpu).unwrap();
    Pretrained { model: m, tokenizer: a.tokenizer.clone(), dir: None }.save(&gpt2).unwrap();
    let gpt2_out = d.join("gpt2.gguf");
    let o = train()
        .args(["export", "--model", gpt2.to_str().unwrap(), "--out", gpt2_out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (ga, gb) = (
        Pretrained::load(&gpt2, DType::F32, &Device::Cpu).unwrap(),
        Pretrained::load(&gpt2_out, DType::F32, &Device::Cpu).unwrap(),
    );
    let (la, lb) = (ga.model.forward(&t, None).unwrap(), gb.model.forward(&t, None).unwrap());
    let diff = (la - lb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 0.05, "gpt2 logits differ by {diff}");
    let bert = d.join("bert");
    let cfg = format!(
        r#"{{"model_type":"bert","vocab_size":{},"hidden_size":16,"num_attention_heads":2,"num_hidden_layers":1,
        "intermediate_size":32,"max_position_embeddings":16}}"#,
        a.tokenizer.vocab_size()
    );
    let m = Model::init(ModelConfig::from_json(&cfg, "t").unwrap(), 3, DType::F32, &Device::Cpu).unwrap();
    Pretrained { model: m, tokenizer: a.tokenizer.clone(), dir: None }.save(&bert).unwrap();
    let o =
        train().args(["export", "--model", bert.to_str().unwrap(), "--out", out.to_str().unwrap()]).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("are written as GGUF; bert is not"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
