//! `train data`: prepare a dataset (ingest, clean, deduplicate, filter, split, tokenize, pack);
//! `train data synth`: generate instruction data.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct DataCmd {
    #[command(subcommand)]
    sub: Option<DataSub>,
    #[command(flatten)]
    args: Option<DataArgs>,
}

/// Runs `train data` or its subcommand.
pub(crate) fn run(d: &DataCmd) -> Result<ExitCode> {
    match &d.sub {
        Some(DataSub::Synth(s)) => synth_cmd(s),
        Some(DataSub::Pairs(p)) => pairs_cmd(p),
        None => match &d.args {
            Some(a) => data_cmd(a),
            None => Err(anyhow::anyhow!("train data: give --input and --out, or a subcommand (synth, pairs)")),
        },
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum DataSub {
    /// Generate a labelled instruction dataset (train.jsonl, test.jsonl) from templates.
    Synth(SynthArgs),
    /// Build preference pairs from a model's own answers: sample several per prompt, rank
    /// them by the reference answer or a reward model, keep the best against the worst.
    Pairs(PairsArgs),
}

#[derive(Args, Debug)]
pub(crate) struct PairsArgs {
    /// The policy: a model directory or GGUF file (the SFT model to tune next).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter directory applied on top of --model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL prompts: `messages` (the turns before the last assistant turn) or `prompt` (text
    /// or messages), as SFT and preference data have them; `answer` holds the reference
    /// answer when ranking by it.
    #[arg(long)]
    prompts: PathBuf,
    /// Output JSONL of preference pairs (TRL's shape; `train finetune --task dpo --data`).
    #[arg(long)]
    out: PathBuf,
    /// Also write every sampled answer with its score to this JSONL file (`prompt`,
    /// `completion`, `score`; ranked by the reference answer, a `label` for `finetune --task
    /// kto`).
    #[arg(long)]
    samples: Option<PathBuf>,
    /// Rank answers with this reward model (`finetune --task reward`) instead of by the
    /// line's reference `answer` (exact match after trimming).
    #[arg(long)]
    reward_model: Option<PathBuf>,
    /// An answer is right when it contains the reference `answer` (ignoring case), rather
    /// than equals it: for models that answer in sentences.
    #[arg(long, conflicts_with = "reward_model")]
    contains: bool,
    /// When no sampled answer is right, pair the reference `answer` (chosen) against the
    /// worst sample, as SPIN and RPO pair the gold answer with the model's own.
    #[arg(long, conflicts_with = "reward_model")]
    reference_chosen: bool,
    /// Answers sampled per prompt.
    #[arg(long, default_value_t = 4)]
    n: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Top-k filter, 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Top-p filter, 1 = off.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Keep a pair only when the best answer's score exceeds the worst's by more than this.
    #[arg(long, default_value_t = 0.0)]
    min_margin: f64,
    /// Chat template the prompts are rendered with: `model`, `plain`, `chatml` or a file (as
    /// `finetune --chat-template`; the policy was finetuned with it).
    #[arg(long, default_value = "model")]
    chat_template: String,
    /// Sequences per model step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Use only the first N prompts.
    #[arg(long)]
    limit: Option<usize>,
    /// Seed.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
}

#[derive(Args, Debug)]
pub(crate) struct SynthArgs {
    /// Output directory [default: data/synth; with --preference, data/synth-preference].
    #[arg(long)]
    out: Option<PathBuf>,
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
    /// Write preference pairs (`prompt`, `chosen`: the right answer, `rejected`: a wrong one)
    /// in TRL's conversational shape instead of instruction examples.
    #[arg(long)]
    preference: bool,
}

#[derive(Args, Debug)]
pub(crate) struct DataArgs {
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
    /// Skip malformed JSONL lines and documents over --max-doc-bytes (counted) instead of
    /// stopping.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Refuse documents longer than this many bytes, naming file:line (0 = no limit; memory
    /// grows with the largest document).
    #[arg(long, default_value_t = lmstack_train::data::DEFAULT_MAX_DOC_BYTES)]
    max_doc_bytes: usize,
}

fn synth_cmd(a: &SynthArgs) -> Result<ExitCode> {
    use lmstack_train::synth::{write_shaped, Shape};
    let shape = if a.preference { Shape::Preference } else { Shape::Sft };
    let out =
        a.out.clone().unwrap_or_else(|| (if a.preference { "data/synth-preference" } else { "data/synth" }).into());
    let (n, m) = write_shaped(&out, &a.tasks, a.train, a.test, a.seed, shape)?;
    println!(
        "{n} training and {m} test {} of {} in {} (train.jsonl, test.jsonl)",
        if a.preference { "preference pairs" } else { "examples" },
        a.tasks.join(", "),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn pairs_cmd(a: &PairsArgs) -> Result<ExitCode> {
    use anyhow::Context;
    use lmstack_core::{DType, Device, Pretrained, SamplingParams};
    use lmstack_train::onpolicy::{build, PairsConfig, Ranker};
    let mut policy = Pretrained::load(&a.model, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading {}", a.model.display()))?;
    if let Some(dir) = &a.adapter {
        lmstack_core::lora::load_peft(&mut policy.model, dir)
            .with_context(|| format!("applying the adapter {}", dir.display()))?;
    }
    policy.model.repack_for_inference()?;
    let ranker = match &a.reward_model {
        Some(dir) => {
            let model = Pretrained::load(dir, DType::F32, &Device::Cpu)
                .with_context(|| format!("loading the reward model {}", dir.display()))?;
            Ranker::Reward { model: Box::new(model), name: dir.display().to_string() }
        }
        None if a.contains => Ranker::Contains,
        None => Ranker::Exact,
    };
    let cfg = PairsConfig {
        policy: match &a.adapter {
            Some(ad) => format!("{} + {}", a.model.display(), ad.display()),
            None => a.model.display().to_string(),
        },
        prompts: a.prompts.clone(),
        out: a.out.clone(),
        samples: a.samples.clone(),
        n: a.n,
        sampling: SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, ..Default::default() },
        seed: a.seed,
        max_tokens: a.max_tokens,
        chat_template: a.chat_template.clone(),
        min_margin: a.min_margin,
        batch: a.batch,
        limit: a.limit,
        reference_chosen: a.reference_chosen,
    };
    let t0 = std::time::Instant::now();
    let s = build(&policy, &ranker, &cfg, |done, all| {
        eprint!("\r{done}/{all} prompts ({:.0} s)", t0.elapsed().as_secs_f64());
    })?;
    eprintln!();
    if s.reference_chosen > 0 {
        println!("{} pairs have the reference answer as chosen (no sampled answer was right)", s.reference_chosen);
    }
    if s.resumed > 0 {
        println!("resumed after {} prompts answered by an interrupted run", s.resumed);
    }
    let what = match a.reward_model {
        Some(_) => "mean reward",
        None => "answers right",
    };
    println!(
        "{} pairs from {} prompts × {} answers in {} ({} prompts without a pair: all answers scored alike; {what} {:.3}; {} answers cut off at --max-tokens)",
        s.pairs,
        s.prompts,
        a.n,
        a.out.display(),
        s.no_pair,
        s.mean_score,
        s.cut_off
    );
    println!("tune on them with: train finetune --task dpo --data {} --base {}", a.out.display(), a.model.display());
    Ok(ExitCode::SUCCESS)
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
        max_doc_bytes: a.max_doc_bytes,
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
