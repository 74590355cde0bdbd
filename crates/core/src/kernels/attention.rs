//! Attention for serving: the new tokens of several sequences, packed, over each sequence's own
//! KV cache ([`KvCache`]). Training's attention (whole padded batches, with a backward pass)
//! is [`super::ops::Attention`]; the AVX2 inner loop of a decode token is
//! [`super::simd::decode_attention`].

use super::simd::Rows;
use crate::kv_cache::KvCache;
use crate::Result;

/// Causal attention of the new tokens of several sequences over their host caches, on CPU in
/// f32: appends each sequence's new keys and values to its cache, then computes each
/// (sequence, head) with two matrix products over the cache in place, in parallel. With a
/// `window`, a token sees only itself and the `window - 1` cached tokens before it (the cache
/// keeps the older ones; they are skipped), and with a soft cap each score `s` becomes
/// `cap · tanh(s / cap)`.
///
/// # Shapes
/// `q`: `[N, heads, d]`, `k`/`v`: `[N, kv_heads, d]` flattened, where the `N` packed tokens are
/// split among sequences by `spans` (`(start, n)`) → `[N, heads · d]` flattened.
#[allow(clippy::too_many_arguments)]
pub fn packed_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (heads, kv_heads, d): (usize, usize, usize),
    spans: &[(usize, usize)],
    caches: &mut [&mut KvCache],
    layer: usize,
    how: crate::nn::Scores,
) -> Result<Vec<f32>> {
    use crate::kernels::gemm::{matmul, View};
    use crate::kernels::simd;
    use rayon::prelude::*;
    let row = kv_heads * d;
    for (&(start, n), c) in spans.iter().zip(caches.iter_mut()) {
        c.host_append(layer, &k[start * row..(start + n) * row], &v[start * row..(start + n) * row])?;
    }
    let n_rep = heads / kv_heads;
    let caches: Vec<&KvCache> = caches.iter().map(|c| &**c).collect();
    let total: usize = spans.iter().map(|s| s.1).sum();
    let (scale, window, softcap) = (how.scale as f32, how.window, how.softcap.map(|c| c as f32));
    // The first key a token that sees `visible` keys (itself and all before it) attends to.
    let first = |visible: usize| window.map_or(0, |w| visible.saturating_sub(w));
    let mut out = vec![0f32; total * heads * d];
    // Decoding sequences (a few new tokens), where the CPU allows: every head of a token in one
    // pass over the cache, straight into `out`.
    let mut done = vec![false; spans.len()];
    let decoding: Vec<usize> = (0..spans.len()).filter(|&i| spans[i].1 <= 4).collect();
    // New token `t` of sequence `i`, the heads of KV heads `g`, into `o`; false (nothing written)
    // where the CPU lacks the kernel.
    let attend_token = |i: usize, t: usize, g: std::ops::Range<usize>, o: &mut [f32], scores: &mut Vec<f32>| {
        let (start, n) = spans[i];
        let (kc, vc) = caches[i].host_kv(layer);
        let qt = &q[(start + t) * heads * d..][g.start * n_rep * d..g.end * n_rep * d];
        let valid = kc.len() / row - n + t + 1;
        let skip = first(valid);
        let (kc, vc) = (kc.skip(skip * row), vc.skip(skip * row));
        simd::decode_attention_groups(qt, kc, vc, (heads, kv_heads, d), g, valid - skip, (scale, softcap), scores, o)
    };
    // Sequence `i`'s new tokens into `o` (its rows of `out`).
    let decode = |i: usize, o: &mut [f32], scores: &mut Vec<f32>| {
        o.chunks_mut(heads * d).enumerate().all(|(t, o)| attend_token(i, t, 0..kv_heads, o, scores))
    };
    let decode_macs: usize = decoding.iter().map(|&i| 2 * spans[i].1 * caches[i].len() * d * heads).sum();
    // Long caches (a large model, long contexts) are worth the pool: 256K multiply-adds read
    // 1 MB of keys and values or more, which takes longer than waking the pool.
    let spread = decode_macs > 1 << 18 && crate::kernels::threads::may_spread();
    if spread && decoding.len() == 1 && kv_heads >= 2 {
        // One sequence: its heads in two halves, by KV head, on two threads.
        let (i, mid) = (decoding[0], kv_heads / 2);
        let (start, n) = spans[i];
        done[i] = out[start * heads * d..(start + n) * heads * d].chunks_mut(heads * d).enumerate().all(|(t, o)| {
            let (oa, ob) = o.split_at_mut(mid * n_rep * d);
            let (a, b) = rayon::join(
                || attend_token(i, t, 0..mid, oa, &mut Vec::new()),
                || attend_token(i, t, mid..kv_heads, ob, &mut Vec::new()),
            );
            a && b
        });
    } else if spread && decoding.len() > 1 {
        // Several: the sequences over the pool.
        let parts: Vec<(bool, Vec<f32>)> = decoding
            .par_iter()
            .map(|&i| {
                let mut o = vec![0f32; spans[i].1 * heads * d];
                (decode(i, &mut o, &mut Vec::new()), o)
            })
            .collect();
        for (&i, (ok, o)) in decoding.iter().zip(parts) {
            done[i] = ok;
            out[spans[i].0 * heads * d..][..o.len()].copy_from_slice(&o);
        }
    } else {
        let mut scores = Vec::new();
        for &i in &decoding {
            let (start, n) = spans[i];
            done[i] = decode(i, &mut out[start * heads * d..(start + n) * heads * d], &mut scores);
        }
    }
    let work: Vec<(usize, usize)> =
        (0..spans.len()).filter(|&i| !done[i]).flat_map(|i| (0..heads).map(move |h| (i, h))).collect();
    // Multiply-adds of the rest; waking the thread pool costs more than small steps take.
    let macs: usize = spans
        .iter()
        .zip(&caches)
        .zip(&done)
        .filter(|(_, d)| !**d)
        .map(|((s, c), _)| 2 * s.1 * c.len() * d * heads)
        .sum();
    // One (sequence, head): the new tokens' outputs `[n, d]` into `part`; `kv` is scratch for
    // the head's keys and values widened to f32 when the cache stores bf16.
    // (`identity` only so the closure may carry `#[inline(always)]`: see `simd::dispatch`.)
    let attend = std::convert::identity(
        #[inline(always)]
        |fma: bool,
         (i, h): (usize, usize),
         scores: &mut Vec<f32>,
         part: &mut Vec<f32>,
         kv: &mut (Vec<f32>, Vec<f32>)| {
            let (start, n) = spans[i];
            let (kr, vr) = caches[i].host_kv(layer);
            let l = kr.len() / row;
            let p0 = l - n;
            let g = h / n_rep;
            // Keys and values as f32 rows of `row` values, the head's `d` starting at `col`.
            let (kc, vc, row, col) = match (kr, vr) {
                (Rows::F32(k), Rows::F32(v)) => (k, v, row, g * d),
                _ => {
                    kr.gather_f32(g * d, row, l, d, &mut kv.0);
                    vr.gather_f32(g * d, row, l, d, &mut kv.1);
                    (&kv.0[..], &kv.1[..], d, 0)
                }
            };
            scores.clear();
            scores.resize(n * l, 0.0);
            part.clear();
            part.resize(n * d, 0.0);
            let qoff = |t: usize| (start + t) * heads * d + h * d;
            if n <= 4 {
                // Decode: a few dot products per cached token; a gemm call would cost more.
                for t in 0..n {
                    let qr = &q[qoff(t)..qoff(t) + d];
                    for (j, s) in scores[t * l..t * l + p0 + t + 1].iter_mut().enumerate().skip(first(p0 + t + 1)) {
                        *s = simd::dot(fma, qr, &kc[j * row + col..j * row + col + d]) * scale;
                    }
                }
            } else {
                // scores[n×l] = Q_h[n×d] · K_gᵀ[d×l]
                matmul(
                    n,
                    l,
                    d,
                    q,
                    View { off: qoff(0), rs: heads * d, cs: 1 },
                    kc,
                    View { off: col, rs: 1, cs: row },
                    scores,
                    View::rows(0, l),
                    false,
                    scale,
                );
            }
            for (t, s) in scores.chunks_mut(l).enumerate() {
                let (s, masked) = s.split_at_mut(p0 + t + 1);
                let (before, s) = s.split_at_mut(first(p0 + t + 1));
                if let Some(cap) = softcap {
                    simd::soft_cap(s, cap);
                }
                simd::softmax(s);
                before.fill(0.0);
                masked.fill(0.0);
            }
            if n <= 4 {
                for t in 0..n {
                    let o = &mut part[t * d..(t + 1) * d];
                    for (j, &p) in scores[t * l..t * l + p0 + t + 1].iter().enumerate().skip(first(p0 + t + 1)) {
                        simd::axpy(fma, p, &vc[j * row + col..j * row + col + d], o);
                    }
                }
            } else {
                // out[n×d] = P[n×l] · V_g[l×d]
                matmul(
                    n,
                    d,
                    l,
                    scores,
                    View::rows(0, l),
                    vc,
                    View { off: col, rs: row, cs: 1 },
                    part,
                    View::rows(0, d),
                    false,
                    1.0,
                );
            }
        },
    );
    let mut place = |(i, h): (usize, usize), part: &[f32]| {
        let (start, n) = spans[i];
        for t in 0..n {
            let o = (start + t) * heads * d + h * d;
            out[o..o + d].copy_from_slice(&part[t * d..(t + 1) * d]);
        }
    };
    if macs > 1 << 20 && crate::kernels::threads::may_spread() {
        let parts: Vec<Vec<f32>> = work
            .par_iter()
            .map(|&w| {
                simd::dispatch(
                    #[inline(always)]
                    |fma| {
                        let (mut scores, mut part, mut kv) = (Vec::new(), Vec::new(), Default::default());
                        attend(fma, w, &mut scores, &mut part, &mut kv);
                        part
                    },
                )
            })
            .collect();
        for (&w, part) in work.iter().zip(&parts) {
            place(w, part);
        }
    } else {
        simd::dispatch(
            #[inline(always)]
            |fma| {
                let (mut scores, mut part, mut kv) = (Vec::new(), Vec::new(), Default::default());
                for &w in &work {
                    attend(fma, w, &mut scores, &mut part, &mut kv);
                    place(w, &part);
                }
            },
        );
    }
    Ok(out)
}
