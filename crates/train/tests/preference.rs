//! Preference data: TRL's line shapes (explicit or implicit prompt, text or messages), bad lines
//! named by `file:line` and field, pairs without a difference counted, and answers scored alone.

use lmstack_core::Tokenizer;
use lmstack_train::preference::{read_pairs, tokenize_pair, Pair, Turns};
use lmstack_train::sft::ChatFormat;
use serde_json::json;

/// TRL's `DataCollatorForPreference` cuts `prompt + answer` to `[:max_length]` (keep_start) or
/// `[-max_length:]` (keep_end), its completion mask alike, and drops a pair whose prompt alone
/// fills `max_length`; its loss never scores the first position. The cases are TRL 1.16's
/// collator output on prompt ids 0..6 and answer ids 6..10 (its keep_end mask for 3 tokens is
/// [1, 1, 1], whose first entry its shifted loss does not read).
#[test]
fn over_long_sequences_are_cut_as_trl_cuts_them() {
    use lmstack_train::finetune::TruncationMode::{KeepEnd, KeepStart};
    use lmstack_train::preference::truncate;
    use lmstack_train::sft::Tokenized;
    let t = Tokenized { ids: (0..10).collect(), scored: (0..10).map(|i| i >= 6).collect() };
    let cut = |max, mode| {
        let mut c = t.clone();
        let kept = truncate(&mut c, max, mode);
        (c.ids, c.scored.iter().map(|&s| u8::from(s)).collect::<Vec<_>>(), kept)
    };
    assert_eq!(cut(10, KeepStart), (t.ids.clone(), vec![0, 0, 0, 0, 0, 0, 1, 1, 1, 1], true));
    assert_eq!(cut(8, KeepStart), ((0..8).collect(), vec![0, 0, 0, 0, 0, 0, 1, 1], true));
    assert_eq!(cut(8, KeepEnd), ((2..10).collect(), vec![0, 0, 0, 0, 1, 1, 1, 1], true));
    assert_eq!(cut(3, KeepEnd), ((7..10).collect(), vec![0, 1, 1], true));
    assert_eq!(cut(6, KeepStart), ((0..6).collect(), vec![0; 6], false), "the prompt fills 6 tokens");
}

fn chat(msgs: &[(&str, &str)]) -> Turns {
    Turns::Chat(msgs.iter().map(|(r, c)| (r.to_string(), c.to_string())).collect())
}

fn text(s: &str) -> Turns {
    Turns::Text(s.into())
}

/// Each shape, and the prompt TRL's `extract_prompt` (trl 1.16) finds in the implicit ones.
#[test]
fn trl_shapes_read_as_trl_reads_them() {
    let cases = [
        (
            json!({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}),
            Pair { prompt: text("The sky is"), chosen: text(" blue."), rejected: text(" green.") },
        ),
        // The space before the first difference goes to the answers.
        (
            json!({"chosen": "The sky is blue.", "rejected": "The sky is green."}),
            Pair { prompt: text("The sky is"), chosen: text(" blue."), rejected: text(" green.") },
        ),
        (
            json!({"prompt": [{"role": "user", "content": "What color is the sky?"}],
                   "chosen": [{"role": "assistant", "content": "It is blue."}],
                   "rejected": [{"role": "assistant", "content": "It is green."}]}),
            Pair {
                prompt: chat(&[("user", "What color is the sky?")]),
                chosen: chat(&[("assistant", "It is blue.")]),
                rejected: chat(&[("assistant", "It is green.")]),
            },
        ),
        // Implicit, several turns: the common messages are the prompt.
        (
            json!({"chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sky?"},
                              {"role": "assistant", "content": "Blue."}],
                   "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sky?"},
                                {"role": "assistant", "content": "Green."}]}),
            Pair {
                prompt: chat(&[("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Sky?")]),
                chosen: chat(&[("assistant", "Blue.")]),
                rejected: chat(&[("assistant", "Green.")]),
            },
        ),
    ];
    for (line, want) in cases {
        assert_eq!(Pair::from_value(&line).unwrap(), want, "{line}");
    }
}

/// Bad lines name the file, the line and the field; ties are counted and left out.
#[test]
fn bad_lines_are_named_and_ties_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prefs.jsonl");
    let good = r#"{"prompt": "2+2=", "chosen": "4", "rejected": "5"}"#;
    for (line, want) in [
        (r#"{"prompt": "2+2=", "chosen": "4"}"#, "`rejected` is missing"),
        (r#"{"prompt": "2+2=", "chosen": 4, "rejected": "5"}"#, "chosen: expected a string or a list of messages"),
        (
            r#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": "4", "rejected": "5"}"#,
            "must all be text or all be messages",
        ),
        (
            r#"{"prompt": [], "chosen": [{"role": "bot", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}"#,
            "chosen[0].role: `bot`",
        ),
        (
            r#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "4"}], "rejected": [{"role": "user", "content": "5"}]}"#,
            "`chosen` has no assistant turn",
        ),
        (r#"not json"#, "not JSON"),
    ] {
        std::fs::write(&path, format!("{good}\n{line}\n")).unwrap();
        let err = read_pairs(&path).unwrap_err().to_string();
        assert!(err.contains(&format!("{}:2: ", path.display())), "{err}");
        assert!(err.contains(want), "{err} (wanted {want})");
    }
    let tie = r#"{"prompt": "2+2=", "chosen": "4", "rejected": "4"}"#;
    std::fs::write(&path, format!("{good}\n\n{tie}\n{good}\n")).unwrap();
    let f = read_pairs(&path).unwrap();
    assert_eq!((f.pairs.len(), f.lines.clone(), f.identical.clone()), (2, vec![1, 4], vec![3]));
    std::fs::write(&path, format!("{tie}\n")).unwrap();
    let err = read_pairs(&path).unwrap_err().to_string();
    assert!(err.contains("no preference pairs with two different answers"), "{err}");
}

/// Both sequences start with the same prompt tokens; only the answer (and its end-of-turn or
/// end-of-sequence token) is scored, not an assistant turn inside the prompt.
#[test]
fn only_the_answers_are_scored() {
    let corpus = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:?!+=\n0123456789";
    let mut tok = Tokenizer::from_chars(corpus.chars()).unwrap();
    tok.add_special_tokens(&["<eos>"]);
    let mut sp = tok.special_tokens().clone();
    sp.eos = Some("<eos>".into());
    tok.set_special_tokens(sp).unwrap();
    let fmt = ChatFormat::from_spec("plain", &tok).unwrap();
    let decode = |ids: &[u32]| tok.decode(ids, false).unwrap();
    let scored_text = |t: &lmstack_train::sft::Tokenized| -> String {
        let ids: Vec<u32> = t.ids.iter().zip(&t.scored).filter(|(_, s)| **s).map(|(i, _)| *i).collect();
        decode(&ids)
    };
    // Text: prompt, answer, end of sequence.
    let p = Pair { prompt: text("2+2="), chosen: text("4"), rejected: text("five") };
    let (c, r) = tokenize_pair(&p, &tok, &fmt).unwrap();
    assert_eq!(scored_text(&c), "4<eos>");
    assert_eq!(scored_text(&r), "five<eos>");
    assert_eq!(decode(&c.ids), "2+2=4<eos>");
    // Messages, with an earlier assistant turn in the prompt that must not be scored.
    let p = Pair {
        prompt: chat(&[("user", "Hi"), ("assistant", "Hello."), ("user", "Sky?")]),
        chosen: chat(&[("assistant", "Blue.")]),
        rejected: chat(&[("assistant", "Green.")]),
    };
    let (c, r) = tokenize_pair(&p, &tok, &fmt).unwrap();
    for (t, answer) in [(&c, " Blue.\n"), (&r, " Green.\n")] {
        // (The plain template: the generation prompt `assistant:` is context, the rest scored.)
        let first = t.scored.iter().position(|s| *s).unwrap();
        let context = decode(&t.ids[..first]);
        assert_eq!(context, "user: Hi\nassistant: Hello.\nuser: Sky?\nassistant:");
        assert!(t.scored[first..].iter().all(|s| *s));
        assert_eq!(scored_text(t), answer);
    }
}

/// The losses and logged rewards equal TRL 1.16's `DPOTrainer` on the same log-probabilities
/// (`tests/data/preference_losses.json`, from TRL's own code), and the gradient in the policy's
/// log-probabilities agrees with finite differences.
#[test]
fn losses_equal_trls_and_their_gradients_finite_differences() {
    use candle_core::{Device, Tensor, Var};
    use lmstack_train::preference::{chosen_nll, orpo_loss, preference_loss, FDivergence, PairLogps, PreferenceLoss};
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/preference_losses.json");
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let v = |k: &str| -> Vec<f64> { serde_json::from_value(d[k].clone()).unwrap() };
    let lens = |k: &str| -> Vec<usize> { serde_json::from_value(d[k].clone()).unwrap() };
    let t = |x: &[f64]| Tensor::new(x, &Device::Cpu).unwrap();
    let (pc, pr, rc, rr) = (v("policy_chosen"), v("policy_rejected"), v("ref_chosen"), v("ref_rejected"));
    let (lc, lr) = (lens("len_chosen"), lens("len_rejected"));
    // A case of the file: a DPO-family loss (with TRL's `sft` loss beside it at `sft`), or ORPO
    // (`kind` None).
    let run = |kind: Option<PreferenceLoss>, beta: f64, div: FDivergence, sft: f64, pc: &Tensor| {
        let (pr, rc, rr) = (t(&pr), t(&rc), t(&rr));
        let Some(kind) = kind else { return orpo_loss(beta, pc, &pr, &lc, &lr).unwrap() };
        let p = PairLogps {
            policy_chosen: pc,
            policy_rejected: &pr,
            ref_chosen: &rc,
            ref_rejected: &rr,
            len_chosen: &lc,
            len_rejected: &lr,
        };
        let mut out = preference_loss(kind, beta, div, p).unwrap();
        if sft > 0.0 {
            out.loss = (out.loss + (chosen_nll(pc, &lc).unwrap() * sft).unwrap()).unwrap();
        }
        out
    };
    let cases = d["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 30);
    for c in cases {
        let beta = c["beta"].as_f64().unwrap();
        let sft = c["sft_weight"].as_f64().unwrap();
        let smoothing = c["label_smoothing"].as_f64().unwrap();
        let div = match c["f_divergence_type"].as_str() {
            None | Some("reverse_kl") => FDivergence::ReverseKl,
            Some("forward_kl") => FDivergence::ForwardKl,
            Some("js_divergence") => FDivergence::JsDivergence,
            Some("alpha_divergence") => FDivergence::Alpha(c["f_alpha_divergence_coef"].as_f64().unwrap()),
            Some(other) => panic!("{other}"),
        };
        let kind = match c["loss_type"].as_str().unwrap() {
            "sigmoid" => Some(PreferenceLoss::Sigmoid),
            "robust" => Some(PreferenceLoss::Robust { label_smoothing: c["label_smoothing"].as_f64().unwrap() }),
            "ipo" => Some(PreferenceLoss::Ipo),
            "hinge" => Some(PreferenceLoss::Hinge),
            "exo_pair" => Some(PreferenceLoss::ExoPair { label_smoothing: c["label_smoothing"].as_f64().unwrap() }),
            "nca_pair" => Some(PreferenceLoss::NcaPair),
            "bco_pair" => Some(PreferenceLoss::BcoPair),
            "sppo_hard" => Some(PreferenceLoss::SppoHard),
            "apo_zero" => Some(PreferenceLoss::ApoZero),
            "apo_down" => Some(PreferenceLoss::ApoDown),
            "sigmoid_norm" => Some(PreferenceLoss::SigmoidNorm),
            "discopop" => Some(PreferenceLoss::Discopop { tau: c["discopop_tau"].as_f64().unwrap() }),
            "aot" => Some(PreferenceLoss::Aot { label_smoothing: smoothing }),
            "aot_unpaired" => Some(PreferenceLoss::AotUnpaired { label_smoothing: smoothing }),
            "orpo" => None,
            other => panic!("{other}"),
        };
        let var = Var::from_tensor(&t(&pc)).unwrap();
        let out = run(kind, beta, div, sft, var.as_tensor());
        let loss = out.loss.to_scalar::<f64>().unwrap();
        // TRL computes ORPO in f32 (`.float()`), EXO's ε as an f32 tensor and the α-divergence
        // cases in f32 (it knows no f64 clamp), the other losses in the inputs' f64.
        let tol = match (kind, div) {
            (_, FDivergence::Alpha(_)) => 1e-5,
            (None | Some(PreferenceLoss::ExoPair { .. }), _) => 1e-6,
            _ => 1e-9,
        };
        let close = |a: f64, b: &serde_json::Value| (a - b.as_f64().unwrap()).abs() < tol;
        assert!(close(loss, &c["loss"]), "{kind:?} {div:?}: loss {loss} vs TRL {}", c["loss"]);
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
        assert!(close(mean(&out.chosen_rewards), &c["rewards/chosen"]), "{kind:?}");
        assert!(close(mean(&out.rejected_rewards), &c["rewards/rejected"]), "{kind:?}");
        assert!(close(out.margin(), &c["rewards/margins"]), "{kind:?}");
        assert!(close(out.accuracy(), &c["rewards/accuracies"]), "{kind:?}");
        for (k, v) in &out.metrics {
            assert!(close(*v, &c[*k]), "{kind:?} {k}: {v} vs TRL {}", c[*k]);
        }
        assert_eq!(out.metrics.len(), if kind.is_none() { 3 } else { 0 });
        // d loss / d log π(chosen), by finite differences.
        let g = out.loss.backward().unwrap().get(var.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        for i in 0..pc.len() {
            let at = |h: f64| {
                let mut x = pc.clone();
                x[i] += h;
                run(kind, beta, div, sft, &t(&x)).loss.to_scalar::<f64>().unwrap()
            };
            let fd = (at(1e-6) - at(-1e-6)) / 2e-6;
            assert!((fd - g[i]).abs() < 1e-6 * fd.abs().max(1.0), "{kind:?}: d/dpc[{i}] {} vs {fd}", g[i]);
        }
    }
    // Bad settings are errors, not NaNs.
    let (a, b) = (t(&pc), t(&pr));
    let p = PairLogps {
        policy_chosen: &a,
        policy_rejected: &b,
        ref_chosen: &a,
        ref_rejected: &b,
        len_chosen: &lc,
        len_rejected: &lr,
    };
    let rkl = FDivergence::ReverseKl;
    assert!(preference_loss(PreferenceLoss::Sigmoid, 0.0, rkl, p).is_err());
    assert!(preference_loss(PreferenceLoss::Robust { label_smoothing: 0.5 }, 0.1, rkl, p).is_err());
    assert!(preference_loss(PreferenceLoss::ExoPair { label_smoothing: 0.0 }, 0.1, rkl, p).is_err());
    assert!(preference_loss(PreferenceLoss::Aot { label_smoothing: 0.5 }, 0.1, rkl, p).is_err());
    assert!(preference_loss(PreferenceLoss::Discopop { tau: 0.0 }, 0.1, rkl, p).is_err());
    // TRL defines the f-divergences for the losses of the scores' difference only.
    let e = preference_loss(PreferenceLoss::NcaPair, 0.1, FDivergence::ForwardKl, p).unwrap_err();
    assert!(e.to_string().contains("reverse KL"), "{e}");
}

/// KTO on unpaired answers (the file's chosen answers desirable, its rejected ones not) equals
/// TRL's `KTOTrainer` lines run on the same log-probabilities and KL estimates; its gradient
/// matches finite differences.
#[test]
fn kto_equals_trls_and_its_gradient_finite_differences() {
    use candle_core::{Device, Tensor, Var};
    use lmstack_train::preference::kto_loss;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/preference_losses.json");
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let v = |k: &str| -> Vec<f64> { serde_json::from_value(d[k].clone()).unwrap() };
    let policy: Vec<f64> = [v("policy_chosen"), v("policy_rejected")].concat();
    let reference = Tensor::new([v("ref_chosen"), v("ref_rejected")].concat(), &Device::Cpu).unwrap();
    let n = v("policy_chosen").len();
    let labels: Vec<bool> = (0..2 * n).map(|i| i < n).collect();
    let cases = d["kto"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for c in cases {
        let f = |k: &str| c[k].as_f64().unwrap();
        let (beta, kl, w) = (f("beta"), f("kl"), (f("desirable_weight"), f("undesirable_weight")));
        let run = |p: &Tensor| kto_loss(beta, kl, p, &reference, &labels, w).unwrap();
        let var = Var::new(policy.as_slice(), &Device::Cpu).unwrap();
        let out = run(var.as_tensor());
        let loss = out.loss.to_scalar::<f64>().unwrap();
        assert!((loss - f("loss")).abs() < 1e-9, "{c}: {loss}");
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
        assert!((mean(&out.chosen_rewards) - f("rewards/chosen")).abs() < 1e-9, "{c}");
        assert!((mean(&out.rejected_rewards) - f("rewards/rejected")).abs() < 1e-9, "{c}");
        let g = out.loss.backward().unwrap().get(var.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        for i in 0..policy.len() {
            let at = |h: f64| {
                let mut x = policy.clone();
                x[i] += h;
                run(&Tensor::new(x, &Device::Cpu).unwrap()).loss.to_scalar::<f64>().unwrap()
            };
            let fd = (at(1e-6) - at(-1e-6)) / 2e-6;
            assert!((fd - g[i]).abs() < 1e-6 * fd.abs().max(1.0), "{c}: d/dp[{i}] {} vs {fd}", g[i]);
        }
    }
    assert!(kto_loss(0.0, 0.0, &reference, &reference, &labels, (1.0, 1.0)).is_err());
}
