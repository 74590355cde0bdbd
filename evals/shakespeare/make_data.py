"""Builds the Shakespeare eval data from the held-out last 10% of data/tinyshakespeare.txt
(the part `train` validates on): val.jsonl (paragraphs, for perplexity / bits per byte) and
cloze.jsonl (a line with its true last word against three last words of other lines) and
continue.jsonl (a line's first half; the model writes the rest, scored against the true rest).
Deterministic; run from the repository root: python3 evals/shakespeare/make_data.py"""
import json
import random
import re

text = open("data/tinyshakespeare.txt", encoding="utf-8").read()
val = text[int(len(text) * 0.9):]
val = val[val.index("\n\n") + 2:]  # start at a paragraph boundary
paras = [p for p in val.split("\n\n") if p.strip()]
with open("evals/shakespeare/val.jsonl", "w") as f:
    for p in paras[:300]:
        f.write(json.dumps({"text": p}) + "\n")

rng = random.Random(1234)
items = []
lines = [l for p in paras for l in p.split("\n")[1:]]  # skip speaker lines
cands = [(i, l) for i, l in enumerate(lines) if len(l.split()) >= 6 and re.fullmatch(r"[A-Za-z']+[,.;:!?]?", l.split()[-1])]
endings = sorted({re.sub(r"[,.;:!?]$", "", l.split()[-1]) for _, l in cands})
for i, line in rng.sample(cands, 200):
    words = line.split()
    last = words[-1]
    punct = last[-1] if last[-1] in ",.;:!?" else ""
    word = last.rstrip(",.;:!?")
    wrong = rng.sample([e for e in endings if e.lower() != word.lower()], 3)
    choices = [word + punct] + [w + punct for w in wrong]
    rng.shuffle(choices)
    prev = lines[i - 1] if i > 0 else ""
    items.append({"context": (prev + "\n" + " ".join(words[:-1])).strip("\n"), "choices": choices,
                  "label": choices.index(word + punct)})
with open("evals/shakespeare/cloze.jsonl", "w") as f:
    for it in items:
        f.write(json.dumps(it) + "\n")

rng2 = random.Random(4321)
conts = []
long_lines = [(i, l) for i, l in enumerate(lines) if len(l.split()) >= 8]
for i, line in rng2.sample(long_lines, 100):
    words = line.split()
    half = len(words) // 2
    prev = lines[i - 1] if i > 0 else ""
    conts.append({"context": (prev + "\n" + " ".join(words[:half])).strip("\n"), "rest": " ".join(words[half:])})
with open("evals/shakespeare/continue.jsonl", "w") as f:
    for it in conts:
        f.write(json.dumps(it) + "\n")
print(len(paras[:300]), "paragraphs,", len(items), "cloze items,", len(conts), "continuations")
