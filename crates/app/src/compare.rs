//! Paired comparison of two eval runs on the same documents: is a difference real?
//!
//! Both runs' per-sample statistics (`samples_<task>.jsonl`, field `scores`) are joined on
//! `doc_id`. For every metric both runs report:
//! - the 95% interval of `B − A` from a **paired bootstrap** (the same resampled documents for
//!   both runs, so per-document difficulty cancels), for any metric — means and corpus-level
//!   ones alike, since each resample is re-aggregated;
//! - a p-value: **McNemar's exact test** on the discordant documents when the metric is a 0/1
//!   score per document (accuracy, exact match, assertions), otherwise the paired bootstrap's
//!   two-sided p;
//! - for a metric scored once per document, how often each run did better: B's **win rate**
//!   (documents where B scores better, ties counted half, over all documents). With the
//!   `reward` metric it is the share of prompts whose B answer the reward model prefers, which
//!   is only compared when both runs were scored by the same reward model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;

use crate::scores::{aggregate, aggregation, higher_is_better, Aggregation, Stats};

/// A finished run read back from its output folder.
#[derive(Debug, Clone)]
pub struct Run {
    /// The folder.
    pub dir: PathBuf,
    /// `results.json`.
    pub results: Value,
    /// Task → its per-document samples, in file order.
    pub samples: BTreeMap<String, Vec<Value>>,
}

impl Run {
    /// Reads `results.json` and every task's `samples_<task>.jsonl` from `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let rf = dir.join("results.json");
        let text = std::fs::read_to_string(&rf)
            .with_context(|| format!("{}: not an eval run folder (no readable results.json)", dir.display()))?;
        let results: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", rf.display()))?;
        let tasks = results["results"].as_object().ok_or_else(|| anyhow!("{}: no `results` object", rf.display()))?;
        let mut samples = BTreeMap::new();
        for task in tasks.keys() {
            let f = dir.join(format!("samples_{task}.jsonl"));
            let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            let mut docs = Vec::new();
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                docs.push(serde_json::from_str::<Value>(line).with_context(|| format!("{}:{}", f.display(), i + 1))?);
            }
            samples.insert(task.clone(), docs);
        }
        Ok(Self { dir: dir.to_owned(), results, samples })
    }

    /// The model the run evaluated.
    pub fn model(&self) -> String {
        self.results["config"]["model_args"].as_str().unwrap_or("?").to_owned()
    }
}

/// A sample's statistics for `key` (`metric,filter`).
pub fn sample_stats(sample: &Value, key: &str) -> Option<Stats> {
    match sample["scores"].get(key)? {
        Value::Number(n) => Some(vec![n.as_f64()?]),
        Value::Array(a) => a.iter().map(Value::as_f64).collect(),
        _ => None,
    }
}

/// One metric of one task compared.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Task.
    pub task: String,
    /// Metric.
    pub metric: String,
    /// Filter.
    pub filter: String,
    /// Documents in both runs.
    pub n: usize,
    /// Run A's value on those documents.
    pub a: f64,
    /// Run B's value.
    pub b: f64,
    /// 95% paired-bootstrap interval of `b − a`.
    pub ci: (f64, f64),
    /// Two-sided p-value of "no difference".
    pub p: f64,
    /// `McNemar` or `paired bootstrap`.
    pub test: String,
    /// Whether larger is better for this metric.
    pub higher_is_better: bool,
    /// Documents where B did better, where A did, and ties (metrics scored once per document).
    pub wins: Option<(usize, usize, usize)>,
}

impl Comparison {
    /// `b − a`.
    pub fn diff(&self) -> f64 {
        self.b - self.a
    }

    /// B's win rate: documents where B did better, ties counted half, over all of them.
    pub fn win_rate(&self) -> Option<f64> {
        let (b, a, t) = self.wins?;
        let n = (a + b + t) as f64;
        (n > 0.0).then(|| (b as f64 + t as f64 / 2.0) / n)
    }

    /// The win rate and its counts for people (`0.670 (64/30/6)`), or `—`.
    pub fn wins_text(&self) -> String {
        match (self.win_rate(), self.wins) {
            (Some(r), Some((b, a, t))) => format!("{r:.3} ({b}/{a}/{t})"),
            _ => "—".into(),
        }
    }

    /// In words: which run is better, or that the difference may be chance (at `alpha`).
    pub fn verdict(&self, alpha: f64) -> &'static str {
        let significant = self.p < alpha;
        if !significant || self.diff() == 0.0 {
            "no significant difference"
        } else if (self.diff() > 0.0) == self.higher_is_better {
            "B better"
        } else {
            "A better"
        }
    }
}

/// Compares every metric both runs report for every task both ran.
pub fn compare(a: &Run, b: &Run, iters: usize, seed: u64) -> anyhow::Result<Vec<Comparison>> {
    let mut out = Vec::new();
    for (task, sa) in &a.samples {
        let Some(sb) = b.samples.get(task) else { continue };
        let by_id: BTreeMap<u64, &Value> = sb.iter().filter_map(|s| Some((s["doc_id"].as_u64()?, s))).collect();
        let pairs: Vec<(&Value, &Value)> =
            sa.iter().filter_map(|s| Some((s, *by_id.get(&s["doc_id"].as_u64()?)?))).collect();
        let Some((first, _)) = pairs.first() else { continue };
        let keys: Vec<String> = first["scores"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        for key in keys {
            let (metric, filter) = key.split_once(',').unwrap_or((&key, "none"));
            let mut xa = Vec::with_capacity(pairs.len());
            let mut xb = Vec::with_capacity(pairs.len());
            for (pa, pb) in &pairs {
                if let (Some(x), Some(y)) = (sample_stats(pa, &key), sample_stats(pb, &key)) {
                    xa.push(x);
                    xb.push(y);
                }
            }
            if xa.is_empty() {
                continue;
            }
            if metric == "reward" {
                let graders = |p: &Value| p["reward_model"].as_str().unwrap_or("?").to_owned();
                if let Some((pa, pb)) = pairs.iter().find(|(pa, pb)| graders(pa) != graders(pb)) {
                    anyhow::bail!(
                        "task {task}: `reward` was scored by different reward models ({} in A, {} in B, doc {}); rescore both runs with the same --reward-model",
                        graders(pa),
                        graders(pb),
                        pa["doc_id"]
                    );
                }
            }
            out.push(compare_metric(task, metric, filter, &xa, &xb, iters, seed));
        }
    }
    if out.is_empty() {
        anyhow::bail!(
            "{} and {} have no task and metric in common on the same documents",
            a.dir.display(),
            b.dir.display()
        );
    }
    Ok(out)
}

/// Compares one metric given both runs' statistics on the same documents, in the same order.
pub fn compare_metric(
    task: &str,
    metric: &str,
    filter: &str,
    xa: &[Stats],
    xb: &[Stats],
    iters: usize,
    seed: u64,
) -> Comparison {
    let how = aggregation(metric);
    let (va, vb) = (aggregate(how, xa), aggregate(how, xb));
    let n = xa.len();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut diffs: Vec<f64> = (0..iters)
        .map(|_| {
            let idx: Vec<usize> = (0..n).map(|_| rng.random_range(0..n)).collect();
            aggregate(how, idx.iter().map(|&i| &xb[i])) - aggregate(how, idx.iter().map(|&i| &xa[i]))
        })
        .filter(|d| d.is_finite())
        .collect();
    diffs.sort_by(f64::total_cmp);
    let q = |p: f64| diffs.get(((diffs.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    let ci = (q(0.025), q(0.975));
    let binary = xa.iter().chain(xb).all(|s| s.len() == 1 && (s[0] == 0.0 || s[0] == 1.0));
    let (p, test) = if binary {
        let b = xa.iter().zip(xb).filter(|(x, y)| x[0] == 1.0 && y[0] == 0.0).count();
        let c = xa.iter().zip(xb).filter(|(x, y)| x[0] == 0.0 && y[0] == 1.0).count();
        (mcnemar_exact(b, c), "McNemar")
    } else {
        let m = diffs.len().max(1) as f64;
        let le = diffs.iter().filter(|d| **d <= 0.0).count() as f64 / m;
        let ge = diffs.iter().filter(|d| **d >= 0.0).count() as f64 / m;
        ((2.0 * le.min(ge)).min(1.0), "paired bootstrap")
    };
    // Per-document scores of a mean metric are the metric itself (higher is better); a
    // corpus-level metric's statistics are not comparable document by document.
    let per_doc = how == Aggregation::Mean && xa.iter().chain(xb).all(|s| s.len() == 1);
    let wins = per_doc.then(|| {
        let b = xa.iter().zip(xb).filter(|(x, y)| y[0] > x[0]).count();
        let a = xa.iter().zip(xb).filter(|(x, y)| x[0] > y[0]).count();
        (b, a, n - a - b)
    });
    Comparison {
        task: task.to_owned(),
        metric: metric.to_owned(),
        filter: filter.to_owned(),
        n,
        a: va,
        b: vb,
        ci,
        p,
        test: test.to_owned(),
        higher_is_better: higher_is_better(metric),
        wins,
    }
}

/// McNemar's exact test: two-sided binomial p of `b` vs `c` discordant pairs under p = ½.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // log P(X = i) for X ~ Bin(n, ½), summed in log space (n may be large).
    let mut log_p = n as f64 * 0.5f64.ln();
    let mut terms = Vec::with_capacity(k + 1);
    for i in 0..=k {
        terms.push(log_p);
        log_p += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
    }
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let tail = max.exp() * terms.iter().map(|t| (t - max).exp()).sum::<f64>();
    (2.0 * tail).min(1.0)
}

/// A p-value for people: three decimals, or `<0.001`.
pub fn fmt_p(p: f64) -> String {
    if p < 0.001 {
        "<0.001".into()
    } else {
        format!("{p:.3}")
    }
}

/// A Markdown table of comparisons.
pub fn markdown(cs: &[Comparison], alpha: f64) -> String {
    let mut s = String::from(
        "| task | metric | filter | n | A | B | B − A | 95% CI | p | test | B wins (B/A/tie) | verdict |\n\
         | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | --- |\n",
    );
    for c in cs {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.4} | {:.4} | {:+.4} | [{:+.4}, {:+.4}] | {} | {} | {} | {} |\n",
            c.task,
            c.metric,
            c.filter,
            c.n,
            c.a,
            c.b,
            c.diff(),
            c.ci.0,
            c.ci.1,
            fmt_p(c.p),
            c.test,
            c.wins_text(),
            c.verdict(alpha)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcnemar_matches_the_binomial() {
        // b = 1, c = 9: 2 · (C(10,0) + C(10,1)) / 2¹⁰ = 22/1024.
        assert!((mcnemar_exact(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert!(mcnemar_exact(0, 2000) < 1e-300 || mcnemar_exact(0, 2000) == 0.0);
        assert!(mcnemar_exact(480, 520) > 0.2);
    }

    #[test]
    fn paired_tests_find_real_differences_only() {
        // B fixes 30 of 100 items A got wrong and breaks none: real.
        let a: Vec<Stats> = (0..100).map(|i| vec![f64::from(u8::from(i % 2 == 0))]).collect();
        let b: Vec<Stats> = (0..100).map(|i| vec![f64::from(u8::from(i % 2 == 0 || i % 10 < 6))]).collect();
        let c = compare_metric("t", "acc", "none", &a, &b, 1000, 1);
        assert_eq!(c.test, "McNemar");
        assert!(c.p < 1e-6 && c.ci.0 > 0.0, "{c:?}");
        assert_eq!(c.verdict(0.05), "B better");
        // Same accuracy, different items: not real.
        let b2: Vec<Stats> = (0..100).map(|i| vec![f64::from(u8::from(i % 2 == 1))]).collect();
        let c2 = compare_metric("t", "acc", "none", &a, &b2, 1000, 1);
        assert_eq!(c2.verdict(0.05), "no significant difference");
        // Lower is better for bits per byte; the bootstrap handles ratio metrics.
        let ra: Vec<Stats> = (0..50).map(|i| vec![-2.0 - (i % 3) as f64, 2.0]).collect();
        let rb: Vec<Stats> = ra.iter().map(|s| vec![s[0] + 0.5, 2.0]).collect();
        let c3 = compare_metric("t", "bits_per_byte", "none", &ra, &rb, 1000, 1);
        assert_eq!(c3.test, "paired bootstrap");
        assert!(c3.diff() < 0.0 && c3.p < 0.01, "{c3:?}");
        assert_eq!(c3.verdict(0.05), "B better");
        assert_eq!(c3.wins, None, "a ratio metric's statistics are not per-document scores");
        // McNemar's discordant pairs are the wins of a 0/1 metric.
        assert_eq!(c.wins, Some((30, 0, 70)));
        assert!((c.win_rate().unwrap() - 0.65).abs() < 1e-12);
    }

    #[test]
    fn rewards_compare_by_win_rate_when_one_model_scored_both() {
        // B's answer gets the higher reward on 60 documents, A's on 30, 10 tie.
        let a: Vec<Stats> = (0..100).map(|i| vec![f64::from(i % 7)]).collect();
        let b: Vec<Stats> = a
            .iter()
            .enumerate()
            .map(|(i, s)| vec![s[0] + [1.5, -0.5, 0.0][usize::from(i % 10 >= 6) + usize::from(i % 10 >= 9)]])
            .collect();
        let c = compare_metric("t", "reward", "none", &a, &b, 1000, 1);
        assert_eq!(c.wins, Some((60, 30, 10)));
        assert_eq!(c.wins_text(), "0.650 (60/30/10)");
        assert_eq!(c.test, "paired bootstrap");
        let run = |model: &str, scores: &[Stats]| {
            Run {
            dir: PathBuf::from(model),
            results: serde_json::json!({}),
            samples: BTreeMap::from([(
                "t".to_owned(),
                scores
                    .iter()
                    .enumerate()
                    .map(|(i, s)| serde_json::json!({"doc_id": i, "scores": {"reward,none": s[0]}, "reward_model": model}))
                    .collect(),
            )]),
        }
        };
        let cs = compare(&run("rm", &a), &run("rm", &b), 200, 1).unwrap();
        assert_eq!(cs[0].wins, Some((60, 30, 10)));
        let e = compare(&run("rm", &a), &run("other-rm", &b), 200, 1).unwrap_err().to_string();
        assert!(e.contains("different reward models") && e.contains("other-rm"), "{e}");
    }
}
