"""Reference figure for `cargo xtask bench serve --gpt2`: single-stream greedy decode of a
GPT-2 124M-shaped model (random weights, f32, batch 1) with Python `transformers.generate`
on the same machine. Needs `pip install torch transformers`."""
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config()).eval()
ids = torch.randint(0, 50257, (1, 8))
with torch.no_grad():
    model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)  # warm-up
    for _ in range(3):
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
        dt = time.perf_counter() - t0
        print(f"transformers generate: {out.shape[1] - ids.shape[1]} tokens in {dt:.2f} s = {(out.shape[1] - ids.shape[1]) / dt:.1f} tokens/s")
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
