//! Text-overlap metrics against their reference implementations (sacreBLEU 2.6, rouge_score,
//! the SQuAD script), from `tests/data/make_text_metrics.py`.

use lmstack_app::scores::{aggregate, bleu_stats, chrf_stats, rouge_l, token_f1, Aggregation, Stats};
use serde_json::Value;

fn golden() -> Value {
    serde_json::from_str(include_str!("data/text_metrics.json")).unwrap()
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() < 1e-9 * b.abs().max(1.0), "{what}: {a} vs reference {b}");
}

#[test]
fn sentence_scores_match_the_reference_implementations() {
    let g = golden();
    for c in g["cases"].as_array().unwrap() {
        let (p, r) = (c["pred"].as_str().unwrap(), c["ref"].as_str().unwrap());
        close(token_f1(p, r), c["f1"].as_f64().unwrap(), &format!("f1 {p:?}"));
        close(rouge_l(p, r), c["rougeL"].as_f64().unwrap(), &format!("rougeL {p:?}"));
        close(aggregate(Aggregation::Bleu, [&bleu_stats(p, r)]), c["bleu"].as_f64().unwrap(), &format!("bleu {p:?}"));
        close(aggregate(Aggregation::Chrf, [&chrf_stats(p, r)]), c["chrf"].as_f64().unwrap(), &format!("chrf {p:?}"));
    }
}

#[test]
fn corpus_scores_sum_statistics_before_scoring() {
    let g = golden();
    let cases = g["cases"].as_array().unwrap();
    let pr = |c: &Value| (c["pred"].as_str().unwrap().to_owned(), c["ref"].as_str().unwrap().to_owned());
    let bleu: Vec<Stats> = cases.iter().map(pr).map(|(p, r)| bleu_stats(&p, &r)).collect();
    let chrf: Vec<Stats> = cases.iter().map(pr).map(|(p, r)| chrf_stats(&p, &r)).collect();
    close(aggregate(Aggregation::Bleu, &bleu), g["corpus_bleu"].as_f64().unwrap(), "corpus bleu");
    close(aggregate(Aggregation::Chrf, &chrf), g["corpus_chrf"].as_f64().unwrap(), "corpus chrf");
    // Not the mean of sentence scores.
    let mean: f64 = cases.iter().map(|c| c["bleu"].as_f64().unwrap()).sum::<f64>() / cases.len() as f64;
    assert!((mean - g["corpus_bleu"].as_f64().unwrap()).abs() > 1.0);
}
