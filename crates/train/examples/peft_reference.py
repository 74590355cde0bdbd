"""PyTorch + peft's LoRA finetuning on the same data and settings as `train finetune --method
lora`, for comparison (issue 26's bench): a Hugging Face model directory, chat examples (JSONL
with `messages`) rendered through the model's chat template with the loss on the assistant
turns only, LoRA on every linear layer, AdamW with lmstack's schedule (linear warmup, cosine
to a tenth of the peak), random batches of `--batch` examples padded to the longest.

Prints one JSON line: ms/step (optimizer steps only, evaluation excluded), scored and padded
tokens/s, peak resident memory, and the validation loss before and after.

With `--order RUN/data_order.jsonl` (written by `train finetune`) it holds out the same
validation examples and draws the same examples at each step as that lmstack run did;
without it, its own seeded split and draws.

    python crates/train/examples/peft_reference.py --model DIR --data train.jsonl [--steps 60] [--order FILE]

Needs torch, transformers and peft (outside the repository: `pip install torch transformers
peft`).
"""
import argparse
import json
import math
import random
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def tokenize(tok, messages):
    """Token ids and which are scored: the assistant turns (with their end-of-turn), as
    lmstack's `sft::tokenize` does — each turn rendered incrementally through the template."""
    ids, scored, done = [], [], ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            with_prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            piece = with_prompt[len(done):]
            t = tok.encode(piece, add_special_tokens=False)
            ids += t
            scored += [False] * len(t)
            done = with_prompt
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        piece = upto[len(done):]
        t = tok.encode(piece, add_special_tokens=False)
        ids += t
        scored += [m["role"] == "assistant"] * len(t)
        done = upto
    if scored:
        scored[0] = False
    return ids, scored


def batch(items, pad):
    n = max(len(i) for i, _ in items)
    x = torch.full((len(items), n), pad, dtype=torch.long)
    y = torch.full((len(items), n), -100, dtype=torch.long)
    for r, (ids, sc) in enumerate(items):
        x[r, : len(ids)] = torch.tensor(ids)
        # The label of position p is token p+1, scored when that token is.
        for p in range(len(ids) - 1):
            if sc[p + 1]:
                y[r, p] = ids[p + 1]
    return x, y


def loss_of(model, x, y):
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)


def val_loss(model, val, pad):
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val), 32):
            x, y = batch(val[i : i + 32], pad)
            k = int((y != -100).sum())
            if k:
                total += float(loss_of(model, x, y)) * k
                n += k
    model.train()
    return total / max(n, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--order", help="an lmstack run's data_order.jsonl: its validation split and batches")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    rows = [json.loads(l) for l in open(a.data, encoding="utf-8") if l.strip()]
    data = [tokenize(tok, r["messages"]) for r in rows]
    steps_of = None
    if a.order:
        lines = [json.loads(l) for l in open(a.order, encoding="utf-8") if l.strip()]
        head = lines[0]
        if head.get("val_file"):
            raise SystemExit(f"{a.order}: that run validated on another file; pass its data instead")
        val = [data[i] for i in head["val"]]
        # A resumed run may have logged a step twice: the later line is the one it trained on.
        steps_of = {l["step"]: l["examples"] for l in lines[1:]}
        missing = [s for s in range(a.steps) if s not in steps_of]
        if missing:
            raise SystemExit(f"{a.order}: no batch for steps {missing[:5]}... (the run was shorter than --steps)")
        train = None
    else:
        idx = list(range(len(data)))
        rng.shuffle(idx)
        n_val = max(1, int(len(data) * a.val_fraction))
        val = [data[i] for i in idx[:n_val]]
        train = [data[i] for i in idx[n_val:]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)

    def lr_at(step):
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        t = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    before = val_loss(model, val, pad)
    times, scored, padded = [], 0, 0
    for step in range(a.steps):
        picked = [data[i] for i in steps_of[step]] if steps_of else rng.sample(train, a.batch)
        x, y = batch(picked, pad)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        t0 = time.perf_counter()
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        scored += int((y != -100).sum())
        padded += x.numel()
    after = val_loss(model, val, pad)
    total = sum(times)
    print(json.dumps({
        "ms_per_step": 1000 * total / len(times),
        "ms_per_step_median": 1000 * sorted(times)[len(times) // 2],
        "scored_tokens_per_sec": scored / total,
        "padded_tokens_per_sec": padded / total,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "val_loss_before": before,
        "val_loss_after": after,
        "steps": a.steps,
        "train": len(train) if train is not None else len(data) - len(val),
        "same_order": bool(a.order),
        "val": len(val),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
