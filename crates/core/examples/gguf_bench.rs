//! Single-stream prefill and decode speed of a model file or directory, as llama.cpp's
//! `llama-bench` measures them (`-p 512 -n 128`): a prompt of `PROMPT` tokens in one step, then
//! `GEN` decode steps of one token each, on a fresh cache; each repeated `REPS` times and the
//! best kept. `DEQUANTIZE=1` computes with f32 copies of quantized weights.
//!
//! `PPL=text.txt`: perplexity as llama.cpp's `llama-perplexity -c CTX` computes it instead
//! (the text in chunks of `CTX` tokens, default 512, each scored on its second half), to
//! compare the two programs' numerics on one file.
//!
//! `FIDELITY=base.bin`: teacher-forced agreement with the logits llama.cpp saved with
//! `llama-perplexity --kl-divergence-base base.bin` (its own format: the tokens of each chunk,
//! and per scored position every token's log-probability to 16 bits): the same tokens through
//! this model, and per position whether the top token agrees, the difference of the target's
//! log-probability, and the KL divergence. `cargo xtask bench fidelity` runs both.
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

/// llama.cpp's `--kl-divergence-base` file: `_logits_`, n_ctx, n_vocab, n_chunk (i32), the
/// tokens (i32, n_chunk·n_ctx), then per chunk and per scored position (the second half of the
/// chunk but its last token) `nv = 2·⌈n_vocab/2⌉ + 4` u16: the f32 scale and the f32 smallest
/// log-probability, then each token's log-probability as `min + scale·q` (q = 0: at most min).
struct Base {
    ctx: usize,
    vocab: usize,
    tokens: Vec<u32>,
    rows: Vec<u16>,
}

fn read_base(path: &str) -> Result<Base, String> {
    let b = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    if b.len() < 20 || &b[..8] != b"_logits_" {
        return Err(format!("{path}: not a llama-perplexity --kl-divergence-base file"));
    }
    let i32_at = |o: usize| i32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let (ctx, vocab, chunks) = (i32_at(8), i32_at(12), i32_at(16));
    if ctx < 4 || vocab < 2 || chunks < 1 {
        return Err(format!("{path}: n_ctx {ctx}, n_vocab {vocab}, n_chunk {chunks}"));
    }
    let (ctx, vocab, chunks) = (ctx as usize, vocab as usize, chunks as usize);
    let nv = 2 * vocab.div_ceil(2) + 4;
    let scored = ctx - 1 - ctx / 2;
    let tok_end = 20 + 4 * chunks * ctx;
    let want = tok_end + 2 * chunks * scored * nv;
    if b.len() != want {
        return Err(format!(
            "{path}: {} bytes where n_ctx {ctx}, n_vocab {vocab}, n_chunk {chunks} make {want}",
            b.len()
        ));
    }
    let tokens = b[20..tok_end].chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4")) as u32).collect();
    let rows = b[tok_end..].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    Ok(Base { ctx, vocab, tokens, rows })
}

/// Log-probabilities of the scored positions of chunk `c` as a base file holds them (`q = 0`,
/// under the file's floor, read as −∞).
fn base_rows(b: &Base, c: usize) -> Vec<Vec<f32>> {
    let nv = 2 * b.vocab.div_ceil(2) + 4;
    let scored = b.ctx - 1 - b.ctx / 2;
    (0..scored)
        .map(|i| {
            let r = &b.rows[(c * scored + i) * nv..(c * scored + i + 1) * nv];
            let f =
                |k: usize| f32::from_le_bytes([r[k] as u8, (r[k] >> 8) as u8, r[k + 1] as u8, (r[k + 1] >> 8) as u8]);
            let (scale, min_lp) = (f(0), f(2));
            r[4..4 + b.vocab]
                .iter()
                .map(|&q| if q == 0 { f32::NEG_INFINITY } else { min_lp + scale * q as f32 })
                .collect()
        })
        .collect()
}

fn fidelity(path: &str, m: &Model, base_path: &str) {
    let fail = |e: String| -> ! {
        eprintln!("error: {e}");
        std::process::exit(1)
    };
    let base = read_base(base_path).unwrap_or_else(|e| fail(e));
    // OTHER=file: compare a second base file with the first instead of this model (how far
    // apart two llama.cpp configurations are, in the same units).
    let other_path = std::env::var("OTHER").ok();
    let other = other_path.as_deref().map(|o| read_base(o).unwrap_or_else(|e| fail(e)));
    if let Some(o) = &other {
        if (o.ctx, o.vocab) != (base.ctx, base.vocab) || o.tokens != base.tokens {
            fail(format!("{} and {base_path} did not score the same tokens", other_path.as_deref().unwrap_or("")));
        }
    }
    let (ctx, vocab) = (base.ctx, base.vocab);
    if vocab != m.config().vocab_size() {
        eprintln!("error: the base file has {vocab} tokens in its vocabulary, {path} {}", m.config().vocab_size());
        std::process::exit(1);
    }
    // llama-perplexity puts the BOS token first in each chunk when the tokenizer adds one (the
    // file keeps the text's tokens).
    let tok = lmstack_core::Pretrained::load(std::path::Path::new(path), DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| fail(e.to_string()))
        .tokenizer;
    let (plain, special) = (tok.encode("a", false), tok.encode("a", true));
    let bos = match (plain, special) {
        (Ok(p), Ok(s)) if s.len() > p.len() && s.first() != p.first() => s.first().copied(),
        _ => None,
    };
    let nv = 2 * vocab.div_ceil(2) + 4;
    let first = ctx / 2;
    let (mut n, mut agree, mut below) = (0usize, 0usize, 0usize);
    let (mut sum_abs, mut max_abs, mut kld, mut nll_a, mut nll_b) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let mut row_i = 0;
    for (c, chunk) in base.tokens.chunks_exact(ctx).enumerate() {
        let mut toks = chunk.to_vec();
        if let Some(b) = bos {
            toks[0] = b;
        }
        let logits = match &other {
            Some(o) => {
                let mut rows = vec![Vec::new(); first];
                rows.extend(base_rows(o, c));
                rows
            }
            None => {
                let mut cache = m.new_cache();
                let out =
                    m.forward_cached(&mut [SeqStep { tokens: &toks, cache: &mut cache, all_logits: true }]).unwrap();
                out[0].to_vec2::<f32>().unwrap()
            }
        };
        for j in first..ctx - 1 {
            let r = &base.rows[row_i * nv..(row_i + 1) * nv];
            row_i += 1;
            let f =
                |k: usize| f32::from_le_bytes([r[k] as u8, (r[k] >> 8) as u8, r[k + 1] as u8, (r[k + 1] >> 8) as u8]);
            let (scale, min_lp) = (f(0) as f64, f(2) as f64);
            let q = &r[4..4 + vocab];
            let lp_base = |t: usize| min_lp + scale * q[t] as f64;
            let row = &logits[j];
            let max = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            let target = chunk[j + 1] as usize;
            let lp_ours = row[target] as f64 - lse;
            let top_base = (0..vocab).max_by_key(|&t| q[t]).expect("vocab");
            let top_ours = (0..vocab).max_by(|&a, &b| row[a].total_cmp(&row[b])).expect("vocab");
            agree += usize::from(top_base == top_ours);
            nll_b -= lp_base(target);
            nll_a -= lp_ours;
            if q[target] == 0 {
                below += 1; // under llama.cpp's floor (max − 16): its value is only a bound
            } else {
                let d = (lp_ours - lp_base(target)).abs();
                sum_abs += d;
                max_abs = max_abs.max(d);
            }
            // KL(base ‖ ours) over the tokens the base file resolves.
            kld += (0..vocab)
                .filter(|&t| q[t] > 0 && row[t].is_finite())
                .map(|t| {
                    let lb = lp_base(t);
                    lb.exp() * (lb - (row[t] as f64 - lse))
                })
                .sum::<f64>();
            n += 1;
        }
        eprintln!("[{}] {n} positions, top-1 agreement {:.2} %", c + 1, 100.0 * agree as f64 / n as f64);
    }
    let resolved = (n - below).max(1) as f64;
    let what = other_path.unwrap_or_else(|| path.to_string());
    println!(
        "fidelity of {what} against {base_path} over {n} positions: top-1 agreement {:.2} %, mean |Δ log p(target)| {:.4} (max {:.4}; {below} targets under llama.cpp's floor left out), mean KL {:.5}, perplexity {:.4} here vs {:.4}",
        100.0 * agree as f64 / n as f64,
        sum_abs / resolved,
        max_abs,
        kld / n as f64,
        (nll_a / n as f64).exp(),
        (nll_b / n as f64).exp()
    );
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
    // PACK=f32|bf16|f16: pack unquantized matrices so (default: as the file stores them).
    let packed = match std::env::var("PACK").as_deref() {
        Ok("f32") => m.repack_for_inference_as(DType::F32),
        Ok("bf16") => m.repack_for_inference_as(DType::BF16),
        Ok("f16") => m.repack_for_inference_as(DType::F16),
        _ => m.repack_for_inference(),
    }
    .expect("repack");
    if let Ok(text) = std::env::var("PPL") {
        return perplexity(&path, &m, &text);
    }
    if let Ok(base) = std::env::var("FIDELITY") {
        return fidelity(&path, &m, &base);
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
