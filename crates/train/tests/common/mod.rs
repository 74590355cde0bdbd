//! Helpers shared by the training tests (each test binary uses some of them).
#![allow(dead_code)]

use std::path::Path;

/// A copy of the run in `from` as a crash right after `step` leaves it: its settings and log,
/// the `extra` files named, and the checkpoint of that step alone, with `finetune.json`'s
/// `out_dir` pointing at the copy.
pub fn crashed_copy(from: &Path, to: &Path, step: u64, extra: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["finetune.json", "metrics.jsonl"].iter().chain(extra) {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    let name = format!("step-{step:07}");
    let (src, dst) = (from.join("checkpoints").join(&name), to.join("checkpoints").join(&name));
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    std::fs::write(to.join("checkpoints/latest"), format!("{name}\n")).unwrap();
    let mut json: serde_json::Value = lmstack_core::io::read_json(&to.join("finetune.json")).unwrap();
    json["out_dir"] = serde_json::json!(to);
    std::fs::write(to.join("finetune.json"), json.to_string()).unwrap();
}

/// A short `task` run of `steps` on `data` from `base` into `out`: batches of 8, a quarter
/// held out, lr 2e-2 decaying to 2e-3, evaluations and checkpoints every 10 steps, the plain
/// chat template.
pub fn small_run(
    base: &Path,
    data: &Path,
    out: &Path,
    steps: u64,
    task: lmstack_train::finetune::Task,
    method: lmstack_train::finetune::Method,
) -> lmstack_train::finetune::FinetuneConfig {
    lmstack_train::finetune::FinetuneConfig {
        base: base.to_owned(),
        data: data.to_owned(),
        val_data: None,
        val_fraction: 0.25,
        out_dir: out.to_owned(),
        max_steps: steps,
        batch_size: 8,
        lr: 2e-2,
        min_lr: 2e-3,
        warmup_steps: 2,
        eval_interval: 10,
        checkpoint_interval: 10,
        chat_template: "plain".into(),
        ..lmstack_train::finetune::FinetuneConfig::for_task(task, Some(method))
    }
}
