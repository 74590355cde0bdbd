"""Builds a small labelled text-classification dataset from data/tinyshakespeare.txt: is a line
a question or a statement? Lines that end in '?' are questions, lines that end in '.' or '!'
statements; the final punctuation is removed, so the model must tell from the words alone
("What", "Why", "shall I", "is it" ...). Balanced classes; train from the first 90% of the text
(the part pretraining trains on), test from the held-out last 10%. Deterministic; run from the
repository root: python3 data/classify/make_data.py"""
import json
import random

text = open("data/tinyshakespeare.txt", encoding="utf-8").read()
cut = int(len(text) * 0.9)


def lines(part):
    out = {"question": [], "statement": []}
    for para in part.split("\n\n"):
        for line in para.split("\n")[1:]:  # skip the speaker line
            line = line.strip()
            if len(line.split()) < 3 or len(line) > 50:
                continue
            if line.endswith("?"):
                out["question"].append(line[:-1].rstrip())
            elif line.endswith(".") or line.endswith("!"):
                out["statement"].append(line[:-1].rstrip())
    return out


rng = random.Random(1234)
for name, part, n in [("train", text[:cut], 1500), ("test", text[cut:], 200)]:
    by = lines(part)
    k = min(n, len(by["question"]), len(by["statement"]))
    items = [{"text": t, "label": lab} for lab in ("question", "statement") for t in rng.sample(by[lab], k)]
    rng.shuffle(items)
    with open(f"data/classify/{name}.jsonl", "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    print(name, len(items), "examples")
