"""Which student: depth- vs width-pruned SmolLM2-135M-Instruct at ratio 0.2, measured side by side.

    python bench/prune.py [--calibration-prompts 32] [--held-out 32]

Prunes the embedded SmolLM2 three ways with `prune_model` (depth; width, MLP channels only; width,
MLP channels plus one query head per KV-head group) into a temporary folder and prints, per student:
parameters, wall time of the prune, and the mean per-token negative log-likelihood (and perplexity)
of built-in train prompts the calibration did not see (chat template applied, fp32, transformers),
next to the unpruned model. No recovery training: this is what each cut costs before dSFT.
Results go to stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from dadpo_offline.core.chat import load_chat_format
from dadpo_offline.core.models import resolve_model
from dadpo_offline.core.prompts import builtin_prompts
from dadpo_offline.prune import prune_model

SOURCE = "embedded:smollm2-135m-instruct"
STUDENTS = {"depth 0.2": {"method": "depth"}, "width 0.2 (MLP only)": {"method": "width"},
            "width 0.2 + 1/3 heads": {"method": "width", "head_ratio": 1 / 3}}


def mean_nll(folder: str, prompt_ids: list[list[int]]) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids in prompt_ids:
            batch = torch.tensor([ids])
            total += model(batch, labels=batch).loss.item() * (len(ids) - 1)
            tokens += len(ids) - 1
    return total / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-prompts", type=int, default=32)
    parser.add_argument("--held-out", type=int, default=32)
    args = parser.parse_args()
    ref = resolve_model(SOURCE)
    chat = load_chat_format(ref)
    held_out = builtin_prompts("train")[args.calibration_prompts:args.calibration_prompts + args.held_out]
    ids = [chat.prompt_ids(p.as_messages()) for p in held_out]
    rows = [("unpruned", sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(ref.path).parameters()),
             0.0, mean_nll(ref.path, ids))]
    with tempfile.TemporaryDirectory() as tmp:
        for name, how in STUDENTS.items():
            out = Path(tmp) / name.replace(" ", "_").replace("/", "-")
            start = time.perf_counter()
            report = prune_model(SOURCE, 0.2, out, args.calibration_prompts, **how)
            rows.append((name, report["params_after"], time.perf_counter() - start, mean_nll(str(out), ids)))
    print(f"| student | parameters | prune wall s | held-out NLL/token | perplexity |  ({len(ids)} prompts, "
          f"{sum(len(i) - 1 for i in ids)} tokens)")
    for name, params, wall, nll in rows:
        print(f"| {name} | {params:,} | {wall:.0f} | {nll:.3f} | {math.exp(nll):.1f} |")


if __name__ == "__main__":
    main()
