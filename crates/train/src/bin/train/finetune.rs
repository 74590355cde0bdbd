//! `train finetune`: SFT (full or LoRA) and classification runs; `train merge`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

/// Flags override the defaults (with `--resume`, the run's saved `finetune.json`).
#[derive(Args, Debug)]
pub(crate) struct FinetuneArgs {
    /// `sft`: instruction finetuning of a causal LM; `classify`: a classification head on a
    /// masked LM (bert); `dpo`: preference tuning on chosen/rejected pairs; `reward`: a reward
    /// model (a score head, Bradley–Terry loss) on the same pairs; `kto`: KTO on answers
    /// labelled good or bad (`{"prompt", "completion", "label"}` lines, or pairs) [default: sft].
    #[arg(long, value_enum)]
    task: Option<lmstack_train::finetune::Task>,
    /// Base model directory (or GGUF file, LoRA only) [default: runs/shakespeare-char/model;
    /// classify: runs/shakespeare-bert/model; dpo: runs/finetune-merged].
    #[arg(long)]
    base: Option<PathBuf>,
    /// Training examples, JSONL [default: data/synth/train.jsonl; classify:
    /// data/classify/train.jsonl with `{"text", "label"}` lines; dpo:
    /// data/synth-preference/train.jsonl with TRL's `prompt`/`chosen`/`rejected` lines].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Held-out examples (JSONL) [default: --val-fraction of --data; classify:
    /// data/classify/test.jsonl; dpo: data/synth-preference/test.jsonl].
    #[arg(long)]
    val_data: Option<PathBuf>,
    /// Held out for validation without --val-data [default: 0.05].
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Run directory [default: runs/finetune; classify: runs/classify].
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// `full` (every weight) or `lora` (adapters on a frozen base; a reward model's new head
    /// trains whole beside them and the run writes `adapter/` and the merged `model/`)
    /// [default: lora; classify: full, the only one it supports; reward: full].
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
    /// Optimizer steps [default: 1500; classify: 600; dpo: 250, an epoch of the synthetic pairs].
    #[arg(long)]
    max_steps: Option<u64>,
    /// Examples per micro-batch [default: 16].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per step [default: 1].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Peak learning rate; the cosine ends at a tenth of it [default: 5e-3 for LoRA, 1e-3 for
    /// full, 1e-4 for classify; dpo: 1e-3 for LoRA, 1e-4 for full].
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
    /// Activation checkpointing: recompute each block's activations in the backward pass
    /// instead of keeping them, and compute the loss in chunks (much less memory, about a
    /// third more time per step).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Padding-free batches: pack each micro-batch's examples end to end, each attending only
    /// within itself (no compute spent on padding; same loss up to rounding).
    #[arg(long)]
    padding_free: bool,
    /// dpo: strength of the pull towards the reference model [default: 0.5].
    #[arg(long)]
    beta: Option<f64>,
    /// dpo: TRL's loss types: sigmoid (DPO), robust (DPO with --label-smoothing), ipo, hinge,
    /// exo_pair (with --label-smoothing > 0), nca_pair, bco_pair, sppo_hard, apo_zero, apo_down,
    /// sigmoid_norm, discopop, aot, aot_unpaired; or orpo (no reference model; beta 0.1 unless
    /// given) [default: sigmoid].
    #[arg(long, value_enum)]
    loss_type: Option<lmstack_train::finetune::LossType>,
    /// dpo with --loss-type robust, exo_pair, aot or aot_unpaired: the assumed fraction of
    /// flipped labels [default: 0].
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// dpo: weight of the chosen answers' token NLL added to the loss (TRL's "sft" loss_type
    /// beside "sigmoid"; RPO) [default: 1].
    #[arg(long)]
    sft_weight: Option<f64>,
    /// kto: weight of the desirable answers' losses [default: 1].
    #[arg(long)]
    desirable_weight: Option<f64>,
    /// kto: weight of the undesirable answers' losses [default: 1].
    #[arg(long)]
    undesirable_weight: Option<f64>,
    /// dpo, kto: the reference model directory [default: the base; with LoRA, the base with the
    /// adapters switched off].
    #[arg(long)]
    ref_model: Option<PathBuf>,
    /// dpo: compute the reference's log-probabilities once before training instead of at every
    /// step.
    #[arg(long)]
    precompute_ref_log_probs: bool,
    /// dpo: the f-divergence the loss regularises with (TRL's f_divergence_type):
    /// reverse_kl (DPO), forward_kl, js_divergence, alpha_divergence [default: reverse_kl].
    #[arg(long, value_enum)]
    f_divergence_type: Option<lmstack_train::finetune::FDivergenceType>,
    /// dpo with --f-divergence-type alpha_divergence: α [default: 0.5].
    #[arg(long)]
    f_alpha_divergence_coef: Option<f64>,
    /// dpo with --loss-type discopop: τ, the temperature of its blend [default: 0.05].
    #[arg(long)]
    discopop_tau: Option<f64>,
    /// dpo, kto: the most tokens of a sequence (prompt and answer); longer ones are cut
    /// (TRL's max_length) [default: what the model's context holds].
    #[arg(long)]
    max_length: Option<usize>,
    /// dpo, kto: which end of a longer sequence is kept: keep_start (a sequence whose prompt
    /// fills --max-length is left out) or keep_end (dpo only) [default: keep_start].
    #[arg(long, value_enum)]
    truncation_mode: Option<lmstack_train::finetune::TruncationMode>,
    #[command(flatten)]
    run: crate::RunFlags,
}

impl FinetuneArgs {
    fn resolve(&self) -> Result<lmstack_train::finetune::FinetuneConfig> {
        use lmstack_train::finetune::{FinetuneConfig, Task};
        // A resumed run starts from the settings it saved, so that `--resume --out-dir DIR`
        // alone continues it (`--task` is needed only to find the default classify dir).
        let saved = match self.run.resume {
            true => {
                let at = self.out_dir.clone().unwrap_or_else(|| Task::default_out_dir(self.task.unwrap_or_default()));
                let at = at.join("finetune.json");
                at.is_file().then(|| FinetuneConfig::read_saved(&at, self.task)).transpose()?
            }
            false => None,
        };
        let fresh = saved.is_none();
        let mut c = match saved {
            Some(saved) => saved,
            None => FinetuneConfig::for_task(self.task.unwrap_or_default(), self.method),
        };
        // ORPO's own defaults (TRL's ORPOConfig): β = 0.1, and its loss holds the NLL term.
        if fresh && self.loss_type == Some(lmstack_train::finetune::LossType::Orpo) {
            c.beta = 0.1;
            c.sft_weight = 0.0;
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(task, base, data, val_fraction, out_dir, method, lora_r, lora_alpha, lora_dropout, target_modules);
        set!(chat_template, max_steps, batch_size, grad_accum, warmup_steps, weight_decay, eval_interval);
        set!(
            checkpoint_interval,
            seed,
            beta,
            loss_type,
            label_smoothing,
            sft_weight,
            desirable_weight,
            undesirable_weight,
            truncation_mode,
            f_divergence_type,
            f_alpha_divergence_coef,
            discopop_tau
        );
        if self.max_length.is_some() {
            c.max_length = self.max_length;
        }
        if self.ref_model.is_some() {
            c.ref_model = self.ref_model.clone();
        }
        c.precompute_ref_log_probs |= self.precompute_ref_log_probs;
        if self.val_data.is_some() {
            c.val_data = self.val_data.clone();
        }
        if let Some(lr) = self.lr {
            (c.lr, c.min_lr) = (lr, lr / 10.0);
        }
        c.train_on_inputs |= self.train_on_inputs;
        c.gradient_checkpointing |= self.gradient_checkpointing;
        c.padding_free |= self.padding_free;
        c.validate()?;
        Ok(c)
    }
}

pub(crate) fn finetune_cmd(a: &FinetuneArgs) -> Result<ExitCode> {
    use lmstack_train::finetune::{self, Task};
    let cfg = a.resolve()?;
    let classify = cfg.task == Task::Classify;
    let resume_line = format!("continue with: train finetune --resume --out-dir {}", cfg.out_dir.display());
    let opts = a.run.options()?;
    if classify {
        let s = lmstack_train::classify::run(&cfg, &opts)?;
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
    if cfg.task == Task::Reward {
        let s = lmstack_train::reward::run(&cfg, &opts)?;
        if s.interrupted {
            println!("interrupted at step {}; {resume_line}", s.steps);
            return Ok(ExitCode::from(130));
        }
        let acc = match s.accuracy {
            (before, Some(after)) if !before.is_nan() => {
                format!(
                    "held-out accuracy {before:.3} → {after:.3}, loss {:.4} → {:.4}",
                    s.val_loss.0,
                    s.val_loss.1.unwrap_or(f64::NAN)
                )
            }
            _ => "no held-out pairs".to_owned(),
        };
        println!("done: {} steps, {:.0} ms/step; {acc}; wrote {}", s.steps, s.train_ms_per_step, s.output.display());
        println!(
            "try: cargo run --release --bin train -- sample --model {} --reward '[{{\"role\": \"user\", \"content\": \"reverse: a b\"}}, {{\"role\": \"assistant\", \"content\": \"b a\"}}]'",
            s.output.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if cfg.task == Task::Kto {
        let s = lmstack_train::kto::run(&cfg, &opts)?;
        if s.interrupted {
            println!("interrupted at step {}; {resume_line}", s.steps);
            return Ok(ExitCode::from(130));
        }
        let val = match (s.val_loss, s.margin) {
            ((before, Some(after)), Some(m)) if !before.is_nan() => {
                format!("held-out loss {before:.4} → {after:.4}, reward margin {m:.3}")
            }
            _ => "no held-out examples".to_owned(),
        };
        println!("done: {} steps, {:.0} ms/step; {val}; wrote {}", s.steps, s.train_ms_per_step, s.output.display());
        return Ok(ExitCode::SUCCESS);
    }
    if cfg.task == Task::Dpo {
        let s = lmstack_train::dpo::run(&cfg, &opts)?;
        if s.interrupted {
            println!("interrupted at step {}; {resume_line}", s.steps);
            return Ok(ExitCode::from(130));
        }
        let val = match (s.val_loss, s.reward_accuracy) {
            ((before, Some(after)), Some(acc)) if !before.is_nan() => format!(
                "held-out loss {before:.4} → {after:.4}, reward accuracy {acc:.3}, chosen answer the more likely {:.3} → {:.3}",
                s.likelihood_accuracy.0,
                s.likelihood_accuracy.1.unwrap_or(f64::NAN)
            ),
            _ => "no held-out pairs".to_owned(),
        };
        println!(
            "done: {} steps, {:.0} ms/step ({:.0} training alone); {val}; wrote {}",
            s.steps,
            s.ms_per_step,
            s.train_ms_per_step,
            s.output.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let s = finetune::run(&cfg, &opts)?;
    if s.interrupted {
        println!("interrupted at step {}; {resume_line}", s.steps);
        return Ok(ExitCode::from(130));
    }
    let val = match s.val_loss {
        (before, Some(after)) if !before.is_nan() => format!("validation loss {before:.4} → {after:.4}"),
        _ => "no validation examples".to_owned(),
    };
    let peak = s.peak_rss_mib.map_or_else(String::new, |m| format!(", peak memory {m:.0} MiB"));
    println!(
        "done: {} steps, {:.0} ms/step ({:.0} training alone){peak}; {val}; wrote {}",
        s.steps,
        s.ms_per_step,
        s.train_ms_per_step,
        s.output.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub(crate) struct MergeArgs {
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

pub(crate) fn merge_cmd(a: &MergeArgs) -> Result<ExitCode> {
    lmstack_train::finetune::merge(&a.base, &a.adapter, &a.out)?;
    println!("merged {} into {}: wrote {}", a.adapter.display(), a.base.display(), a.out.display());
    Ok(ExitCode::SUCCESS)
}
