//! `lmstack-eval` (front door: `cargo xtask eval`): runs an eval suite on a model directory and
//! writes lm-eval-shaped results, per-sample JSONL and a Markdown summary; exits 1 when a
//! suite threshold is not met.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use lmstack_app::backend::{Backend, LocalBackend};
use lmstack_app::endpoint::EndpointBackend;
use lmstack_app::eval::{self, EvalOptions, Suite};

/// Evaluate a model on an eval suite (lm-evaluation-harness task files).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Suite YAML.
    #[arg(long, default_value = "evals/shakespeare/suite.yaml")]
    suite: PathBuf,
    /// Model directory (run in-process).
    #[arg(long, default_value = "runs/shakespeare-char/model")]
    model: PathBuf,
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
    /// Output folder (default: `runs/eval/<suite name>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// At most this many documents per task.
    #[arg(long)]
    limit: Option<usize>,
    /// Seed for few-shot sampling and bootstrap standard errors.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Bootstrap resamples for corpus-level metrics.
    #[arg(long, default_value_t = 1000)]
    bootstrap_iters: usize,
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    let suite = Suite::load(&cli.suite)?;
    let opts = EvalOptions { limit: cli.limit, seed: cli.seed, bootstrap_iters: cli.bootstrap_iters };
    let out = cli.out.clone().unwrap_or_else(|| PathBuf::from("runs/eval").join(&suite.config.name));
    std::fs::create_dir_all(&out)?;
    let (mut backend, model): (Box<dyn Backend>, String) = match &cli.endpoint {
        Some(url) => {
            let cache = lmstack_app::endpoint::default_cache(&out);
            let b = EndpointBackend::new(url, cli.endpoint_model.as_deref(), cli.api_key.clone(), Some(&cache))?
                .with_concurrency(cli.concurrency);
            if b.cached() > 0 {
                eprintln!("resuming: {} answers cached in {}", b.cached(), cache.display());
            }
            let name = b.name();
            (Box::new(b), name)
        }
        None => {
            if !cli.model.is_dir() {
                anyhow::bail!(
                    "no model directory at {}; train the default model first with `cargo run --release --bin train` (or pass --model DIR)",
                    cli.model.display()
                );
            }
            (Box::new(LocalBackend::load(&cli.model)?), cli.model.display().to_string())
        }
    };
    let mut results = Vec::new();
    for task in &suite.tasks {
        let n = opts.limit.map_or(task.docs.len(), |l| l.min(task.docs.len()));
        let bar = indicatif::ProgressBar::new(n as u64).with_style(
            indicatif::ProgressStyle::with_template("{prefix:>20} {bar:30} {pos}/{len} docs  {per_sec}  eta {eta}")
                .expect("valid template"),
        );
        bar.set_prefix(task.config.task.clone());
        let r = eval::run_task(task, backend.as_mut(), &opts, &mut |k| bar.inc(k as u64))?;
        bar.finish();
        let lines: Vec<String> = r.samples.iter().map(|s| s.to_string()).collect();
        lmstack_core::io::write_atomic(
            &out.join(format!("samples_{}.jsonl", r.name)),
            (lines.join("\n") + "\n").as_bytes(),
        )?;
        results.push(r);
    }
    let json = eval::results_json(&suite, &results, &model, &opts);
    lmstack_core::io::write_atomic(&out.join("results.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;
    let md = format!("# {} on {model}\n\n{}", suite.config.name, eval::markdown(&results));
    lmstack_core::io::write_atomic(&out.join("summary.md"), md.as_bytes())?;
    println!("\n{}", eval::markdown(&results));
    println!("results: {}/results.json, samples: {}/samples_*.jsonl", out.display(), out.display());
    let bad = eval::check_thresholds(&suite, &results);
    for b in &bad {
        eprintln!("threshold not met: {b}");
    }
    Ok(bad.is_empty())
}

fn main() -> ExitCode {
    lmstack_core::prefer_rayon_threads();
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
