//! Scoring generations: text-overlap metrics and promptfoo-style assertions in a task,
//! model-graded rubrics by a judge behind an OpenAI-compatible endpoint (scripted here), chat
//! endpoints for generation, the HTML report, and the paired comparison of two runs through
//! the `lmstack-eval compare` command.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use lmstack_app::backend::{Backend, BackendResult};
use lmstack_app::endpoint::EndpointBackend;
use lmstack_app::eval::{self, EvalOptions, Graders, Suite};
use lmstack_app::judge::Judge;
use lmstack_app::schema::GenerationKwargs;
use lmstack_app::scores::{aggregate, bleu_stats, Aggregation};
use lmstack_app::task::Task;
use serde_json::{json, Value};

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Answers from a table keyed by the question (the last line of the context).
struct Table(Vec<(&'static str, &'static str)>);

impl Backend for Table {
    fn name(&self) -> String {
        "table".into()
    }
    fn loglikelihood(&mut self, _: &[(String, String)]) -> BackendResult<Vec<(f64, bool)>> {
        unreachable!()
    }
    fn loglikelihood_rolling(&mut self, _: &[String]) -> BackendResult<Vec<f64>> {
        unreachable!()
    }
    fn generate(&mut self, reqs: &[(String, GenerationKwargs)]) -> BackendResult<Vec<String>> {
        Ok(reqs
            .iter()
            .map(|(c, _)| {
                let q = c.lines().last().unwrap_or("");
                self.0.iter().find(|(k, _)| q.contains(k)).map_or("no idea", |(_, v)| v).to_owned()
            })
            .collect())
    }
}

const DOCS: &str = r#"{"q": "capital of France", "answer": "Paris"}
{"q": "name a colour as JSON", "answer": "{\"colour\": \"red\"}"}
{"q": "<script>alert(1)</script> say hi", "answer": "hello there"}
{"q": "the first prime", "answer": "2"}
"#;

const TASK: &str = r#"task: qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: qa.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Q: {{q}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\n"]
metric_list:
  - metric: exact_match
  - metric: f1
  - metric: bleu
  - metric: chrf
  - metric: rougeL
assert:
  - type: icontains
    value: "{{ target }}"
  - type: not-contains
    value: sorry
  - type: regex
    value: "^[A-Za-z0-9{]"
  - type: llm-rubric
    value: "The answer is polite"
    metric: polite
"#;

fn answers_a() -> Table {
    Table(vec![
        ("capital", "Paris"),
        ("colour", "{\"colour\": \"blue\"}"),
        ("say hi", "sorry, hello there"),
        ("prime", "2"),
    ])
}

fn answers_b() -> Table {
    Table(vec![
        ("capital", "paris, of course"),
        ("colour", "{\"colour\": \"red\"}"),
        ("say hi", "hello there, kind friend"),
        ("prime", "two"),
    ])
}

/// A judge: "pass" when the graded output contains "kind" or "course"; a non-JSON reply for
/// outputs containing "sorry"; counts requests.
async fn judge_chat(State(n): State<Arc<AtomicUsize>>, Json(b): Json<Value>) -> Json<Value> {
    n.fetch_add(1, Ordering::SeqCst);
    let prompt = b["messages"][0]["content"].as_str().unwrap().to_owned();
    assert!(prompt.contains("<Rubric>\nThe answer is polite\n</Rubric>"), "{prompt}");
    let output = prompt.split("<Output>\n").nth(1).unwrap().split("\n</Output>").next().unwrap();
    let reply = if output.contains("sorry") {
        "Hmm, hard to say.".to_owned()
    } else {
        let pass = output.contains("kind") || output.contains("course");
        format!("{{\"reason\": \"judged\", \"pass\": {pass}, \"score\": {}}}", if pass { 0.9 } else { 0.2 })
    };
    Json(
        json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]}),
    )
}

async fn models() -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": "judge", "object": "model", "max_model_len": 64}]}))
}

/// The judge on a background runtime; returns its base URL and request counter.
fn spawn_judge() -> (String, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(judge_chat))
        .with_state(n.clone());
    (spawn(app), n)
}

/// Serves `app` on a background runtime; returns its base URL.
fn spawn(app: Router) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    format!("http://{}/v1", rx.recv().unwrap())
}

fn setup(dir: &Path) -> Suite {
    write(dir, "qa.jsonl", DOCS);
    write(dir, "qa.yaml", TASK);
    write(dir, "suite.yaml", "name: qa\ntasks: [qa.yaml]\nthresholds:\n  qa: {pass: 0.5, polite: 0.1}\n");
    Suite::load(&dir.join("suite.yaml")).unwrap()
}

#[test]
fn generations_are_scored_by_metrics_assertions_and_a_judge() {
    let dir = tempfile::tempdir().unwrap();
    let suite = setup(dir.path());
    let task = &suite.tasks[0];
    assert_eq!(
        task.metric_names(),
        ["exact_match", "f1", "bleu", "chrf", "rougeL", "icontains", "not-contains", "regex", "polite", "pass"]
    );

    // Without a judge the rubric cannot be graded: a clear error before any generation.
    let e =
        eval::run_task(task, &mut answers_a(), Graders::default(), &EvalOptions::default(), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("--judge"), "{e}");

    let (url, calls) = spawn_judge();
    let cache = dir.path().join("judge_cache.jsonl");
    let judge = Judge::new(EndpointBackend::new(&url, None, None, Some(&cache)).unwrap());
    let r = judged(task, &mut answers_b(), &judge);
    assert_eq!(calls.load(Ordering::SeqCst), 4, "one judge request per document");
    // exact: only the JSON answer; icontains target: paris, red json, hello there → 3 of 4.
    assert_eq!(r.get("exact_match"), Some(0.25));
    assert_eq!(r.get("icontains"), Some(0.75));
    assert_eq!(r.get("not-contains"), Some(1.0));
    assert_eq!(r.get("regex"), Some(1.0));
    // Judge: "course" and "kind" pass with 0.9; the others score 0.2.
    assert!((r.get("polite").unwrap() - (0.9 + 0.2 + 0.9 + 0.2) / 4.0).abs() < 1e-12);
    // All four assertions hold only for doc 0 ("paris, of course") and doc 2.
    assert_eq!(r.get("pass"), Some(0.5));
    // Corpus BLEU sums statistics over documents.
    let outs = ["paris, of course", "{\"colour\": \"red\"}", "hello there, kind friend", "two"];
    let refs = ["Paris", "{\"colour\": \"red\"}", "hello there", "2"];
    let stats: Vec<_> = outs.iter().zip(refs).map(|(o, t)| bleu_stats(o, t)).collect();
    assert_eq!(r.get("bleu"), Some(aggregate(Aggregation::Bleu, &stats)));
    assert!(r.metrics["bleu_stderr,none"].is_finite());
    let a = &r.samples[3]["assertions"]["none"];
    assert_eq!(a[0]["pass"], false);
    assert!(a[0]["reason"].as_str().unwrap().contains("\"2\""), "{a}");
    assert_eq!(a[3]["reason"], "judged");
    assert_eq!(r.samples[0]["scores"]["polite,none"], 0.9);

    // Run A: the judge's non-JSON reply is a failed grade with the reason, not an error.
    let ra = judged(task, &mut answers_a(), &judge);
    let why = ra.samples[2]["assertions"]["none"][3]["reason"].as_str().unwrap();
    assert!(why.contains("not a JSON verdict"), "{why}");
    assert_eq!(ra.samples[2]["assertions"]["none"][1]["pass"], false, "contains sorry");

    // A rerun asks the judge nothing new: answers come from the cache.
    let before = calls.load(Ordering::SeqCst);
    let judge2 = Judge::new(EndpointBackend::new(&url, None, None, Some(&cache)).unwrap());
    judged(task, &mut answers_b(), &judge2);
    assert_eq!(calls.load(Ordering::SeqCst), before);
    assert!(eval::check_thresholds(&suite, &[r]).is_empty());
}

#[test]
fn bad_assertions_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "qa.jsonl", DOCS);
    let cases = [
        ("  - type: sounds-right\n    value: x\n", "assert[0].type"),
        ("  - type: regex\n    value: \"(\"\n", "assert[0].value"),
        (
            "  - type: contains\n    value: a\n  - type: contains\n    value: b\n",
            "assert[1]: the metric name `contains`",
        ),
        ("  - type: contains\n    value: a\n    weight: 2\n", "weight"),
    ];
    let head = TASK.split("assert:\n").next().unwrap();
    for (i, (body, needle)) in cases.iter().enumerate() {
        let p = write(dir.path(), &format!("t{i}.yaml"), &format!("{head}assert:\n{body}"));
        let e = Task::load(&p).unwrap_err().to_string();
        assert!(e.contains(needle) && e.contains(&format!("t{i}.yaml")), "case {i}: {e}");
    }
}

/// Runs `task` with `judge` grading its rubrics, default options.
fn judged(task: &Task, backend: &mut dyn Backend, judge: &Judge) -> eval::TaskResult {
    let graders = Graders { judge: Some(judge), ..Default::default() };
    eval::run_task(task, backend, graders, &EvalOptions::default(), &mut |_| {}).unwrap()
}

fn run_to(dir: &Path, suite: &Suite, backend: &mut dyn Backend, judge: &Judge, name: &str) -> std::path::PathBuf {
    let out = dir.join(name);
    let opts = EvalOptions::default();
    let results: Vec<_> = suite
        .tasks
        .iter()
        .map(|t| {
            eval::run_task(t, backend, Graders { judge: Some(judge), ..Default::default() }, &opts, &mut |_| {})
                .unwrap()
        })
        .collect();
    eval::write_run(&out, suite, &results, name, &opts).unwrap();
    out
}

#[test]
fn reports_and_paired_comparison_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let suite = setup(dir.path());
    let (url, _) = spawn_judge();
    let judge = Judge::new(EndpointBackend::new(&url, None, None, None).unwrap());
    let a = run_to(dir.path(), &suite, &mut answers_a(), &judge, "run-a");
    let b = run_to(dir.path(), &suite, &mut answers_b(), &judge, "run-b");

    // The report is one self-contained file with every prompt, output and reason, escaped.
    let html = std::fs::read_to_string(a.join("report.html")).unwrap();
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;")
            || html.contains("&lt;script&gt;alert(1)&lt;/script&gt;")
    );
    assert!(!html.contains("<script>alert(1)"));
    assert!(html.contains("sorry, hello there") && html.contains("not a JSON verdict"));
    assert!(!html.contains("http://") && !html.contains("https://"), "no external assets");

    let exe = env!("CARGO_BIN_EXE_lmstack-eval");
    let cmp = |x: &Path, y: &Path| std::process::Command::new(exe).arg("compare").arg(x).arg(y).output().unwrap();
    let o = cmp(&a, &b);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("| qa | polite | none | 4 |"), "{stdout}");
    assert!(stdout.contains("McNemar") && stdout.contains("paired bootstrap"), "{stdout}");
    let page = std::fs::read_to_string(b.join("compare.html")).unwrap();
    assert!(page.contains("paris, of course") && page.contains("sorry, hello there"));

    // Four documents are too few for any difference to be significant; the exit code says
    // whether B is significantly worse, which needs more evidence.
    assert!(cmp(&b, &a).status.success());
    let o = std::process::Command::new(exe).args(["compare", "nowhere", "nothere"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nowhere"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn chat_endpoints_generate_but_cannot_score() {
    let seen = Arc::new(AtomicUsize::new(0));
    async fn chat(State(n): State<Arc<AtomicUsize>>, Json(b): Json<Value>) -> Json<Value> {
        n.fetch_add(1, Ordering::SeqCst);
        assert_eq!(b["messages"][0]["role"], "user");
        assert_eq!(b["stop"], json!(["\n"]));
        let reply = format!("you said: {}", b["messages"][0]["content"].as_str().unwrap());
        Json(json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}))
    }
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .with_state(seen.clone());
    let url = spawn(app);
    let mut b = EndpointBackend::new(&url, None, None, None).unwrap().with_chat(true);
    let kw = GenerationKwargs { until: vec!["\n".into()], ..Default::default() };
    let out = b.generate(&[("2+2?".into(), kw)]).unwrap();
    assert_eq!(out, ["you said: 2+2?"]);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    let e = b.loglikelihood(&[("a".into(), " b".into())]).unwrap_err();
    assert!(e.to_string().contains("chat"), "{e}");
}
