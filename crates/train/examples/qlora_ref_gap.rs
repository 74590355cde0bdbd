//! A quantized base with fresh LoRA adapters (which change nothing): the log-probability of an
//! answer from the policy's pass (with gradients) and from the DPO reference's (without), as a
//! training run computes them, where they are equal, and with candle's 8-bit quantized
//! kernels in the pass without gradients, where they are not.
//!
//! ```sh
//! cargo xtask fetch-model smollm2
//! cargo run --release -p lmstack-train --example qlora_ref_gap -- ~/.cache/lmstack/models/SmolLM2-135M-Instruct.Q4_1.gguf
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use lmstack_core::examples::{ChatFormat, Example};
use lmstack_core::lora::LoraConfig;
use lmstack_core::{DType, Device, Pretrained};

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: qlora_ref_gap MODEL.gguf"))?;
    let mut p = Pretrained::load(std::path::Path::new(&path), DType::F32, &Device::Cpu)?;
    let cfg: LoraConfig =
        serde_json::from_value(serde_json::json!({"r": 8, "lora_alpha": 16.0, "target_modules": "all-linear"}))?;
    // As `finetune` attaches them: this also makes every product exact.
    let (step, training) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    lmstack_train::finetune::attach_lora(&mut p.model, &cfg, 1, step, training)?;
    let fmt = ChatFormat::from_spec("model", &p.tokenizer)?;
    for (q, a) in [
        ("reverse: day deer key", "key deer day"),
        ("sort: silk sea", "sea silk"),
        ("What is the capital of France?", "The capital of France is Paris."),
    ] {
        let ex = Example::Chat(vec![("user".into(), q.into()), ("assistant".into(), a.into())]);
        let t = lmstack_core::examples::tokenize(&ex, &p.tokenizer, &fmt, false)?;
        let b = lmstack_train::sft::batch(&[&t], p.model.max_len(), 0, &Device::Cpu)?;
        let mut logp = |exact: bool, grad: bool| -> anyhow::Result<f32> {
            p.model.set_exact_products(exact);
            let pass = || p.model.sequence_logps(&b.inputs, &b.labels, None);
            let (s, _) = if grad { pass()? } else { lmstack_core::grad::no_grad(pass)? };
            Ok(s.to_vec1::<f32>()?[0])
        };
        let policy = logp(true, true)?;
        let reference = logp(true, false)?;
        let kernels = logp(false, false)?;
        println!(
            "{q:?} ({} answer tokens): policy {policy:.5}, reference {reference:.5} (gap {:.5}); with the 8-bit kernels {kernels:.5} (gap {:.5})",
            t.n_scored(),
            policy - reference,
            policy - kernels
        );
    }
    Ok(())
}
