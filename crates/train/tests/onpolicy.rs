//! `train data pairs` (`onpolicy::build`): preference pairs from a model's own sampled answers.
//! Ranked by the reference answer, the chosen answer is the right one and the rejected a wrong
//! one; the pairs are the same at any batch size and after an interrupted run resumes. Ranked
//! by a reward model, the scores written are the reward model's and the chosen is the best.

use std::path::Path;

use lmstack_core::{DType, Device, Model, ModelConfig, Pretrained, SamplingParams, Tokenizer};
use lmstack_train::onpolicy::{build, PairsConfig, PairsSummary, Ranker};
use serde_json::{json, Value};

fn tiny(chars: &str, extra: &str, seed: u64) -> Pretrained {
    let tokenizer = Tokenizer::from_chars(chars.chars()).unwrap();
    let cfg = format!(
        r#"{{"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 48, "vocab_size": {}{extra}}}"#,
        tokenizer.vocab_size()
    );
    let model = Model::init(ModelConfig::from_json(&cfg, "t").unwrap(), seed, DType::F32, &Device::Cpu).unwrap();
    Pretrained { model, tokenizer, dir: None }
}

fn config(dir: &Path, out: &str, batch: usize) -> PairsConfig {
    PairsConfig {
        policy: "tiny".into(),
        prompts: dir.join("prompts.jsonl"),
        out: dir.join(out),
        samples: Some(dir.join(format!("samples-{out}"))),
        n: 4,
        sampling: SamplingParams { temperature: 1.0, ..Default::default() },
        seed: 7,
        max_tokens: 1,
        chat_template: "plain".into(),
        min_margin: 0.0,
        batch,
        limit: None,
        reference_chosen: false,
    }
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Text prompts answered with one token of {a, b}: a pair wherever the four answers are not
/// all right or all wrong, its chosen answer the reference.
#[test]
fn reference_answers_rank_sampled_answers_and_an_interrupted_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = String::new();
    for i in 0..40 {
        let answer = if i % 3 == 0 { "b" } else { "a" };
        s.push_str(&format!("{}\n", json!({"prompt": "ab".repeat(1 + i % 5), "answer": answer, "task": "t"})));
    }
    std::fs::write(dir.path().join("prompts.jsonl"), s).unwrap();
    let policy = tiny("ab", "", 3);
    let whole = build(&policy, &Ranker::Exact, &config(dir.path(), "whole.jsonl", 64), |_, _| {}).unwrap();
    assert_eq!((whole.prompts, whole.answers, whole.cut_off), (40, 160, 160), "{whole:?}");
    assert_eq!(whole.pairs + whole.no_pair, 40);
    assert!(whole.pairs >= 20 && whole.mean_score > 0.2 && whole.mean_score < 0.8, "{whole:?}");
    let pairs = lines(&dir.path().join("whole.jsonl"));
    // What `finetune --task dpo` reads.
    assert_eq!(
        lmstack_train::preference::read_pairs(&dir.path().join("whole.jsonl")).unwrap().pairs.len(),
        whole.pairs
    );
    assert_eq!(pairs.len(), whole.pairs);
    for p in &pairs {
        assert!(p["prompt"].is_string(), "{p}");
        assert_eq!(p["chosen"], p["answer"], "{p}");
        assert_ne!(p["rejected"], p["answer"], "{p}");
        assert_eq!(
            (p["chosen_score"].as_f64(), p["rejected_score"].as_f64(), &p["task"]),
            (Some(1.0), Some(0.0), &json!("t"))
        );
    }
    // Every answer, labelled for KTO.
    let samples = lines(&dir.path().join("samples-whole.jsonl"));
    assert!(whole.empty > 0, "this seed samples `<unk>` (no text) at times");
    assert_eq!(samples.len(), 160 - whole.empty, "empty text answers are left out");
    for a in &samples {
        assert_eq!(a["label"], json!(a["completion"] == a["answer"]), "{a}");
        assert_eq!(a["score"], json!(if a["label"] == json!(true) { 1.0 } else { 0.0 }), "{a}");
    }
    let (unpaired, _) = lmstack_train::preference::read_unpaired(&dir.path().join("samples-whole.jsonl")).unwrap();
    assert_eq!(unpaired.len(), samples.len());
    // Batches of 3 (whole prompts per group: 4 answers each): the same pairs, a group at a time.
    let mut groups = 0;
    let small = build(&policy, &Ranker::Exact, &config(dir.path(), "small.jsonl", 3), |_, _| groups += 1).unwrap();
    assert_eq!((groups, &small), (40, &whole));
    assert_eq!(lines(&dir.path().join("small.jsonl")), pairs);
    // Interrupted after 15 prompts: nothing at the output path; the rerun resumes and ends with
    // the same pairs and totals.
    let cfg = config(dir.path(), "resumed.jsonl", 20);
    let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        build(&policy, &Ranker::Exact, &cfg, |done, _| assert!(done < 15, "interrupted"))
    }));
    assert!(crashed.is_err());
    assert!(!cfg.out.exists());
    let resumed = build(&policy, &Ranker::Exact, &cfg, |_, _| {}).unwrap();
    assert_eq!(resumed, PairsSummary { resumed: 15, ..whole.clone() });
    assert_eq!(lines(&cfg.out), pairs);
    assert_eq!(lines(cfg.samples.as_ref().unwrap()), samples);
    assert!(!dir.path().join("resumed.jsonl.partial").exists());
    // With the reference chosen where every answer is wrong: a pair for every prompt not
    // answered right every time.
    let gold = build(
        &policy,
        &Ranker::Exact,
        &PairsConfig { reference_chosen: true, ..config(dir.path(), "gold.jsonl", 64) },
        |_, _| {},
    )
    .unwrap();
    assert!(gold.reference_chosen > 0 && gold.pairs == whole.pairs + gold.reference_chosen, "{gold:?}");
    for p in lines(&dir.path().join("gold.jsonl")) {
        assert_eq!(p["chosen"], p["answer"], "{p}");
    }
    // Other settings start again rather than resume.
    let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        build(&policy, &Ranker::Exact, &cfg, |done, _| assert!(done < 15, "interrupted"))
    }));
    assert!(crashed.is_err());
    let other =
        build(&policy, &Ranker::Exact, &PairsConfig { seed: 8, ..config(dir.path(), "resumed.jsonl", 20) }, |_, _| {})
            .unwrap();
    assert_eq!(other.resumed, 0);
}

/// Chat prompts through the plain template, ranked by a reward model: each answer stops at
/// the template's end of turn and is written without the space the template puts before it;
/// the scores written are the reward model's own for those conversations, the chosen the best.
#[test]
fn a_reward_model_ranks_chat_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = String::new();
    for w in ["cat", "dog", "sun", "sea", "owl", "fig"] {
        s.push_str(&format!("{}\n", json!({"messages": [{"role": "user", "content": format!("copy: {w}")}, {"role": "assistant", "content": w}]})));
    }
    std::fs::write(dir.path().join("prompts.jsonl"), s).unwrap();
    let chars = "abcdefghijklmnopqrstuvwxyz :\n";
    let policy = tiny(chars, "", 5);
    let scorer =
        tiny(chars, r#", "architectures": ["LlamaForSequenceClassification"], "num_labels": 1, "pad_token_id": 0"#, 9);
    assert_eq!(scorer.model.config().score_labels(), Some(1));
    let fmt = scorer.reward_format().unwrap();
    let ranker = Ranker::Reward { model: Box::new(scorer), name: "random".into() };
    let cfg = PairsConfig { max_tokens: 12, n: 3, ..config(dir.path(), "pairs.jsonl", 8) };
    let s = build(&policy, &ranker, &cfg, |_, _| {}).unwrap();
    assert_eq!((s.prompts, s.answers), (6, 18), "{s:?}");
    assert!(s.pairs >= 4, "{s:?}");
    let Ranker::Reward { model: scorer, .. } = &ranker else { unreachable!() };
    for p in lines(&cfg.out) {
        let user = p["prompt"].as_array().unwrap();
        assert_eq!((user.len(), user[0]["role"].as_str()), (1, Some("user")), "{p}");
        let mut scores = Vec::new();
        for k in ["chosen", "rejected"] {
            let a = p[k][0]["content"].as_str().unwrap();
            assert!(!a.contains('\n') && a.len() <= 13, "{k}: {a:?}");
            let conv = lmstack_core::examples::Example::Chat(vec![
                ("user".into(), user[0]["content"].as_str().unwrap().into()),
                ("assistant".into(), a.into()),
            ]);
            let r = scorer.rewards(&[scorer.reward_tokens(&conv, &fmt).unwrap()], 1).unwrap()[0];
            assert!((r - p[format!("{k}_score")].as_f64().unwrap()).abs() < 1e-6, "{k}: {r} in {p}");
            scores.push(r);
        }
        assert!(scores[0] > scores[1], "{p}");
    }
}

#[test]
fn bad_prompts_and_settings_are_refused_naming_what() {
    let dir = tempfile::tempdir().unwrap();
    let policy = tiny("ab", "", 3);
    let run = |text: &str, cfg: PairsConfig| {
        std::fs::write(dir.path().join("prompts.jsonl"), text).unwrap();
        build(&policy, &Ranker::Exact, &cfg, |_, _| {}).unwrap_err().to_string()
    };
    let cfg = || config(dir.path(), "out.jsonl", 8);
    for (text, needle) in [
        ("{\"prompt\": \"ab\", \"answer\": \"a\"}\n{\"prompt\": 3}\n", "prompts.jsonl:2: prompt: expected a string"),
        ("{\"prompt\": \"ab\"}\n", "prompts.jsonl:1: ranking by `answer` needs"),
        ("{\"prompt\": \"ab\", \"answer\": 1}\n", "prompts.jsonl:1: `answer`: expected a string"),
        ("{\"messages\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"answer\": \"a\"}\n", "no turn before"),
        ("not json\n", "prompts.jsonl:1: not JSON"),
        ("\n", "no prompts"),
        (
            &format!("{}\n", json!({"prompt": "ab".repeat(30), "answer": "a"})),
            "prompts.jsonl:1: the prompt is 60 tokens",
        ),
        ("{\"prompt\": \"ab\", \"answer\": \"c\"}\n", "no pairs: all 4 answers to each of the 1 prompts scored alike"),
    ] {
        let e = run(text, cfg());
        assert!(e.contains(needle), "{needle}: {e}");
    }
    let e = run("{\"prompt\": \"ab\", \"answer\": \"a\"}\n", PairsConfig { n: 1, ..cfg() });
    assert!(e.contains("at least 2"), "{e}");
    // With `reference_chosen`, a prompt no sample gets right pairs its reference with the worst.
    std::fs::write(dir.path().join("prompts.jsonl"), "{\"prompt\": \"ab\", \"answer\": \"c\"}\n").unwrap();
    let s = build(&policy, &Ranker::Exact, &PairsConfig { reference_chosen: true, ..cfg() }, |_, _| {}).unwrap();
    assert_eq!((s.pairs, s.reference_chosen), (1, 1), "{s:?}");
    let p = &lines(&dir.path().join("out.jsonl"))[0];
    assert_eq!(
        (&p["chosen"], p["chosen_score"].as_f64(), p["rejected_score"].as_f64()),
        (&json!("c"), Some(1.0), Some(0.0))
    );
}
