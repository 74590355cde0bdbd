#!/usr/bin/env python3
"""TRL's DPO and ORPO losses on fixed log-probabilities, for crates/train/tests/preference.rs.

Regenerate (needs `pip install torch trl==1.16.0`, no network):

    python3 crates/train/tests/data/make_preference_losses.py

trl 1.16 computes its losses inline in `DPOTrainer._compute_loss`, not in a function of the
log-probabilities; this script runs that very code (the lines from `chosen_logratios = ...` to
the loss accumulation, read from the installed trl's source) on fixed sequence log-probabilities
and completion lengths, and writes the losses and the logged rewards to
`preference_losses.json`: `sigmoid`, `robust`, `ipo`, `hinge`, `exo_pair`, `nca_pair`, `bco_pair`,
`sppo_hard`, `apo_zero`, `apo_down`, `sigmoid_norm`, `discopop`, `aot`, `aot_unpaired`, and the
losses that take one under each `f_divergence_type` (forward KL, Jensen–Shannon, α). The `sft` loss type runs beside `sigmoid` (`loss_weights`), on
per-token log-probabilities that sum to the sequence ones. ORPO is `ORPOTrainer.odds_ratio_loss`
(trl.experimental.orpo) on the per-token means, and the chosen answers' token NLL, combined as
`get_batch_loss_metrics` does.
"""
import json
import math
import os
import textwrap
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import trl
import trl.trainer.dpo_trainer as dpo
from trl.experimental.orpo.orpo_trainer import ORPOTrainer

HERE = os.path.dirname(os.path.abspath(__file__))


def trl_block():
    lines = open(dpo.__file__).read().splitlines()
    start = next(i for i, l in enumerate(lines) if "chosen_logratios = chosen_logps - ref_chosen_logps" in l)
    end = next(i for i, l in enumerate(lines) if i > start and "loss += per_sequence_loss.mean() * loss_weight" in l)
    return compile(textwrap.dedent("\n".join(lines[start:end + 1])), "trl_dpo_loss", "exec")


def kto_block():
    """KTOTrainer._compute_loss's lines from the chosen losses to their concatenation."""
    import trl.trainer.kto_trainer as kto
    lines = open(kto.__file__).read().splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "# Chosen losses")
    end = next(i for i, l in enumerate(lines) if i > start and l.strip() == "0,") + 1
    return compile(textwrap.dedent("\n".join(lines[start:end + 1])), "trl_kto_loss", "exec")


def main():
    g = torch.Generator().manual_seed(0)
    n = 6
    lens_c = torch.randint(3, 12, (n,), generator=g)
    lens_r = torch.randint(3, 12, (n,), generator=g)
    # Sequence log-probabilities: sums over the completion's tokens.
    pc = -(torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.2) * lens_c
    pr = -(torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.2) * lens_r
    rc = pc + torch.randn(n, generator=g, dtype=torch.float64)
    rr = pr + torch.randn(n, generator=g, dtype=torch.float64)
    width = int(max(lens_c.max(), lens_r.max()))
    mask = torch.zeros(2 * n, width)
    for i, l in enumerate(torch.cat([lens_c, lens_r]).tolist()):
        mask[i, :l] = 1
    # Per-token log-probabilities: each sequence's sum spread evenly over its tokens.
    per_token = torch.zeros(2 * n, width, dtype=torch.float64)
    for i, (s, l) in enumerate(zip(torch.cat([pc, pr]).tolist(), torch.cat([lens_c, lens_r]).tolist())):
        per_token[i, :l] = s / l
    block = trl_block()
    cases = []
    plain = [("sigmoid", 0.1, 0.0, 0.0), ("sigmoid", 0.5, 0.0, 0.0), ("robust", 0.1, 0.2, 0.0),
             ("ipo", 0.1, 0.0, 0.0), ("hinge", 0.3, 0.0, 0.0), ("sigmoid", 0.5, 0.0, 1.0),
             ("exo_pair", 0.1, 1e-3, 0.0), ("nca_pair", 0.1, 0.0, 0.0), ("bco_pair", 0.2, 0.0, 0.0),
             ("sppo_hard", 0.5, 0.0, 0.0), ("apo_zero", 0.1, 0.0, 0.0), ("apo_down", 0.3, 0.0, 0.0),
             ("sigmoid_norm", 0.5, 0.0, 0.0), ("discopop", 0.1, 0.0, 0.0), ("aot", 0.1, 0.0, 0.0),
             ("aot", 0.2, 0.1, 0.0), ("aot_unpaired", 0.1, 0.0, 0.0), ("aot_unpaired", 0.3, 0.2, 0.0)]
    # (loss, beta, label smoothing, sft weight, f-divergence, its α, DiscoPOP's τ)
    cases_in = [c + ("reverse_kl", 0.5, 0.05) for c in plain] + [
        ("sigmoid", 0.1, 0.0, 0.0, "forward_kl", 0.5, 0.05), ("sigmoid", 0.1, 0.0, 0.0, "js_divergence", 0.5, 0.05),
        ("sigmoid", 0.1, 0.0, 0.0, "alpha_divergence", 0.5, 0.05), ("ipo", 0.1, 0.0, 0.0, "forward_kl", 0.5, 0.05),
        ("sigmoid_norm", 0.5, 0.0, 0.0, "js_divergence", 0.5, 0.05),
        ("hinge", 0.3, 0.0, 0.0, "alpha_divergence", 0.3, 0.05), ("robust", 0.1, 0.2, 0.0, "forward_kl", 0.5, 0.05),
        ("exo_pair", 0.1, 1e-3, 0.0, "js_divergence", 0.5, 0.05),
        ("discopop", 0.5, 0.0, 0.0, "forward_kl", 0.5, 0.2),
        ("sigmoid", 0.5, 0.0, 1.0, "alpha_divergence", 1.0, 0.05)]
    for loss_type, beta, smoothing, sft, fdiv, alpha, tau in cases_in:
        types, weights = ([loss_type, "sft"], [1.0, sft]) if sft else ([loss_type], [1.0])
        self = SimpleNamespace(beta=beta, label_smoothing=smoothing, loss_types=types, loss_weights=weights,
                               f_divergence_type=fdiv, f_alpha_divergence_coef=alpha, use_weighting=False,
                               args=SimpleNamespace(discopop_tau=tau))
        # TRL's α-divergence clamps by dtype and knows f16, bf16 and f32 only: those cases run
        # in f32, as a training run would.
        cast = (lambda x: x.float()) if fdiv == "alpha_divergence" else (lambda x: x)
        ns = {"self": self, "chosen_logps": cast(pc), "rejected_logps": cast(pr), "ref_chosen_logps": cast(rc),
              "ref_rejected_logps": cast(rr), "completion_mask": mask, "shift_completion_mask": mask,
              "per_token_logps": cast(per_token), "device": "cpu", "torch": torch, "F": F, "math": math}
        exec(block, ns)
        chosen_rewards = beta * (pc - rc)
        rejected_rewards = beta * (pr - rr)
        cases.append({
            "loss_type": loss_type, "beta": beta, "label_smoothing": smoothing, "loss": float(ns["loss"]),
            "rewards/chosen": float(chosen_rewards.mean()), "rewards/rejected": float(rejected_rewards.mean()),
            "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
            "rewards/accuracies": float((chosen_rewards > rejected_rewards).double().mean()),
            "sft_weight": sft, "f_divergence_type": fdiv, "f_alpha_divergence_coef": alpha, "discopop_tau": tau,
        })
    for beta in [0.1, 0.25]:
        self = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
        losses, chosen_rewards, rejected_rewards, ratio, log_odds = ORPOTrainer.odds_ratio_loss(
            self, pc / lens_c, pr / lens_r)
        nll = -pc.sum() / lens_c.sum()  # CrossEntropyLoss's mean over the chosen answers' tokens
        cases.append({
            "loss_type": "orpo", "beta": beta, "label_smoothing": 0.0, "sft_weight": 0.0,
            "loss": float(nll - losses.mean()),
            "rewards/chosen": float(chosen_rewards.mean()), "rewards/rejected": float(rejected_rewards.mean()),
            "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
            "rewards/accuracies": float((chosen_rewards > rejected_rewards).double().mean()),
            "nll_loss": float(nll), "log_odds_ratio": float(ratio), "log_odds_chosen": float(log_odds),
        })
    # KTO on unpaired answers: the chosen ones desirable, the rejected ones not, with a KL
    # estimate (TRL's, clamped at 0), as KTOTrainer computes them.
    block = kto_block()
    kto_cases = []
    for beta, kl, wd, wu in [(0.1, 0.0, 1.0, 1.0), (0.5, 0.7, 1.0, 1.33), (0.2, 2.5, 0.8, 1.0)]:
        self = SimpleNamespace(beta=beta, loss_type="kto", desirable_weight=wd, undesirable_weight=wu,
                               accelerator=SimpleNamespace(device="cpu"))
        ns = {"self": self, "chosen_logps": pc, "ref_chosen_logps": rc, "rejected_logps": pr,
              "ref_rejected_logps": rr, "kl": torch.tensor(kl, dtype=torch.float64), "torch": torch, "F": F}
        exec(block, ns)
        kto_cases.append({"beta": beta, "kl": kl, "desirable_weight": wd, "undesirable_weight": wu,
                          "loss": float(ns["losses"].nanmean()),
                          "rewards/chosen": float(ns["chosen_rewards"].mean()),
                          "rewards/rejected": float(ns["rejected_rewards"].mean())})
    out = {"trl_version": trl.__version__, "policy_chosen": pc.tolist(), "policy_rejected": pr.tolist(),
           "ref_chosen": rc.tolist(), "ref_rejected": rr.tolist(), "len_chosen": lens_c.tolist(),
           "len_rejected": lens_r.tolist(), "cases": cases, "kto": kto_cases}
    with open(os.path.join(HERE, "preference_losses.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"{len(cases)} cases (trl {trl.__version__})")


if __name__ == "__main__":
    main()
