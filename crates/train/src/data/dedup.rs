//! Deduplication: exact (content hash) and near-duplicate (MinHash signatures with
//! locality-sensitive hashing, "On the resemblance and containment of documents", Broder 1997;
//! bands as in "Mining of Massive Datasets", ch. 3).
//!
//! Near-duplicates are judged by the Jaccard similarity of word 5-gram shingles (character
//! 5-grams for documents of fewer than five words), estimated from 128 min-hashes. LSH with
//! `b` bands of `r` rows makes documents above the threshold collide in some band with high
//! probability; colliding pairs are then checked against the threshold with the signature
//! estimate. The first occurrence is kept.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A stable 64-bit hash (SipHash with fixed keys).
pub fn hash64<T: Hash + ?Sized>(x: &T) -> u64 {
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0x6c6d_7374, 0x6163_6b21);
    x.hash(&mut h);
    h.finish()
}

/// Keeps the first of each set of byte-identical documents; returns which to keep.
pub fn exact(docs: &[String]) -> Vec<bool> {
    let mut seen = HashSet::new();
    docs.iter().map(|d| seen.insert(hash64(d.as_str()))).collect()
}

const PRIME: u64 = (1 << 61) - 1;

fn mulmod(a: u64, b: u64) -> u64 {
    ((a as u128 * b as u128) % PRIME as u128) as u64
}

/// MinHash near-duplicate detector.
#[derive(Debug, Clone)]
pub struct MinHasher {
    a: Vec<u64>,
    b: Vec<u64>,
    bands: usize,
    rows: usize,
    threshold: f64,
}

impl MinHasher {
    /// `num_perm` hash functions, LSH bands chosen so the collision threshold is close to
    /// `threshold` (Jaccard similarity in (0, 1]).
    pub fn new(num_perm: usize, threshold: f64, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let a = (0..num_perm).map(|_| rng.random_range(1..PRIME)).collect();
        let b = (0..num_perm).map(|_| rng.random_range(0..PRIME)).collect();
        // Among b·r = num_perm, pick the S-curve whose midpoint (1/b)^(1/r) is nearest the
        // threshold, leaning lower so true duplicates are not missed.
        let (mut best, mut err) = ((num_perm, 1), f64::INFINITY);
        for r in 1..=num_perm {
            if !num_perm.is_multiple_of(r) {
                continue;
            }
            let bands = num_perm / r;
            let mid = (1.0 / bands as f64).powf(1.0 / r as f64);
            let e = (mid - (threshold - 0.05)).abs();
            if e < err {
                (best, err) = ((bands, r), e);
            }
        }
        Self { a, b, bands: best.0, rows: best.1, threshold }
    }

    /// Calls `f` with the hash of each shingle of a document, in order (repeats included):
    /// word 5-grams, or character 5-grams for fewer than five words (the whole text for fewer
    /// than five characters). Nothing is collected, so a long document costs no memory.
    pub fn for_each_shingle(text: &str, mut f: impl FnMut(u64)) {
        if text.split_whitespace().nth(4).is_some() {
            let mut w = [""; 5];
            for (i, word) in text.split_whitespace().enumerate() {
                w.rotate_left(1);
                w[4] = word;
                if i >= 4 {
                    f(hash64(&w[..]));
                }
            }
        } else {
            let mut w = ['\0'; 5];
            let mut n = 0;
            for c in text.chars() {
                w.rotate_left(1);
                w[4] = c;
                n += 1;
                if n >= 5 {
                    f(hash64(&w[..]));
                }
            }
            if n < 5 {
                f(hash64(text));
            }
        }
    }

    /// Shingle hashes of a document, as a set.
    pub fn shingles(text: &str) -> HashSet<u64> {
        let mut out = HashSet::new();
        Self::for_each_shingle(text, |h| {
            out.insert(h);
        });
        out
    }

    /// The MinHash signature of a shingle set.
    pub fn signature(&self, shingles: &HashSet<u64>) -> Vec<u64> {
        let mut sig = vec![u64::MAX; self.a.len()];
        shingles.iter().for_each(|&x| self.update(&mut sig, x));
        sig
    }

    /// The MinHash signature of a document, streamed over its shingles (equal to
    /// `signature(&shingles(text))`: a minimum does not change with repeats).
    pub fn signature_of(&self, text: &str) -> Vec<u64> {
        let mut sig = vec![u64::MAX; self.a.len()];
        Self::for_each_shingle(text, |x| self.update(&mut sig, x));
        sig
    }

    fn update(&self, sig: &mut [u64], x: u64) {
        for ((s, &a), &b) in sig.iter_mut().zip(&self.a).zip(&self.b) {
            *s = (*s).min((mulmod(a, x % PRIME) + b) % PRIME);
        }
    }

    /// Estimated Jaccard similarity of two signatures.
    pub fn similarity(s1: &[u64], s2: &[u64]) -> f64 {
        s1.iter().zip(s2).filter(|(a, b)| a == b).count() as f64 / s1.len().max(1) as f64
    }

    /// Keeps each document unless it is a near-duplicate of an earlier kept one.
    pub fn dedup(&self, docs: &[String]) -> Vec<bool> {
        use rayon::prelude::*;
        let sigs: Vec<Vec<u64>> = docs.par_iter().map(|d| self.signature_of(d)).collect();
        let mut buckets: Vec<HashMap<u64, Vec<usize>>> = vec![HashMap::new(); self.bands];
        let mut keep = vec![true; docs.len()];
        for (i, sig) in sigs.iter().enumerate() {
            let keys: Vec<u64> = (0..self.bands).map(|b| hash64(&sig[b * self.rows..(b + 1) * self.rows])).collect();
            let mut dup = false;
            'bands: for (b, key) in keys.iter().enumerate() {
                if let Some(cands) = buckets[b].get(key) {
                    for &j in cands {
                        if Self::similarity(sig, &sigs[j]) >= self.threshold {
                            dup = true;
                            break 'bands;
                        }
                    }
                }
            }
            if dup {
                keep[i] = false;
            } else {
                for (b, key) in keys.into_iter().enumerate() {
                    buckets[b].entry(key).or_default().push(i);
                }
            }
        }
        keep
    }

    /// `(bands, rows)` of the LSH index.
    pub fn bands(&self) -> (usize, usize) {
        (self.bands, self.rows)
    }
}
