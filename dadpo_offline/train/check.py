"""Step-0 consistency check: does the policy reproduce the cached reference log-probs?

daDPO's implicit rewards are differences between the policy's log-probs and the cached
reference's. If the policy at step 0 is not the model (or not the numerics) the cache was
scored with, every reward starts biased by that gap and training optimises noise. So before
the first step we re-score a sample of cached sequences with the policy, exactly as training
will (same forward, same autocast), and stop with a clear error when they disagree.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import torch

from ..cache.index import open_cache
from ..errors import TrainError
from .data import _pad
from .logps import token_logps


@dataclass(frozen=True)
class Step0Report:
    sequences: int
    tokens: int
    seq_mean: float  # mean |Σ policy − cached| per sequence, nats
    seq_max: float
    token_mean: float  # mean |policy − cached| per token, nats
    token_max: float
    cached_reference: str  # the model the cache says it scored the reference with

    def line(self) -> str:
        return (f"step-0 check over {self.sequences} sequences ({self.tokens} tokens): |policy − cached reference| "
                f"per sequence mean {self.seq_mean:.4f} max {self.seq_max:.4f} nats; "
                f"per token mean {self.token_mean:.5f} max {self.token_max:.5f} nats")


def cached_reference_sequences(cache_dir: str, pairs: int) -> tuple[list[dict], str]:
    """Both sides of the first `pairs` train pairs, as the reference scorer stored them."""
    cache = open_cache(cache_dir)
    cache.check_intact(["scores"], "dadpo-offline precompute MANIFEST --stage score")
    with cache.connect(read_only=True) as con:
        rows = con.execute("""
            SELECT s.input_ids, s.prompt_len, s.token_logprobs, s.logprob
            FROM (SELECT prompt_id, sample FROM pairs WHERE split = 'train' ORDER BY prompt_id, sample LIMIT ?) p
            JOIN scores s ON s.prompt_id = p.prompt_id AND s.sample = p.sample AND s.scorer = 'reference'
            ORDER BY s.prompt_id, s.sample, s.role""", [pairs]).fetchall()
        settings = con.execute("SELECT settings FROM stages WHERE stage = 'score-reference' AND active").fetchone()
    model = json.loads(settings[0]).get("model", "?") if settings else "?"
    return [{"input_ids": r[0], "prompt_len": r[1], "token_logprobs": r[2], "logprob": r[3]} for r in rows], model


def measure(model, sequences: list[dict], pad_id: int, micro_batch: int = 8, autocast=None) -> tuple[list, list]:
    """Per-sequence and per-token absolute gaps between the model and the cached numbers."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seq_gaps, token_gaps = [], []
    try:
        for start in range(0, len(sequences), micro_batch):
            chunk = sequences[start:start + micro_batch]
            ids, mask = _pad([s["input_ids"] for s in chunk], pad_id)
            prompt_lens = torch.tensor([s["prompt_len"] for s in chunk])
            seq_lens = torch.tensor([len(s["input_ids"]) for s in chunk])
            with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
                logps, keep, first = token_logps(model, ids.to(device), mask.to(device), prompt_lens, seq_lens)
            for row, s in enumerate(chunk):
                lo, hi = s["prompt_len"] - first, len(s["input_ids"]) - first
                ours = logps[row, lo:hi].double().cpu()
                cached = torch.tensor(s["token_logprobs"], dtype=torch.float64)
                token_gaps.extend((ours - cached).abs().tolist())
                seq_gaps.append(abs(ours.sum().item() - s["logprob"]))
    finally:
        model.train(was_training)
    return seq_gaps, token_gaps


def step0_check(model, cache_dir: str, pad_id: int, pairs: int, max_token_gap: float, policy_name: str,
                autocast=None) -> Step0Report:
    sequences, cached_model = cached_reference_sequences(cache_dir, pairs)
    seq_gaps, token_gaps = measure(model, sequences, pad_id, autocast=autocast)
    report = Step0Report(len(seq_gaps), len(token_gaps), sum(seq_gaps) / len(seq_gaps), max(seq_gaps),
                         sum(token_gaps) / len(token_gaps), max(token_gaps), cached_model)
    if not report.token_mean <= max_token_gap:  # also catches NaN
        raise TrainError(
            f"{report.line()} — above train.step0_max_token_gap={max_token_gap}. The policy ({policy_name}) does not "
            f"reproduce the reference the cache was scored with ({cached_model}). Usual causes: the policy is not "
            "that reference (set train.init_model, or set `reference:` to the dSFT model and rescore), or the "
            "reference was scored with other numerics (dtype, engine). Rescore with: dadpo-offline precompute "
            "MANIFEST --stage score, or raise train.step0_max_token_gap if the gap is expected")
    return report
