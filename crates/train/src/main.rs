//! The `train` binary: pretraining (the default command), sampling from a model directory,
//! tokenizer training, data preparation, finetuning, merging and GGUF export. `train --help`
//! and `train <command> --help` describe every flag.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use lmstack_core::{DType, Device, Pretrained, SamplingParams, StopConditions, Tokenizer};
use lmstack_train::config::PretrainConfig;
use lmstack_train::pretrain::{self, RunOptions};

#[derive(Parser, Debug)]
#[command(name = "train", version, about = "lmstack model development: pretrain, sample, train tokenizers")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no command, `train` pretrains (nanoGPT's character-level Shakespeare by default).
    #[command(flatten)]
    pretrain: PretrainArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Pretrain a model (causal LM: gpt2, llama; masked LM: bert).
    Pretrain(Box<PretrainArgs>),
    /// Generate text from a model directory.
    Sample(SampleArgs),
    /// Train a tokenizer (byte-level BPE or character-level) and save it as tokenizer.json.
    Tokenizer(TokenizerArgs),
    /// Prepare a dataset: ingest, clean, deduplicate, filter, split, tokenize, pack shards
    /// (`train data synth …` generates instruction data instead).
    Data(Box<DataCmd>),
    /// Finetune a model on instruction data (JSONL: `messages` or `prompt`/`completion`):
    /// full or LoRA, with the loss on the answers only.
    Finetune(Box<FinetuneArgs>),
    /// Fold a LoRA adapter into its base model and write a complete model directory.
    Merge(MergeArgs),
    /// Write a model directory (or GGUF file) as a GGUF file for llama.cpp, Ollama, LM Studio.
    Export(ExportArgs),
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct DataCmd {
    #[command(subcommand)]
    sub: Option<DataSub>,
    #[command(flatten)]
    args: Option<DataArgs>,
}

#[derive(Subcommand, Debug)]
enum DataSub {
    /// Generate a labelled instruction dataset (train.jsonl, test.jsonl) from templates.
    Synth(SynthArgs),
}

#[derive(Args, Debug)]
struct SynthArgs {
    /// Output directory.
    #[arg(long, default_value = "data/synth")]
    out: PathBuf,
    /// Tasks, comma-separated: reverse, sort, lookup, copy, add (`add` needs digits in the
    /// base model's vocabulary).
    #[arg(long, value_delimiter = ',', default_value = "reverse,sort,lookup,copy")]
    tasks: Vec<String>,
    /// Training examples.
    #[arg(long, default_value_t = 4000)]
    train: usize,
    /// Held-out test examples (no prompt shared with train).
    #[arg(long, default_value_t = 200)]
    test: usize,
    /// Seed.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
}

/// Flags override the defaults (with `--resume`, the run's saved `finetune.json`).
#[derive(Args, Debug)]
struct FinetuneArgs {
    /// `sft`: instruction finetuning of a causal LM; `classify`: a classification head on a
    /// masked LM (bert) [default: sft].
    #[arg(long, value_enum)]
    task: Option<lmstack_train::finetune::Task>,
    /// Base model directory [default: runs/shakespeare-char/model; classify:
    /// runs/shakespeare-bert/model].
    #[arg(long)]
    base: Option<PathBuf>,
    /// Training examples, JSONL [default: data/synth/train.jsonl; classify:
    /// data/classify/train.jsonl with `{"text", "label"}` lines].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Held-out examples (JSONL) [default: --val-fraction of --data; classify:
    /// data/classify/test.jsonl].
    #[arg(long)]
    val_data: Option<PathBuf>,
    /// Held out for validation without --val-data [default: 0.05].
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Run directory [default: runs/finetune; classify: runs/classify].
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// `full` (every weight) or `lora` (adapters on a frozen base) [default: lora; classify:
    /// full, the only one it supports].
    #[arg(long, value_enum)]
    method: Option<lmstack_train::finetune::Method>,
    /// LoRA rank [default: 8].
    #[arg(long)]
    lora_r: Option<usize>,
    /// LoRA alpha (scale = alpha / r) [default: 16].
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Dropout on the adapters' input [default: 0.05].
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// Modules to adapt (comma-separated names, e.g. c_attn,c_proj or q_proj,v_proj), or
    /// all-linear [default: all-linear].
    #[arg(long, value_delimiter = ',')]
    target_modules: Option<Vec<String>>,
    /// Chat template: model (the base's own, else plain), plain, chatml, or a Jinja file
    /// [default: model].
    #[arg(long)]
    chat_template: Option<String>,
    /// Also score the prompt tokens.
    #[arg(long)]
    train_on_inputs: bool,
    /// Optimizer steps [default: 1500; classify: 600].
    #[arg(long)]
    max_steps: Option<u64>,
    /// Examples per micro-batch [default: 16].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per step [default: 1].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Peak learning rate; the cosine ends at a tenth of it [default: 5e-3 for LoRA, 1e-3 for
    /// full, 1e-4 for classify].
    #[arg(long)]
    lr: Option<f64>,
    /// Warmup steps [default: 20].
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Weight decay [default: 0].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Validation every N steps [default: 250].
    #[arg(long)]
    eval_interval: Option<u64>,
    /// Checkpoint every N steps [default: 100].
    #[arg(long)]
    checkpoint_interval: Option<u64>,
    /// Seed [default: 1337].
    #[arg(long)]
    seed: Option<u64>,
    /// Continue the run in --out-dir from its latest checkpoint, with the settings it saved
    /// (only --max-steps may change).
    #[arg(long)]
    resume: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

impl FinetuneArgs {
    fn resolve(&self) -> Result<lmstack_train::finetune::FinetuneConfig> {
        use lmstack_train::finetune::{FinetuneConfig, Method, Task};
        let out_for = |task| PathBuf::from(if task == Task::Classify { "runs/classify" } else { "runs/finetune" });
        // A resumed run starts from the settings it saved, so that `--resume --out-dir DIR`
        // alone continues it (`--task` is needed only to find the default classify dir).
        let saved = match self.resume {
            true => {
                let at = self.out_dir.clone().unwrap_or_else(|| out_for(self.task.unwrap_or_default()));
                let at = at.join("finetune.json");
                at.is_file().then(|| FinetuneConfig::read_saved(&at, self.task)).transpose()?
            }
            false => None,
        };
        let mut c = match saved {
            Some(saved) => saved,
            None => {
                let task = self.task.unwrap_or_default();
                let classify = task == Task::Classify;
                let method = self.method.unwrap_or(if classify { Method::Full } else { Method::Lora });
                let lr = match (classify, method) {
                    (true, _) => 1e-4,
                    (false, Method::Lora) => 5e-3,
                    (false, Method::Full) => 1e-3,
                };
                let pick = |sft: &str, cls: &str| PathBuf::from(if classify { cls } else { sft });
                FinetuneConfig {
                    task,
                    base: pick("runs/shakespeare-char/model", "runs/shakespeare-bert/model"),
                    data: pick("data/synth/train.jsonl", "data/classify/train.jsonl"),
                    val_data: classify.then(|| "data/classify/test.jsonl".into()),
                    out_dir: out_for(task),
                    method,
                    max_steps: if classify { 600 } else { 1500 },
                    lr,
                    min_lr: lr / 10.0,
                    ..FinetuneConfig::default()
                }
            }
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(task, base, data, val_fraction, out_dir, method, lora_r, lora_alpha, lora_dropout, target_modules);
        set!(chat_template, max_steps, batch_size, grad_accum, warmup_steps, weight_decay, eval_interval);
        set!(checkpoint_interval, seed);
        if self.val_data.is_some() {
            c.val_data = self.val_data.clone();
        }
        if let Some(lr) = self.lr {
            (c.lr, c.min_lr) = (lr, lr / 10.0);
        }
        c.train_on_inputs |= self.train_on_inputs;
        if c.task == Task::Classify && c.method == Method::Lora {
            anyhow::bail!("--task classify trains every weight; --method lora is not supported for it");
        }
        Ok(c)
    }
}

#[derive(Args, Debug)]
struct MergeArgs {
    /// Base model directory.
    #[arg(long)]
    base: PathBuf,
    /// PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Output model directory.
    #[arg(long)]
    out: PathBuf,
}

fn synth_cmd(a: &SynthArgs) -> Result<ExitCode> {
    let (n, m) = lmstack_train::synth::write(&a.out, &a.tasks, a.train, a.test, a.seed)?;
    println!(
        "{n} training and {m} test examples of {} in {} (train.jsonl, test.jsonl)",
        a.tasks.join(", "),
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn finetune_cmd(a: &FinetuneArgs) -> Result<ExitCode> {
    use lmstack_train::finetune::{self, Task};
    let cfg = a.resolve()?;
    let classify = cfg.task == Task::Classify;
    let resume_line = format!("continue with: train finetune --resume --out-dir {}", cfg.out_dir.display());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without a checkpoint (the last one saved stays)");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit at once)");
    })
    .context("installing the Ctrl-C handler")?;
    if classify {
        let s = lmstack_train::classify::run(&cfg, a.resume, stop, !a.quiet)?;
        if s.interrupted {
            println!("interrupted at step {}; {resume_line}", s.steps);
            return Ok(ExitCode::from(130));
        }
        println!(
            "done: {} steps, {:.0} ms/step; held-out accuracy {:.3} → {:.3} (majority label {:.3}); wrote {}",
            s.steps,
            s.ms_per_step,
            s.accuracy.0,
            s.accuracy.1.unwrap_or(f64::NAN),
            s.majority_baseline,
            s.output.display()
        );
        println!(
            "try: cargo run --release --bin train -- sample --model {} --classify \"Why dost thou weep\"",
            s.output.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let s = finetune::run(&cfg, a.resume, stop, !a.quiet)?;
    if s.interrupted {
        println!("interrupted at step {}; {resume_line}", s.steps);
        return Ok(ExitCode::from(130));
    }
    let val = match s.val_loss {
        (before, Some(after)) if !before.is_nan() => format!("validation loss {before:.4} → {after:.4}"),
        _ => "no validation examples".to_owned(),
    };
    println!("done: {} steps, {:.0} ms/step; {val}; wrote {}", s.steps, s.ms_per_step, s.output.display());
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json) or GGUF file; a Llama
    /// or GPT-2 model with a byte-level BPE or character-level tokenizer.
    #[arg(long)]
    model: PathBuf,
    /// Output GGUF file.
    #[arg(long)]
    out: PathBuf,
    /// How the matrices are stored: f32, f16, q8_0, q4_0, q4_1, q4_k, q6_k (norms stay f32).
    #[arg(long = "type", default_value = "f16", value_parser = |s: &str| s.parse::<lmstack_core::gguf::WriteType>())]
    wtype: lmstack_core::gguf::WriteType,
}

fn export_cmd(a: &ExportArgs) -> Result<ExitCode> {
    let p = Pretrained::load(&a.model, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading the model {}", a.model.display()))?;
    lmstack_core::gguf::write_model(&p.model, &p.tokenizer, &a.out, a.wtype)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    println!("wrote {} ({:?}, {:.1} MB)", a.out.display(), a.wtype, bytes as f64 / 1e6);
    Ok(ExitCode::SUCCESS)
}

fn merge_cmd(a: &MergeArgs) -> Result<ExitCode> {
    lmstack_train::finetune::merge(&a.base, &a.adapter, &a.out)?;
    println!("merged {} into {}: wrote {}", a.adapter.display(), a.base.display(), a.out.display());
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
struct DataArgs {
    /// Text files, JSONL files, or directories of them (.txt, .jsonl, .json).
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Output directory (manifest.json, stats.json, tokenizer/, *.bin shards).
    #[arg(long)]
    out: PathBuf,
    /// JSONL field holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// `char`, `bpe:VOCAB_SIZE` (trained on the cleaned corpus), or a tokenizer directory.
    #[arg(long, default_value = "char")]
    tokenizer: String,
    /// Fraction held out for validation (by document; by tail for a single document).
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Seed of the split and of MinHash.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// How text files become documents: `file` or `paragraphs`.
    #[arg(long, default_value = "file")]
    doc_split: String,
    /// Skip cleaning (NFC, control characters, whitespace).
    #[arg(long)]
    no_clean: bool,
    /// Keep exact duplicates.
    #[arg(long)]
    no_exact_dedup: bool,
    /// Jaccard threshold for near-duplicates, 0 = off.
    #[arg(long, default_value_t = 0.8)]
    near_dup_threshold: f64,
    /// MinHash permutations.
    #[arg(long, default_value_t = 128)]
    num_perm: usize,
    /// Drop documents shorter than this (characters).
    #[arg(long, default_value_t = 1)]
    min_chars: usize,
    /// Drop documents longer than this (characters), 0 = no limit.
    #[arg(long, default_value_t = 0)]
    max_chars: usize,
    /// Drop documents with more symbols per alphanumeric character than this.
    #[arg(long, default_value_t = 1.0)]
    max_symbol_ratio: f64,
    /// Drop documents whose fraction of repeated lines exceeds this, 0 = off.
    #[arg(long, default_value_t = 0.0)]
    max_repeated_lines: f64,
    /// Tokens per shard.
    #[arg(long, default_value_t = 1 << 24)]
    shard_tokens: usize,
    /// Skip malformed JSONL lines (counted) instead of stopping.
    #[arg(long)]
    skip_bad_lines: bool,
}

fn data_cmd(a: &DataArgs) -> Result<ExitCode> {
    use lmstack_train::data::{self, filter::Filters, DataConfig, DocSplit};
    let doc_split = match a.doc_split.as_str() {
        "file" => DocSplit::File,
        "paragraphs" => DocSplit::Paragraphs,
        other => anyhow::bail!("--doc-split `{other}`: expected file or paragraphs"),
    };
    let cfg = DataConfig {
        inputs: a.input.clone(),
        text_field: a.text_field.clone(),
        out: a.out.clone(),
        tokenizer: a.tokenizer.clone(),
        val_fraction: a.val_fraction,
        seed: a.seed,
        clean: !a.no_clean,
        exact_dedup: !a.no_exact_dedup,
        near_dup_threshold: a.near_dup_threshold,
        num_perm: a.num_perm,
        filters: Filters {
            min_chars: a.min_chars,
            max_chars: a.max_chars,
            max_symbol_ratio: a.max_symbol_ratio,
            max_repeated_lines: a.max_repeated_lines,
        },
        doc_split,
        shard_tokens: a.shard_tokens,
        skip_bad_lines: a.skip_bad_lines,
    };
    let m = data::prepare(&cfg)?;
    print!("{}", data::report(&m.stats));
    println!(
        "vocabulary {} ({} bytes per token); {} train and {} validation shards in {}",
        m.vocab_size,
        m.token_bytes,
        m.train.len(),
        m.val.len(),
        a.out.display()
    );
    println!("train on it with: cargo run --release --bin train -- --data {}", a.out.display());
    Ok(ExitCode::SUCCESS)
}

/// Flags override the `--config` file (with `--resume` and no `--config`, the run's saved
/// `config.toml`), which overrides the defaults.
#[derive(Args, Debug, Default)]
struct PretrainArgs {
    /// TOML configuration file (see docs/training.md for every key).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the run in --out-dir from its latest checkpoint, configured as it was saved
    /// (flags may still change training settings, e.g. a larger --max-steps).
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Start again in --out-dir even if it holds a run (its checkpoints and models are replaced).
    #[arg(long)]
    overwrite: bool,
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
    /// Architecture: gpt2, llama or bert [default: gpt2].
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
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

impl PretrainArgs {
    fn resolve(&self) -> Result<PretrainConfig> {
        let mut c = match &self.config {
            Some(p) => PretrainConfig::from_toml_file(p)?,
            // A resumed run starts from the configuration it saved, so that `--resume --out-dir
            // DIR` alone continues it as it was set up; flags still change training settings.
            None if self.resume => {
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

#[derive(Args, Debug)]
struct SampleArgs {
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
    /// How many tokens --fill lists.
    #[arg(long, default_value_t = 5)]
    top: usize,
}

#[derive(Args, Debug)]
struct TokenizerArgs {
    /// Text files to train on.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// `bpe` (byte-level) or `char`.
    #[arg(long, default_value = "bpe")]
    kind: String,
    /// Vocabulary size (bpe).
    #[arg(long, default_value_t = 4096)]
    vocab_size: usize,
    /// Output directory for tokenizer.json and tokenizer_config.json.
    #[arg(long)]
    out: PathBuf,
    /// Train on the raw text instead of the cleaned text (NFC, control characters removed,
    /// whitespace normalised, as `train data` cleans it).
    #[arg(long)]
    no_clean: bool,
}

fn pretrain_cmd(args: &PretrainArgs) -> Result<ExitCode> {
    let cfg = args.resolve()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit at once)");
    })
    .context("installing the Ctrl-C handler")?;
    let opts =
        RunOptions { resume: args.resume, progress: !args.quiet, stop, verbose: true, overwrite: args.overwrite };
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

fn sample_cmd(a: &SampleArgs) -> Result<ExitCode> {
    let mut p = Pretrained::load(&a.model, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading {}", a.model.display()))?;
    if let Some(dir) = &a.adapter {
        lmstack_core::lora::load_peft(&mut p.model, dir)?;
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

fn tokenizer_cmd(a: &TokenizerArgs) -> Result<ExitCode> {
    // Clean each input into a scratch directory first, so the vocabulary is learnt on the same
    // text `train data` would tokenize.
    let scratch = a.out.join(".clean-inputs.tmp");
    let cleaned: Vec<PathBuf> = if a.no_clean {
        a.input.clone()
    } else {
        std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        let mut v = Vec::new();
        for (i, f) in a.input.iter().enumerate() {
            let text = lmstack_train::corpus::load(Some(f))?;
            let p = scratch.join(format!("{i}.txt"));
            std::fs::write(&p, lmstack_train::data::clean::clean(&text))
                .with_context(|| format!("writing {}", p.display()))?;
            v.push(p);
        }
        v
    };
    let files: Vec<&std::path::Path> = cleaned.iter().map(PathBuf::as_path).collect();
    let tok = match a.kind.as_str() {
        "bpe" => Tokenizer::train_bpe(&files, a.vocab_size, &["<|endoftext|>"]),
        "char" => Tokenizer::train_chars(&files),
        other => Err(lmstack_core::Error::invalid("kind", format!("`{other}`: expected bpe or char"))),
    };
    let _ = std::fs::remove_dir_all(&scratch);
    let tok = tok?;
    tok.save(&a.out)?;
    println!("{} tokenizer, {} tokens, saved to {}", a.kind, tok.vocab_size(), a.out.display());
    Ok(ExitCode::SUCCESS)
}

// Training allocates and frees many tensors of the same few sizes each step; glibc returns
// large blocks to the OS and the next step pays for fresh zeroed pages, while mimalloc keeps
// and reuses them (measured ~10% faster steps on the default run).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps memory that mimalloc has freed committed instead of handing it back to the OS 10 ms
/// later: a step frees its activations at its end and allocates the same sizes at the start of
/// the next, and pages handed back returned as page faults and kernel page zeroing (about 430
/// faults per step of the default run, ~4 % of its time; a few hundred in a whole run with this). Peak memory is
/// unchanged, since what is kept is what the next step needs. `MIMALLOC_PURGE_DELAY` in the
/// environment still decides when set.
#[allow(unsafe_code)]
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // `mi_option_purge_delay` in mimalloc.h (the same in v2 and v3); -1 means never purge.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an option stores a value in mimalloc's option table; valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

fn main() -> ExitCode {
    keep_freed_memory();
    lmstack_core::prefer_rayon_threads();
    let cli = Cli::parse();
    let res = match &cli.command {
        None => pretrain_cmd(&cli.pretrain),
        Some(Command::Pretrain(a)) => pretrain_cmd(a),
        Some(Command::Sample(a)) => sample_cmd(a),
        Some(Command::Tokenizer(a)) => tokenizer_cmd(a),
        Some(Command::Data(d)) => match &d.sub {
            Some(DataSub::Synth(s)) => synth_cmd(s),
            None => match &d.args {
                Some(a) => data_cmd(a),
                None => Err(anyhow::anyhow!("train data: give --input and --out, or a subcommand (synth)")),
            },
        },
        Some(Command::Finetune(a)) => finetune_cmd(a),
        Some(Command::Merge(a)) => merge_cmd(a),
        Some(Command::Export(a)) => export_cmd(a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
