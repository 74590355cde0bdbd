//! `lmstack-eval` (front door: `cargo xtask eval`): runs an eval suite on a model directory or
//! an OpenAI-compatible endpoint and writes lm-eval-shaped results, per-sample JSONL, a Markdown
//! summary and an HTML report; exits 1 when a suite threshold is not met.
//! `lmstack-eval compare A B` compares two runs on the same documents (paired tests) and writes
//! a side-by-side HTML report; exits 1 when B is significantly worse on some metric.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lmstack_app::backend::{Backend, LocalBackend};
use lmstack_app::compare::{self, Run};
use lmstack_app::endpoint::EndpointBackend;
use lmstack_app::eval::{self, EvalOptions, Suite};
use lmstack_app::judge::Judge;
use lmstack_app::report;
use lmstack_app::reward::RewardModel;

/// Evaluate a model on an eval suite (lm-evaluation-harness task files), or compare two runs.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Compare two runs on the same documents: paired bootstrap intervals, McNemar's test for
    /// 0/1 scores, and a side-by-side HTML report. Exits 1 when B is significantly worse.
    Compare {
        /// Run A's output folder (the baseline).
        a: PathBuf,
        /// Run B's output folder.
        b: PathBuf,
        /// Where to write the HTML report (default: `<B>/compare.html`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Significance level.
        #[arg(long, default_value_t = 0.05)]
        alpha: f64,
        /// Bootstrap resamples.
        #[arg(long, default_value_t = 2000)]
        bootstrap_iters: usize,
        /// Bootstrap seed.
        #[arg(long, default_value_t = 1234)]
        seed: u64,
    },
}

/// Running a suite.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Suite YAML.
    #[arg(long, default_value = "evals/shakespeare/suite.yaml")]
    suite: PathBuf,
    /// Model directory (run in-process).
    #[arg(long, default_value = "runs/shakespeare-char/model")]
    model: PathBuf,
    /// A PEFT LoRA adapter directory to load on top of --model.
    #[arg(long, conflicts_with = "endpoint")]
    adapter: Option<PathBuf>,
    /// Evaluate an OpenAI-compatible server instead (e.g. http://localhost:8000/v1).
    #[arg(long)]
    endpoint: Option<String>,
    /// The endpoint's model name (default: the first it lists).
    #[arg(long)]
    endpoint_model: Option<String>,
    /// Bearer token for the endpoint.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Requests in flight at once against the endpoint.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Read at most this many tokens at once (lm-eval's `max_length`; default: the model's
    /// context, over an endpoint what its context allows a scoring prompt).
    #[arg(long, value_parser = at_least_one)]
    max_length: Option<usize>,
    /// Output folder (default: `runs/eval/<suite name>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// At most this many documents per task.
    #[arg(long, value_parser = at_least_one)]
    limit: Option<usize>,
    /// Seed for few-shot sampling and bootstrap standard errors.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Bootstrap resamples for corpus-level metrics.
    #[arg(long, default_value_t = 1000)]
    bootstrap_iters: usize,
    /// Query as a chat model: contexts go through the model's chat template (local) or to
    /// `/v1/chat/completions` (endpoint; generation tasks only).
    #[arg(long)]
    chat: bool,
    /// A judge model for `llm-rubric` assertions: an OpenAI-compatible endpoint
    /// (e.g. http://localhost:8000/v1).
    #[arg(long)]
    judge: Option<String>,
    /// The judge endpoint's model name (default: the first it lists).
    #[arg(long)]
    judge_model: Option<String>,
    /// Bearer token for the judge endpoint.
    #[arg(long, env = "LMSTACK_JUDGE_API_KEY", hide_env_values = true)]
    judge_api_key: Option<String>,
    /// A reward model for the `reward` metric (a `train finetune --task reward` directory, or
    /// any one-label `…ForSequenceClassification` one). It reads conversations with --chat,
    /// text pairs without.
    #[arg(long)]
    reward_model: Option<PathBuf>,
}

fn run(cli: RunArgs) -> anyhow::Result<bool> {
    let suite = Suite::load(&cli.suite)?;
    let opts = EvalOptions { limit: cli.limit, seed: cli.seed, bootstrap_iters: cli.bootstrap_iters };
    let out = cli.out.clone().unwrap_or_else(|| PathBuf::from("runs/eval").join(&suite.config.name));
    std::fs::create_dir_all(&out)?;
    let (mut backend, model): (Box<dyn Backend>, String) = match &cli.endpoint {
        Some(url) => {
            let cache = lmstack_app::endpoint::default_cache(&out);
            let b = EndpointBackend::new(url, cli.endpoint_model.as_deref(), cli.api_key.clone(), Some(&cache))?
                .with_concurrency(cli.concurrency)
                .with_chat(cli.chat)
                .with_max_length(cli.max_length);
            if b.cached() > 0 {
                eprintln!("resuming: {} answers cached in {}", b.cached(), cache.display());
            }
            let name = b.name();
            (Box::new(b), name)
        }
        None => {
            if !cli.model.is_dir() && !lmstack_core::gguf::is_gguf(&cli.model) {
                anyhow::bail!(
                    "no model directory or GGUF file at {}; train the default model first with `cargo run --release --bin train` (or pass --model DIR|FILE.gguf)",
                    cli.model.display()
                );
            }
            let mut b = LocalBackend::load(&cli.model)?.with_chat(cli.chat)?.with_max_length(cli.max_length)?;
            if let Some(a) = &cli.adapter {
                b = b.with_adapter(a)?;
            }
            let name = b.name();
            (Box::new(b), name)
        }
    };
    let judge = match &cli.judge {
        Some(url) => {
            let cache = out.join("judge_cache.jsonl");
            let e = EndpointBackend::new(url, cli.judge_model.as_deref(), cli.judge_api_key.clone(), Some(&cache))?
                .with_concurrency(cli.concurrency);
            Some(Judge::new(e))
        }
        None => None,
    };
    let reward = match &cli.reward_model {
        Some(dir) => Some(RewardModel::load(dir)?.with_chat(cli.chat)),
        None => None,
    };
    let graders = eval::Graders { judge: judge.as_ref(), reward: reward.as_ref() };
    let mut results = Vec::new();
    for task in &suite.tasks {
        let n = opts.limit.map_or(task.docs.len(), |l| l.min(task.docs.len()));
        let bar = indicatif::ProgressBar::new(n as u64).with_style(
            indicatif::ProgressStyle::with_template("{prefix:>20} {bar:30} {pos}/{len} docs  {per_sec}  eta {eta}")
                .expect("valid template"),
        );
        bar.set_prefix(task.config.task.clone());
        let r = eval::run_task(task, backend.as_mut(), graders, &opts, &mut |k| bar.inc(k as u64))?;
        bar.finish();
        results.push(r);
    }
    eval::write_run(&out, &suite, &results, &model, &opts)?;
    println!("\n{}", eval::markdown(&results));
    println!("results: {0}/results.json, samples: {0}/samples_*.jsonl, report: {0}/report.html", out.display());
    let bad = eval::check_thresholds(&suite, &results);
    for b in &bad {
        eprintln!("threshold not met: {b}");
    }
    Ok(bad.is_empty())
}

fn compare_runs(a: &Path, b: &Path, out: Option<PathBuf>, alpha: f64, iters: usize, seed: u64) -> anyhow::Result<bool> {
    let (ra, rb) = (Run::load(a)?, Run::load(b)?);
    let cs = compare::compare(&ra, &rb, iters, seed)?;
    println!("A = {} ({})\nB = {} ({})\n", ra.model(), a.display(), rb.model(), b.display());
    println!("{}", compare::markdown(&cs, alpha));
    let out = out.unwrap_or_else(|| b.join("compare.html"));
    lmstack_core::io::write_atomic(&out, report::compare_report(&ra, &rb, &cs, alpha)?.as_bytes())?;
    println!("report: {}", out.display());
    let worse: Vec<_> = cs.iter().filter(|c| c.verdict(alpha) == "A better").collect();
    for c in &worse {
        eprintln!(
            "B is significantly worse: {} {} {:.4} → {:.4} (p = {})",
            c.task,
            c.metric,
            c.a,
            c.b,
            compare::fmt_p(c.p)
        );
    }
    Ok(worse.is_empty())
}

/// `--limit`: a count of documents, at least 1.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("at least 1 (leave --limit out for every document)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> ExitCode {
    lmstack_core::prefer_rayon_threads();
    let cli = Cli::parse();
    let outcome = match cli.cmd {
        Some(Cmd::Compare { a, b, out, alpha, bootstrap_iters, seed }) => {
            compare_runs(&a, &b, out, alpha, bootstrap_iters, seed)
        }
        None => run(cli.run),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
