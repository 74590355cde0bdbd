//! Logits of tiny random models match Python `transformers` (float32) to 1e-4, and parameter
//! counts match `model.num_parameters()`. Fixtures: `tests/data/make_fixtures.py`.

mod common;

use common::{expected, fixture, ids_tensor};
use lmstack_core::{DType, Device, Model, Tensor};

/// Compares the logits of `name` at every real (unpadded) position, and the parameter count.
fn check_lm(name: &str) {
    let model = check_logits(name);
    let exp = expected(name);
    assert_eq!(model.num_parameters() as u64, exp["num_parameters"].as_u64().unwrap(), "{name}: parameter count");
}

/// Compares the logits of `name` at every real (unpadded) position; returns the model.
fn check_logits(name: &str) -> Model {
    let exp = expected(name);
    let model = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
    let ids = ids_tensor(&exp["input_ids"]);
    let mask = ids_tensor(&exp["attention_mask"]);
    let tt = (!exp["token_type_ids"].is_null()).then(|| ids_tensor(&exp["token_type_ids"]));
    let logits = match model.as_bert() {
        Some(b) => b.mlm_logits(&model.hidden_states(&ids, Some(&mask), tt.as_ref()).unwrap()).unwrap(),
        None => model.forward(&ids, Some(&mask)).unwrap(),
    };
    let want: Vec<Vec<Vec<f32>>> = serde_json::from_value(exp["logits"].clone()).unwrap();
    let got = logits.to_vec3::<f32>().unwrap();
    let mask_rows: Vec<Vec<u32>> = serde_json::from_value(exp["attention_mask"].clone()).unwrap();
    let mut worst = 0f32;
    for (b, row) in mask_rows.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            if m == 1 {
                for (x, y) in got[b][t].iter().zip(&want[b][t]) {
                    worst = worst.max((x - y).abs());
                }
            }
        }
    }
    assert!(worst < 1e-4, "{name}: max |lmstack - transformers| = {worst}");
    model
}

#[test]
fn gpt2_logits_match_transformers() {
    check_lm("tiny-gpt2");
}

#[test]
fn llama_gqa_logits_match_transformers() {
    check_lm("tiny-llama");
}

#[test]
fn qwen2_biases_windows_and_yarn_match_transformers() {
    check_lm("tiny-qwen2");
}

#[test]
fn qwen3_head_norms_and_wide_heads_match_transformers() {
    check_lm("tiny-qwen3");
}

#[test]
fn mistral_sliding_window_and_linear_rope_match_transformers() {
    check_lm("tiny-mistral");
}

#[test]
fn gemma2_soft_caps_and_sandwich_norms_match_transformers() {
    check_lm("tiny-gemma2");
}

#[test]
fn gemma3_local_rope_and_head_norms_match_transformers() {
    check_lm("tiny-gemma3");
}

/// A Gemma 3 multimodal checkpoint is read as its text model: the vision tower is left out
/// (so are its parameters), the logits of text are `Gemma3ForConditionalGeneration`'s.
#[test]
fn gemma3_multimodal_checkpoints_read_as_their_text_model() {
    let m = check_logits("tiny-gemma3-mm");
    assert_eq!(m.config().model_type_str(), "gemma3_text");
    assert!(m.num_parameters() < expected("tiny-gemma3-mm")["num_parameters"].as_u64().unwrap() as usize);
}

#[test]
fn phi3_fused_projections_and_partial_rope_match_transformers() {
    check_lm("tiny-phi3");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    check_lm("tiny-llama3");
}

/// The families of the Llama block, with the features each fixture sets apart.
const FAMILIES: [&str; 7] =
    ["tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-llama3", "tiny-gemma2", "tiny-gemma3", "tiny-phi3"];

/// Greedy decoding through the KV cache (prompt prefilled in two chunks, then one token a
/// step, past the sliding windows) picks the tokens `transformers`' `generate` picks.
#[test]
fn greedy_generations_match_transformers() {
    use lmstack_core::SeqStep;
    for name in FAMILIES {
        let exp = expected(name);
        let prompt: Vec<u32> = serde_json::from_value(exp["greedy"]["prompt"].clone()).unwrap();
        let want: Vec<u32> = serde_json::from_value(exp["greedy"]["tokens"].clone()).unwrap();
        let model = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let mut cache = model.new_cache();
        let argmax = |t: &Tensor| t.flatten_all().unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
        model.forward_cached(&mut [SeqStep { tokens: &prompt[..7], cache: &mut cache, all_logits: false }]).unwrap();
        let mut logits = model
            .forward_cached(&mut [SeqStep { tokens: &prompt[7..], cache: &mut cache, all_logits: false }])
            .unwrap()
            .remove(0);
        let mut got = Vec::new();
        while got.len() < want.len() {
            let next = argmax(&logits);
            got.push(next);
            logits = model
                .forward_cached(&mut [SeqStep { tokens: &[next], cache: &mut cache, all_logits: false }])
                .unwrap()
                .remove(0);
        }
        assert_eq!(got, want, "{name}: greedy tokens");
    }
}

#[test]
fn bert_masked_lm_logits_match_transformers() {
    check_lm("tiny-bert");
}

#[test]
fn bert_classifier_logits_match_transformers() {
    let exp = expected("tiny-bert-cls");
    let model = Model::load(&fixture("tiny-bert-cls"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.num_parameters() as u64, exp["num_parameters"].as_u64().unwrap());
    let ids = ids_tensor(&exp["input_ids"]);
    let mask = ids_tensor(&exp["attention_mask"]);
    let tt = ids_tensor(&exp["token_type_ids"]);
    let logits = model.classify(&ids, Some(&mask), Some(&tt)).unwrap();
    let want: Vec<Vec<f32>> = serde_json::from_value(exp["logits"].clone()).unwrap();
    let want = Tensor::new(want, &Device::Cpu).unwrap();
    let d = common::max_diff(&logits, &want);
    assert!(d < 1e-4, "max diff {d}");
    let lmstack_core::ModelConfig::Bert(cfg) = model.config() else { panic!("not bert") };
    assert_eq!(cfg.labels(), ["negative", "neutral", "positive"]);
}

/// Reward models (`LlamaForSequenceClassification`, `GPT2ForSequenceClassification`, one label):
/// the score of each row's last non-pad token, as transformers pools it; their LM computations
/// are refused.
#[test]
fn reward_model_scores_match_transformers() {
    for name in common::REWARD_FIXTURES {
        let exp = expected(name);
        let model = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        assert!(model.is_scorer(), "{name}");
        assert_eq!(model.num_parameters() as u64, exp["num_parameters"].as_u64().unwrap(), "{name}");
        let ids = ids_tensor(&exp["input_ids"]);
        let scores = model.score(&ids).unwrap();
        let want: Vec<Vec<f32>> = serde_json::from_value(exp["logits"].clone()).unwrap();
        let want = Tensor::new(want, &Device::Cpu).unwrap();
        let d = common::max_diff(&scores, &want);
        assert!(d < 1e-4, "{name}: max diff {d}: {scores} vs {want}");
        // Pooling another token would give other scores.
        let spread =
            want.max_all().unwrap().to_scalar::<f32>().unwrap() - want.min_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(spread > 0.1, "{name}: scores too close to tell poolings apart");
        let err = model.forward(&ids, None).unwrap_err().to_string();
        assert!(err.contains("no LM head"), "{err}");
    }
}

#[test]
fn bf16_logits_stay_close_to_f32() {
    let exp = expected("tiny-llama");
    let ids = ids_tensor(&exp["input_ids"]).narrow(0, 0, 1).unwrap();
    let f32m = Model::load(&fixture("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    let bf16m = Model::load(&fixture("tiny-llama"), DType::BF16, &Device::Cpu).unwrap();
    let a = f32m.forward(&ids, None).unwrap();
    let b = bf16m.forward(&ids, None).unwrap();
    assert_eq!(b.dtype(), DType::BF16);
    let d = common::max_diff(&a, &b);
    assert!(d < 0.05, "bf16 drifted {d} from f32");
}
