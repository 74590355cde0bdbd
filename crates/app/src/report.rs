//! Self-contained HTML reports (one file, no external assets): a run's per-task table with a
//! per-sample drill-down (prompt, target, output, scores, assertion reasons), and two runs side
//! by side with the paired comparison. Rendered with minijinja, which HTML-escapes every value.

use serde_json::{json, Value};

use crate::compare::{sample_stats, Comparison, Run};
use crate::scores::{aggregate, aggregation};

const TEMPLATE: &str = include_str!("report.html");

fn render(ctx: Value) -> anyhow::Result<String> {
    let mut env = minijinja::Environment::new();
    env.add_template("report.html", TEMPLATE)?;
    Ok(env.get_template("report.html")?.render(ctx)?)
}

fn fmt(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "N/A".into()
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The prompt, target and output of a sample in words, whatever its task's output type.
fn describe(s: &Value) -> (String, String, String) {
    let args = &s["arguments"];
    let prompt = text(&args["context"]);
    if let Some(choices) = args["choices"].as_array() {
        let lls: Vec<f64> =
            s["resps"].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default();
        let best = lls.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
        let gold = s["target"].as_u64().map(|g| g as usize);
        let mut out = String::new();
        for (i, c) in choices.iter().enumerate() {
            let mark = match (Some(i) == best, Some(i) == gold) {
                (true, true) => "  ← chosen, gold",
                (true, false) => "  ← chosen",
                (false, true) => "  ← gold",
                _ => "",
            };
            out.push_str(&format!("{:>10.3}  {}{mark}\n", lls.get(i).copied().unwrap_or(f64::NAN), text(c)));
        }
        let target = gold.and_then(|g| choices.get(g)).map(text).unwrap_or_default();
        return (prompt, target, out);
    }
    if let Some(cont) = args.get("continuation") {
        let r = &s["resps"];
        let out = format!("log-likelihood {} · greedy: {}", fmt(r[0].as_f64().unwrap_or(f64::NAN)), r[1]);
        return (prompt, text(cont), out);
    }
    if args.is_null() {
        // Rolling log-likelihood: the document is the target.
        let out = format!(
            "log-likelihood {} over {} bytes, {} words",
            fmt(s["resps"].as_f64().unwrap_or(f64::NAN)),
            s["bytes"],
            s["words"]
        );
        return (String::new(), text(&s["target"]), out);
    }
    let raw = text(&s["resps"][0]);
    let mut out = raw.clone();
    if let Some(f) = s["filtered_resps"].as_object() {
        for (name, v) in f {
            if name != "none" || text(v) != raw {
                out.push_str(&format!("\n[filter {name}] {}", text(v)));
            }
        }
    }
    (prompt, text(&s["target"]), out)
}

/// Per-document values of a sample's scores (corpus statistics aggregated over this document).
fn scores(s: &Value) -> Vec<(String, f64)> {
    let keys: Vec<String> = s["scores"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
    keys.into_iter()
        .filter_map(|k| {
            let st = sample_stats(s, &k)?;
            let metric = k.split(',').next().unwrap_or(&k).to_owned();
            Some((k, aggregate(aggregation(&metric), [&st])))
        })
        .collect()
}

fn score_tags(sc: &[(String, f64)]) -> Vec<Value> {
    sc.iter()
        .map(|(k, v)| {
            let key = k.strip_suffix(",none").unwrap_or(k);
            let (class, value) = match *v {
                1.0 if is_binary_key(k) => ("pass", "1".to_owned()),
                0.0 if is_binary_key(k) => ("fail", "0".to_owned()),
                _ => ("info", fmt(*v)),
            };
            json!({"key": key, "value": value, "class": class})
        })
        .collect()
}

fn is_binary_key(k: &str) -> bool {
    let m = k.split(',').next().unwrap_or(k);
    !matches!(m, "f1" | "bleu" | "chrf" | "rougeL") && aggregation(m) == crate::scores::Aggregation::Mean
}

fn assertions(s: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(m) = s["assertions"].as_object() {
        for (filter, list) in m {
            for a in list.as_array().into_iter().flatten() {
                let metric = a["metric"].as_str().unwrap_or("?");
                let name = if filter == "none" { metric.to_owned() } else { format!("{metric},{filter}") };
                out.push(json!({"metric": name, "pass": a["pass"] == true, "reason": a["reason"]}));
            }
        }
    }
    out
}

fn preview(prompt: &str, target: &str) -> String {
    let src = if prompt.trim().is_empty() { target } else { prompt };
    let tail: String = src.chars().rev().take(90).collect::<Vec<_>>().into_iter().rev().collect();
    tail.replace('\n', " ⏎ ")
}

/// The HTML report of one run.
pub fn run_report(run: &Run) -> anyhow::Result<String> {
    let mut tasks = Vec::new();
    for (name, samples) in &run.samples {
        let res = &run.results["results"][name];
        let mut metrics = Vec::new();
        for (k, v) in res.as_object().into_iter().flatten() {
            if k == "alias" || k.contains("_stderr") {
                continue;
            }
            let (metric, filter) = k.split_once(',').unwrap_or((k, "none"));
            let se = &res[format!("{metric}_stderr,{filter}")];
            metrics.push(json!({"metric": metric, "filter": filter, "value": num(v), "stderr": num(se)}));
        }
        let rows: Vec<Value> = samples
            .iter()
            .map(|s| {
                let (prompt, target, output) = describe(s);
                let sc = scores(s);
                let failed = sc.iter().any(|(k, v)| is_binary_key(k) && *v == 0.0);
                json!({"doc_id": s["doc_id"], "prompt": prompt, "target": target, "output": output,
                       "scores": score_tags(&sc), "assertions": assertions(s), "flag": failed,
                       "preview": preview(&prompt, &target)})
            })
            .collect();
        tasks.push(json!({"name": name, "metrics": metrics, "samples": rows,
                          "n": run.results["n-samples"][name]["effective"]}));
    }
    let suite = run.results["suite"].as_str().unwrap_or("eval");
    render(json!({
        "title": format!("{suite} on {}", run.model()),
        "subtitle": format!("lmstack eval · seed {} · {}", run.results["config"]["random_seed"], run.dir.display()),
        "compare": false, "tasks": tasks,
    }))
}

fn num(v: &Value) -> String {
    v.as_f64().map_or_else(|| text(v), fmt)
}

/// The HTML report of two runs side by side, with their paired comparison.
pub fn compare_report(a: &Run, b: &Run, comparisons: &[Comparison], alpha: f64) -> anyhow::Result<String> {
    let comps: Vec<Value> = comparisons
        .iter()
        .map(|c| {
            let verdict = c.verdict(alpha);
            let class = match verdict {
                "B better" => "good",
                "A better" => "bad",
                _ => "same",
            };
            json!({"task": c.task, "metric": c.metric, "filter": c.filter, "n": c.n, "a": fmt(c.a), "b": fmt(c.b),
                   "diff": format!("{:+.4}", c.diff()), "ci": format!("[{:+.4}, {:+.4}]", c.ci.0, c.ci.1),
                   "p": crate::compare::fmt_p(c.p), "test": c.test, "wins": c.wins_text(), "verdict": verdict, "class": class})
        })
        .collect();
    let mut tasks = Vec::new();
    for (name, sa) in &a.samples {
        let Some(sb) = b.samples.get(name) else { continue };
        let by_id: std::collections::HashMap<String, &Value> =
            sb.iter().map(|y| (y["doc_id"].to_string(), y)).collect();
        let rows: Vec<Value> = sa
            .iter()
            .filter_map(|x| {
                let y = *by_id.get(&x["doc_id"].to_string())?;
                let (prompt, target, out_a) = describe(x);
                let (_, _, out_b) = describe(y);
                let (sc_a, sc_b) = (scores(x), scores(y));
                // Log-likelihoods always differ between models: flag documents whose 0/1 scores
                // differ, or whose generated text does.
                let binary = |sc: &[(String, f64)]| -> Vec<(String, f64)> {
                    sc.iter().filter(|(k, _)| is_binary_key(k)).cloned().collect()
                };
                let generated = x["resps"][0].is_string();
                let differs = binary(&sc_a) != binary(&sc_b) || (generated && out_a != out_b);
                Some(json!({
                    "doc_id": x["doc_id"], "prompt": prompt, "target": target, "flag": differs,
                    "preview": preview(&prompt, &target),
                    "a": {"output": out_a, "scores": score_tags(&sc_a), "assertions": assertions(x)},
                    "b": {"output": out_b, "scores": score_tags(&sc_b), "assertions": assertions(y)},
                }))
            })
            .collect();
        tasks.push(json!({"name": name, "samples": rows}));
    }
    render(json!({
        "title": format!("{} vs {}", a.model(), b.model()),
        "subtitle": format!("A: {} · B: {}", a.dir.display(), b.dir.display()),
        "compare": true, "comparisons": comps, "tasks": tasks, "alpha": alpha,
        "a_name": a.model(), "b_name": b.model(),
    }))
}
