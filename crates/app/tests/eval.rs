//! Eval tasks and suites: lm-eval task files load (unsupported keys refused by name), metrics
//! come out as lm-eval defines them (checked against a scripted backend), the local backend's
//! log-likelihoods equal a direct forward pass (also across context windows), and thresholds
//! fail a run.

use std::path::Path;

use lmstack_app::backend::{Backend, BackendResult, LocalBackend};
use lmstack_app::eval::{self, EvalOptions, Graders, Suite};
use lmstack_app::reward::RewardModel;
use lmstack_app::schema::GenerationKwargs;
use lmstack_app::task::Task;
use lmstack_core::sampling::log_softmax;
use lmstack_core::{DType, Device, Model, ModelConfig, Pretrained, Tensor, Tokenizer};
use serde_json::json;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Scores a continuation by how many `x` it has; generates the context's last word.
struct Scripted;

impl Backend for Scripted {
    fn name(&self) -> String {
        "scripted".into()
    }
    fn loglikelihood(&mut self, reqs: &[(String, String)]) -> BackendResult<Vec<(f64, bool)>> {
        Ok(reqs.iter().map(|(_, c)| (c.matches('x').count() as f64 - c.len() as f64, c.contains('x'))).collect())
    }
    fn loglikelihood_rolling(&mut self, texts: &[String]) -> BackendResult<Vec<f64>> {
        Ok(texts.iter().map(|t| -(t.len() as f64)).collect())
    }
    fn generate(&mut self, reqs: &[(String, GenerationKwargs)]) -> BackendResult<Vec<String>> {
        Ok(reqs.iter().map(|(c, _)| format!("The answer is {}.", c.split_whitespace().last().unwrap_or(""))).collect())
    }
}

#[test]
fn multiple_choice_and_generation_metrics_follow_lm_eval() {
    let dir = tempfile::tempdir().unwrap();
    // Gold is "xx" (index 1) for doc 0, "b" for doc 1: the scripted backend prefers x's.
    write(dir.path(), "mc.jsonl", "{\"q\": \"one\", \"choices\": [\"a\", \"xx\"], \"label\": 1}\n{\"q\": \"two\", \"choices\": [\"xb\", \"bbbbbbbb\"], \"label\": 1}\n");
    let mc = write(
        dir.path(),
        "mc.yaml",
        "task: mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: mc.jsonl\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: \"Q: {{q}}\"\ndoc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    );
    let task = Task::load(&mc).unwrap();
    let r = eval::run_task(&task, &mut Scripted, Graders::default(), &EvalOptions::default(), &mut |_| {}).unwrap();
    // doc 0: ll(a) = -2, ll(xx) = -1 → right. doc 1: ll(xb) = -2, ll(bbbbbbbb) = -9 → wrong;
    // normalised by length: -2/2 = -1 vs -9/8 → still wrong.
    assert_eq!(r.get("acc"), Some(0.5));
    assert_eq!(r.metrics["acc_stderr,none"], 0.5);
    assert_eq!(r.get("acc_norm"), Some(0.5));
    assert_eq!(r.samples[0]["arguments"]["context"], "Q: one");

    write(dir.path(), "gen.csv", "question,answer\nwhat is 4,4\nwhat is 5,6\n");
    let gen = write(
        dir.path(),
        "gen.yaml",
        "task: gen\ndataset_path: csv\ndataset_kwargs:\n  data_files:\n    test: gen.csv\ntest_split: test\noutput_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\nfilter_list:\n  - name: get-answer\n    filter:\n      - function: regex\n        regex_pattern: \"answer is (\\\\d+)\"\n      - function: take_first\nmetric_list:\n  - metric: exact_match\n",
    );
    let task = Task::load(&gen).unwrap();
    let r = eval::run_task(&task, &mut Scripted, Graders::default(), &EvalOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(r.metrics["exact_match,get-answer"], 0.5);
    assert_eq!(r.samples[0]["filtered_resps"]["get-answer"], "4");

    let suite = write(
        dir.path(),
        "suite.yaml",
        "name: s\ntasks: [mc.yaml, gen.yaml]\nthresholds:\n  mc: {acc: 0.6}\n  gen: {exact_match: {max: 0.9}}\n",
    );
    let suite = Suite::load(&suite).unwrap();
    let results: Vec<_> = suite
        .tasks
        .iter()
        .map(|t| eval::run_task(t, &mut Scripted, Graders::default(), &EvalOptions::default(), &mut |_| {}).unwrap())
        .collect();
    let bad = eval::check_thresholds(&suite, &results);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].contains("mc acc = 0.5000 is below the threshold 0.6"), "{bad:?}");
    let j = eval::results_json(&suite, &results, "m", &EvalOptions::default());
    assert_eq!(j["results"]["mc"]["acc,none"], 0.5);
    assert_eq!(j["results"]["mc"]["acc_stderr,none"], 0.5);
    assert_eq!(j["n-samples"]["gen"], json!({"original": 2, "effective": 2}));
    assert_eq!(j["versions"]["mc"], 1.0);
    assert_eq!(j["configs"]["gen"]["output_type"], "generate_until");
    assert!(eval::markdown(&results).contains("| mc | acc | none | 0.5000 | 0.5000 |"));
}

#[test]
fn bad_task_files_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "d.jsonl", "{\"text\": \"hi\"}\n");
    let base = "task: t\ndataset_kwargs:\n  data_files:\n    test: d.jsonl\ntest_split: test\noutput_type: loglikelihood_rolling\ndoc_to_target: text\n";
    let cases = [
        (format!("{base}dataset_path: json\nprocess_docs: !function utils.process\n"), "process_docs"),
        (format!("{base}dataset_path: hellaswag\n"), "dataset_path"),
        (format!("{base}dataset_path: json\nmetric_list:\n  - metric: acc\n"), "`acc` is not available"),
        (base.replace("test: d.jsonl", "train: d.jsonl") + "dataset_path: json\n", "no file for split `test`"),
        (format!("{base}dataset_path: json\noutput_type: guess\n"), "output_type"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let p = write(dir.path(), &format!("t{i}.yaml"), text);
        let e = Task::load(&p).unwrap_err().to_string();
        assert!(e.contains(needle) && e.contains(&format!("t{i}.yaml")), "case {i}: {e}");
    }
    let p = write(dir.path(), "s.yaml", "name: s\ntasks: []\nthresholds:\n  ghost: {acc: 1}\n");
    let e = Suite::load(&p).unwrap_err().to_string();
    assert!(e.contains("ghost"), "{e}");
    let p = write(dir.path(), "s2.yaml", "group: s\ntask: [nowhere]\n");
    let e = Suite::load(&p).unwrap_err().to_string();
    assert!(e.contains("tasks[0]: `nowhere` is neither a file nor the `task:` of a YAML file"), "{e}");

    // A document the templates cannot render is named at load, before any model runs.
    let mc = "task: mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: mc.jsonl\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: choices\ndoc_to_target: label\n";
    let p = write(dir.path(), "mc.yaml", mc);
    for (docs, needle) in [
        ("{\"q\": \"a\", \"choices\": [\"x\"], \"label\": 0}\n{\"q\": \"b\", \"choices\": [\"x\", \"y\"], \"label\": 2}\n", "document 1 (mc.jsonl, split `test`): target index 2 but only 2 choices"),
        ("{\"q\": \"a\", \"choices\": [\"x\"], \"label\": 0}\n\n{\"choices\": [\"x\"], \"label\": 0}\n", "document 1 (mc.jsonl, split `test`)"),
    ] {
        write(dir.path(), "mc.jsonl", docs);
        let e = Task::load(&p).unwrap_err().to_string();
        assert!(e.contains("mc.yaml") && e.contains(needle), "{e}");
    }
}

/// lm-evaluation-harness's shapes: a group file (`group:`, `task:` naming tasks by their
/// `task:` key in YAML files beside it), a task file given as the whole suite, and
/// `data_files` as one file (Hugging Face `datasets`' `train` split).
#[test]
fn lm_eval_group_files_task_files_and_one_data_file_load() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "d.jsonl", "{\"text\": \"hi there\"}\n{\"text\": \"again\"}\n");
    let task = "dataset_path: json\ndataset_kwargs:\n  data_files: d.jsonl\ntest_split: train\noutput_type: loglikelihood_rolling\ndoc_to_target: text\n";
    write(dir.path(), "first.yaml", &format!("task: first\n{task}"));
    let second = write(dir.path(), "second.yml", &format!("task: second\n{task}"));
    write(dir.path(), "notes.yaml", ": not a task [\n");
    let group = write(dir.path(), "group.yaml", "group: both\ntask:\n  - second\n  - first.yaml\n");
    let suite = Suite::load(&group).unwrap();
    assert_eq!(suite.config.name, "both");
    let names: Vec<&str> = suite.tasks.iter().map(|t| t.config.task.as_str()).collect();
    assert_eq!(names, ["second", "first"]);
    assert_eq!(suite.tasks[0].docs.len(), 2);
    let r = eval::run_task(&suite.tasks[0], &mut Scripted, Graders::default(), &EvalOptions::default(), &mut |_| {})
        .unwrap();
    assert_eq!(r.samples.len(), 2);

    let one = Suite::load(&second).unwrap();
    assert_eq!(one.config.name, "second");
    assert_eq!(one.tasks.len(), 1);
    assert_eq!(one.tasks[0].config.task, "second");
}

/// A tiny random char-level GPT-2 with context 16 (so rolling windows are exercised).
fn tiny_model(dir: &Path) {
    let tok = Tokenizer::from_chars("abcdefghijklmnopqrstuvwxyz .".chars()).unwrap();
    let cfg = format!(
        r#"{{"model_type": "gpt2", "n_embd": 16, "n_head": 2, "n_layer": 2, "n_positions": 16, "vocab_size": {}}}"#,
        tok.vocab_size()
    );
    let model = Model::init(ModelConfig::from_json(&cfg, "t").unwrap(), 3, DType::F32, &Device::Cpu).unwrap();
    Pretrained { model, tokenizer: tok, dir: None }.save(dir).unwrap();
}

#[test]
fn local_loglikelihoods_equal_a_direct_forward() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path());
    let p = Pretrained::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let mut b = LocalBackend::load(dir.path()).unwrap();
    // Direct: log-probabilities of every next token of a short text.
    let text = "the cat sat on a mat";
    let ids = p.tokenizer.encode(text, false).unwrap();
    let lp = |ids: &[u32]| -> Vec<f64> {
        let input = &ids[..ids.len() - 1];
        let t = Tensor::from_vec(input.to_vec(), (1, input.len()), &Device::Cpu).unwrap();
        let rows = p.model.forward(&t, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        (1..ids.len()).map(|i| log_softmax(&rows[i - 1])[ids[i] as usize] as f64).collect()
    };
    let direct = lp(&ids[..16]);
    let (ctx, cont) = ("the cat sat ", "on a");
    let got = b.loglikelihood(&[(ctx.into(), cont.into())]).unwrap()[0].0;
    let want: f64 = direct[11..15].iter().sum(); // tokens 12..16 are predicted by rows 11..15
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");

    // Rolling over a text longer than the context: windows of 16 predictions, each with the
    // preceding tokens (up to the context) as input; without BOS the first token is not scored.
    let long = "the quick brown fox jumps over the lazy dog. the end.";
    let ids = p.tokenizer.encode(long, false).unwrap();
    let mut want = 0.0;
    let mut a = 1;
    while a < ids.len() {
        let b_ = (a + 16).min(ids.len());
        let s = b_.saturating_sub(17).min(a - 1);
        let l = lp(&ids[s..b_]);
        want += l[a - 1 - s..].iter().sum::<f64>();
        a = b_;
    }
    let got = b.loglikelihood_rolling(&[long.into()]).unwrap()[0];
    assert!((got - want).abs() < 1e-3, "{got} vs {want}");
    assert!(got < 0.0);
    // Greedy generation respects max_gen_toks and stop strings.
    let kw = GenerationKwargs {
        until: vec![],
        max_gen_toks: Some(5),
        temperature: None,
        do_sample: None,
        ..Default::default()
    };
    let g = b.generate(&[("the ".into(), kw.clone())]).unwrap();
    assert_eq!(g[0].chars().count(), 5);
    let first: String = g[0].chars().take(2).collect();
    let kw2 = GenerationKwargs { until: vec![first.chars().nth(1).unwrap().to_string()], ..kw };
    let g2 = b.generate(&[("the ".into(), kw2)]).unwrap();
    assert!(g2[0].chars().count() <= 1, "{:?} then {:?}", g[0], g2[0]);
}

/// A task that asks for a JSON schema in its generation settings gets outputs that satisfy
/// it from a random model (in-process); the schema-validity assertion measures it, and a bad
/// constraint is refused naming the key.
#[test]
fn a_task_constrains_its_generations_to_a_schema() {
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::from_chars("abcdefghijklmnopqrstuvwxyz .{}\":,0123456789".chars()).unwrap();
    let cfg = format!(
        r#"{{"model_type": "gpt2", "n_embd": 16, "n_head": 2, "n_layer": 2, "n_positions": 96, "vocab_size": {}}}"#,
        tok.vocab_size()
    );
    let model = Model::init(ModelConfig::from_json(&cfg, "t").unwrap(), 5, DType::F32, &Device::Cpu).unwrap();
    let mdir = dir.path().join("model");
    Pretrained { model, tokenizer: tok, dir: None }.save(&mdir).unwrap();
    write(
        dir.path(),
        "d.jsonl",
        "{\"t\": \"one\", \"k\": \"ab\"}\n{\"t\": \"two\", \"k\": \"cd\"}\n{\"t\": \"six\", \"k\": \"ab\"}\n",
    );
    let task = |rf: &str| {
        format!(
            "task: j\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: d.jsonl\ntest_split: test\noutput_type: generate_until\ndoc_to_text: \"{{{{t}}}}\"\ndoc_to_target: \"{{{{k}}}}\"\ngeneration_kwargs:\n  max_gen_toks: 40\n  response_format: {rf}\nassert:\n  - type: is-json\n    value: {{type: object, properties: {{k: {{enum: [ab, cd]}}, n: {{type: integer, minimum: 0, maximum: 9}}}}, required: [k, n], additionalProperties: false}}\n    metric: schema_valid\n  - type: json-fields\n    value: {{k: \"{{{{k}}}}\"}}\n    metric: field_accuracy\n"
        )
    };
    let schema = "{type: json_schema, json_schema: {name: x, schema: {type: object, properties: {k: {enum: [ab, cd]}, n: {type: integer, minimum: 0, maximum: 9}}, required: [k, n], additionalProperties: false}}}";
    let t = Task::load(&write(dir.path(), "j.yaml", &task(schema))).unwrap();
    let mut b = LocalBackend::load(&mdir).unwrap();
    let r = eval::run_task(&t, &mut b, Graders::default(), &EvalOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(r.get("schema_valid"), Some(1.0), "{:?}", r.samples);
    assert!(r.get("field_accuracy").is_some());
    for s in &r.samples {
        let out = s["resps"][0].as_str().unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(out).is_ok(), "{out}");
    }
    let e = Task::load(&write(dir.path(), "bad.yaml", &task("{type: xml}"))).unwrap_err().to_string();
    assert!(e.contains("generation_kwargs.response_format.type"), "{e}");
}

/// The built-in suite loads from the repository and runs end to end (on a random model, a few
/// documents per task).
#[test]
fn the_builtin_shakespeare_suite_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let suite = Suite::load(&root.join("evals/shakespeare/suite.yaml")).unwrap();
    let n: Vec<usize> = suite.tasks.iter().map(|t| t.docs.len()).collect();
    assert_eq!(n, [300, 200, 100]);
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join("data/tinyshakespeare.txt")).unwrap();
    let tok = Tokenizer::from_chars(text.chars()).unwrap();
    let cfg = format!(
        r#"{{"model_type": "gpt2", "n_embd": 16, "n_head": 2, "n_layer": 1, "n_positions": 64, "vocab_size": {}}}"#,
        tok.vocab_size()
    );
    let model = Model::init(ModelConfig::from_json(&cfg, "t").unwrap(), 3, DType::F32, &Device::Cpu).unwrap();
    Pretrained { model, tokenizer: tok, dir: None }.save(dir.path()).unwrap();
    let mut b = LocalBackend::load(dir.path()).unwrap();
    let opts = EvalOptions { limit: Some(4), ..Default::default() };
    let results: Vec<_> = suite
        .tasks
        .iter()
        .map(|t| eval::run_task(t, &mut b, Graders::default(), &opts, &mut |_| {}).unwrap())
        .collect();
    // An untrained model over 66 characters: about log2(66) ≈ 6 bits per byte.
    let bpb = results[0].get("bits_per_byte").unwrap();
    assert!((5.0..7.5).contains(&bpb), "{bpb}");
    assert!(results[1].get("acc").is_some());
    let chrf = results[2].get("chrf").unwrap();
    assert!((0.0..=100.0).contains(&chrf), "{chrf}");
    assert_eq!(results[2].samples.len(), 4);
    assert!(!eval::check_thresholds(&suite, &results).is_empty(), "an untrained model must fail the gate");
}

/// A task file with a YAML syntax error, given as the suite, reports the YAML error with its
/// line (it reported that a suite's `tasks` was not a sequence).
#[test]
fn a_task_file_with_a_yaml_error_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.yaml");
    std::fs::write(&p, "task: demo\ndataset_path: json\noutput_type: generate_until\ndoc_to_text: [1, 2\n").unwrap();
    let e = format!("{:#}", lmstack_app::eval::Suite::load(&p).unwrap_err());
    assert!(e.contains("t.yaml:5") && e.contains("did not find expected") && !e.contains("expected a sequence"), "{e}");
}

#[test]
fn a_missing_data_file_names_the_task_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.yaml");
    std::fs::write(
        &p,
        "task: demo\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: nothere.jsonl\ntest_split: test\n\
         output_type: generate_until\ndoc_to_text: \"{{q}}\"\ndoc_to_target: \"{{a}}\"\n",
    )
    .unwrap();
    let e = format!("{:#}", lmstack_app::eval::Suite::load(&p).unwrap_err());
    assert!(e.contains("t.yaml") && e.contains("dataset_kwargs.data_files.test") && e.contains("nothere.jsonl"), "{e}");
}

/// The `reward` metric: a reward model scores each generated answer in its context, as text
/// (context then answer) or, with `--chat`, as the conversation its chat template renders; each
/// score equals the reward model's own forward on those characters. Without a reward model the
/// task is refused naming the flag, and a language model is not taken for one.
#[test]
fn the_reward_metric_scores_answers_with_a_reward_model() {
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::from_chars("abcdefghijklmnopqrstuvwxyzT .:\n".chars()).unwrap();
    // The pad token is an id no text produces, so each row pools at its own last character.
    let pad = tok.vocab_size();
    let cfg = format!(
        r#"{{"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"], "num_labels": 1, "pad_token_id": {pad}, "n_embd": 16, "n_head": 2, "n_layer": 2, "n_positions": 64, "vocab_size": {}}}"#,
        pad + 1
    );
    let model = Model::init(ModelConfig::from_json(&cfg, "t").unwrap(), 7, DType::F32, &Device::Cpu).unwrap();
    let rdir = dir.path().join("rm");
    Pretrained { model, tokenizer: tok, dir: None }.save(&rdir).unwrap();
    write(dir.path(), "d.jsonl", "{\"w\": \"cat\"}\n{\"w\": \"dog\"}\n{\"w\": \"owl\"}\n");
    let yaml = "task: r\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: d.jsonl\ntest_split: test\noutput_type: generate_until\ndoc_to_text: \"say {{w}}\"\ndoc_to_target: \"{{w}}\"\nmetric_list:\n  - metric: exact_match\n  - metric: reward\n";
    let t = Task::load(&write(dir.path(), "r.yaml", yaml)).unwrap();
    let e = eval::run_task(&t, &mut Scripted, Graders::default(), &EvalOptions::default(), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("--reward-model"), "{e}");

    let p = Pretrained::load(&rdir, DType::F32, &Device::Cpu).unwrap();
    let direct = |text: &str| -> f64 {
        let ids = p.tokenizer.encode(text, false).unwrap();
        let x = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
        f64::from(p.model.score(&x).unwrap().to_vec2::<f32>().unwrap()[0][0])
    };
    let mut means = Vec::new();
    for chat in [false, true] {
        let rm = RewardModel::load(&rdir).unwrap().with_chat(chat);
        let graders = Graders { reward: Some(&rm), ..Default::default() };
        let r = eval::run_task(&t, &mut Scripted, graders, &EvalOptions::default(), &mut |_| {}).unwrap();
        let mut sum = 0.0;
        for s in &r.samples {
            let (ctx, out) = (s["arguments"]["context"].as_str().unwrap(), s["resps"][0].as_str().unwrap());
            // The plain chat template (the reward model's tokenizer has none of its own).
            let text = if chat { format!("user: {ctx}\nassistant: {out}\n") } else { format!("{ctx}{out}") };
            let got = s["scores"]["reward,none"].as_f64().unwrap();
            assert!((got - direct(&text)).abs() < 1e-5, "chat {chat}: {got} vs {} for {text:?}", direct(&text));
            assert_eq!(s["reward_model"], rm.name());
            sum += got;
        }
        assert!((r.get("reward").unwrap() - sum / 3.0).abs() < 1e-9);
        means.push(sum);
    }
    assert!((means[0] - means[1]).abs() > 1e-6, "the chat rendering must change what the model reads");

    let lm = dir.path().join("lm");
    tiny_model(&lm);
    let e = RewardModel::load(&lm).err().unwrap().to_string();
    assert!(e.contains("not a reward model"), "{e}");
    // … nor a reward model for the model under evaluation.
    let e = LocalBackend::load(&rdir).err().unwrap().to_string();
    assert!(e.contains("--reward-model"), "{e}");
}
