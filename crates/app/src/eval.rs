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

use crate::assertions::Assertion;
use crate::backend::Backend;
use crate::judge::Judge;
use crate::reward::RewardModel;
use crate::schema::{FilterStep, OutputType};
use crate::scores::{self, aggregation, apply_filters, exact_match, value_stderr, Stats};
use crate::task::{Task, TaskError};

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

/// The models that grade generated answers, beside the task's own metrics.
#[derive(Default, Clone, Copy)]
pub struct Graders<'a> {
    /// Grades `llm-rubric` assertions.
    pub judge: Option<&'a Judge>,
    /// Gives the `reward` metric.
    pub reward: Option<&'a RewardModel>,
}

/// Evaluates one task; `progress` is called with the number of documents done. Tasks with
/// `llm-rubric` assertions need a judge, tasks with the `reward` metric a reward model.
pub fn run_task(
    task: &Task,
    backend: &mut dyn Backend,
    graders: Graders<'_>,
    opts: &EvalOptions,
    progress: &mut dyn FnMut(usize),
) -> anyhow::Result<TaskResult> {
    let n = opts.limit.map_or(task.docs.len(), |l| l.min(task.docs.len()));
    let names = task.metric_names();
    let wanted = |key: &str| names.iter().any(|m| key.split(',').next() == Some(m.as_str()));
    if graders.judge.is_none() && task.assertions.iter().any(Assertion::is_model_graded) {
        anyhow::bail!(
            "{}: llm-rubric assertions need a judge model; pass --judge URL (an OpenAI-compatible endpoint)",
            task.file.display()
        );
    }
    let reward = names.iter().any(|m| m == "reward");
    if reward && graders.reward.is_none() {
        anyhow::bail!(
            "{}: the `reward` metric needs a reward model; pass --reward-model DIR (a `train finetune --task reward` output)",
            task.file.display()
        );
    }
    let mut samples = Vec::with_capacity(n);
    // "metric,filter" → each document's statistics, in document order.
    let mut stats: BTreeMap<String, Vec<Stats>> = BTreeMap::new();
    let chunk = 64;
    for start in (0..n).step_by(chunk) {
        let ids: Vec<usize> = (start..(start + chunk).min(n)).collect();
        // Per document of the chunk: its record and its statistics.
        let mut recs: Vec<(Value, BTreeMap<String, Stats>)> = Vec::new();
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
                    let norm: Vec<f64> =
                        ll.iter().zip(&choices).map(|(l, c)| l / c.chars().count().max(1) as f64).collect();
                    let acc = f64::from(u8::from(argmax(&ll) == gold));
                    let acc_norm = f64::from(u8::from(argmax(&norm) == gold));
                    let rec = json!({
                        "doc_id": i, "doc": task.docs[i], "target": gold, "arguments": {"context": ctx, "choices": choices},
                        "resps": ll, "acc": acc, "acc_norm": acc_norm,
                    });
                    recs.push((
                        rec,
                        BTreeMap::from([("acc,none".into(), vec![acc]), ("acc_norm,none".into(), vec![acc_norm])]),
                    ));
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
                    let rec = json!({
                        "doc_id": i, "doc": task.docs[i], "target": cont, "arguments": {"context": ctx, "continuation": cont},
                        "resps": [ll, greedy], "acc": acc, "perplexity": ll,
                    });
                    recs.push((
                        rec,
                        BTreeMap::from([("acc,none".into(), vec![acc]), ("perplexity,none".into(), vec![ll])]),
                    ));
                }
            }
            OutputType::LoglikelihoodRolling => {
                let texts: Vec<String> =
                    ids.iter().map(|&i| task.doc_to_target(&task.docs[i])).collect::<Result<_, TaskError>>()?;
                let lls = backend.loglikelihood_rolling(&texts)?;
                for ((&i, text), ll) in ids.iter().zip(&texts).zip(lls) {
                    let (w, b) = (scores::count_words(text) as f64, text.len() as f64);
                    let rec = json!({
                        "doc_id": i, "doc": task.docs[i], "target": text, "resps": ll, "words": w, "bytes": b,
                    });
                    recs.push((
                        rec,
                        BTreeMap::from([
                            ("word_perplexity,none".into(), vec![ll, w]),
                            ("byte_perplexity,none".into(), vec![ll, b]),
                            ("bits_per_byte,none".into(), vec![ll, b]),
                        ]),
                    ));
                }
            }
            OutputType::GenerateUntil => recs = generate_chunk(task, backend, graders, reward, opts, &ids)?,
        }
        for (mut rec, st) in recs {
            let st: BTreeMap<String, Stats> = st.into_iter().filter(|(k, _)| wanted(k)).collect();
            let scores: Map<String, Value> =
                st.iter().map(|(k, v)| (k.clone(), if v.len() == 1 { json!(v[0]) } else { json!(v) })).collect();
            rec["scores"] = Value::Object(scores);
            for (k, v) in st {
                stats.entry(k).or_default().push(v);
            }
            samples.push(rec);
        }
        progress(ids.len());
    }
    let mut metrics = BTreeMap::new();
    for (key, docs) in &stats {
        let (metric, filter) = key.split_once(',').unwrap_or((key, "none"));
        let (v, se) = value_stderr(aggregation(metric), docs, opts.bootstrap_iters, opts.seed);
        metrics.insert(key.clone(), v);
        metrics.insert(format!("{metric}_stderr,{filter}"), se);
    }
    for name in &names {
        if !stats.keys().any(|k| k.split(',').next() == Some(name.as_str())) && n > 0 {
            anyhow::bail!("metric `{name}` cannot be computed for this task");
        }
    }
    Ok(TaskResult { name: task.config.task.clone(), metrics, samples })
}

/// Generates for a chunk of documents and scores each output under each filter: text metrics,
/// assertions (deterministic ones here, rubric ones by the judge in one concurrent batch), and
/// (`reward`) the reward model's score in one batch.
fn generate_chunk(
    task: &Task,
    backend: &mut dyn Backend,
    graders: Graders<'_>,
    reward: bool,
    opts: &EvalOptions,
    ids: &[usize],
) -> anyhow::Result<Vec<(Value, BTreeMap<String, Stats>)>> {
    let mut reqs = Vec::new();
    for &i in ids {
        reqs.push((task.context(i, opts.seed)?, task.config.generation_kwargs.clone()));
    }
    let outs = backend.generate(&reqs)?;
    let filters: Vec<(String, Vec<FilterStep>)> = if task.config.filter_list.is_empty() {
        vec![("none".into(), Vec::new())]
    } else {
        task.config.filter_list.iter().map(|f| (f.name.clone(), f.filter.clone())).collect()
    };
    let spec = task.config.metric_list.iter().find(|m| m.metric == "exact_match");
    let mut recs = Vec::new();
    // (record, filter, assertion index) awaiting the judge, with what it grades.
    let mut pending: Vec<(usize, String, usize)> = Vec::new();
    let mut to_grade: Vec<(&Assertion, String, Value)> = Vec::new();
    // (record, filter) awaiting the reward model, with (context, answer, where).
    let mut to_reward: Vec<(usize, String)> = Vec::new();
    let mut reward_items: Vec<(String, String, String)> = Vec::new();
    for ((&i, (ctx, _)), out) in ids.iter().zip(&reqs).zip(outs) {
        let doc = &task.docs[i];
        let target = task.doc_to_target(doc)?;
        let mut vars = doc.clone();
        if let Value::Object(m) = &mut vars {
            m.insert("target".into(), json!(target));
        } else {
            vars = json!({"doc": doc, "target": target});
        }
        let mut st = BTreeMap::new();
        let mut filtered = Map::new();
        let mut asserted = Map::new();
        for (name, steps) in &filters {
            let f = apply_filters(steps, &out);
            st.insert(format!("exact_match,{name}"), vec![exact_match(&f, &target, spec)]);
            st.insert(format!("f1,{name}"), vec![scores::token_f1(&f, &target)]);
            st.insert(format!("bleu,{name}"), scores::bleu_stats(&f, &target));
            st.insert(format!("chrf,{name}"), scores::chrf_stats(&f, &target));
            st.insert(format!("rougeL,{name}"), vec![scores::rouge_l(&f, &target)]);
            if reward {
                to_reward.push((recs.len(), name.clone()));
                reward_items.push((
                    ctx.clone(),
                    f.clone(),
                    format!("{}: doc {i} (filter {name})", task.file.display()),
                ));
            }
            let mut outcomes = Vec::new();
            for (k, a) in task.assertions.iter().enumerate() {
                if a.is_model_graded() {
                    pending.push((recs.len(), name.clone(), k));
                    to_grade.push((a, f.clone(), vars.clone()));
                    outcomes.push(Value::Null);
                } else {
                    let o = a.check(&f, &vars).map_err(|e| anyhow::anyhow!("{}: doc {i}: {e}", task.file.display()))?;
                    st.insert(format!("{},{name}", a.metric), vec![o.score]);
                    outcomes.push(json!({"metric": a.metric, "pass": o.pass, "score": o.score, "reason": o.reason}));
                }
            }
            if !task.assertions.is_empty() {
                asserted.insert(name.clone(), Value::Array(outcomes));
            }
            filtered.insert(name.clone(), json!(f));
        }
        let mut rec = json!({
            "doc_id": i, "doc": doc, "target": target, "arguments": {"context": ctx},
            "resps": [out], "filtered_resps": filtered,
        });
        if !asserted.is_empty() {
            rec["assertions"] = Value::Object(asserted);
        }
        recs.push((rec, st));
    }
    if let (Some(rm), false) = (graders.reward, reward_items.is_empty()) {
        for ((r, filter), v) in to_reward.into_iter().zip(rm.score(&reward_items)?) {
            let (rec, st) = &mut recs[r];
            st.insert(format!("reward,{filter}"), vec![v]);
            rec["reward_model"] = json!(rm.name());
        }
    }
    if let (Some(judge), false) = (graders.judge, to_grade.is_empty()) {
        let graded = judge.grade(&to_grade)?;
        for ((r, filter, k), o) in pending.into_iter().zip(graded) {
            let a = &task.assertions[k];
            let (rec, st) = &mut recs[r];
            st.insert(format!("{},{filter}", a.metric), vec![o.score]);
            rec["assertions"][&filter][k] = json!({"metric": a.metric, "pass": o.pass, "score": o.score, "reason": o.reason, "judge": judge.name()});
        }
    }
    if !task.assertions.is_empty() {
        for (rec, st) in &mut recs {
            for (name, _) in &filters {
                let all = rec["assertions"][name].as_array().is_some_and(|a| a.iter().all(|o| o["pass"] == true));
                st.insert(format!("pass,{name}"), vec![f64::from(u8::from(all))]);
            }
        }
    }
    Ok(recs)
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
    /// Suite name (`group` in lm-evaluation-harness's group files).
    #[serde(alias = "group")]
    pub name: String,
    /// Task files relative to the suite, or names of tasks defined by YAML files in the suite's
    /// folder (`task` in lm-evaluation-harness's group files).
    #[serde(alias = "task")]
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
    /// Loads a suite and every task in it; thresholds must name tasks of the suite. A task
    /// file given as the suite is a suite of that one task, as lm-evaluation-harness's `--tasks`
    /// takes a task YAML.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let yaml_error = |e: serde_yaml_ng::Error| {
            let at = e.location().map(|l| format!(":{}", l.line())).unwrap_or_default();
            anyhow::anyhow!("{file}{at}: {e}")
        };
        // A syntax error is reported as such, before the file is read as a suite or a task.
        let value = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text).map_err(yaml_error)?;
        if let serde_yaml_ng::Value::Mapping(m) = &value {
            if let Some(serde_yaml_ng::Value::String(name)) = m.get("task") {
                let task = Task::load(path)?;
                let tasks = vec![path.file_name().map(PathBuf::from).unwrap_or_default()];
                let config = SuiteConfig { name: name.clone(), tasks, thresholds: BTreeMap::new() };
                return Ok(Self { config, tasks: vec![task] });
            }
        }
        let config: SuiteConfig = serde_yaml_ng::from_str(&text).map_err(yaml_error)?;
        let dir = if base.as_os_str().is_empty() { Path::new(".") } else { base };
        // Task names → files, read from the folder once, and only if some entry is a name.
        let mut by_name: Option<BTreeMap<String, PathBuf>> = None;
        let mut tasks = Vec::with_capacity(config.tasks.len());
        for (i, t) in config.tasks.iter().enumerate() {
            let p = base.join(t);
            if p.is_file() {
                tasks.push(Task::load(&p)?);
                continue;
            }
            let name = t.to_string_lossy();
            match by_name.get_or_insert_with(|| task_files_by_name(dir)).get(name.as_ref()) {
                Some(p) => tasks.push(Task::load(p)?),
                None => anyhow::bail!(
                    "{file}: tasks[{i}]: `{name}` is neither a file nor the `task:` of a YAML file in {}",
                    dir.display()
                ),
            }
        }
        for (t, ms) in &config.thresholds {
            let task = tasks
                .iter()
                .find(|x| &x.config.task == t)
                .ok_or_else(|| anyhow::anyhow!("{file}: thresholds: `{t}` is not a task of this suite"))?;
            for m in ms.keys() {
                if !task.metric_names().contains(m) {
                    anyhow::bail!("{file}: thresholds.{t}: `{m}` is not one of the task's metrics");
                }
            }
        }
        Ok(Self { config, tasks })
    }
}

/// The YAML files in `dir` (not its subfolders) by their `task:`, as lm-evaluation-harness finds
/// tasks by name under an include path (the first file in name order where two share a task);
/// files that do not parse are passed over.
fn task_files_by_name(dir: &Path) -> BTreeMap<String, PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return BTreeMap::new() };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut index = BTreeMap::new();
    for p in files {
        let task = std::fs::read_to_string(&p)
            .ok()
            .and_then(|t| serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&t).ok())
            .and_then(|v| v.get("task").and_then(serde_yaml_ng::Value::as_str).map(str::to_owned));
        if let Some(task) = task {
            index.entry(task).or_insert(p);
        }
    }
    index
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

/// Writes a finished run to `out`: `results.json`, `samples_<task>.jsonl`, `summary.md` and the
/// self-contained `report.html` (each written atomically).
pub fn write_run(
    out: &Path,
    suite: &Suite,
    results: &[TaskResult],
    model: &str,
    opts: &EvalOptions,
) -> anyhow::Result<()> {
    use lmstack_core::io::write_atomic;
    std::fs::create_dir_all(out)?;
    for r in results {
        let mut lines = String::new();
        for s in &r.samples {
            lines.push_str(&s.to_string());
            lines.push('\n');
        }
        write_atomic(&out.join(format!("samples_{}.jsonl", r.name)), lines.as_bytes())?;
    }
    let json = results_json(suite, results, model, opts);
    write_atomic(&out.join("results.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;
    let md = format!("# {} on {model}\n\n{}", suite.config.name, markdown(results));
    write_atomic(&out.join("summary.md"), md.as_bytes())?;
    let html = crate::report::run_report(&crate::compare::Run::load(out)?)?;
    write_atomic(&out.join("report.html"), html.as_bytes())?;
    Ok(())
}
