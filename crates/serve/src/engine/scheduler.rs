//! Scheduling decisions, apart from the model so they can be tested alone: whether a waiting
//! request is admitted, and which tokens of which sequences make up the next step.

/// Whether a request that may need `reserve` KV-cache tokens is admitted now, with `running`
/// sequences holding `reserved` tokens of a `kv_budget`, at most `max_num_seqs` running.
/// Admission is in arrival order: when the head of the queue does not fit, nothing behind it
/// overtakes it.
pub(super) fn admits(running: usize, reserved: usize, reserve: usize, max_num_seqs: usize, kv_budget: usize) -> bool {
    running < max_num_seqs && reserved + reserve <= kv_budget
}

/// What a running sequence needs from the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Want<'a> {
    /// Its last sampled token fed, with the tokens its output constraint forced after it
    /// (fast-forward; usually none).
    Decode { token: u32, forced: &'a [u32] },
    /// The rest of its prompt prefilled (as much of it as the step has room for); `all_logits`
    /// when every prompt token's log-probabilities were asked for.
    Prefill { rest: &'a [u32], all_logits: bool },
    /// Nothing (it waits on another sequence's prefill).
    Nothing,
}

/// The next step: per sequence, the tokens it feeds and whether it wants every position's
/// logits; and the prompt tokens in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Batch {
    pub tokens: Vec<Option<(Vec<u32>, bool)>>,
    pub prefill_tokens: usize,
}

/// Plans a step of at most `max_batch_tokens` tokens: first the decode tokens of every
/// generating sequence (streams keep flowing; one each, with any forced tokens after it), then prefill chunks of the prompts in the order
/// the sequences were admitted, a long prompt cut to the room left (it goes on next step).
pub(super) fn plan(wants: &[Want<'_>], max_batch_tokens: usize) -> Batch {
    let mut budget = max_batch_tokens;
    let mut tokens: Vec<Option<(Vec<u32>, bool)>> = vec![None; wants.len()];
    for (p, w) in tokens.iter_mut().zip(wants) {
        if let Want::Decode { token, forced } = *w {
            let mut t = Vec::with_capacity(1 + forced.len());
            t.push(token);
            t.extend_from_slice(forced);
            budget = budget.saturating_sub(t.len());
            *p = Some((t, false));
        }
    }
    let mut prefill_tokens = 0;
    for (p, w) in tokens.iter_mut().zip(wants) {
        if budget == 0 {
            break;
        }
        if let Want::Prefill { rest, all_logits } = *w {
            let n = rest.len().min(budget);
            *p = Some((rest[..n].to_vec(), all_logits));
            budget -= n;
            prefill_tokens += n;
        }
    }
    Batch { tokens, prefill_tokens }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_keeps_to_the_sequence_count_and_the_kv_budget() {
        assert!(admits(0, 0, 100, 4, 100));
        assert!(!admits(0, 0, 101, 4, 100), "more than the whole budget");
        assert!(admits(3, 60, 40, 4, 100));
        assert!(!admits(3, 61, 40, 4, 100), "the budget is reserved");
        assert!(!admits(4, 0, 1, 4, 100), "max_num_seqs are running");
    }

    #[test]
    fn decode_tokens_come_first_then_prefill_chunks_in_order_within_the_budget() {
        let long: Vec<u32> = (0..10).collect();
        let short = [7u32, 8, 9];
        let wants = [
            Want::Prefill { rest: &long, all_logits: false },
            Want::Decode { token: 42, forced: &[] },
            Want::Nothing,
            Want::Prefill { rest: &short, all_logits: true },
            Want::Decode { token: 43, forced: &[44, 45] },
        ];
        // Room for the decode tokens (one, and one with two forced after it) and 6 prompt
        // tokens: the first prompt's chunk only.
        let b = plan(&wants, 10);
        assert_eq!(b.tokens[1], Some((vec![42], false)));
        assert_eq!(b.tokens[4], Some((vec![43, 44, 45], false)));
        assert_eq!(b.tokens[0], Some(((0..6).collect(), false)));
        assert_eq!((b.tokens[2].clone(), b.tokens[3].clone()), (None, None));
        assert_eq!(b.prefill_tokens, 6);
        // Room for everything.
        let b = plan(&wants, 102);
        assert_eq!(b.tokens[0], Some((long.clone(), false)));
        assert_eq!(b.tokens[3], Some((short.to_vec(), true)));
        assert_eq!(b.prefill_tokens, 13);
        // Decode tokens are never cut, even past the budget; prefill waits.
        let b = plan(&wants, 1);
        assert_eq!(b.tokens.iter().flatten().count(), 2);
        assert_eq!(b.prefill_tokens, 0);
    }
}
