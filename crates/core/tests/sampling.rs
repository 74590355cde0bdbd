//! Sampling: each filter and penalty does what its definition says, seeds reproduce, and
//! log-probabilities are those of the raw distribution.

use lmstack_core::sampling::{log_softmax, logprobs_of, logsumexp, top_n};
use lmstack_core::{Sampler, SamplingParams};

const LOGITS: [f32; 6] = [2.0, 1.0, 0.5, 3.0, -1.0, 2.9];

fn draws(params: SamplingParams, n: usize) -> Vec<u32> {
    let mut s = Sampler::new(params, &[], 0).unwrap();
    (0..n).map(|_| s.sample(&LOGITS).unwrap().token).collect()
}

fn seeded(p: SamplingParams) -> SamplingParams {
    SamplingParams { seed: Some(42), ..p }
}

#[test]
fn greedy_takes_the_argmax() {
    assert!(draws(SamplingParams::greedy(), 5).iter().all(|&t| t == 3));
}

#[test]
fn same_seed_same_tokens_and_different_seed_differs() {
    let p = seeded(SamplingParams::default());
    assert_eq!(draws(p.clone(), 50), draws(p.clone(), 50));
    assert_ne!(draws(p, 50), draws(SamplingParams { seed: Some(7), ..SamplingParams::default() }, 50));
}

#[test]
fn top_k_keeps_only_the_k_best() {
    let d = draws(seeded(SamplingParams { top_k: 2, ..Default::default() }), 200);
    assert!(d.iter().all(|&t| t == 3 || t == 5));
    assert!(d.contains(&3) && d.contains(&5));
    assert!(draws(seeded(SamplingParams { top_k: 1, ..Default::default() }), 20).iter().all(|&t| t == 3));
}

#[test]
fn top_p_keeps_the_nucleus() {
    // p(3) ≈ 0.39, p(5) ≈ 0.35: top_p 0.5 needs both, top_p 0.3 only the best.
    let d = draws(seeded(SamplingParams { top_p: 0.5, ..Default::default() }), 200);
    assert!(d.iter().all(|&t| t == 3 || t == 5), "{d:?}");
    assert!(draws(seeded(SamplingParams { top_p: 0.3, ..Default::default() }), 20).iter().all(|&t| t == 3));
}

#[test]
fn min_p_drops_unlikely_tokens() {
    // Relative to the best (e^3): token 0 has e^-1 ≈ 0.37, token 1 e^-2 ≈ 0.14.
    let d = draws(seeded(SamplingParams { min_p: 0.3, ..Default::default() }), 300);
    assert!(d.iter().all(|&t| [0, 3, 5].contains(&t)), "{d:?}");
}

#[test]
fn low_temperature_sharpens() {
    let d = draws(seeded(SamplingParams { temperature: 0.05, ..Default::default() }), 100);
    assert!(d.iter().filter(|&&t| t == 3).count() > 85);
}

#[test]
fn penalties_change_what_greedy_picks() {
    // Repetition penalty: token 3 in the prompt, 3.0 / 2 = 1.5 < 2.9.
    let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() }, &[3], 0).unwrap();
    assert_eq!(s.sample(&LOGITS).unwrap().token, 5);
    // Frequency penalty: after choosing 3 once, 3.0 - 0.5 < 2.9.
    let mut s = Sampler::new(SamplingParams { frequency_penalty: 0.5, ..SamplingParams::greedy() }, &[], 0).unwrap();
    assert_eq!(s.sample(&LOGITS).unwrap().token, 3);
    assert_eq!(s.sample(&LOGITS).unwrap().token, 5);
    // Presence penalty works the same way, once per distinct token.
    let mut s = Sampler::new(SamplingParams { presence_penalty: 0.2, ..SamplingParams::greedy() }, &[], 0).unwrap();
    assert_eq!([s.sample(&LOGITS).unwrap().token, s.sample(&LOGITS).unwrap().token], [3, 5]);
}

#[test]
fn banned_tokens_are_never_chosen() {
    let mut greedy = Sampler::new(SamplingParams::greedy(), &[], 0).unwrap();
    let out = greedy.sample_except(&LOGITS, &[3]).unwrap();
    assert_eq!(out.token, 5, "the next best");
    assert!((out.logprob - log_softmax(&LOGITS)[5]).abs() < 1e-6, "the model's log-probability");
    let mut s = Sampler::new(seeded(SamplingParams::default()), &[], 0).unwrap();
    for _ in 0..200 {
        assert!(![3, 5, 0].contains(&s.sample_except(&LOGITS, &[3, 5, 0]).unwrap().token));
    }
    assert!(s.sample_except(&LOGITS, &[0, 1, 2, 3, 4, 5]).is_err(), "nothing left to choose");
}

#[test]
fn logprobs_are_of_the_raw_distribution() {
    let mut s = Sampler::new(SamplingParams { temperature: 0.1, seed: Some(1), ..Default::default() }, &[], 3).unwrap();
    let out = s.sample(&LOGITS).unwrap();
    let lp = log_softmax(&LOGITS);
    assert!((out.logprob - lp[out.token as usize]).abs() < 1e-6);
    assert_eq!(out.top_logprobs.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 5, 0]);
    let total: f64 = lp.iter().map(|&x| (x as f64).exp()).sum();
    assert!((total - 1.0).abs() < 1e-6);
    assert_eq!(top_n(&[1.0, 5.0, 3.0], 2), vec![(1, 5.0), (2, 3.0)]);
}

#[test]
fn logsumexp_matches_f64_over_a_large_vocabulary() {
    // A GPT-2-sized row spanning a wide range, plus rows too short for a vector lane.
    let big: Vec<f32> = (0..50_257u64).map(|i| ((i * 2_654_435_761) % 4001) as f32 / 100.0 - 20.0).collect();
    for row in [&big[..], &big[..5], &LOGITS[..]] {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let want = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
        let got = logsumexp(row);
        assert!((got - want).abs() < 1e-6 * want.abs().max(1.0), "{got} vs {want} over {} logits", row.len());
    }
}

#[test]
fn logit_bias_shifts_the_logits_before_choosing() {
    // Token 3 (3.0) is greedy's choice; -1.5 on it leaves 5 (2.9) on top; +10 on 4 forces it.
    let greedy = |bias: Vec<(u32, f32)>| draws(SamplingParams { logit_bias: bias, ..SamplingParams::greedy() }, 3);
    assert_eq!(greedy(vec![(3, -1.5)]), vec![5; 3]);
    assert_eq!(greedy(vec![(3, -1.5), (5, -100.0)]), vec![0; 3]);
    assert!(draws(seeded(SamplingParams { logit_bias: vec![(4, 100.0)], ..Default::default() }), 50)
        .iter()
        .all(|&t| t == 4));
    // An id outside this vocabulary is ignored here (the server refuses it up front), and the
    // reported log-probability is the raw distribution's.
    let mut s =
        Sampler::new(SamplingParams { logit_bias: vec![(4, 100.0), (99, 5.0)], ..SamplingParams::greedy() }, &[], 0)
            .unwrap();
    let out = s.sample(&LOGITS).unwrap();
    assert_eq!(out.token, 4);
    assert!((out.logprob - log_softmax(&LOGITS)[4]).abs() < 1e-6);
}

#[test]
fn invalid_parameters_name_the_field() {
    for (p, field) in [
        (SamplingParams { temperature: -1.0, ..Default::default() }, "temperature"),
        (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
        (SamplingParams { min_p: 1.5, ..Default::default() }, "min_p"),
        (SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty"),
        (SamplingParams { frequency_penalty: 3.0, ..Default::default() }, "frequency_penalty"),
        (SamplingParams { presence_penalty: f32::NAN, ..Default::default() }, "presence_penalty"),
        (SamplingParams { logit_bias: vec![(1, -100.5)], ..Default::default() }, "logit_bias"),
        (SamplingParams { logit_bias: vec![(1, f32::NAN)], ..Default::default() }, "logit_bias"),
    ] {
        let e = Sampler::new(p, &[], 0).unwrap_err().to_string();
        assert!(e.contains(&format!("`{field}`")), "{e}");
    }
}

#[test]
fn top_n_and_logprobs_of_agree_with_sorting_the_log_softmax() {
    // Many ties (values from a small set), so the lower-index-first rule is exercised.
    let row: Vec<f32> = (0..5_000u64).map(|i| ((i * 2_654_435_761) % 97) as f32 / 8.0 - 6.0).collect();
    let lp = log_softmax(&row);
    let mut sorted: Vec<(u32, f32)> = lp.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    for n in [1, 2, 5, 16, 17, 40] {
        let ids = |v: &[(u32, f32)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(ids(&top_n(&row, n)), ids(&sorted[..n]), "top {n}");
        for id in [0u32, 7, 4_999] {
            let (own, top) = logprobs_of(&row, id, n);
            assert_eq!(own, lp[id as usize]);
            assert_eq!(top, sorted[..n].to_vec());
        }
    }
    assert_eq!(top_n(&row[..3], 16).len(), 3);
    assert_eq!(logprobs_of(&row, 9_999, 0), (f32::NEG_INFINITY, vec![]));
}
