//! The CPU fast path (host-vector KV caches, fused packed attention, the step split over two
//! threads) gives the same logits as the generic tensor path, for decode steps, long prefill
//! chunks (which use matrix products) and grouped-query heads, in both the AVX2 and the
//! portable build of its kernels and with weights repacked for the AVX2 linear kernel. Its own test binary: switching kernels off is process-wide.

mod common;

use common::{fixture, max_diff};
use lmstack_core::{ops, simd, DType, Device, Model, SeqStep, Tensor};

/// Runs three sequences through a prefill step (lengths 3, 9, 1) and three mixed steps.
fn run(m: &Model) -> Vec<Tensor> {
    let v = m.config().vocab_size() as u32;
    let prompts: Vec<Vec<u32>> = [3u32, 9, 1].iter().map(|&n| (0..n).map(|i| (i * 11 + n) % v).collect()).collect();
    let mut caches: Vec<_> = (0..3).map(|_| m.new_cache()).collect();
    let mut out = Vec::new();
    let mut steps: Vec<SeqStep<'_>> =
        caches.iter_mut().zip(&prompts).map(|(c, p)| SeqStep { tokens: p, cache: c, all_logits: true }).collect();
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
    for name in ["tiny-gpt2", "tiny-llama"] {
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
