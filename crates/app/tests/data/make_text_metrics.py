"""Golden values for lmstack-app's text metrics, from the reference implementations:
sacrebleu 2.x (corpus BLEU, chrF), rouge_score (ROUGE-L) and the SQuAD v1.1 evaluation
script's token F1. Run: python3 make_text_metrics.py > text_metrics.json"""
import collections, json, re, string

import sacrebleu
from rouge_score import rouge_scorer

PAIRS = [
    ("The cat sat on the mat.", "The cat sat on the mat."),
    ("the cat is on the mat", "There is a cat on the mat."),
    ("It costs 3.14 dollars, or 1,000 cents.", "It costs 3.14 dollars or 1,000 cents!"),
    ("pages 2-3 of the report", "see pages 2-3 of that report"),
    ("", "Something was expected here."),
    ("Completely unrelated words", "No overlap at all"),
    ("AT&amp;T said \"hello\" (twice) [sic] {ok} ~fine~", "AT&T said hello twice"),
    ("Où est la bibliothèque? Ça va.", "Où est la bibliothèque ? Ça va bien."),
    ("42", "42"),
    ("an apple a day", "the apple"),
    ("To be, or not to be: that is the question.", "To be or not to be, that is the question:"),
    ("reverse: olleh dlrow", "reverse: olleh dlrow"),
]


def squad_normalize(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(pred, gold):
    p, g = squad_normalize(pred).split(), squad_normalize(gold).split()
    if len(p) == 0 or len(g) == 0:
        return float(p == g)
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    pr, rc = same / len(p), same / len(g)
    return 2 * pr * rc / (pr + rc)


scorer = rouge_scorer.RougeScorer(["rougeL"])
cases = []
for pred, ref in PAIRS:
    cases.append({
        "pred": pred, "ref": ref,
        "f1": squad_f1(pred, ref),
        "bleu": sacrebleu.corpus_bleu([pred], [[ref]]).score,
        "chrf": sacrebleu.corpus_chrf([pred], [[ref]]).score,
        "rougeL": scorer.score(ref, pred)["rougeL"].fmeasure * 100,
    })
preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
print(json.dumps({
    "cases": cases,
    "corpus_bleu": sacrebleu.corpus_bleu(preds, [refs]).score,
    "corpus_chrf": sacrebleu.corpus_chrf(preds, [refs]).score,
}, indent=1, ensure_ascii=False))
