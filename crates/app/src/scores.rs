//! Metrics with lm-evaluation-harness's definitions, filters for generations, and aggregation
//! with standard errors.
//!
//! - `acc`: the gold choice has the highest log-likelihood (multiple choice), or the target is
//!   the greedy continuation (loglikelihood).
//! - `acc_norm`: the same with log-likelihoods divided by each choice's length in characters.
//! - `exact_match`: the (filtered) generation equals the target, optionally ignoring case,
//!   punctuation and regexes.
//! - `perplexity`: `exp(−mean log-likelihood)` of targets.
//! - `word_perplexity`, `byte_perplexity`, `bits_per_byte`: from a rolling log-likelihood over
//!   whole documents, `exp(−Σ ll / Σ words)`, `exp(−Σ ll / Σ bytes)`, `−Σ ll / Σ bytes / ln 2`.
//!
//! - `f1`: SQuAD's token F1 (lower-cased, punctuation and articles removed), 0–1.
//! - `bleu`: sacreBLEU's corpus BLEU (13a tokenisation, 4-grams, `exp` smoothing), 0–100.
//! - `chrf`: sacreBLEU's corpus chrF (character 6-grams, β = 2, whitespace ignored), 0–100.
//! - `rougeL`: `rouge_score`'s ROUGE-L F-measure (longest common subsequence of lower-cased
//!   alphanumeric tokens), averaged over documents, 0–100 (as lm-eval's TruthfulQA reports it).
//!
//! Every metric is computed from per-document statistics ([`Stats`]): a mean metric keeps one
//! score per document, a corpus metric its sufficient statistics (log-likelihood and length,
//! n-gram counts), and [`aggregate`] turns any subset of documents into the reported value — so
//! the bootstrap and the paired comparison of two runs resample documents the same way for
//! every metric. Means get the closed-form standard error (sample standard deviation over √n);
//! corpus-level metrics a seeded bootstrap over documents.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use regex::Regex;

use crate::schema::{FilterStep, MetricSpec, OutputType};

/// Metrics each output type can compute.
pub fn metrics_for(t: OutputType) -> &'static [&'static str] {
    match t {
        OutputType::Loglikelihood => &["perplexity", "acc"],
        OutputType::MultipleChoice => &["acc", "acc_norm"],
        OutputType::GenerateUntil => &["exact_match", "f1", "bleu", "chrf", "rougeL", "reward"],
        OutputType::LoglikelihoodRolling => &["word_perplexity", "byte_perplexity", "bits_per_byte"],
    }
}

/// An error unless `metric` is computable for `t`.
pub fn check_metric(metric: &str, t: OutputType) -> Result<(), String> {
    if metrics_for(t).contains(&metric) {
        Ok(())
    } else {
        Err(format!("`{metric}` is not available for {t:?} tasks (available: {})", metrics_for(t).join(", ")))
    }
}

/// An error unless the filter step is supported and well-formed.
pub fn check_filter(s: &FilterStep) -> Result<(), String> {
    match s.function.as_str() {
        "regex" => {
            let p = s.regex_pattern.as_deref().ok_or("regex needs regex_pattern")?;
            Regex::new(p).map(|_| ()).map_err(|e| format!("regex_pattern: {e}"))
        }
        "take_first" | "lowercase" | "uppercase" | "strip" => Ok(()),
        other => {
            Err(format!("filter function `{other}` is not supported (regex, take_first, lowercase, uppercase, strip)"))
        }
    }
}

/// Applies a filter pipeline to one generation.
pub fn apply_filters(steps: &[FilterStep], text: &str) -> String {
    let mut t = text.to_owned();
    for s in steps {
        t = match s.function.as_str() {
            "regex" => {
                let re = Regex::new(s.regex_pattern.as_deref().unwrap_or("")).expect("checked at load");
                let matches: Vec<String> = re
                    .captures_iter(&t)
                    .map(|c| c.get(1).or_else(|| c.get(0)).map_or(String::new(), |m| m.as_str().to_owned()))
                    .collect();
                let sel = s.group_select.unwrap_or(0);
                let idx = if sel < 0 { matches.len() as i64 + sel } else { sel };
                match usize::try_from(idx).ok().and_then(|i| matches.get(i)) {
                    Some(m) => m.clone(),
                    None => s.fallback.clone().unwrap_or_else(|| "[invalid]".into()),
                }
            }
            "lowercase" => t.to_lowercase(),
            "uppercase" => t.to_uppercase(),
            "strip" => t.trim().to_owned(),
            _ => t, // take_first: one response per document
        };
    }
    t
}

/// lm-eval's `exact_match` with its options.
pub fn exact_match(pred: &str, target: &str, spec: Option<&MetricSpec>) -> f64 {
    let norm = |s: &str| {
        let mut s = s.to_owned();
        if let Some(m) = spec {
            for r in &m.regexes_to_ignore {
                if let Ok(re) = Regex::new(r) {
                    s = re.replace_all(&s, "").into_owned();
                }
            }
            if m.ignore_case {
                s = s.to_lowercase();
            }
            if m.ignore_punctuation {
                s.retain(|c| !c.is_ascii_punctuation());
            }
        }
        s
    };
    f64::from(u8::from(norm(pred) == norm(target)))
}

/// Mean and its standard error.
pub fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// One document's statistics for one metric (see [`aggregate`]).
pub type Stats = Vec<f64>;

/// How a metric's per-document statistics combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregation {
    /// The mean of one score per document.
    Mean,
    /// `exp(−Σ ll / n)` over `[ll]`.
    Perplexity,
    /// `exp(−Σ ll / Σ len)` over `[ll, len]` (words or bytes).
    PerUnitPerplexity,
    /// `−Σ ll / Σ bytes / ln 2` over `[ll, bytes]`.
    BitsPerByte,
    /// Corpus BLEU from `[sys_len, ref_len, correct₁..₄, total₁..₄]`.
    Bleu,
    /// Corpus chrF from `[hyp, ref, match] × 6` character orders.
    Chrf,
}

/// The aggregation of a metric (any name not listed is a mean, e.g. assertions).
pub fn aggregation(metric: &str) -> Aggregation {
    match metric {
        "perplexity" => Aggregation::Perplexity,
        "word_perplexity" | "byte_perplexity" => Aggregation::PerUnitPerplexity,
        "bits_per_byte" => Aggregation::BitsPerByte,
        "bleu" => Aggregation::Bleu,
        "chrf" => Aggregation::Chrf,
        _ => Aggregation::Mean,
    }
}

/// Whether a larger value of `metric` is better.
pub fn higher_is_better(metric: &str) -> bool {
    !matches!(aggregation(metric), Aggregation::Perplexity | Aggregation::PerUnitPerplexity | Aggregation::BitsPerByte)
}

/// The metric's value over the documents whose statistics are given.
pub fn aggregate<'a>(how: Aggregation, docs: impl IntoIterator<Item = &'a Stats>) -> f64 {
    let mut sum: Vec<f64> = Vec::new();
    let mut n = 0usize;
    for d in docs {
        if sum.len() < d.len() {
            sum.resize(d.len(), 0.0);
        }
        for (s, x) in sum.iter_mut().zip(d) {
            *s += x;
        }
        n += 1;
    }
    if n == 0 {
        return f64::NAN;
    }
    let at = |i: usize| sum.get(i).copied().unwrap_or(0.0);
    match how {
        Aggregation::Mean => at(0) / n as f64,
        Aggregation::Perplexity => (-at(0) / n as f64).exp(),
        Aggregation::PerUnitPerplexity => (-at(0) / at(1)).exp(),
        Aggregation::BitsPerByte => -at(0) / at(1) / std::f64::consts::LN_2,
        Aggregation::Bleu => bleu_from_stats(&sum),
        Aggregation::Chrf => chrf_from_stats(&sum),
    }
}

/// The value and standard error of a metric over per-document statistics: closed form for
/// means, otherwise the standard deviation of `iters` seeded bootstrap resamples.
pub fn value_stderr(how: Aggregation, docs: &[Stats], iters: usize, seed: u64) -> (f64, f64) {
    let value = aggregate(how, docs);
    if how == Aggregation::Mean {
        let xs: Vec<f64> = docs.iter().map(|d| d.first().copied().unwrap_or(f64::NAN)).collect();
        return mean_stderr(&xs);
    }
    if docs.len() < 2 || iters < 2 {
        return (value, f64::NAN);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = docs.len();
    let samples: Vec<f64> = (0..iters).map(|_| aggregate(how, (0..n).map(|_| &docs[rng.random_range(0..n)]))).collect();
    let m = samples.iter().sum::<f64>() / iters as f64;
    let sd = (samples.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (iters as f64 - 1.0)).sqrt();
    (value, sd)
}

/// SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces.
fn squad_normalize(s: &str) -> Vec<String> {
    static ARTICLES: std::sync::LazyLock<Regex> =
        std::sync::LazyLock::new(|| Regex::new(r"\b(a|an|the)\b").expect("valid regex"));
    let lower: String = s.to_lowercase().chars().filter(|c| !c.is_ascii_punctuation()).collect();
    ARTICLES.replace_all(&lower, " ").split_whitespace().map(str::to_owned).collect()
}

/// Token-level F1 between a prediction and a reference (SQuAD's definition), 0–1.
pub fn token_f1(pred: &str, target: &str) -> f64 {
    let (p, t) = (squad_normalize(pred), squad_normalize(target));
    if p.is_empty() || t.is_empty() {
        return f64::from(u8::from(p == t));
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for w in &t {
        *counts.entry(w).or_default() += 1;
    }
    let mut same = 0usize;
    for w in &p {
        if let Some(c) = counts.get_mut(w.as_str()).filter(|c| **c > 0) {
            *c -= 1;
            same += 1;
        }
    }
    if same == 0 {
        return 0.0;
    }
    let (precision, recall) = (same as f64 / p.len() as f64, same as f64 / t.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

/// sacreBLEU's `13a` tokeniser (mteval-v13a).
fn tokenize_13a(line: &str) -> Vec<String> {
    static RULES: std::sync::LazyLock<[(Regex, &str); 4]> = std::sync::LazyLock::new(|| {
        [
            (Regex::new(r"([\x7B-\x7E\x5B-\x60\x20-\x26\x28-\x2B\x3A-\x40/])").expect("valid"), " $1 "),
            (Regex::new(r"([^0-9])([\.,])").expect("valid"), "$1 $2 "),
            (Regex::new(r"([\.,])([^0-9])").expect("valid"), " $1 $2"),
            (Regex::new(r"([0-9])(-)").expect("valid"), "$1 $2 "),
        ]
    });
    let mut s = line.trim_end().replace("<skipped>", "").replace("-\n", "").replace('\n', " ");
    if s.contains('&') {
        s = s.replace("&quot;", "\"").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">");
    }
    let mut s = format!(" {s} ");
    for (re, rep) in RULES.iter() {
        s = re.replace_all(&s, *rep).into_owned();
    }
    s.split_whitespace().map(str::to_owned).collect()
}

fn ngram_counts<T: std::hash::Hash + Eq + Clone>(xs: &[T], n: usize) -> HashMap<Vec<T>, usize> {
    let mut m = HashMap::new();
    if xs.len() >= n {
        for w in xs.windows(n) {
            *m.entry(w.to_vec()).or_default() += 1;
        }
    }
    m
}

/// One sentence's BLEU statistics: `[sys_len, ref_len, correct₁..₄, total₁..₄]`.
pub fn bleu_stats(pred: &str, target: &str) -> Stats {
    let (h, r) = (tokenize_13a(pred), tokenize_13a(target));
    let mut s = vec![h.len() as f64, r.len() as f64];
    let (mut correct, mut total) = (Vec::new(), Vec::new());
    for n in 1..=4 {
        let (hc, rc) = (ngram_counts(&h, n), ngram_counts(&r, n));
        total.push(hc.values().sum::<usize>() as f64);
        correct.push(hc.iter().map(|(g, c)| (*c).min(rc.get(g).copied().unwrap_or(0))).sum::<usize>() as f64);
    }
    s.extend(correct);
    s.extend(total);
    s
}

/// Corpus BLEU (0–100) from summed [`bleu_stats`], with sacreBLEU's default `exp` smoothing.
pub fn bleu_from_stats(s: &[f64]) -> f64 {
    let at = |i: usize| s.get(i).copied().unwrap_or(0.0);
    let (sys, reference) = (at(0), at(1));
    if (2..6).all(|i| at(i) == 0.0) {
        return 0.0;
    }
    let bp = if sys < reference {
        if sys > 0.0 {
            (1.0 - reference / sys).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let mut smooth = 1.0;
    let mut logs = 0.0;
    for n in 0..4 {
        let (correct, total) = (at(2 + n), at(6 + n));
        let p = if total == 0.0 {
            0.0
        } else if correct == 0.0 {
            smooth *= 2.0;
            100.0 / (smooth * total)
        } else {
            100.0 * correct / total
        };
        logs += if p > 0.0 { p.ln() } else { -9_999_999_999.0 };
    }
    bp * (logs / 4.0).exp()
}

/// One sentence's chrF statistics: `[hyp, ref, match]` for character n-grams of orders 1–6
/// (whitespace removed).
pub fn chrf_stats(pred: &str, target: &str) -> Stats {
    let squeeze = |s: &str| s.split_whitespace().collect::<String>().chars().collect::<Vec<char>>();
    let (h, r) = (squeeze(pred), squeeze(target));
    let mut s = Vec::with_capacity(18);
    for n in 1..=6 {
        let (hc, rc) = (ngram_counts(&h, n), ngram_counts(&r, n));
        let matched: usize = hc.iter().map(|(g, c)| (*c).min(rc.get(g).copied().unwrap_or(0))).sum();
        s.extend([hc.values().sum::<usize>() as f64, rc.values().sum::<usize>() as f64, matched as f64]);
    }
    s
}

/// Corpus chrF (β = 2, 0–100) from summed [`chrf_stats`], as sacreBLEU 2 computes it.
pub fn chrf_from_stats(s: &[f64]) -> f64 {
    let factor = 4.0; // β²
    let (mut prec, mut rec, mut order) = (0.0, 0.0, 0usize);
    for n in 0..6 {
        let at = |i: usize| s.get(3 * n + i).copied().unwrap_or(0.0);
        let (hyp, reference, matched) = (at(0), at(1), at(2));
        if hyp > 0.0 && reference > 0.0 {
            prec += matched / hyp;
            rec += matched / reference;
            order += 1;
        }
    }
    if order == 0 {
        return 0.0;
    }
    let (p, r) = (prec / order as f64, rec / order as f64);
    if p + r == 0.0 {
        return 0.0;
    }
    100.0 * (1.0 + factor) * p * r / (factor * p + r)
}

/// ROUGE-L F-measure (0–100) as `rouge_score` computes it without stemming.
pub fn rouge_l(pred: &str, target: &str) -> f64 {
    static NON_ALNUM: std::sync::LazyLock<Regex> =
        std::sync::LazyLock::new(|| Regex::new(r"[^a-z0-9]+").expect("valid regex"));
    let toks = |s: &str| -> Vec<String> {
        NON_ALNUM.replace_all(&s.to_lowercase(), " ").split_whitespace().map(str::to_owned).collect()
    };
    let (p, t) = (toks(pred), toks(target));
    if p.is_empty() || t.is_empty() {
        return 0.0;
    }
    let mut row = vec![0usize; p.len() + 1];
    for tw in &t {
        let mut diag = 0;
        for (j, pw) in p.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if tw == pw { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    let lcs = row[p.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (precision, recall) = (lcs / p.len() as f64, lcs / t.len() as f64);
    100.0 * 2.0 * precision * recall / (precision + recall)
}

/// Words as lm-eval counts them for `word_perplexity` (whitespace-separated).
pub fn count_words(s: &str) -> usize {
    s.split_whitespace().count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_stderr_closed_form() {
        let (m, se) = mean_stderr(&[1.0, 0.0, 1.0, 1.0]);
        assert_eq!(m, 0.75);
        assert!((se - (0.25f64 / 4.0).sqrt()).abs() < 1e-12, "{se}");
    }

    #[test]
    fn exact_match_options() {
        let spec: MetricSpec = serde_json::from_value(serde_json::json!({
            "metric": "exact_match", "ignore_case": true, "ignore_punctuation": true, "regexes_to_ignore": ["^The "]
        }))
        .unwrap();
        assert_eq!(exact_match("The Answer!", "answer", Some(&spec)), 1.0);
        assert_eq!(exact_match("The Answer!", "answer", None), 0.0);
    }

    #[test]
    fn filters_select_regex_groups() {
        let steps: Vec<FilterStep> = serde_json::from_value(serde_json::json!([
            {"function": "regex", "regex_pattern": "answer is (\\d+)", "group_select": -1},
            {"function": "strip"}
        ]))
        .unwrap();
        assert_eq!(apply_filters(&steps, "answer is 3, no, the answer is 42."), "42");
        assert_eq!(apply_filters(&steps, "no idea"), "[invalid]");
    }

    #[test]
    fn bootstrap_is_seeded_and_centred() {
        let docs: Vec<Stats> = (0..50).map(|i| vec![-(i as f64 % 7.0) - 1.0, 3.0]).collect();
        let (v, se) = value_stderr(Aggregation::BitsPerByte, &docs, 500, 1);
        assert_eq!(value_stderr(Aggregation::BitsPerByte, &docs, 500, 1), (v, se));
        assert!((v - 4.0 * 50.0 / 150.0 / std::f64::consts::LN_2).abs() < 0.05, "{v}");
        assert!(se > 0.0 && se < v / 5.0, "{v} ± {se}");
    }
}
