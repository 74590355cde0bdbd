//! Times one cached forward step for 1 and many sequences (decode), for tuning; `KERNEL=1`
//! times the AVX2 projection kernel alone at each batch size; `KV=bf16` stores the caches'
//! keys and values as bf16.
use std::time::Instant;

use lmstack_core::{DType, Device, Model, ModelConfig, SeqStep};

/// `KERNEL=1`: the AVX2 projection kernel alone, one thread, per batch size, with the weights
/// packed as f32 and as bf16: how much more arithmetic a core does per second on a batch of rows
/// than on one row (the 768-wide shapes' weights, 7-9 MB in f32, outgrow a core's L2).
fn kernel_only() {
    use lmstack_core::kernels::simd::{packed_linear, PackedWeight};
    for (inp, out) in [(128usize, 384usize), (128, 512), (512, 128), (768, 2304), (768, 3072)] {
        let w: Vec<f32> = (0..inp * out).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
        let f32_panels = PackedWeight::new(&w, (0, inp, 1), out, inp);
        for pw in [f32_panels.to_bf16(), f32_panels] {
            let bias = vec![0.1; out];
            let mut line = format!("{inp:>4} -> {out:<5} {}", if pw.is_bf16() { "bf16" } else { "f32 " });
            for m in [1usize, 4, 8, 16, 24] {
                let x: Vec<f32> = (0..m * inp).map(|i| ((i * 31) % 100) as f32 * 1e-2).collect();
                let iters = (4e8 / (m * inp * out) as f64).ceil() as usize;
                let t0 = Instant::now();
                let mut sink = 0.0;
                for _ in 0..iters {
                    sink += packed_linear(&x, m, &pw, Some(&bias), false).expect("AVX2 + FMA")[0];
                }
                let dt = t0.elapsed().as_secs_f64() / iters as f64;
                line += &format!("  m={m:<2} {:>5.1}", 2.0 * (m * inp * out) as f64 / dt * 1e-9);
                std::hint::black_box(sink);
            }
            println!("{line}   GFLOP/s");
        }
    }
}

fn main() {
    // As `serve` does: candle's own pool would otherwise compete with rayon's.
    lmstack_core::prefer_rayon_threads();
    if std::env::var("KERNEL").is_ok_and(|v| v == "1") {
        return kernel_only();
    }
    let args: Vec<String> = std::env::args().collect();
    let (layers, heads, width, ctx, vocab) =
        if args.get(1).map(String::as_str) == Some("gpt2") { (12, 12, 768, 1024, 50257) } else { (4, 4, 128, 64, 65) };
    let cfg = serde_json::json!({"model_type": "gpt2", "n_layer": layers, "n_head": heads, "n_embd": width,
                                 "n_positions": ctx, "vocab_size": vocab});
    // Written and loaded back frozen, as `serve` loads a model (an initialised model's
    // parameters are trainable variables, so every op would be recorded for backprop).
    let dir = std::env::temp_dir().join(format!("lmstack-step-bench-{layers}-{width}"));
    Model::init(ModelConfig::from_value(cfg, "bench").unwrap(), 1, DType::F32, &Device::Cpu)
        .unwrap()
        .save(&dir)
        .unwrap();
    let mut m = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
    // REPACK=0 keeps the weights as loaded (gemm), as a model being trained would.
    if std::env::var("REPACK").map_or(true, |v| v != "0") {
        eprintln!("repacked {} bytes of weights", m.repack_for_inference().unwrap());
    }
    // KV=bf16 keeps the caches' keys and values as bf16.
    if std::env::var("KV").is_ok_and(|v| v == "bf16") {
        m.set_kv_cache_dtype(DType::BF16).unwrap();
    }
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
    // B=n: that batch size only; PROMPT=n: cached tokens before decoding (30); STEPS=n.
    let (only, prompt_len) = (env("B"), env("PROMPT").unwrap_or(30));
    if let Ok(n) = std::env::var("PREFILL").map(|v| v.parse::<usize>().unwrap()) {
        let prompt: Vec<u32> = (0..n).map(|i| (i * 7 % vocab) as u32).collect();
        let t0 = Instant::now();
        for _ in 0..300 {
            let mut c = m.new_cache();
            m.forward_cached(&mut [SeqStep { tokens: &prompt, cache: &mut c, all_logits: false }]).unwrap();
        }
        println!("prefill of {n} tokens: {:.3} ms", t0.elapsed().as_secs_f64() * 1e3 / 300.0);
        return;
    }
    for b in [1usize, 4, 16, 32].into_iter().filter(|b| only.is_none_or(|o| o == *b)) {
        let mut caches: Vec<_> = (0..b).map(|_| m.new_cache()).collect();
        let prompt: Vec<u32> = (0..prompt_len).map(|i| (i * 7 % vocab) as u32).collect();
        let t0 = Instant::now();
        for c in caches.iter_mut() {
            m.forward_cached(&mut [SeqStep { tokens: &prompt, cache: c, all_logits: false }]).unwrap();
        }
        eprintln!(
            "prefill of {} tokens: {:.3} ms per sequence",
            prompt.len(),
            t0.elapsed().as_secs_f64() * 1e3 / b as f64
        );
        let steps = env("STEPS").unwrap_or(if only.is_some() { 2000 } else { 20 });
        let t0 = Instant::now();
        for s in 0..steps {
            let toks: Vec<[u32; 1]> = (0..b).map(|i| [((s + i) % vocab) as u32]).collect();
            let mut st: Vec<SeqStep<'_>> =
                caches.iter_mut().zip(&toks).map(|(c, t)| SeqStep { tokens: t, cache: c, all_logits: false }).collect();
            m.forward_cached(&mut st).unwrap();
            if s % 30 == 29 {
                for c in caches.iter_mut() {
                    c.truncate(prompt_len);
                }
            }
        }
        let dt = t0.elapsed().as_secs_f64() / steps as f64;
        println!("batch {b:>2}: {:.3} ms/step, {:.0} tokens/s", dt * 1e3, b as f64 / dt);
    }
}
