//! Running tasks and suites: requests to a [`Backend`], per-sample records, metrics with
//! standard errors, lm-eval-shaped results, Markdown summaries and threshold checks.
//!
//! A suite is a YAML file:
//!
//! ```yaml
//! name: shakespeare
//! tasks: [val_perplexity.yaml, cloze.yaml]     # task files, relative to the suite
//! thresholds:                                   # a metric outside its bound fails the run
//!   shakespeare_cloze: {acc: 0.4}               # at least
//!   shakespeare_val: {bits_per_byte: {max: 3.2}}
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::backend::Backend;
use crate::metrics::{self, apply_filters, exact_match, mean_stderr, ratio_stderr};
use crate::task::{OutputType, Task, TaskError};

/// Run settings.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Evaluate at most this many documents per task.
    pub limit: Option<usize>,
    /// Seed for few-shot sampling and the bootstrap.
    pub seed: u64,
    /// Bootstrap resamples for corpus-level metrics.
    pub bootstrap_iters: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self { limit: None, seed: 1234, bootstrap_iters: 1000 }
    }
}

/// One task's outcome.
#[derive(Debug, Clone)]
pub struct TaskResult {
    /// Task name.
    pub name: String,
    /// `metric,filter` → value, and `metric_stderr,filter` → standard error.
    pub metrics: BTreeMap<String, f64>,
    /// Per-document records (lm-eval's samples).
    pub samples: Vec<Value>,
}

impl TaskResult {
    /// The value of `metric` (under any filter; `none` first).
    pub fn get(&self, metric: &str) -> Option<f64> {
        self.metrics.get(&format!("{metric},none")).copied().or_else(|| {
            self.metrics
                .iter()
                .find(|(k, _)| k.split(',').next() == Some(metric) && !k.contains("_stderr"))
                .map(|(_, v)| *v)
        })
    }
}

fn metric_names(task: &Task) -> Vec<String> {
    if task.config.metric_list.is_empty() {
        metrics::metrics_for(task.config.output_type).iter().map(|s| s.to_string()).collect()
    } else {
        task.config.metric_list.iter().map(|m| m.metric.clone()).collect()
    }
}

/// Evaluates one task; `progress` is called with the number of documents done.
pub fn run_task(
    task: &Task,
    backend: &mut dyn Backend,
    opts: &EvalOptions,
    progress: &mut dyn FnMut(usize),
) -> anyhow::Result<TaskResult> {
    let n = opts.limit.map_or(task.docs.len(), |l| l.min(task.docs.len()));
    let names = metric_names(task);
    let mut samples = Vec::with_capacity(n);
    let mut per_metric: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut metrics = BTreeMap::new();
    let chunk = 64;
    let mut rolling: Vec<(f64, f64, f64)> = Vec::new(); // (ll, words, bytes)
    let mut ppl_ll: Vec<f64> = Vec::new();
    for start in (0..n).step_by(chunk) {
        let ids: Vec<usize> = (start..(start + chunk).min(n)).collect();
        match task.config.output_type {
            OutputType::MultipleChoice => {
                let mut reqs = Vec::new();
                let mut spans = Vec::new();
                for &i in &ids {
                    let ctx = task.context(i, opts.seed)?;
                    let choices = task.doc_to_choice(&task.docs[i])?;
                    let gold = task.gold_index(&task.docs[i], &choices)?;
                    spans.push((reqs.len(), choices.clone(), gold, ctx.clone()));
                    for c in &choices {
                        reqs.push((ctx.clone(), format!("{}{c}", task.target_delimiter())));
                    }
                }
                let lls = backend.loglikelihood(&reqs)?;
                for (&i, (at, choices, gold, ctx)) in ids.iter().zip(spans) {
                    let ll: Vec<f64> = lls[at..at + choices.len()].iter().map(|x| x.0).collect();
                    let best = argmax(&ll);
                    let norm: Vec<f64> =
                        ll.iter().zip(&choices).map(|(l, c)| l / c.chars().count().max(1) as f64).collect();
                    let acc = f64::from(u8::from(best == gold));
                    let acc_norm = f64::from(u8::from(argmax(&norm) == gold));
                    per_metric.entry("acc".into()).or_default().push(acc);
                    per_metric.entry("acc_norm".into()).or_default().push(acc_norm);
                    samples.push(json!({
                        "doc_id": i, "doc": task.docs[i], "target": gold, "arguments": {"context": ctx, "choices": choices},
                        "resps": ll, "acc": acc, "acc_norm": acc_norm,
                    }));
                }
            }
            OutputType::Loglikelihood => {
                let mut reqs = Vec::new();
                for &i in &ids {
                    let target = task.doc_to_target(&task.docs[i])?;
                    reqs.push((task.context(i, opts.seed)?, format!("{}{target}", task.target_delimiter())));
                }
                let lls = backend.loglikelihood(&reqs)?;
                for ((&i, (ctx, cont)), (ll, greedy)) in ids.iter().zip(&reqs).zip(lls) {
                    let acc = f64::from(u8::from(greedy));
                    per_metric.entry("acc".into()).or_default().push(acc);
                    ppl_ll.push(ll);
                    samples.push(json!({
                        "doc_id": i, "doc": task.docs[i], "target": cont, "arguments": {"context": ctx, "continuation": cont},
                        "resps": [ll, greedy], "acc": acc, "perplexity": ll,
                    }));
                }
            }
            OutputType::LoglikelihoodRolling => {
                let texts: Vec<String> =
                    ids.iter().map(|&i| task.doc_to_target(&task.docs[i])).collect::<Result<_, TaskError>>()?;
                let lls = backend.loglikelihood_rolling(&texts)?;
                for ((&i, text), ll) in ids.iter().zip(&texts).zip(lls) {
                    let (w, b) = (metrics::count_words(text) as f64, text.len() as f64);
                    rolling.push((ll, w, b));
                    samples.push(json!({
                        "doc_id": i, "doc": task.docs[i], "target": text, "resps": ll, "words": w, "bytes": b,
                    }));
                }
            }
            OutputType::GenerateUntil => {
                let mut reqs = Vec::new();
                for &i in &ids {
                    reqs.push((task.context(i, opts.seed)?, task.config.generation_kwargs.clone()));
                }
                let outs = backend.generate(&reqs)?;
                let filters: Vec<(String, Vec<crate::task::FilterStep>)> = if task.config.filter_list.is_empty() {
                    vec![("none".into(), Vec::new())]
                } else {
                    task.config.filter_list.iter().map(|f| (f.name.clone(), f.filter.clone())).collect()
                };
                let spec = task.config.metric_list.iter().find(|m| m.metric == "exact_match");
                for ((&i, (ctx, _)), out) in ids.iter().zip(&reqs).zip(outs) {
                    let target = task.doc_to_target(&task.docs[i])?;
                    let mut filtered = Map::new();
                    let mut scores = Map::new();
                    for (name, steps) in &filters {
                        let f = apply_filters(steps, &out);
                        let em = exact_match(&f, &target, spec);
                        per_metric.entry(format!("exact_match,{name}")).or_default().push(em);
                        filtered.insert(name.clone(), json!(f));
                        scores.insert(name.clone(), json!(em));
                    }
                    samples.push(json!({
                        "doc_id": i, "doc": task.docs[i], "target": target, "arguments": {"context": ctx},
                        "resps": [out], "filtered_resps": filtered, "exact_match": scores,
                    }));
                }
            }
        }
        progress(ids.len());
    }
    let ln2 = std::f64::consts::LN_2;
    let iters = opts.bootstrap_iters;
    for name in names {
        match name.as_str() {
            "acc" | "acc_norm" => {
                let (m, se) = mean_stderr(&per_metric[&name]);
                metrics.insert(format!("{name},none"), m);
                metrics.insert(format!("{name}_stderr,none"), se);
            }
            "exact_match" => {
                for (k, v) in per_metric.iter().filter(|(k, _)| k.starts_with("exact_match,")) {
                    let (m, se) = mean_stderr(v);
                    let filter = k.split_once(',').map_or("none", |x| x.1);
                    metrics.insert(k.clone(), m);
                    metrics.insert(format!("exact_match_stderr,{filter}"), se);
                }
            }
            "perplexity" => {
                let pairs: Vec<(f64, f64)> = ppl_ll.iter().map(|&l| (l, 1.0)).collect();
                let (v, se) = ratio_stderr(&pairs, |l, n| (-l / n).exp(), iters, opts.seed);
                metrics.insert("perplexity,none".into(), v);
                metrics.insert("perplexity_stderr,none".into(), se);
            }
            "word_perplexity" | "byte_perplexity" | "bits_per_byte" => {
                let pairs: Vec<(f64, f64)> =
                    rolling.iter().map(|&(l, w, b)| (l, if name == "word_perplexity" { w } else { b })).collect();
                let f = |l: f64, d: f64| match name.as_str() {
                    "bits_per_byte" => -l / d / ln2,
                    _ => (-l / d).exp(),
                };
                let (v, se) = ratio_stderr(&pairs, f, iters, opts.seed);
                metrics.insert(format!("{name},none"), v);
                metrics.insert(format!("{name}_stderr,none"), se);
            }
            other => anyhow::bail!("metric `{other}` cannot be computed"),
        }
    }
    Ok(TaskResult { name: task.config.task.clone(), metrics, samples })
}

fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// A threshold: a bare number is a minimum; `{min, max}` bounds either side.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Threshold {
    /// At least this.
    Min(f64),
    /// Explicit bounds.
    Bounds {
        /// At least.
        min: Option<f64>,
        /// At most.
        max: Option<f64>,
    },
}

/// A suite file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteConfig {
    /// Suite name.
    pub name: String,
    /// Task files, relative to the suite.
    pub tasks: Vec<PathBuf>,
    /// task → metric → bound.
    #[serde(default)]
    pub thresholds: BTreeMap<String, BTreeMap<String, Threshold>>,
}

/// A loaded suite.
#[derive(Debug)]
pub struct Suite {
    /// The config.
    pub config: SuiteConfig,
    /// Its tasks, loaded.
    pub tasks: Vec<Task>,
}

impl Suite {
    /// Loads a suite and every task in it; thresholds must name tasks of the suite.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        let config: SuiteConfig = serde_yaml_ng::from_str(&text).map_err(|e| {
            let at = e.location().map(|l| format!(":{}", l.line())).unwrap_or_default();
            anyhow::anyhow!("{file}{at}: {e}")
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let tasks = config.tasks.iter().map(|t| Task::load(&base.join(t))).collect::<Result<Vec<_>, _>>()?;
        for (t, ms) in &config.thresholds {
            let task = tasks
                .iter()
                .find(|x| &x.config.task == t)
                .ok_or_else(|| anyhow::anyhow!("{file}: thresholds: `{t}` is not a task of this suite"))?;
            for m in ms.keys() {
                if !metric_names(task).contains(m) {
                    anyhow::bail!("{file}: thresholds.{t}: `{m}` is not one of the task's metrics");
                }
            }
        }
        Ok(Self { config, tasks })
    }
}

/// Results of a suite in lm-evaluation-harness's shape.
pub fn results_json(suite: &Suite, results: &[TaskResult], model: &str, opts: &EvalOptions) -> Value {
    let mut res = Map::new();
    let mut configs = Map::new();
    let mut versions = Map::new();
    let mut n = Map::new();
    for (task, r) in suite.tasks.iter().zip(results) {
        let mut m = Map::new();
        m.insert("alias".into(), json!(r.name));
        for (k, v) in &r.metrics {
            m.insert(k.clone(), if v.is_finite() { json!(v) } else { json!("N/A") });
        }
        res.insert(r.name.clone(), Value::Object(m));
        configs.insert(r.name.clone(), serde_json::to_value(&task.config).unwrap_or(Value::Null));
        versions.insert(r.name.clone(), task.version());
        n.insert(r.name.clone(), json!({"original": task.docs.len(), "effective": r.samples.len()}));
    }
    json!({
        "results": res, "configs": configs, "versions": versions, "n-samples": n,
        "config": {"model": "lmstack", "model_args": model, "limit": opts.limit, "random_seed": opts.seed,
                   "bootstrap_iters": opts.bootstrap_iters},
        "suite": suite.config.name,
    })
}

/// Checks the suite's thresholds; returns the violations in words.
pub fn check_thresholds(suite: &Suite, results: &[TaskResult]) -> Vec<String> {
    let mut bad = Vec::new();
    for (task, ms) in &suite.config.thresholds {
        let Some(r) = results.iter().find(|r| &r.name == task) else { continue };
        for (metric, th) in ms {
            let v = r.get(metric).unwrap_or(f64::NAN);
            let (min, max) = match th {
                Threshold::Min(m) => (Some(*m), None),
                Threshold::Bounds { min, max } => (*min, *max),
            };
            if min.is_some_and(|m| v.is_nan() || v < m) {
                bad.push(format!("{task} {metric} = {v:.4} is below the threshold {}", min.unwrap_or_default()));
            }
            if max.is_some_and(|m| v.is_nan() || v > m) {
                bad.push(format!("{task} {metric} = {v:.4} is above the threshold {}", max.unwrap_or_default()));
            }
        }
    }
    bad
}

/// A Markdown table of every task's metrics (`value ± stderr`).
pub fn markdown(results: &[TaskResult]) -> String {
    let mut s = String::from("| task | metric | filter | value | ± stderr |\n| --- | --- | --- | ---: | ---: |\n");
    for r in results {
        for (k, v) in r.metrics.iter().filter(|(k, _)| !k.contains("_stderr")) {
            let (metric, filter) = k.split_once(',').unwrap_or((k, "none"));
            let se = r.metrics.get(&format!("{metric}_stderr,{filter}")).copied().unwrap_or(f64::NAN);
            s.push_str(&format!(
                "| {} | {metric} | {filter} | {v:.4} | {} |\n",
                r.name,
                if se.is_finite() { format!("{se:.4}") } else { "N/A".into() }
            ));
        }
    }
    s
}
