//! Single-stream prefill and decode speed of a model file or directory, as llama.cpp's
//! `llama-bench` measures them (`-p 512 -n 128`): a prompt of `PROMPT` tokens in one step, then
//! `GEN` decode steps of one token each, on a fresh cache; each repeated `REPS` times and the
//! best kept. `DEQUANTIZE=1` computes with f32 copies of quantized weights.
//!
//! `PPL=text.txt`: perplexity as llama.cpp's `llama-perplexity -c CTX` computes it instead
//! (the text in chunks of `CTX` tokens, default 512, each scored on its second half), to
//! compare the two programs' numerics on one file.
//!
//! `cargo run --release -p lmstack-core --example gguf_bench -- MODEL.gguf`
use std::time::Instant;

use lmstack_core::{DType, Device, Model, SeqStep};

fn env(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn perplexity(path: &str, m: &Model, text: &str) {
    let tok = lmstack_core::Pretrained::load(std::path::Path::new(path), DType::F32, &Device::Cpu)
        .expect("load the tokenizer")
        .tokenizer;
    let text = std::fs::read_to_string(text).expect("read the text");
    let ids = tok.encode(&text, false).expect("encode");
    let ctx = env("CTX", 512);
    let chunks = (ids.len() / ctx).min(env("CHUNKS", usize::MAX));
    let (mut nll, mut n) = (0.0f64, 0usize);
    for c in 0..chunks {
        let chunk = &ids[c * ctx..(c + 1) * ctx];
        let mut cache = m.new_cache();
        let out = m.forward_cached(&mut [SeqStep { tokens: chunk, cache: &mut cache, all_logits: true }]).unwrap();
        let logits = out[0].to_vec2::<f32>().unwrap();
        for j in ctx / 2..ctx - 1 {
            let row = &logits[j];
            let max = row.iter().cloned().fold(f32::MIN, f32::max);
            let lse = max as f64 + row.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>().ln();
            nll += lse - row[chunk[j + 1] as usize] as f64;
            n += 1;
        }
        println!("[{}] {:.4}", c + 1, (nll / n as f64).exp());
    }
    println!("perplexity over {chunks} chunks of {ctx} tokens ({n} scored): {:.4}", (nll / n as f64).exp());
}

fn main() {
    lmstack_core::prefer_rayon_threads();
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: gguf_bench MODEL (a .gguf file or a model directory)");
        std::process::exit(2);
    };
    let t0 = Instant::now();
    let mut m = Model::load(std::path::Path::new(&path), DType::F32, &Device::Cpu).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1)
    });
    if std::env::var("DEQUANTIZE").is_ok_and(|v| v == "1") {
        m.dequantize().expect("dequantize");
    }
    let packed = m.repack_for_inference().expect("repack");
    if let Ok(text) = std::env::var("PPL") {
        return perplexity(&path, &m, &text);
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(0.0, |k| k / 1024.0)
    };
    eprintln!(
        "loaded in {:.2} s ({} bytes repacked); resident {:.0} MiB, peak {:.0} MiB",
        t0.elapsed().as_secs_f64(),
        packed,
        mib("VmRSS:"),
        mib("VmHWM:")
    );
    let (prompt, gen, reps) = (env("PROMPT", 512), env("GEN", 128), env("REPS", 3));
    let vocab = m.config().vocab_size() as u32;
    let tokens: Vec<u32> = (0..prompt as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let (mut best_p, mut best_d) = (f64::MAX, f64::MAX);
    for _ in 0..reps {
        let mut cache = m.new_cache();
        let t = Instant::now();
        let out = m.forward_cached(&mut [SeqStep { tokens: &tokens, cache: &mut cache, all_logits: false }]).unwrap();
        best_p = best_p.min(t.elapsed().as_secs_f64());
        let mut next = out[0].argmax(1).unwrap().to_vec1::<u32>().unwrap()[0];
        let mut cache = m.new_cache();
        m.forward_cached(&mut [SeqStep { tokens: &[1], cache: &mut cache, all_logits: false }]).unwrap();
        let t = Instant::now();
        for _ in 0..gen {
            let out =
                m.forward_cached(&mut [SeqStep { tokens: &[next], cache: &mut cache, all_logits: false }]).unwrap();
            next = out[0].argmax(1).unwrap().to_vec1::<u32>().unwrap()[0];
        }
        best_d = best_d.min(t.elapsed().as_secs_f64());
    }
    println!(
        "prefill {prompt} tokens: {:.1} tokens/s   decode {gen} tokens: {:.1} tokens/s   ({} threads)",
        prompt as f64 / best_p,
        gen as f64 / best_d,
        rayon::current_num_threads()
    );
}
