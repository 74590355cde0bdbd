"""Teacher-forced log-probabilities of `transformers` on a GGUF file, in llama.cpp's format.

transformers loads a GGUF file by dequantizing every tensor to f32; this script runs it over
the same tokens llama.cpp scored (read from a `llama-perplexity --kl-divergence-base` file) and
writes its log-probabilities in that same format, so that `gguf_bench`'s FIDELITY mode compares
lmstack (with DEQUANTIZE=1) against transformers as it does against llama.cpp.

    python transformers_gguf_logits.py MODEL.gguf LLAMA_BASE.bin OUT.bin

Run by `cargo xtask bench fidelity --python VENV/bin/python` (needs torch, transformers, gguf).
"""

import struct
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit("usage: transformers_gguf_logits.py MODEL.gguf LLAMA_BASE.bin OUT.bin")
    model_path, base_path, out_path = (Path(a) for a in sys.argv[1:])
    raw = base_path.read_bytes()
    if raw[:8] != b"_logits_":
        sys.exit(f"{base_path}: not a llama-perplexity --kl-divergence-base file")
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<3i", raw, 8)
    tokens = np.frombuffer(raw, dtype="<i4", count=n_chunk * n_ctx, offset=20).reshape(n_chunk, n_ctx)

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    ).eval()
    nv = 2 * ((n_vocab + 1) // 2) + 4
    first = n_ctx // 2
    tmp = out_path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        out.write(b"_logits_" + struct.pack("<3i", n_ctx, n_vocab, n_chunk))
        out.write(tokens.astype("<i4").tobytes())
        for c in range(n_chunk):
            ids = torch.tensor(tokens[c : c + 1].astype(np.int64))
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].double()
            for j in range(first, n_ctx - 1):
                row = logits[j]
                mx, mn = row.max().item(), max(row.min().item(), row.max().item() - 16)
                lse = mx + torch.log(torch.exp(row - mx).sum()).item()
                scale = (mx - mn) / 65535.0
                q = torch.where(row > mn, torch.round((row - mn) / scale), torch.zeros_like(row))
                rec = np.zeros(nv, dtype="<u2")
                rec[:4] = np.frombuffer(struct.pack("<2f", scale, mn - lse), dtype="<u2")
                rec[4 : 4 + n_vocab] = q.numpy().astype("<u2")
                out.write(rec.tobytes())
            print(f"[{c + 1}/{n_chunk}]", file=sys.stderr, flush=True)
    tmp.replace(out_path)


if __name__ == "__main__":
    main()
