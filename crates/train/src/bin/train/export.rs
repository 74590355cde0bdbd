//! `train export`: a model directory (or GGUF file) written as GGUF.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use lmstack_core::{DType, Device, Pretrained};

#[derive(Args, Debug)]
pub(crate) struct ExportArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json) or GGUF file; a Llama
    /// (or Mistral without a window), Qwen2, Qwen3 or GPT-2 model with a byte-level BPE or
    /// character-level tokenizer.
    #[arg(long)]
    model: PathBuf,
    /// Output GGUF file.
    #[arg(long)]
    out: PathBuf,
    /// How the matrices are stored: f32, f16, q8_0, q4_0, q4_1, q4_k, q6_k (norms stay f32).
    #[arg(long = "type", default_value = "f16", value_parser = |s: &str| s.parse::<lmstack_core::gguf::WriteType>())]
    wtype: lmstack_core::gguf::WriteType,
}

pub(crate) fn export_cmd(a: &ExportArgs) -> Result<ExitCode> {
    let p = Pretrained::load(&a.model, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading the model {}", a.model.display()))?;
    lmstack_core::gguf::write_model(&p.model, &p.tokenizer, &a.out, a.wtype)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    println!("wrote {} ({:?}, {:.1} MB)", a.out.display(), a.wtype, bytes as f64 / 1e6);
    Ok(ExitCode::SUCCESS)
}
