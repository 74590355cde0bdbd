"""A LoRA reward model (`train finetune --task reward --method lora`) read back by PEFT: the
base LM loaded as `AutoModelForSequenceClassification` (a fresh one-label head), the run's
`adapter/` loaded on it with `PeftModel.from_pretrained` (its LoRA weights and the head saved
whole, `modules_to_save=["score"]`), and the run's merged `model/` loaded by `transformers`.
Prints both scores of one conversation, to set beside `train sample --model RUN/model
--reward TEXT`:

    python crates/train/examples/peft_reward_check.py runs/finetune-merged runs/reward-lora

Measured 2026-12-05 (peft 0.21.2, transformers 5.25): −1.036525 (PEFT), −1.036526 (merged),
−1.0365 (`train sample --reward`). Needs torch, transformers and peft (outside the repository).
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

TEXT = "user: reverse: a b\nassistant: b a\n"  # the plain template's rendering of one exchange


def main():
    base, run = sys.argv[1], sys.argv[2]
    merged = f"{run}/model"
    pad = json.load(open(f"{merged}/config.json"))["pad_token_id"]
    ids = torch.tensor([AutoTokenizer.from_pretrained(merged)(TEXT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        lm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=pad)
        peft = PeftModel.from_pretrained(lm, f"{run}/adapter").eval()(ids).logits.item()
        whole = AutoModelForSequenceClassification.from_pretrained(merged).eval()(ids).logits.item()
    print(json.dumps({"peft_base_plus_adapter": peft, "transformers_merged": whole}))


if __name__ == "__main__":
    main()
