//! KV-cached prefill/decode equals the full forward at every position, and sequences batched
//! together (different lengths, positions, prefill mixed with decode) get the same logits as
//! when run alone.

mod common;

use common::{fixture, max_diff};
use lmstack_core::{DType, Device, Model, SeqStep, Tensor};

const TOL: f32 = 1e-5;

fn models() -> Vec<(&'static str, Model)> {
    common::CAUSAL_FIXTURES
        .into_iter()
        .map(|n| (n, Model::load(&fixture(n), DType::F32, &Device::Cpu).unwrap()))
        .collect()
}

fn tokens(n: usize, seed: u32, vocab: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7 + seed * 13 + i * i) % vocab as u32).collect()
}

fn full_logits(m: &Model, toks: &[u32]) -> Tensor {
    let ids = Tensor::new(toks, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    m.forward(&ids, None).unwrap().squeeze(0).unwrap()
}

#[test]
fn decode_one_token_at_a_time_equals_full_forward() {
    for (name, m) in models() {
        let toks = tokens(20, 1, m.config().vocab_size());
        let full = full_logits(&m, &toks);
        let mut cache = m.new_cache();
        for (p, &t) in toks.iter().enumerate() {
            let out = m.forward_cached(&mut [SeqStep { tokens: &[t], cache: &mut cache, all_logits: false }]).unwrap();
            let d = max_diff(&out[0], &full.narrow(0, p, 1).unwrap());
            assert!(d < TOL, "{name}: position {p} differs by {d}");
        }
        assert_eq!(cache.len(), 20);
    }
}

#[test]
fn prefill_then_decode_equals_full_forward() {
    for (name, m) in models() {
        let toks = tokens(24, 2, m.config().vocab_size());
        let full = full_logits(&m, &toks);
        let mut cache = m.new_cache();
        // Prefill in two chunks (chunked prefill), asking for every position's logits.
        let a = m.forward_cached(&mut [SeqStep { tokens: &toks[..9], cache: &mut cache, all_logits: true }]).unwrap();
        let b = m.forward_cached(&mut [SeqStep { tokens: &toks[9..17], cache: &mut cache, all_logits: true }]).unwrap();
        assert!(max_diff(&a[0], &full.narrow(0, 0, 9).unwrap()) < TOL, "{name}: chunk 1");
        assert!(max_diff(&b[0], &full.narrow(0, 9, 8).unwrap()) < TOL, "{name}: chunk 2");
        for p in 17..24 {
            let o = m
                .forward_cached(&mut [SeqStep { tokens: &toks[p..p + 1], cache: &mut cache, all_logits: false }])
                .unwrap();
            assert!(max_diff(&o[0], &full.narrow(0, p, 1).unwrap()) < TOL, "{name}: decode {p}");
        }
    }
}

#[test]
fn batched_sequences_of_different_lengths_match_running_alone() {
    for (name, m) in models() {
        let v = m.config().vocab_size();
        let seqs: Vec<Vec<u32>> = vec![tokens(13, 3, v), tokens(5, 4, v), tokens(21, 5, v), tokens(1, 6, v)];
        let alone: Vec<Tensor> = seqs.iter().map(|s| full_logits(&m, s)).collect();
        let mut caches: Vec<_> = seqs.iter().map(|_| m.new_cache()).collect();
        // Step 1: prefill all but the last 3 tokens (or all of a 1-token prompt), batched.
        let cut: Vec<usize> = seqs.iter().map(|s| s.len().saturating_sub(3).max(1)).collect();
        {
            let mut steps: Vec<SeqStep<'_>> = seqs
                .iter()
                .zip(caches.iter_mut())
                .zip(&cut)
                .map(|((s, c), &k)| SeqStep { tokens: &s[..k], cache: c, all_logits: true })
                .collect();
            let out = m.forward_cached(&mut steps).unwrap();
            for (i, o) in out.iter().enumerate() {
                let d = max_diff(o, &alone[i].narrow(0, 0, cut[i]).unwrap());
                assert!(d < TOL, "{name}: prefill of sequence {i} differs by {d}");
            }
        }
        // Then decode steps where sequences are at different positions; a finished sequence
        // leaves the batch, as in continuous batching.
        for round in 0..3 {
            let mut idx = Vec::new();
            let mut steps = Vec::new();
            for (i, (s, c)) in seqs.iter().zip(caches.iter_mut()).enumerate() {
                let p = cut[i] + round;
                if p < s.len() {
                    idx.push((i, p));
                    steps.push(SeqStep { tokens: &s[p..p + 1], cache: c, all_logits: false });
                }
            }
            let out = m.forward_cached(&mut steps).unwrap();
            for (o, &(i, p)) in out.iter().zip(&idx) {
                let d = max_diff(o, &alone[i].narrow(0, p, 1).unwrap());
                assert!(d < TOL, "{name}: decode of sequence {i} at {p} differs by {d}");
            }
        }
    }
}

#[test]
fn mixed_prefill_and_decode_in_one_step() {
    for (name, m) in models() {
        let v = m.config().vocab_size();
        let (a, b, c) = (tokens(10, 7, v), tokens(8, 8, v), tokens(5, 9, v));
        let (fa, fb, fc) = (full_logits(&m, &a), full_logits(&m, &b), full_logits(&m, &c));
        let mut ca = m.new_cache();
        let mut cb = m.new_cache();
        let mut cc = m.new_cache();
        m.forward_cached(&mut [SeqStep { tokens: &a[..9], cache: &mut ca, all_logits: false }]).unwrap();
        // `a` decodes its 10th token while `b` is prefilled whole (all but its last token's
        // row pruned after the last layer's attention) and `c`, in the same step, asks for
        // every row.
        let out = m
            .forward_cached(&mut [
                SeqStep { tokens: &a[9..], cache: &mut ca, all_logits: false },
                SeqStep { tokens: &b[..7], cache: &mut cb, all_logits: false },
                SeqStep { tokens: &c, cache: &mut cc, all_logits: true },
            ])
            .unwrap();
        assert!(max_diff(&out[0], &fa.narrow(0, 9, 1).unwrap()) < TOL, "{name}: decode");
        assert!(max_diff(&out[1], &fb.narrow(0, 6, 1).unwrap()) < TOL, "{name}: prefill");
        assert!(max_diff(&out[2], &fc) < TOL, "{name}: all rows");
        // The pruned prefill cached every layer's keys and values: `b` continues exactly.
        let out = m.forward_cached(&mut [SeqStep { tokens: &b[7..], cache: &mut cb, all_logits: false }]).unwrap();
        assert!(max_diff(&out[0], &fb.narrow(0, 7, 1).unwrap()) < TOL, "{name}: decode after a pruned prefill");
    }
}

#[test]
fn padded_batch_forward_matches_each_sequence_alone() {
    for (name, m) in models() {
        let v = m.config().vocab_size();
        let (a, b) = (tokens(11, 9, v), tokens(6, 10, v));
        let mut padded = b.clone();
        padded.resize(11, 0);
        let ids = Tensor::new(vec![a.clone(), padded], &Device::Cpu).unwrap();
        let mask = Tensor::new(vec![vec![1u32; 11], [vec![1u32; 6], vec![0u32; 5]].concat()], &Device::Cpu).unwrap();
        let out = m.forward(&ids, Some(&mask)).unwrap();
        let d0 = max_diff(&out.get(0).unwrap(), &full_logits(&m, &a));
        let d1 = max_diff(&out.get(1).unwrap().narrow(0, 0, 6).unwrap(), &full_logits(&m, &b));
        assert!(d0 < TOL && d1 < TOL, "{name}: padded batch differs ({d0}, {d1})");
    }
}

#[test]
fn context_overflow_and_bad_ids_are_errors_not_panics() {
    let m = Model::load(&fixture("tiny-gpt2"), DType::F32, &Device::Cpu).unwrap();
    let max = m.max_len();
    let mut cache = m.new_cache();
    let long = vec![1u32; max + 1];
    let e = m.forward_cached(&mut [SeqStep { tokens: &long, cache: &mut cache, all_logits: false }]).unwrap_err();
    assert!(e.to_string().contains("exceeds the context length"), "{e}");
    let e = m.forward_cached(&mut [SeqStep { tokens: &[999_999], cache: &mut cache, all_logits: false }]).unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    assert!(cache.is_empty(), "a failed step must not advance the cache");
    let e = m.forward_cached(&mut [SeqStep { tokens: &[], cache: &mut cache, all_logits: false }]).unwrap_err();
    assert!(e.to_string().contains("at least one new token"), "{e}");
}

#[test]
fn cache_reports_memory_and_truncates() {
    let m = Model::load(&fixture("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    let toks = tokens(12, 11, 64);
    let full = full_logits(&m, &toks);
    let mut cache = m.new_cache();
    m.forward_cached(&mut [SeqStep { tokens: &toks[..10], cache: &mut cache, all_logits: false }]).unwrap();
    // 2 layers × (K and V) × 2 kv heads × head_dim 8 × 4 bytes.
    assert_eq!(cache.bytes_per_token(), 2 * 2 * 2 * 8 * 4);
    assert!(cache.allocated_bytes() >= 10 * cache.bytes_per_token());
    // Roll back to 6 tokens and continue: same as never having seen tokens 6..10.
    cache.truncate(6);
    let o = m.forward_cached(&mut [SeqStep { tokens: &toks[6..12], cache: &mut cache, all_logits: true }]).unwrap();
    assert!(max_diff(&o[0], &full.narrow(0, 6, 6).unwrap()) < TOL);
    let fork = cache.fork().unwrap();
    assert_eq!(fork.len(), 12);
}

#[test]
fn a_cache_told_its_length_allocates_once() {
    let m = Model::load(&fixture("tiny-gpt2"), DType::F32, &Device::Cpu).unwrap();
    let mut c = m.new_cache();
    if !c.is_host() {
        return;
    }
    let expected = 40.min(c.max_len());
    c.expect_tokens(expected);
    let v = m.config().vocab_size();
    m.forward_cached(&mut [SeqStep { tokens: &tokens(3, 1, v), cache: &mut c, all_logits: false }]).unwrap();
    let bytes = c.allocated_bytes();
    assert_eq!(bytes, expected * c.bytes_per_token());
    for i in 3..expected {
        m.forward_cached(&mut [SeqStep { tokens: &[(i % v) as u32], cache: &mut c, all_logits: false }]).unwrap();
    }
    assert_eq!(c.len(), expected);
    assert_eq!(c.allocated_bytes(), bytes, "the cache regrew");
    // A fork keeps the room, and continues exactly as the original does.
    c.truncate(10);
    let mut f = c.fork().unwrap();
    assert_eq!(f.allocated_bytes(), bytes);
    let step = |c: &mut lmstack_core::KvCache| {
        m.forward_cached(&mut [SeqStep { tokens: &[7], cache: c, all_logits: false }]).unwrap().remove(0)
    };
    assert!(max_diff(&step(&mut c), &step(&mut f)) == 0.0);
}

#[test]
fn a_long_expectation_is_reserved_as_the_cache_fills() {
    use lmstack_core::kv_cache::{KvCache, FIRST_ROOM};
    let mut c = KvCache::new(2, 1, 4, 4096, DType::F32, &Device::Cpu);
    if !c.is_host() {
        return;
    }
    let expected = 3000;
    c.expect_tokens(expected);
    let row = vec![0.5f32; 4];
    let mut sizes = vec![];
    for _ in 0..expected {
        for layer in 0..2 {
            c.host_append(layer, &row, &row).unwrap();
        }
        if sizes.last() != Some(&c.allocated_bytes()) {
            sizes.push(c.allocated_bytes());
        }
    }
    // A request that stops early holds little; the room doubles and ends at the expectation,
    // never past it.
    let per = c.bytes_per_token();
    assert_eq!(sizes[0], FIRST_ROOM * per);
    assert_eq!(*sizes.last().unwrap(), expected * per);
    assert!(sizes.windows(2).all(|w| w[1] <= 2 * w[0]), "{sizes:?}");
    assert!(sizes.len() <= 5, "regrew {} times: {sizes:?}", sizes.len() - 1);
    let e = c.host_append(0, &row[..3], &row[..3]).unwrap_err();
    assert!(e.to_string().contains("whole"), "{e}");
}

#[test]
fn a_step_on_one_thread_equals_the_split_step() {
    use lmstack_core::StepThreads;
    for (name, mut m) in models() {
        let v = m.config().vocab_size();
        let seqs: Vec<Vec<u32>> = (0..6).map(|i| tokens(6 + 2 * i, 20 + i as u32, v)).collect();
        let run = |m: &Model, threads: StepThreads| -> Vec<Vec<f32>> {
            let mut caches: Vec<_> = seqs.iter().map(|_| m.new_cache()).collect();
            let mut outs = Vec::new();
            // A prefill step of all six, then two decode steps.
            for (lo, hi) in [(0usize, 4usize), (4, 5), (5, 6)] {
                let mut steps: Vec<SeqStep<'_>> = seqs
                    .iter()
                    .zip(caches.iter_mut())
                    .map(|(s, c)| SeqStep { tokens: &s[lo..hi], cache: c, all_logits: true })
                    .collect();
                assert_eq!(m.can_split(&steps), rayon::current_num_threads() >= 2, "{name}");
                let out = m.forward_cached_on(&mut steps, threads).unwrap();
                outs.extend(out.iter().flat_map(|o| o.to_vec2::<f32>().unwrap()));
            }
            outs
        };
        // Through gemm (weights as loaded) a row's rounding may depend on the rows beside it;
        // through the repacked kernel every row is computed the same way, so the two agree exactly.
        let (one, split) = (run(&m, StepThreads::One), run(&m, StepThreads::Auto));
        for (a, b) in one.iter().zip(&split) {
            let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            assert!(d < TOL, "{name}: one thread and split halves differ by {d}");
        }
        if m.repack_for_inference().unwrap() > 0 {
            assert_eq!(run(&m, StepThreads::One), run(&m, StepThreads::Auto), "{name}, repacked");
        }
    }
}
