//! Project chores: `cargo xtask <command>`.
//!
//! - `ci`: what `.ci/run` runs — formatting, clippy with warnings denied, the tests and the docs.
//! - `fixtures`: regenerates the Hugging Face parity fixtures of `lmstack-core` with Python
//!   (`pip install torch transformers tokenizers safetensors`); CI never needs Python.
//! - `verify-hf DIR`: loads an lmstack-written model directory in Python `transformers` and
//!   compares its logits to the `expected.json` lmstack wrote beside it.
//!
//! Kept dependency-free so it compiles in seconds.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace root").to_path_buf()
}

fn run(cmd: &str, args: &[&str], env: &[(&str, &str)]) -> Result<(), String> {
    eprintln!("$ {cmd} {}", args.join(" "));
    let mut c = Command::new(cmd);
    c.args(args).current_dir(root());
    for (k, v) in env {
        c.env(k, v);
    }
    let status = c.status().map_err(|e| format!("could not start `{cmd}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{cmd} {}` failed with {status}", args.join(" ")))
    }
}

const FIXTURES: &str = "crates/core/tests/data/make_fixtures.py";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("ci") => (|| {
            run("cargo", &["fmt", "--all", "--check"], &[])?;
            run("cargo", &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"], &[])?;
            run("cargo", &["test", "--workspace"], &[])?;
            run("cargo", &["doc", "--no-deps", "--workspace"], &[("RUSTDOCFLAGS", "-D warnings")])
        })(),
        Some("fixtures") => run("python3", &[FIXTURES], &[]),
        Some("verify-hf") => match args.get(1) {
            Some(dir) => run("python3", &[FIXTURES, "--verify", dir], &[]),
            None => Err("usage: cargo xtask verify-hf DIR".into()),
        },
        Some(other) => Err(format!("unknown command `{other}`; expected one of: ci, fixtures, verify-hf")),
        None => Err("usage: cargo xtask <ci | fixtures | verify-hf DIR>".into()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
