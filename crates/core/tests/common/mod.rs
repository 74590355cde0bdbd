//! Helpers shared by the core integration tests: fixture paths and tolerant comparisons.
#![allow(dead_code)]

use std::path::PathBuf;

use lmstack_core::{DType, Device, Tensor};
use serde_json::Value;

/// The causal LM fixtures: GPT-2, Llama, and each family of the Llama block.
pub const CAUSAL_FIXTURES: [&str; 9] = [
    "tiny-gpt2",
    "tiny-llama",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-mistral",
    "tiny-llama3",
    "tiny-gemma2",
    "tiny-gemma3",
    "tiny-phi3",
];

/// Reward models: causal LMs' sequence-classification heads.
pub const REWARD_FIXTURES: [&str; 2] = ["tiny-llama-reward", "tiny-gpt2-reward"];

/// Every model fixture: the causal ones, the reward models and BERT's.
pub fn all_fixtures() -> impl Iterator<Item = &'static str> {
    CAUSAL_FIXTURES.into_iter().chain(REWARD_FIXTURES).chain(["tiny-bert", "tiny-bert-cls"])
}

/// `crates/core/tests/data/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// The repository's `data/` folder.
pub fn repo_data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data").join(name)
}

/// `expected.json` of a fixture.
pub fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A `[b, t]` u32 tensor from a JSON array of arrays.
pub fn ids_tensor(v: &Value) -> Tensor {
    let rows: Vec<Vec<u32>> = serde_json::from_value(v.clone()).unwrap();
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.into_iter().flatten().collect::<Vec<_>>(), (b, t), &Device::Cpu).unwrap()
}

/// Largest absolute difference between two equally shaped tensors.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A tensor `[n, v]` as rows.
pub fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
}
