//! End-to-end pretraining on tiny models: the loss falls, an interrupted-and-resumed run
//! reproduces the uninterrupted one exactly, corrupt checkpoints are refused, and the run
//! directory holds a loadable Hugging Face model.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lmstack_train::config::PretrainConfig;
use lmstack_train::pretrain::run;
use lmstack_train::runlog;
use lmstack_train::trainer::RunOptions;

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lmstack-pretrain-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A small corpus file (the first 40k characters of the embedded Shakespeare).
fn corpus(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let text: String = lmstack_train::corpus::TINY_SHAKESPEARE.chars().take(40_000).collect();
    let p = dir.join("corpus.txt");
    std::fs::write(&p, text).unwrap();
    p
}

fn tiny(out: &Path, arch: &str) -> PretrainConfig {
    PretrainConfig {
        out_dir: out.to_owned(),
        data: Some(corpus(&out.with_extension("data"))),
        arch: arch.into(),
        n_layer: 2,
        n_head: 2,
        n_kv_head: if arch == "llama" { 1 } else { 0 },
        n_embd: 32,
        block_size: 32,
        batch_size: 8,
        max_steps: 40,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 5,
        eval_interval: 20,
        eval_iters: 4,
        log_interval: 5,
        checkpoint_interval: 0,
        sample_tokens: 20,
        ..PretrainConfig::default()
    }
}

fn opts() -> RunOptions {
    RunOptions {
        resume: false,
        resume_verified: false,
        progress: false,
        stop: Arc::new(AtomicBool::new(false)),
        verbose: false,
        overwrite: false,
    }
}

fn train_losses(dir: &Path) -> Vec<(u64, f64)> {
    runlog::read(&dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.split == "train")
        .map(|r| (r.step, r.loss))
        .collect()
}

#[test]
fn loss_falls_for_every_architecture() {
    for arch in ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "bert"] {
        let out = tmp(arch);
        let mut cfg = tiny(&out, arch);
        if ["mistral", "qwen3", "gemma2", "gemma3", "phi3"].contains(&arch) {
            cfg.sliding_window = 8;
        }
        let s = run(&cfg, &opts()).unwrap();
        let l = train_losses(&out);
        let (first, last) = (l.first().unwrap().1, l.last().unwrap().1);
        assert!(last < first - 0.5, "{arch}: loss went from {first} to {last}");
        assert!(s.val_loss.unwrap().is_finite());
        // The run directory holds a model that loads as a Hugging Face directory.
        let p =
            lmstack_core::Pretrained::load(&out.join("model"), lmstack_core::DType::F32, &lmstack_core::Device::Cpu)
                .unwrap();
        assert_eq!(p.model.num_parameters(), s.num_parameters);
        assert_eq!(p.model.config().model_type_str(), if arch == "gemma3" { "gemma3_text" } else { arch });
        if cfg.sliding_window > 0 {
            let lmstack_core::ModelConfig::Llama(c) = p.model.config() else { panic!("{arch}") };
            assert_eq!(c.layer_window(0), Some(8), "{arch}");
        }
        assert!(out.join("best/model.safetensors").is_file());
        assert!(std::fs::read_to_string(out.join("loss.svg")).unwrap().contains("<polyline"));
        if arch != "bert" {
            assert!(!s.sample.unwrap().is_empty());
        } else {
            assert!(p.tokenizer.mask_id().is_some(), "bert run must add a [MASK] token");
        }
    }
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let a = tmp("whole");
    let mut cfg = tiny(&a, "gpt2");
    cfg.max_steps = 30;
    cfg.log_interval = 1;
    cfg.eval_interval = 10;
    cfg.checkpoint_interval = 10;
    run(&cfg, &opts()).unwrap();
    let whole = train_losses(&a);

    // Same run, stopped after step 17 (as Ctrl-C would), then resumed.
    let b = tmp("resumed");
    let mut cfg_b = cfg.clone();
    cfg_b.out_dir = b.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let metrics = b.join("metrics.jsonl");
        std::thread::spawn(move || loop {
            if let Ok(r) = runlog::read(&metrics) {
                if r.iter().any(|r| r.step >= 17) {
                    stop.store(true, Ordering::SeqCst);
                    return;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        })
    };
    let s = run(&cfg_b, &RunOptions { stop, ..opts() }).unwrap();
    watcher.join().unwrap();
    assert!(s.interrupted && s.steps < 30, "run was not interrupted: {s:?}");
    // Resuming without --resume is refused; with it the run completes.
    let e = run(&cfg_b, &opts()).unwrap_err().to_string();
    assert!(e.contains("--resume"), "{e}");
    run(&cfg_b, &RunOptions { resume: true, ..opts() }).unwrap();
    let resumed = train_losses(&b);
    assert_eq!(whole.len(), resumed.len());
    for ((s1, l1), (s2, l2)) in whole.iter().zip(&resumed) {
        assert_eq!(s1, s2);
        assert_eq!(l1, l2, "loss at step {s1} differs after resume");
    }
    // The final weights are identical too.
    let w1 = lmstack_core::models::read_safetensors(&a.join("model/model.safetensors")).unwrap();
    let w2 = lmstack_core::models::read_safetensors(&b.join("model/model.safetensors")).unwrap();
    for (k, t) in &w1 {
        let d = (t - &w2[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{k}");
    }
}

#[test]
fn corrupt_checkpoints_are_refused() {
    let out = tmp("corrupt");
    let mut cfg = tiny(&out, "gpt2");
    cfg.max_steps = 6;
    run(&cfg, &opts()).unwrap();
    let ckpt = lmstack_train::checkpoint::latest(&out.join("checkpoints")).unwrap().unwrap();
    let model = ckpt.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    // Flip one byte in the middle: the checksum catches it.
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xFF;
    std::fs::write(&model, &flipped).unwrap();
    cfg.max_steps = 8;
    let e = run(&cfg, &RunOptions { resume: true, ..opts() }).unwrap_err().to_string();
    assert!(e.contains("checksum") && e.contains("model.safetensors"), "{e}");
    // Truncate it: the size check catches it.
    std::fs::write(&model, &bytes[..bytes.len() - 100]).unwrap();
    let e = run(&cfg, &RunOptions { resume: true, ..opts() }).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    // Restored, the run resumes.
    std::fs::write(&model, &bytes).unwrap();
    let s = run(&cfg, &RunOptions { resume: true, ..opts() }).unwrap();
    assert_eq!(s.steps, 8);
    // Resuming with a different model is refused and names the setting.
    let other = PretrainConfig { n_head: 4, max_steps: 10, ..cfg.clone() };
    let e = run(&other, &RunOptions { resume: true, ..opts() }).unwrap_err().to_string();
    assert!(e.contains("`n_head`"), "{e}");
    // Starting again in the same directory needs --overwrite, which begins at step 0.
    let e = run(&cfg, &opts()).unwrap_err().to_string();
    assert!(e.contains("--overwrite"), "{e}");
    let metrics_before = train_losses(&out).len();
    let s = run(&cfg, &RunOptions { overwrite: true, ..opts() }).unwrap();
    assert_eq!(s.steps, 8);
    assert!(train_losses(&out).len() <= metrics_before && train_losses(&out)[0].0 <= 5, "the log restarted");
}

/// Every file of a checkpoint is verified (an edited `state.json` was loaded silently and
/// resumed at the wrong step); `--resume` names the newest checkpoint that verifies and
/// `resume_verified` takes it; leftover temporary files are cleaned; a directory holding
/// checkpoints needs `--overwrite` even without `latest`.
#[test]
fn every_checkpoint_file_is_verified_and_resume_can_fall_back() {
    let out = tmp("verify");
    let mut cfg = tiny(&out, "gpt2");
    cfg.max_steps = 6;
    cfg.checkpoint_interval = 3;
    run(&cfg, &opts()).unwrap();
    let root = out.join("checkpoints");
    let latest = lmstack_train::checkpoint::latest(&root).unwrap().unwrap();
    assert!(latest.ends_with("step-0000006"), "{}", latest.display());
    // One edit to state.json: step 6 becomes 5.
    let state = latest.join("state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    let edited = text.replacen("\"step\": 6", "\"step\": 5", 1);
    assert_ne!(text, edited);
    std::fs::write(&state, &edited).unwrap();
    cfg.max_steps = 8;
    let e = run(&cfg, &RunOptions { resume: true, ..opts() }).unwrap_err().to_string();
    assert!(e.contains("state.json") && e.contains("checksum"), "{e}");
    assert!(e.contains("step-0000003") && e.contains("--resume-verified"), "{e}");
    // A temporary file an interrupted write left behind goes when a run starts.
    let leftover = root.join("latest.4242.tmp");
    std::fs::write(&leftover, "step-0000009\n").unwrap();
    let s = run(&cfg, &RunOptions { resume: true, resume_verified: true, ..opts() }).unwrap();
    assert_eq!(s.steps, 8);
    assert!(!leftover.exists());
    let resumed = train_losses(&out);
    assert!(resumed.iter().any(|r| r.0 == 5) && resumed.last().unwrap().0 == 8, "{resumed:?}");
    // Without `latest`, the directory still holds a run.
    std::fs::remove_file(root.join("latest")).unwrap();
    let e = run(&cfg, &opts()).unwrap_err().to_string();
    assert!(e.contains("already holds") && e.contains("--overwrite"), "{e}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let out = tmp("bad");
    std::fs::create_dir_all(&out).unwrap();
    type Edit = Box<dyn Fn(&mut PretrainConfig)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|c| c.data = Some(PathBuf::from("/nonexistent/corpus.txt"))), "/nonexistent/corpus.txt"),
        (Box::new(|c| c.block_size = 100_000), "context length"),
        (Box::new(|c| c.n_head = 3), "n_embd"),
        (Box::new(|c| c.arch = "t5".into()), "arch"),
        (Box::new(|c| c.tokenizer = "bpe:lots".into()), "tokenizer"),
        (Box::new(|c| c.lr = -1.0), "lr"),
    ];
    for (i, (edit, want)) in cases.into_iter().enumerate() {
        let mut cfg = tiny(&out.join(format!("c{i}")), "gpt2");
        edit(&mut cfg);
        let e = run(&cfg, &opts()).unwrap_err().to_string();
        assert!(e.contains(want), "case {i}: `{e}` does not mention `{want}`");
    }
    let empty = out.join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    let mut cfg = tiny(&out.join("e"), "gpt2");
    cfg.data = Some(empty);
    assert!(run(&cfg, &opts()).unwrap_err().to_string().contains("empty"));
    let binary = out.join("binary.txt");
    std::fs::write(&binary, b"line one\nline two \xff\xfe\n").unwrap();
    cfg.data = Some(binary);
    let e = run(&cfg, &opts()).unwrap_err().to_string();
    assert!(e.contains("binary.txt:2") && e.contains("UTF-8"), "{e}");
    let e = PretrainConfig::from_toml("lr = 0.1\nn_layers = 4\n", "run.toml").unwrap_err().to_string();
    assert!(e.contains("run.toml:2") && e.contains("n_layers"), "{e}");
}

/// `init_std` (0: 1/sqrt(n_embd)) is written to `config.json` as `initializer_range` and is the
/// spread of the initial weights; GPT-2's residual projections get it over sqrt(2 * n_layer).
#[test]
fn initial_weights_have_the_configured_spread() {
    use lmstack_core::{DType, Device, Model};
    let std_of = |t: &lmstack_core::Tensor| {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
    };
    for (arch, init_std, want) in
        [("gpt2", 0.0, 1.0 / 128f64.sqrt()), ("gpt2", 0.02, 0.02), ("llama", 0.0, 1.0 / 128f64.sqrt())]
    {
        let cfg = PretrainConfig { arch: arch.into(), n_embd: 128, n_layer: 4, init_std, ..PretrainConfig::default() };
        assert_eq!(cfg.resolved_init_std(), want);
        let mcfg = lmstack_train::pretrain::model_config(&cfg, 65).unwrap();
        let m = Model::init(mcfg, 3, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.config_json()["initializer_range"], want, "{arch}");
        let t = m.params().tensors();
        let (fc, proj) = match arch {
            "gpt2" => ("transformer.h.0.mlp.c_fc.weight", Some("transformer.h.0.mlp.c_proj.weight")),
            _ => ("model.layers.0.mlp.up_proj.weight", None),
        };
        let s = std_of(&t[fc]);
        assert!((s / want - 1.0).abs() < 0.05, "{arch} {fc}: spread {s}, configured {want}");
        if let Some(p) = proj {
            let s = std_of(&t[p]);
            let scaled = want / 8f64.sqrt();
            assert!((s / scaled - 1.0).abs() < 0.05, "{arch} {p}: spread {s}, expected {scaled}");
        }
    }
    let bad = PretrainConfig { init_std: f64::INFINITY, ..PretrainConfig::default() };
    assert!(bad.validate().unwrap_err().to_string().contains("init_std"));
}
