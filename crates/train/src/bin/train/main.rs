//! The `train` binary: pretraining (the default command), sampling from a model directory,
//! tokenizer training, data preparation, finetuning, merging and GGUF export. `train --help`
//! and `train <command> --help` describe every flag.

mod data;
mod export;
mod finetune;
mod pretrain;
mod sample;
mod tokenizer;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use data::DataCmd;
use export::ExportArgs;
use finetune::{FinetuneArgs, MergeArgs};
use pretrain::PretrainArgs;
use sample::SampleArgs;
use tokenizer::TokenizerArgs;

#[derive(Parser, Debug)]
#[command(
    name = "train",
    version,
    about = "lmstack model development: pretrain, prepare data, train tokenizers, finetune, sample, merge adapters, export GGUF"
)]
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

/// How a training run is driven, the same for `train` and `train finetune`.
#[derive(clap::Args, Debug, Default)]
pub(crate) struct RunFlags {
    /// Continue the run in --out-dir from its latest checkpoint, with the settings it saved
    /// (flags may change training settings such as a larger --max-steps; a finetuning run
    /// allows only --max-steps, and a model setting that differs is refused, naming it).
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// With --resume: when the latest checkpoint fails verification, continue from the newest
    /// one that verifies.
    #[arg(long, requires = "resume")]
    pub resume_verified: bool,
    /// Start again in --out-dir even if it holds a run (what the run wrote there — checkpoints,
    /// models, adapter — is replaced).
    #[arg(long)]
    pub overwrite: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl RunFlags {
    /// The run options these flags ask for; Ctrl-C sets the stop flag.
    pub(crate) fn options(&self) -> Result<lmstack_train::trainer::RunOptions> {
        Ok(lmstack_train::trainer::RunOptions {
            resume: self.resume,
            resume_verified: self.resume_verified,
            progress: !self.quiet,
            stop: stop_on_ctrl_c()?,
            verbose: true,
            overwrite: self.overwrite,
        })
    }
}

/// Sets a flag on Ctrl-C, which a training run checks to checkpoint and stop after the current
/// step; a second Ctrl-C exits at once.
fn stop_on_ctrl_c() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without a checkpoint (the last one saved stays)");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit at once)");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(stop)
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
        None => pretrain::pretrain_cmd(&cli.pretrain),
        Some(Command::Pretrain(a)) => pretrain::pretrain_cmd(a),
        Some(Command::Sample(a)) => sample::sample_cmd(a),
        Some(Command::Tokenizer(a)) => tokenizer::tokenizer_cmd(a),
        Some(Command::Data(d)) => data::run(d),
        Some(Command::Finetune(a)) => finetune::finetune_cmd(a),
        Some(Command::Merge(a)) => finetune::merge_cmd(a),
        Some(Command::Export(a)) => export::export_cmd(a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
