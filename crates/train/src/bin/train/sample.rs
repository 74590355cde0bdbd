//! `train sample`: text from a causal LM, masks filled by a masked LM, labels from a classifier.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use lmstack_core::{DType, Device, Pretrained, SamplingParams, StopConditions};

#[derive(Args, Debug)]
pub(crate) struct SampleArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json) or GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "\n")]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 300)]
    max_tokens: usize,
    /// Sampling temperature, 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Top-k filter, 0 = off.
    #[arg(long, default_value_t = 200)]
    top_k: usize,
    /// Top-p filter, 1 = off.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// RNG seed.
    #[arg(long)]
    seed: Option<u64>,
    /// A PEFT LoRA adapter directory to apply on top of --model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Masked LM (bert): list the most likely tokens for each `[MASK]` in this text.
    #[arg(long, conflicts_with = "classify")]
    fill: Option<String>,
    /// Classifier (bert with a classification head): the label probabilities of this text.
    #[arg(long)]
    classify: Option<String>,
    /// Reward model (`finetune --task reward`): the reward of this text, or of a JSON list of
    /// chat messages rendered with the model's chat template.
    #[arg(long, conflicts_with_all = ["classify", "fill"])]
    reward: Option<String>,
    /// How many tokens --fill lists.
    #[arg(long, default_value_t = 5)]
    top: usize,
}

pub(crate) fn sample_cmd(a: &SampleArgs) -> Result<ExitCode> {
    let mut p = Pretrained::load(&a.model, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading {}", a.model.display()))?;
    if let Some(dir) = &a.adapter {
        lmstack_core::lora::load_peft(&mut p.model, dir)?;
    }
    if let Some(text) = &a.reward {
        println!("{:.4}", lmstack_train::reward::score_text(&p, text)?);
        return Ok(ExitCode::SUCCESS);
    }
    if p.model.is_scorer() {
        anyhow::bail!(
            "{} is a reward model (a sequence classifier, no LM head): score a text with --reward TEXT",
            a.model.display()
        );
    }
    p.model.repack_for_inference()?;
    if let Some(text) = &a.fill {
        for (i, top) in lmstack_train::classify::fill_mask(&p, text, a.top)?.iter().enumerate() {
            println!("[MASK] #{}:", i + 1);
            for (t, q) in top {
                println!("  {:>7.2}%  {t:?}", q * 100.0);
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(text) = &a.classify {
        for (label, q) in &lmstack_train::classify::predict(&p, &[text.as_str()])?[0] {
            println!("{:>7.2}%  {label}", q * 100.0);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !p.model.config().is_causal() {
        anyhow::bail!(
            "{}: a bert model does not generate text; use --fill \"… [MASK] …\" (or --classify TEXT for a classifier)",
            a.model.display()
        );
    }
    let (n, max) = (p.tokenizer.encode(&a.prompt, false)?.len(), p.model.max_len());
    if n > max {
        // As nanoGPT crops its context: `generate` keeps the window's last half.
        eprintln!(
            "note: the prompt is {n} tokens, more than the model's context of {max}: it continues from the last {}",
            max / 2
        );
    }
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        ..Default::default()
    };
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", a.prompt)?;
    let ids = p.tokenizer.encode(&a.prompt, false)?;
    let stop = StopConditions::max_tokens(a.max_tokens);
    lmstack_core::decoding::generate(&p.model, &p.tokenizer, &ids, params, stop, |piece| {
        let _ = write!(stdout, "{piece}");
        let _ = stdout.flush();
    })?;
    writeln!(stdout)?;
    Ok(ExitCode::SUCCESS)
}
