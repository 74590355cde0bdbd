//! Temporary: how far the no-grad reference pass is from the policy's graph pass on a GGUF base.
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use lmstack_core::examples::{ChatFormat, Example};
use lmstack_core::lora::LoraConfig;
use lmstack_core::{DType, Device, Pretrained};

fn main() {
    let path = std::env::args().nth(1).unwrap();
    let mut p = Pretrained::load(std::path::Path::new(&path), DType::F32, &Device::Cpu).unwrap();
    let cfg: LoraConfig =
        serde_json::from_value(serde_json::json!({"r": 8, "lora_alpha": 16.0, "target_modules": "all-linear"}))
            .unwrap();
    let _vars = lmstack_train::finetune::attach_lora(
        &mut p.model,
        &cfg,
        1,
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
    let fmt = ChatFormat::from_spec("model", &p.tokenizer).unwrap();
    for (q, a) in [
        ("reverse: day deer key", "key deer day"),
        ("sort: silk sea", "sea silk"),
        ("What is the capital of France?", "The capital of France is Paris."),
    ] {
        let ex = Example::Chat(vec![("user".into(), q.into()), ("assistant".into(), a.into())]);
        let t = lmstack_core::examples::tokenize(&ex, &p.tokenizer, &fmt, false).unwrap();
        let rows = [&t];
        let b = lmstack_train::sft::batch(&rows, p.model.max_len(), 0, &Device::Cpu).unwrap();
        let (graph, _) = p.model.sequence_logps(&b.inputs, &b.labels, None).unwrap();
        let (nograd, _) = lmstack_core::grad::no_grad(|| p.model.sequence_logps(&b.inputs, &b.labels, None)).unwrap();
        let g = graph.to_vec1::<f32>().unwrap()[0];
        let n = nograd.to_vec1::<f32>().unwrap()[0];
        println!("{q:?}: policy pass {g:.5}, reference pass {n:.5}, gap {:.5} ({} answer tokens)", g - n, t.n_scored());
    }
}
