//! A tour of `lmstack-core` on the embedded tiny-Shakespeare corpus: tokens and vocabularies,
//! parameter counts of the three architectures, and batched prefill + decode with KV caches and
//! per-sequence sampling. The models here are untrained (random weights), so their text is
//! noise; `cargo run --release --bin train` pretrains one.
//!
//! Run: `cargo run --release -p lmstack-core --example tour`

use std::time::Instant;

use anyhow::Result;
use lmstack_core::sampling::top_n;
use lmstack_core::{DType, Device, Model, ModelConfig, Sampler, SamplingParams, SeqStep, Tokenizer};

const CORPUS: &str = include_str!("../../../data/tinyshakespeare.txt");

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("lmstack-tour-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let corpus = dir.join("tinyshakespeare.txt");
    std::fs::write(&corpus, CORPUS)?;

    println!("== 1. Tokens and vocabularies ({} characters of Shakespeare)", CORPUS.chars().count());
    let chars = Tokenizer::train_chars(&[&corpus])?;
    let t0 = Instant::now();
    let bpe = Tokenizer::train_bpe(&[&corpus], 1024, &["<|endoftext|>"])?;
    let line = "ROMEO: But, soft! what light through yonder window breaks?";
    for (name, tok) in [("character", &chars), ("byte-level BPE", &bpe)] {
        let ids = tok.encode(line, false)?;
        let pieces: Vec<String> = ids.iter().map(|&i| tok.decode(&[i], false).unwrap_or_default()).collect();
        println!("{name:>15}: vocabulary {:>5}, {:>2} tokens: {:?}", tok.vocab_size(), ids.len(), pieces);
    }
    println!(
        "   (BPE trained in {:.1}s; fewer, longer tokens per line, a bigger vocabulary)",
        t0.elapsed().as_secs_f32()
    );

    println!("\n== 2. Architectures and parameter counts (vocabulary {})", chars.vocab_size());
    let v = chars.vocab_size();
    let configs = [
        (
            "gpt2 (autoregressive)",
            format!(
                r#"{{"model_type":"gpt2","vocab_size":{v},"n_positions":256,"n_embd":128,"n_layer":4,"n_head":4}}"#
            ),
        ),
        (
            "llama (autoregressive, GQA 4:2)",
            format!(
                r#"{{"model_type":"llama","vocab_size":{v},"hidden_size":128,"intermediate_size":344,"num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":256,"tie_word_embeddings":true}}"#
            ),
        ),
        (
            "bert (masked)",
            format!(
                r#"{{"model_type":"bert","vocab_size":{v},"hidden_size":128,"num_hidden_layers":4,"num_attention_heads":4,"intermediate_size":512,"max_position_embeddings":256}}"#
            ),
        ),
    ];
    let mut llama = None;
    for (name, json) in &configs {
        let m = Model::init(ModelConfig::from_json(json, name)?, 0, DType::F32, &dev)?;
        println!("{name:>32}: {:>8} parameters", m.num_parameters());
        if name.starts_with("llama") {
            llama = Some(m);
        }
    }
    let model = llama.expect("llama config above");

    println!("\n== 3. Prefill and decode: three prompts of different lengths, one batch");
    let prompts = [
        "ROMEO:\n",
        "JULIET:\nO Romeo, Romeo! wherefore art thou",
        "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    ];
    let params = [
        SamplingParams { seed: Some(1), ..SamplingParams::greedy() },
        SamplingParams { temperature: 0.8, top_k: 20, seed: Some(2), ..Default::default() },
        SamplingParams { temperature: 1.0, top_p: 0.9, repetition_penalty: 1.2, seed: Some(3), ..Default::default() },
    ];
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| chars.encode(p, false)).collect::<Result<_, _>>()?;
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut samplers: Vec<Sampler> =
        ids.iter().zip(&params).map(|(p, s)| Sampler::new(s.clone(), p, 5)).collect::<Result<_, _>>()?;
    let t0 = Instant::now();
    let mut steps: Vec<SeqStep<'_>> =
        ids.iter().zip(caches.iter_mut()).map(|(p, c)| SeqStep { tokens: p, cache: c, all_logits: false }).collect();
    let logits = model.forward_cached(&mut steps)?;
    let prefill = t0.elapsed();
    let prompt_tokens: usize = ids.iter().map(Vec::len).sum();
    let mut next: Vec<u32> = Vec::new();
    for (i, l) in logits.iter().enumerate() {
        let row = l.squeeze(0)?.to_vec1::<f32>()?;
        let s = samplers[i].sample(&row)?;
        if i == 0 {
            let top: Vec<String> = top_n(&lmstack_core::sampling::log_softmax(&row), 5)
                .iter()
                .map(|(t, lp)| format!("{:?} {:.3}", chars.decode(&[*t], false).unwrap_or_default(), lp.exp()))
                .collect();
            println!("next-token probabilities after {:?}: {}", prompts[0], top.join(", "));
        }
        next.push(s.token);
    }
    let mut outs: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
    let n_new = 40;
    let t1 = Instant::now();
    for _ in 1..n_new {
        let mut steps: Vec<SeqStep<'_>> = next
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, c)| SeqStep { tokens: std::slice::from_ref(t), cache: c, all_logits: false })
            .collect();
        let logits = model.forward_cached(&mut steps)?;
        for (i, l) in logits.iter().enumerate() {
            let tok = samplers[i].sample(&l.squeeze(0)?.to_vec1::<f32>()?)?.token;
            next[i] = tok;
            outs[i].push(tok);
        }
    }
    let decode = t1.elapsed();
    for (i, o) in outs.iter().enumerate() {
        println!("[{i}] {:?} + {:?}", prompts[i], chars.decode(o, false)?);
    }
    println!(
        "prefill: {prompt_tokens} prompt tokens in {:.1} ms ({:.0} tokens/s, all positions in parallel)",
        prefill.as_secs_f64() * 1e3,
        prompt_tokens as f64 / prefill.as_secs_f64()
    );
    println!(
        "decode:  {} steps × {} sequences in {:.1} ms ({:.0} tokens/s, one token per sequence per step)",
        n_new - 1,
        outs.len(),
        decode.as_secs_f64() * 1e3,
        ((n_new - 1) * outs.len()) as f64 / decode.as_secs_f64()
    );
    println!(
        "KV cache: {} bytes per token, {} tokens cached for prompt 2",
        caches[2].bytes_per_token(),
        caches[2].len()
    );
    println!("\n(The weights are random, so the text is noise: `cargo run --release --bin train` pretrains a model.)");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
