//! The prefix cache: finished sequences' KV caches, kept in the part of the KV budget no
//! running sequence has reserved, for requests whose prompts begin with their tokens. The
//! least recently used is evicted first.

use lmstack_core::tokenizer::common_prefix;
use lmstack_core::KvCache;

/// A finished sequence's KV cache, kept for requests whose prompts begin with its tokens.
struct Prefix {
    /// The tokens whose keys and values `cache` holds.
    ids: Vec<u32>,
    cache: KvCache,
    /// Tokens of room the cache's storage takes.
    room: usize,
    /// The engine's clock at its last use.
    used: u64,
}

/// The kept caches and the tokens of room they take.
pub(super) struct PrefixCache {
    kept: Vec<Prefix>,
    tokens: usize,
    bytes_per_token: usize,
}

impl PrefixCache {
    /// An empty prefix cache for caches of `bytes_per_token` bytes a token.
    pub fn new(bytes_per_token: usize) -> Self {
        Self { kept: Vec::new(), tokens: 0, bytes_per_token }
    }

    /// Tokens of room the kept caches take.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The kept cache holding the longest beginning of `prompt` (at most `limit` tokens):
    /// its index and that length, if any holds one.
    pub fn longest(&self, prompt: &[u32], limit: usize) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize)> = None;
        for (i, p) in self.kept.iter().enumerate() {
            let n = common_prefix(&p.ids, prompt).min(limit).min(p.cache.len());
            if n > best.map_or(0, |b| b.1) {
                best = Some((i, n));
            }
        }
        best
    }

    /// Kept cache `i`, marked used at `clock`.
    pub fn use_cache(&mut self, i: usize, clock: u64) -> &KvCache {
        self.kept[i].used = clock;
        &self.kept[i].cache
    }

    /// Keeps `cache`, holding the keys and values of `ids`, at `clock`, unless a kept cache
    /// already begins with all of `ids`; kept caches that are beginnings of `ids` go (this one
    /// serves every request they could).
    pub fn keep(&mut self, ids: Vec<u32>, cache: KvCache, clock: u64) {
        if let Some(p) = self.kept.iter_mut().find(|p| common_prefix(&p.ids, &ids) == ids.len()) {
            p.used = clock;
            return;
        }
        let mut freed = 0;
        self.kept.retain(|p| {
            let covered = common_prefix(&p.ids, &ids) == p.ids.len();
            if covered {
                freed += p.room;
            }
            !covered
        });
        self.tokens -= freed;
        let room = cache.allocated_bytes().div_ceil(self.bytes_per_token.max(1));
        self.tokens += room;
        self.kept.push(Prefix { ids, cache, room, used: clock });
    }

    /// Drops the least recently used kept caches until they take at most `free` tokens.
    pub fn evict_to(&mut self, free: usize) {
        while self.tokens > free && !self.kept.is_empty() {
            let lru = (0..self.kept.len()).min_by_key(|&i| self.kept[i].used).expect("not empty");
            let p = self.kept.swap_remove(lru);
            self.tokens -= p.room;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmstack_core::{DType, Device};

    /// A one-layer host cache holding `n` tokens of one head of width 2.
    fn cache(n: usize) -> KvCache {
        let mut c = KvCache::new(1, 1, 2, 64, DType::F32, &Device::Cpu);
        c.expect_tokens(n);
        for _ in 0..n {
            c.host_append(0, &[1.0, 2.0], &[3.0, 4.0]).unwrap();
        }
        c
    }

    #[test]
    fn longest_beginning_covering_caches_and_lru_eviction() {
        let c = cache(1);
        let mut p = PrefixCache::new(c.bytes_per_token());
        p.keep(vec![1, 2, 3], cache(3), 1);
        p.keep(vec![5, 6], cache(2), 2);
        assert_eq!(p.longest(&[1, 2, 9], 10), Some((0, 2)));
        assert_eq!(p.longest(&[1, 2, 3, 4], 2), Some((0, 2)), "at most `limit`");
        assert_eq!(p.longest(&[7], 10), None);
        // A longer cache replaces the one it begins with; one it begins with is not kept.
        let before = p.tokens();
        p.keep(vec![1, 2, 3, 4], cache(4), 3);
        assert_eq!(p.longest(&[1, 2, 3, 4, 5], 10).map(|b| b.1), Some(4));
        assert!(p.tokens() > before);
        let now = p.tokens();
        p.keep(vec![5], cache(1), 4);
        assert_eq!(p.tokens(), now, "[5] is a beginning of [5, 6]");
        // Eviction drops the least recently used: [1, 2, 3, 4] (used at 3) before [5, 6]
        // (used at 4, when [5] was offered).
        p.evict_to(p.tokens() - 1);
        assert_eq!(p.longest(&[1, 2, 3, 4], 10), None);
        assert!(p.longest(&[5, 6], 10).is_some());
        p.evict_to(0);
        assert_eq!((p.tokens(), p.longest(&[5, 6], 10)), (0, None));
    }
}
