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
//! Means get the closed-form standard error (sample standard deviation over √n); the
//! corpus-level ratios a seeded bootstrap over documents.

use rand::{Rng, SeedableRng};
use regex::Regex;

use crate::task::{FilterStep, MetricSpec, OutputType};

/// Metrics each output type can compute.
pub fn metrics_for(t: OutputType) -> &'static [&'static str] {
    match t {
        OutputType::Loglikelihood => &["perplexity", "acc"],
        OutputType::MultipleChoice => &["acc", "acc_norm"],
        OutputType::GenerateUntil => &["exact_match"],
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

/// A corpus-level statistic `f(Σ a, Σ b)` over per-document pairs, with a bootstrap standard
/// error (`iters` resamples, seeded).
pub fn ratio_stderr(pairs: &[(f64, f64)], f: impl Fn(f64, f64) -> f64, iters: usize, seed: u64) -> (f64, f64) {
    let total = |it: &mut dyn Iterator<Item = (f64, f64)>| it.fold((0.0, 0.0), |acc, (a, b)| (acc.0 + a, acc.1 + b));
    let (a, b) = total(&mut pairs.iter().copied());
    let value = f(a, b);
    if pairs.len() < 2 || iters == 0 {
        return (value, f64::NAN);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = pairs.len();
    let samples: Vec<f64> = (0..iters)
        .map(|_| {
            let (a, b) = total(&mut (0..n).map(|_| pairs[rng.random_range(0..n)]));
            f(a, b)
        })
        .collect();
    let m = samples.iter().sum::<f64>() / iters as f64;
    let sd = (samples.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (iters as f64 - 1.0)).sqrt();
    (value, sd)
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
        let pairs: Vec<(f64, f64)> = (0..50).map(|i| (-(i as f64 % 7.0) - 1.0, 3.0)).collect();
        let bpb = |ll: f64, bytes: f64| -ll / bytes / std::f64::consts::LN_2;
        let (v, se) = ratio_stderr(&pairs, bpb, 500, 1);
        assert_eq!(ratio_stderr(&pairs, bpb, 500, 1), (v, se));
        assert!(se > 0.0 && se < v / 5.0, "{v} ± {se}");
    }
}
