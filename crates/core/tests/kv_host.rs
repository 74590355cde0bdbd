//! The CPU fast path (host-vector KV caches, fused packed attention, the step split over two
//! threads) gives the same logits as the generic tensor path, for decode steps, long prefill
//! chunks (which use matrix products) and grouped-query heads, in both the AVX2 and the
//! portable build of its kernels and with weights repacked for the AVX2 linear kernel. Its own test binary: switching kernels off is process-wide.

mod common;

use common::{fixture, max_diff};
use lmstack_core::kernels::{ops, simd};
use lmstack_core::{DType, Device, Model, ModelConfig, SeqStep, StepThreads, Tensor};

/// Serialises the tests of this file: one switches the process-wide kernel toggles, which the
/// others read (a repack is skipped while the AVX2 build is off).
static TOGGLE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    TOGGLE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs three sequences through a prefill step (lengths 3, 9, 1; the 9-token prompt asks only
/// for its last token's logits, so the last layer prunes the rest) and three mixed steps.
fn run(m: &Model) -> Vec<Tensor> {
    let v = m.config().vocab_size() as u32;
    let prompts: Vec<Vec<u32>> = [3u32, 9, 1].iter().map(|&n| (0..n).map(|i| (i * 11 + n) % v).collect()).collect();
    let mut caches: Vec<_> = (0..3).map(|_| m.new_cache()).collect();
    let mut out = Vec::new();
    let mut steps: Vec<SeqStep<'_>> = caches
        .iter_mut()
        .zip(&prompts)
        .map(|(c, p)| SeqStep { tokens: p, cache: c, all_logits: p.len() != 9 })
        .collect();
    out.extend(m.forward_cached(&mut steps).unwrap());
    for s in 0..3u32 {
        let toks: Vec<Vec<u32>> = (0..3u32).map(|i| vec![(s * 5 + i) % v; if i == 1 { 6 } else { 1 }]).collect();
        let mut steps: Vec<SeqStep<'_>> =
            caches.iter_mut().zip(&toks).map(|(c, t)| SeqStep { tokens: t, cache: c, all_logits: true }).collect();
        out.extend(m.forward_cached(&mut steps).unwrap());
    }
    out
}

#[test]
fn host_caches_match_the_tensor_path() {
    let _serial = serial();
    // tiny-mistral and tiny-qwen2 have sliding windows (5; 6 on their upper layers) shorter
    // than the 15 tokens the longest sequence reaches.
    for name in ["tiny-gpt2", "tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gemma2", "tiny-gemma3"] {
        let m = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        ops::set_enabled(true);
        assert!(m.new_cache().is_host());
        let fast = run(&m);
        // With the projections' weights repacked for the AVX2 linear kernel.
        let mut mp = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let packed_bytes = mp.repack_for_inference().unwrap();
        assert_eq!(packed_bytes > 0, simd::has_avx2_fma());
        let packed = run(&mp);
        // The same kernels in their portable build (no AVX2 decode attention).
        simd::set_enabled(false);
        let portable = run(&m);
        simd::set_enabled(true);
        ops::set_enabled(false);
        assert!(!m.new_cache().is_host());
        let slow = run(&m);
        ops::set_enabled(true);
        for (i, (((a, p), r), b)) in fast.iter().zip(&portable).zip(&packed).zip(&slow).enumerate() {
            let (d, dp, dr) = (max_diff(a, b), max_diff(p, b), max_diff(r, b));
            assert!(
                d < 1e-5 && dp < 1e-5 && dr < 1e-5,
                "{name}: output {i} differs by {d} (portable build: {dp}, repacked weights: {dr})"
            );
        }
    }
}

/// Gemma 2's soft-capped scores in the AVX2 decode loop (head_dim 16, caps that bind, a
/// window of 4) equal the general path and the tensor path.
#[test]
fn soft_capped_decode_matches_the_tensor_path() {
    let _serial = serial();
    let cfg = r#"{"model_type":"gemma2","vocab_size":64,"hidden_size":32,"intermediate_size":40,"num_hidden_layers":2,
        "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"max_position_embeddings":64,"sliding_window":4,
        "query_pre_attn_scalar":16,"attn_logit_softcapping":0.5,"final_logit_softcapping":2.0,"initializer_range":0.5}"#;
    let init = Model::init(ModelConfig::from_json(cfg, "t").unwrap(), 3, DType::F32, &Device::Cpu).unwrap();
    let tensors = init.params().tensors().into_iter().map(|(k, t)| (k, t.detach())).collect();
    let store = lmstack_core::params::ParamStore::frozen(tensors, "t");
    let m = Model::new(init.config().clone(), &store, DType::F32, &Device::Cpu).unwrap();
    ops::set_enabled(true);
    let fast = run(&m);
    simd::set_enabled(false);
    let portable = run(&m);
    simd::set_enabled(true);
    ops::set_enabled(false);
    let slow = run(&m);
    ops::set_enabled(true);
    for (i, ((a, p), b)) in fast.iter().zip(&portable).zip(&slow).enumerate() {
        let (d, dp) = (max_diff(a, b), max_diff(p, b));
        assert!(d < 1e-5 && dp < 1e-5, "output {i} differs by {d} (portable build: {dp})");
    }
}

/// Weights packed as bf16: half the bytes; an untied model computes exactly what the f32 kernel
/// computes with each projection's weight rounded to bf16, and a tied one (its embedding rows
/// read from the bf16 head) stays within bf16 rounding of the f32 model.
#[test]
fn bf16_packed_weights_are_the_rounded_weights_in_f32_arithmetic() {
    let _serial = serial();
    if !simd::has_avx2_fma() {
        return;
    }
    for name in ["tiny-llama", "tiny-gpt2"] {
        let f32_model = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let mut half = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let mut full = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let half_bytes = half.repack_for_inference_as(DType::BF16).unwrap();
        let full_bytes = full.repack_for_inference().unwrap();
        assert_eq!(half_bytes * 2, full_bytes, "{name}");
        let out = run(&half);
        if name == "tiny-llama" {
            let mut rounded = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
            for l in rounded.linears_mut() {
                let w = l.weight().to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
                l.set_weight(w).unwrap();
            }
            rounded.repack_for_inference().unwrap();
            for (i, (a, b)) in out.iter().zip(run(&rounded)).enumerate() {
                assert_eq!(max_diff(a, &b), 0.0, "{name}: output {i}");
            }
        }
        for (i, (a, b)) in out.iter().zip(run(&f32_model)).enumerate() {
            let d = max_diff(a, &b);
            assert!(d > 0.0 && d < 0.05, "{name}: output {i} differs from f32 by {d}");
        }
    }
    // Packed weights are f32, bf16 or f16.
    let mut m = Model::load(&fixture("tiny-gpt2"), DType::F32, &Device::Cpu).unwrap();
    assert!(m.repack_for_inference_as(DType::F64).is_err());
}

#[test]
fn repacking_releases_the_original_weights() {
    let _serial = serial();
    if !simd::has_avx2_fma() {
        return;
    }
    // tiny-gpt2 ties its output head to the token embedding; tiny-llama does not.
    for (name, tied) in [("tiny-gpt2", true), ("tiny-llama", false)] {
        let m = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let mut packed = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let before = packed.clone();
        let n = packed.num_parameters();
        assert!(packed.repack_for_inference().unwrap() > 0);
        let released = packed.params().released();
        // Every projection's weight; a tied head's is the token embedding, now read from the
        // packed head too.
        assert_eq!(released.len(), packed.linears_mut().len(), "{name}: released {released:?}");
        assert_eq!(released.contains(&"lm_head.weight".to_string()), !tied, "{name}: {released:?}");
        let embedding = released.iter().any(|r| r.contains("wte") || r.contains("embed_tokens"));
        assert_eq!(embedding, tied, "{name}: {released:?}");
        assert_eq!(packed.num_parameters(), n, "{name}: released parameters still count");
        // The same outputs, now from the packed copies alone.
        let expected = run(&m);
        assert!(run(&packed).iter().zip(&expected).all(|(a, b)| max_diff(a, b) < 1e-5), "{name}");
        // Saving would write an incomplete checkpoint: refused, saying why, nothing written.
        let dir = std::env::temp_dir().join(format!("lmstack-released-{name}-{}", std::process::id()));
        let err = packed.save(&dir).unwrap_err().to_string();
        assert!(err.contains("released") && err.contains("load the model again"), "{err}");
        assert!(!dir.join("model.safetensors").exists());
        // A clone taken before shares the parameter store: it still computes with its own
        // weights, but cannot save either.
        assert!(before.save(&dir).is_err());
        assert!(run(&before).iter().zip(&expected).all(|(a, b)| max_diff(a, b) < 1e-5), "{name}");
        let _ = std::fs::remove_dir_all(&dir);
        // A token id outside the vocabulary is an error naming the table, packed or not.
        let v = m.config().vocab_size() as u32;
        let mut c = packed.new_cache();
        let err = packed.forward_cached(&mut [SeqStep { tokens: &[v], cache: &mut c, all_logits: false }]);
        let err = err.unwrap_err().to_string();
        assert!(err.contains(&v.to_string()), "{name}: {err}");
    }
}

#[test]
fn a_repacked_masked_lm_gives_the_same_outputs() {
    let _serial = serial();
    // BERT's decoder (tied to the word embedding) is not repacked, so the embedding stays.
    let m = Model::load(&fixture("tiny-bert"), DType::F32, &Device::Cpu).unwrap();
    let mut packed = Model::load(&fixture("tiny-bert"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(packed.repack_for_inference().unwrap() > 0, simd::has_avx2_fma());
    let released = packed.params().released();
    assert!(!released.iter().any(|r| r.contains("word_embeddings")), "{released:?}");
    let v = m.config().vocab_size() as u32;
    let ids = Tensor::new(&[[1u32, 5, 9, 2], [3, v - 1, 0, 4]], &Device::Cpu).unwrap();
    let (a, b) = (m.forward(&ids, None).unwrap(), packed.forward(&ids, None).unwrap());
    assert!(max_diff(&a, &b) < 1e-5, "{}", max_diff(&a, &b));
}

/// A request that starts from a copy of another sequence's first tokens (prefix caching)
/// continues exactly as if it had prefilled them itself, with host caches and with the tensor
/// path; the donor is left as it was.
#[test]
fn a_forked_prefix_continues_like_a_full_prefill() {
    let _serial = serial();
    for host in [true, false] {
        ops::set_enabled(host);
        for name in ["tiny-gpt2", "tiny-llama", "tiny-mistral", "tiny-gemma2"] {
            let m = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
            let v = m.config().vocab_size() as u32;
            let toks: Vec<u32> = (0..20u32).map(|i| (i * 7 + i * i + 3) % v).collect();
            let ids = Tensor::new(toks.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let full = m.forward(&ids, None).unwrap().squeeze(0).unwrap();
            // The donor: a prefill of 12 tokens and two decode steps.
            let mut donor = m.new_cache();
            assert_eq!(donor.is_host(), host);
            m.forward_cached(&mut [SeqStep { tokens: &toks[..12], cache: &mut donor, all_logits: false }]).unwrap();
            for p in 12..14 {
                m.forward_cached(&mut [SeqStep { tokens: &toks[p..p + 1], cache: &mut donor, all_logits: false }])
                    .unwrap();
            }
            let mut fork = donor.fork_prefix(13, 20).unwrap();
            assert_eq!((fork.len(), donor.len()), (13, 14));
            assert!(fork.allocated_bytes() <= 20 * fork.bytes_per_token() || !host);
            let o =
                m.forward_cached(&mut [SeqStep { tokens: &toks[13..20], cache: &mut fork, all_logits: true }]).unwrap();
            let d = max_diff(&o[0], &full.narrow(0, 13, 7).unwrap());
            assert!(d < 1e-5, "{name} (host caches: {host}): the forked prefix's continuation differs by {d}");
            // The donor still continues as before.
            let o = m
                .forward_cached(&mut [SeqStep { tokens: &toks[14..15], cache: &mut donor, all_logits: false }])
                .unwrap();
            assert!(max_diff(&o[0], &full.narrow(0, 14, 1).unwrap()) < 1e-5, "{name}: the donor changed");
            assert!(donor.fork_prefix(16, 20).is_err(), "more tokens than the donor holds");
            assert_eq!(donor.fork_prefix(0, 0).unwrap().len(), 0);
        }
    }
    ops::set_enabled(true);
}

/// Keys and values stored as bf16 (`Model::set_kv_cache_dtype`): half the bytes per token; the
/// outputs stay within bf16 rounding of f32 storage, and are the same in the AVX2 and portable
/// builds, for decode steps and prefill chunks alike; a forked prefix keeps the storage and
/// continues exactly as its donor does.
#[test]
fn bf16_kv_caches_stay_within_rounding_of_f32_caches() {
    let _serial = serial();
    ops::set_enabled(true);
    for name in ["tiny-gpt2", "tiny-llama", "tiny-mistral"] {
        let f32_model = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let mut m = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        assert!(m.set_kv_cache_dtype(DType::F16).is_err(), "{name}: f16 storage is refused");
        m.set_kv_cache_dtype(DType::BF16).unwrap();
        let c = m.new_cache();
        assert!(c.is_host() && c.is_bf16());
        assert_eq!(2 * c.bytes_per_token(), f32_model.new_cache().bytes_per_token());
        let out = run(&m);
        simd::set_enabled(false);
        let portable = run(&m);
        simd::set_enabled(true);
        for (i, ((a, p), b)) in out.iter().zip(&portable).zip(run(&f32_model)).enumerate() {
            let (d, dp) = (max_diff(a, &b), max_diff(a, p));
            assert!(d > 0.0 && d < 0.005, "{name}: output {i} differs from f32 storage by {d}");
            assert!(dp < 1e-5, "{name}: output {i}: the portable build differs by {dp}");
        }
        // A fork of the first 10 tokens continues as the donor, given the same tokens.
        let v = m.config().vocab_size() as u32;
        let toks: Vec<u32> = (0..16u32).map(|i| (i * 5 + 1) % v).collect();
        let mut donor = m.new_cache();
        m.forward_cached(&mut [SeqStep { tokens: &toks[..10], cache: &mut donor, all_logits: false }]).unwrap();
        let mut fork = donor.fork_prefix(10, 16).unwrap();
        assert!(fork.is_bf16());
        for (c, what) in [(&mut donor, "donor"), (&mut fork, "fork")] {
            let o = m.forward_cached(&mut [SeqStep { tokens: &toks[10..16], cache: c, all_logits: true }]).unwrap();
            let want = f32_model.forward(&Tensor::new(&toks[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap(), None);
            let d = max_diff(&o[0], &want.unwrap().squeeze(0).unwrap().narrow(0, 10, 6).unwrap());
            assert!(d < 0.005, "{name} ({what}): differs from the uncached f32 forward by {d}");
        }
        let (a, b) = (donor.host_kv(1), fork.host_kv(1));
        assert!(matches!((a.0, b.0), (simd::Rows::Bf16(x), simd::Rows::Bf16(y)) if x == y));
    }
    // The tensor path (no host caches) has no bf16 storage.
    ops::set_enabled(false);
    let mut m = Model::load(&fixture("tiny-gpt2"), DType::F32, &Device::Cpu).unwrap();
    let e = m.set_kv_cache_dtype(DType::BF16).unwrap_err().to_string();
    ops::set_enabled(true);
    assert!(e.contains("kv_cache_dtype"), "{e}");
}

/// Decode steps over long caches spread their sequences (or one sequence's heads) over the
/// thread pool; each output is the same as on one thread, bit for bit, with f32 or bf16 storage.
#[test]
fn long_cache_decode_over_the_pool_equals_one_thread() {
    let _serial = serial();
    ops::set_enabled(true);
    let cfg =
        r#"{"model_type": "gpt2", "n_layer": 1, "n_head": 4, "n_embd": 256, "n_positions": 2048, "vocab_size": 40}"#;
    let mut m = Model::init(ModelConfig::from_json(cfg, "t").unwrap(), 3, DType::F32, &Device::Cpu).unwrap();
    for kv in [DType::F32, DType::BF16] {
        m.set_kv_cache_dtype(kv).unwrap();
        // Three sequences of 1,500 cached tokens (written directly: a prefill would take long),
        // one new token each: more than 256K multiply-adds of attention, too few tokens to split.
        let len = 1500;
        let mut caches: Vec<_> = (0..3u32)
            .map(|s| {
                let mut c = m.new_cache();
                let kv: Vec<f32> =
                    (0..len * 256).map(|i| ((i as u32 * 37 + s * 11) % 101) as f32 / 50.0 - 1.0).collect();
                c.host_append(0, &kv, &kv[7..].iter().chain(&kv[..7]).copied().collect::<Vec<_>>()).unwrap();
                c
            })
            .collect();
        let mut again: Vec<_> = caches.iter().map(|c| c.fork().unwrap()).collect();
        let toks = [[1u32], [7], [30]];
        let step = |cs: &mut Vec<lmstack_core::KvCache>, t: StepThreads| {
            let mut st: Vec<SeqStep<'_>> =
                cs.iter_mut().zip(&toks).map(|(c, t)| SeqStep { tokens: t, cache: c, all_logits: false }).collect();
            m.forward_cached_on(&mut st, t).unwrap()
        };
        let (pooled, one) = (step(&mut caches, StepThreads::Auto), step(&mut again, StepThreads::One));
        for (i, (a, b)) in pooled.iter().zip(&one).enumerate() {
            assert_eq!(max_diff(a, b), 0.0, "{kv:?}: sequence {i}");
        }
        // One sequence alone: its heads in two halves on two threads.
        let (mut a, mut b) = (vec![caches.remove(0)], vec![again.remove(0)]);
        let (pooled, one) = (step(&mut a, StepThreads::Auto), step(&mut b, StepThreads::One));
        assert_eq!(max_diff(&pooled[0], &one[0]), 0.0, "{kv:?}: one sequence");
    }
}
