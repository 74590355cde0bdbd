"""PyTorch reference for `train`'s default run: nanoGPT's character-level Shakespeare on CPU.

The model and training loop follow nanoGPT's `model.py` / `train.py` with the configuration of
its README's CPU command (4 layers, 4 heads, width 128, context 64, batch 12, 2000 steps, lr 1e-3
cosine to 1e-4 after 100 warmup steps, AdamW betas (0.9, 0.99), weight decay 0.1, grad clip 1.0,
no dropout, no biases, 90/10 split), so that lmstack's figures can be compared like for like on
the machine at hand:

    pip install torch numpy
    python3 crates/train/examples/nanogpt_reference.py                 # nanoGPT as published
    python3 crates/train/examples/nanogpt_reference.py --lmstack-variant --seed 1

It prints nanoGPT's 20-batch validation estimate every 250 steps, the milliseconds per step
(training steps alone, as nanoGPT's per-iteration log, and all-in), and at the end the loss over
the whole validation split in consecutive 64-token windows, as `train` reports it.
`--lmstack-variant` uses biases and leaves embeddings, biases and norms out of weight decay, as
lmstack's GPT-2 does. `--init-std fan-in` initialises at 1/sqrt(128) instead of nanoGPT's 0.02,
as lmstack's `train` does by default (residual projections over sqrt(8) either way). Nothing
is downloaded: the corpus is the repository's
data/tinyshakespeare.txt.
"""

import argparse
import math
import pathlib
import time

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

ROOT = pathlib.Path(__file__).resolve().parents[3]


class Block(nn.Module):
    def __init__(self, d, heads, bias):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d, bias=bias)
        self.c_attn = nn.Linear(d, 3 * d, bias=bias)
        self.attn_proj = nn.Linear(d, d, bias=bias)
        self.ln_2 = nn.LayerNorm(d, bias=bias)
        self.c_fc = nn.Linear(d, 4 * d, bias=bias)
        self.mlp_proj = nn.Linear(4 * d, d, bias=bias)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, ctx, layers, heads, d, bias, std=0.02):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads, bias) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=bias)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections, scaled by depth
                nn.init.normal_(p, std=std / math.sqrt(2 * layers))

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1])
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-interval", type=int, default=250)
    ap.add_argument("--eval-iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    ap.add_argument("--lmstack-variant", action="store_true")
    ap.add_argument("--init-std", default="0.02",
                    help="standard deviation of the initial weights (nanoGPT: 0.02), or `fan-in` for "
                         "1/sqrt(width); residual projections get it over sqrt(2 * layers)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = np.array([stoi[c] for c in text], dtype=np.int64)
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}
    ctx, batch = 64, 12
    lr, min_lr, warmup = 1e-3, 1e-4, 100

    def get_batch(split):
        d = splits[split]
        ix = torch.randint(len(d) - ctx, (batch,)).numpy()
        x = torch.from_numpy(np.stack([d[i : i + ctx] for i in ix]))
        y = torch.from_numpy(np.stack([d[i + 1 : i + 1 + ctx] for i in ix]))
        return x, y

    bias = a.lmstack_variant
    std = 1 / math.sqrt(128) if a.init_std == "fan-in" else float(a.init_std)
    model = GPT(len(chars), ctx, 4, 4, 128, bias, std)
    params = [p for p in model.parameters() if p.requires_grad]
    if a.lmstack_variant:  # decay matrices only: not embeddings, biases or norms
        emb = {id(model.wte.weight), id(model.wpe.weight)}
        decay = [p for p in params if p.dim() >= 2 and id(p) not in emb]
    else:  # nanoGPT: every parameter of 2 or more dimensions, embeddings included
        decay = [p for p in params if p.dim() >= 2]
    ids = {id(p) for p in decay}
    groups = [
        {"params": decay, "weight_decay": 0.1},
        {"params": [p for p in params if id(p) not in ids], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))
    n_params = sum(p.numel() for p in params)
    print(f"{n_params} parameters, {torch.get_num_threads()} threads, torch {torch.__version__}")

    @torch.no_grad()
    def estimate():
        model.eval()
        out = {}
        for split in ("train", "val"):
            out[split] = float(np.mean([model(*get_batch(split)).item() for _ in range(a.eval_iters)]))
        model.train()
        return out

    def lr_at(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / (a.steps - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (lr - min_lr)

    started = time.perf_counter()
    stepping = 0.0
    for it in range(a.steps + 1):
        if it % a.eval_interval == 0 or it == a.steps:
            e = estimate()
            print(f"step {it}: train loss {e['train']:.4f}, val loss {e['val']:.4f} ({a.eval_iters}-batch estimates)")
        if it == a.steps:
            break
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        loss = model(*get_batch("train"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stepping += time.perf_counter() - t0
    total = time.perf_counter() - started
    # The whole validation split in consecutive windows, as `train` reports it.
    model.eval()
    val = torch.from_numpy(splits["val"])
    starts = [s for s in range(0, len(val) - 1, ctx) if s + ctx < len(val)]
    losses = []
    with torch.no_grad():
        for i in range(0, len(starts), 64):
            chunk = starts[i : i + 64]
            x = torch.stack([val[s : s + ctx] for s in chunk])
            y = torch.stack([val[s + 1 : s + 1 + ctx] for s in chunk])
            losses.append(model(x, y).item() * len(chunk))
    whole = sum(losses) / len(starts)
    print(
        f"done: {a.steps} steps; {1e3 * stepping / a.steps:.1f} ms/step training alone, "
        f"{1e3 * total / a.steps:.1f} ms/step all-in ({batch * ctx * a.steps / total:.0f} tokens/s); "
        f"validation loss over the whole split {whole:.4f}"
    )


if __name__ == "__main__":
    main()
