//! `train` / `train pretrain`: pretraining as configured by `--config` and flags.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use lmstack_train::config::PretrainConfig;
use lmstack_train::pretrain;

/// Flags override the `--config` file (with `--resume` and no `--config`, the run's saved
/// `config.toml`), which overrides the defaults.
#[derive(Args, Debug, Default)]
pub(crate) struct PretrainArgs {
    /// TOML configuration file (see docs/training.md for every key).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) run: crate::RunFlags,
    /// Run directory [default: runs/shakespeare-char].
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Training text (a file or a directory of .txt files) or a dataset prepared by `train data`
    /// [default: embedded tiny Shakespeare].
    #[arg(long)]
    data: Option<PathBuf>,
    /// `char`, `bpe:VOCAB_SIZE`, or a directory with tokenizer.json [default: char].
    #[arg(long)]
    tokenizer: Option<String>,
    /// Architecture: gpt2, llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3 (causal LMs) or
    /// bert (masked LM) [default: gpt2].
    #[arg(long)]
    arch: Option<String>,
    /// Transformer blocks [default: 4].
    #[arg(long)]
    n_layer: Option<usize>,
    /// Attention heads [default: 4].
    #[arg(long)]
    n_head: Option<usize>,
    /// Key/value heads for llama (grouped-query attention) [default: n_head].
    #[arg(long)]
    n_kv_head: Option<usize>,
    /// Hidden width [default: 128].
    #[arg(long)]
    n_embd: Option<usize>,
    /// Context length [default: 64].
    #[arg(long)]
    block_size: Option<usize>,
    /// Sliding attention window in tokens (mistral, qwen2, qwen3, phi3: every layer; gemma2,
    /// gemma3: the local layers); 0 = none [default: 0].
    #[arg(long)]
    sliding_window: Option<usize>,
    /// Standard deviation of the initial weights; 0 = 1/sqrt(n_embd) [default: 0; nanoGPT: 0.02].
    #[arg(long)]
    init_std: Option<f64>,
    /// Sequences per micro-batch [default: 12].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Slices of each micro-batch run in parallel on the cores [default: 2].
    #[arg(long)]
    parallel_shards: Option<usize>,
    /// Optimizer steps [default: 2000].
    #[arg(long)]
    max_steps: Option<u64>,
    /// Peak learning rate [default: 1e-3].
    #[arg(long)]
    lr: Option<f64>,
    /// Final learning rate [default: 1e-4].
    #[arg(long)]
    min_lr: Option<f64>,
    /// Warmup steps [default: 100].
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Steps until the cosine reaches min_lr [default: max_steps].
    #[arg(long)]
    lr_decay_steps: Option<u64>,
    /// AdamW β₂ [default: 0.99].
    #[arg(long)]
    beta2: Option<f64>,
    /// Weight decay [default: 0.1].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Gradient-norm clip, 0 = off [default: 1.0].
    #[arg(long)]
    grad_clip: Option<f64>,
    /// Seed for initialisation and data order [default: 1337].
    #[arg(long)]
    seed: Option<u64>,
    /// Steps between validation estimates [default: 250].
    #[arg(long)]
    eval_interval: Option<u64>,
    /// Batches per validation estimate [default: 20].
    #[arg(long)]
    eval_iters: Option<usize>,
    /// Steps between metrics lines [default: 10].
    #[arg(long)]
    log_interval: Option<u64>,
    /// Steps between checkpoints, 0 = only at the end [default: 500].
    #[arg(long)]
    checkpoint_interval: Option<u64>,
    /// Tokens sampled at the end [default: 300].
    #[arg(long)]
    sample_tokens: Option<usize>,
}

impl PretrainArgs {
    fn resolve(&self) -> Result<PretrainConfig> {
        let mut c = match &self.config {
            Some(p) => PretrainConfig::from_toml_file(p)?,
            // A resumed run starts from the configuration it saved, so that `--resume --out-dir
            // DIR` alone continues it as it was set up; flags still change training settings.
            None if self.run.resume => {
                let dir = self.out_dir.clone().unwrap_or_else(|| PretrainConfig::default().out_dir);
                let saved = dir.join("config.toml");
                if saved.is_file() {
                    PretrainConfig::from_toml_file(&saved)?
                } else {
                    PretrainConfig::default()
                }
            }
            None => PretrainConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(
            out_dir,
            tokenizer,
            arch,
            n_layer,
            n_head,
            n_kv_head,
            n_embd,
            init_std,
            block_size,
            sliding_window,
            batch_size,
            grad_accum,
            parallel_shards
        );
        set!(max_steps, lr, min_lr, warmup_steps, lr_decay_steps, beta2, weight_decay, grad_clip, seed);
        set!(eval_interval, eval_iters, log_interval, checkpoint_interval, sample_tokens);
        if self.data.is_some() {
            c.data = self.data.clone();
        }
        c.validate()?;
        Ok(c)
    }
}

pub(crate) fn pretrain_cmd(args: &PretrainArgs) -> Result<ExitCode> {
    let cfg = args.resolve()?;
    let opts = args.run.options()?;
    let s = pretrain::run(&cfg, &opts)?;
    if s.interrupted {
        println!(
            "stopped at step {}; checkpoint saved in {}. Continue with: train --resume --out-dir {}",
            s.steps,
            cfg.out_dir.join("checkpoints").display(),
            cfg.out_dir.display()
        );
        return Ok(ExitCode::from(130));
    }
    if let Some(sample) = &s.sample {
        println!("--- sample ---\n{sample}\n--------------");
    }
    println!(
        "done: {} steps, validation loss {:.4} (perplexity {:.2}) over the whole validation split{}",
        s.steps,
        s.val_loss.unwrap_or(f64::NAN),
        s.val_loss.unwrap_or(f64::NAN).exp(),
        s.best_val.map(|(st, v)| format!("; best estimate {v:.4} at step {st}")).unwrap_or_default()
    );
    println!(
        "speed: {:.0} tokens/s, {:.1} ms/step ({:.1} ms/step without the periodic evaluations and checkpoints); peak memory {}",
        s.tokens_per_sec,
        s.ms_per_step,
        s.train_ms_per_step,
        s.peak_rss_mib.map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "n/a".into())
    );
    let d = cfg.out_dir.display();
    println!("model: {d}/model (best: {d}/best); metrics: {d}/metrics.jsonl; curve: {d}/loss.svg");
    if cfg.arch == "bert" {
        println!(
            "try: cargo run --release --bin train -- sample --model {d}/model --fill \"To be, or not to [MASK]e\""
        );
    } else {
        println!("try: cargo run --release --bin train -- sample --model {d}/model --prompt \"ROMEO:\"");
    }
    Ok(ExitCode::SUCCESS)
}
