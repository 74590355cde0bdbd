//! Writes a GGUF model as a Hugging Face model directory (safetensors, `config.json`,
//! `tokenizer.json`, `tokenizer_config.json`), its weights dequantized to f32: the f32 base
//! `cargo xtask bench finetune` trains, which PyTorch + peft load too.
//!
//! ```text
//! cargo run --release -p lmstack-train --example gguf_to_dir -- MODEL.gguf OUT_DIR
//! ```

use lmstack_core::{DType, Device, Pretrained};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [gguf, out] = args.as_slice() else {
        anyhow::bail!("usage: gguf_to_dir MODEL.gguf OUT_DIR");
    };
    let p = Pretrained::load(std::path::Path::new(gguf), DType::F32, &Device::Cpu)?;
    p.save(std::path::Path::new(out))?;
    println!("wrote {out}");
    Ok(())
}
