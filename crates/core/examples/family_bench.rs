//! Decode speed of each family of the Llama block against Llama itself, at one parameter count:
//! SmolLM2-135M's shape (576 wide, 30 layers, 9 heads over 3 KV heads, MLP 1536, vocabulary
//! 49,152, tied head) with random weights, as Llama, Qwen2 (query/key/value biases), Qwen3
//! (query/key head norms), Mistral (a sliding window of `WINDOW` tokens, default 64, shorter
//! than the context the decode reaches), Gemma 2 (its norms, soft caps, and the window on every
//! other layer) and Gemma 3 (head norms, the window on five layers of six). Each round runs every family in turn (alternated, so a
//! slower stretch of the machine falls on all of them): a prompt of `PROMPT` tokens (default
//! 128), then `GEN` decode steps (default 128); the best of `ROUNDS` rounds (default 3) is kept.
//! Weights are f32, repacked for inference as `serve` does.
//!
//! `cargo xtask bench families`, or
//! `cargo run --release -p lmstack-core --example family_bench`
use std::time::Instant;

use lmstack_core::params::ParamStore;
use lmstack_core::{DType, Device, Model, ModelConfig, SeqStep};

fn env(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A frozen model of `family` at SmolLM2-135M's shape, repacked for inference.
fn model(family: &str, window: usize) -> Model {
    let extra = match family {
        "mistral" => format!(r#","sliding_window":{window}"#),
        "qwen3" => r#","head_dim":64"#.to_string(),
        // Gemma's local layers window by `WINDOW` too (Gemma 2's soft caps as published).
        "gemma2" | "gemma3_text" => format!(r#","head_dim":64,"query_pre_attn_scalar":64,"sliding_window":{window}"#),
        _ => String::new(),
    };
    let json = format!(
        r#"{{"model_type":"{family}","vocab_size":49152,"hidden_size":576,"intermediate_size":1536,
        "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"max_position_embeddings":8192,
        "rms_norm_eps":1e-5,"rope_theta":100000.0,"tie_word_embeddings":true,"initializer_range":0.04{extra}}}"#
    );
    let cfg = ModelConfig::from_json(&json, family).expect("config");
    let init = Model::init(cfg.clone(), 1, DType::F32, &Device::Cpu).expect("init");
    // Plain tensors, not the initialised variables (which would track gradients).
    let store = ParamStore::frozen(init.params().tensors().into_iter().map(|(k, t)| (k, t.detach())).collect(), family);
    let mut m = Model::new(cfg, &store, DType::F32, &Device::Cpu).expect("model");
    m.repack_for_inference().expect("repack");
    m
}

/// Seconds of the prefill and of the decode steps.
fn run(m: &Model, prompt: usize, gen: usize) -> (f64, f64) {
    let vocab = m.config().vocab_size() as u32;
    let tokens: Vec<u32> = (0..prompt as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let mut cache = m.new_cache();
    let t = Instant::now();
    let out = m.forward_cached(&mut [SeqStep { tokens: &tokens, cache: &mut cache, all_logits: false }]).unwrap();
    let prefill = t.elapsed().as_secs_f64();
    let mut next = out[0].argmax(1).unwrap().to_vec1::<u32>().unwrap()[0];
    let t = Instant::now();
    for _ in 0..gen {
        let out = m.forward_cached(&mut [SeqStep { tokens: &[next], cache: &mut cache, all_logits: false }]).unwrap();
        next = out[0].argmax(1).unwrap().to_vec1::<u32>().unwrap()[0];
    }
    (prefill, t.elapsed().as_secs_f64())
}

fn main() {
    lmstack_core::prefer_rayon_threads();
    let (prompt, gen, rounds, window) = (env("PROMPT", 128), env("GEN", 128), env("ROUNDS", 3), env("WINDOW", 64));
    let families = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text"];
    let models: Vec<Model> = families.iter().map(|f| model(f, window)).collect();
    for (f, m) in families.iter().zip(&models) {
        println!("{f}: {:.1} M parameters", m.num_parameters() as f64 / 1e6);
    }
    let mut best = vec![(f64::MAX, f64::MAX); families.len()];
    for r in 0..rounds {
        for (i, m) in models.iter().enumerate() {
            let (p, d) = run(m, prompt, gen);
            println!(
                "round {r} {:8}: prefill {:7.1} tokens/s, decode {:6.2} tokens/s",
                families[i],
                prompt as f64 / p,
                gen as f64 / d
            );
            best[i] = (best[i].0.min(p), best[i].1.min(d));
        }
    }
    println!(
        "\nbest of {rounds} rounds, prompt {prompt} tokens then {gen} decode steps, {} threads:",
        rayon::current_num_threads()
    );
    let llama = best[0];
    for (f, &(p, d)) in families.iter().zip(&best) {
        println!(
            "{f:12} prefill {:7.1} tokens/s ({:.2}× llama)   decode {:6.2} tokens/s ({:.2}× llama)",
            prompt as f64 / p,
            llama.0 / p,
            gen as f64 / d,
            llama.1 / d
        );
    }
}
