"""Step-0 consistency check: does the loss receive the cached numbers, and does the policy reproduce them?

daDPO's implicit rewards are differences between the policy's log-probs and the cached
reference's. Two things can bias every reward from the first step on, and both are checked on
the first `pairs` train pairs before training starts:

- the anchors: the reference and teacher log-probs the loss receives (through the Trainer's own
  input preparation, where DeepSpeed casts floating inputs) must equal those stored in the
  cache's `scores` view, read here by a separate query;
- the policy: re-scored exactly as training will (same batches, forward and autocast), it must
  reproduce the cached reference per token, within a tolerance set by the training dtype.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import torch

from ..cache.index import open_cache
from ..errors import TrainError
from .data import ANCHORS
from .logps import token_logps

ANCHOR_TOLERANCE = 1e-9  # nats: float64 end to end, so any visible difference means something rounded them
# Default train.step0_max_token_gap, by the coarser of the two numerics (the cache's scorer, the
# training forward). Measured with the right reference (SmolLM2-135M, vLLM scores vs a transformers
# forward, 1,364 tokens, CPU): fp32/fp32 1e-5 nats per token; a bf16 side 0.019–0.028. The
# defaults leave room for other kernels (GPUs) and stay far below a wrong reference's gap.
TOKEN_GAP_BY_DTYPE = {"float32": 1e-3, "bfloat16": 0.08, "float16": 0.08}


@dataclass(frozen=True)
class Step0Report:
    sequences: int
    tokens: int
    seq_mean: float  # mean |Σ policy − cached| per sequence, nats
    seq_max: float
    token_mean: float  # mean |policy − cached| per token, nats
    token_max: float
    anchor_max: float  # max |what the loss receives − the cache| over the reference and teacher numbers, nats
    cached_reference: str  # the model the cache says it scored the reference with

    def line(self) -> str:
        return (f"step-0 check over {self.sequences} sequences ({self.tokens} tokens): |policy − cached reference| "
                f"per sequence mean {self.seq_mean:.4f} max {self.seq_max:.4f} nats; "
                f"per token mean {self.token_mean:.5f} max {self.token_max:.5f} nats; "
                f"anchors the loss receives differ from the cache by at most {self.anchor_max:.2g} nats")


def default_token_gap(training_dtype: str, cached_dtype: str) -> float:
    return max(TOKEN_GAP_BY_DTYPE.get(d, TOKEN_GAP_BY_DTYPE["bfloat16"]) for d in (training_dtype, cached_dtype))


def stored_scores(cache_dir: str, keys: list[tuple]) -> tuple[dict, dict]:
    """{(prompt_id, sample, role, scorer): (token log-probs, sequence log-prob)} straight from `scores`,
    and the settings the reference was scored with."""
    cache = open_cache(cache_dir)
    cache.check_intact(["scores"], "dadpo-offline precompute MANIFEST --stage score")
    with cache.connect() as con:
        con.execute("CREATE TEMP TABLE wanted (prompt_id VARCHAR, sample INTEGER)")
        con.executemany("INSERT INTO wanted VALUES (?, ?)", keys)
        rows = con.execute("SELECT prompt_id, sample, role, scorer, token_logprobs, logprob FROM scores "
                           "JOIN wanted USING (prompt_id, sample)").fetchall()
        settings = con.execute("SELECT settings FROM stages WHERE stage = 'score-reference' AND active").fetchone()
    return {tuple(r[:4]): (r[4], r[5]) for r in rows}, json.loads(settings[0]) if settings else {}


def step0_check(trainer, model, pairs: int, cache_dir: str, max_token_gap: float | None, policy_name: str,
                micro_batch: int = 4) -> Step0Report:
    """Measure both gaps on the first `pairs` pairs, through `trainer`'s collator and input path."""
    dataset = trainer.train_dataset
    features = [dataset[i] for i in range(min(pairs, len(dataset)))]
    stored, scored_with = stored_scores(cache_dir, list({(f["prompt_id"], f[f"{side}_sample"]) for f in features
                                                         for side in ("chosen", "rejected")}))
    cached_model = scored_with.get("model", "?")
    training_dtype = "bfloat16" if trainer.args.bf16 else "float16" if trainer.args.fp16 else "float32"
    cached_dtype = scored_with.get("engine", {}).get("dtype", "bfloat16")
    limit = f"train.step0_max_token_gap={max_token_gap}"
    if max_token_gap is None:
        max_token_gap = default_token_gap(training_dtype, cached_dtype)
        limit = f"{max_token_gap} (train.step0_max_token_gap's default for {cached_dtype} scores, {training_dtype} training)"
    seq_gaps, token_gaps, anchor_gaps = [], [], []
    for inputs, scored in rescore(model, features, trainer.data_collator, micro_batch, trainer._prepare_inputs,
                                  trainer.accelerator.autocast):  # the Trainer's own path, casts included
        received = trainer.anchors_for(inputs).double().cpu()
        for row, (f, *sides) in enumerate(scored):
            # chosen = the teacher's answer, rejected = the student's
            key = {"teacher": (f["prompt_id"], f["chosen_sample"]), "student": (f["prompt_id"], f["rejected_sample"])}
            # the anchors' order: reference chosen, rejected, then each teacher's chosen, then each one's rejected
            expected = [stored[(*key[role], role, "reference")][1] for role in ("teacher", "student")] + \
                [stored[(*key[role], role, scorer)][1] for role in ("teacher", "student") for scorer in trainer.scorers]
            anchor_gaps.extend((received[row] - torch.tensor(expected, dtype=torch.float64)).abs().tolist())
            for side, (role, ours) in enumerate(zip(("teacher", "student"), sides)):
                cached_tokens = torch.tensor(stored[(*key[role], role, "reference")][0], dtype=torch.float64)
                token_gaps.extend((ours - cached_tokens).abs().tolist())
                seq_gaps.append(abs(ours.sum().item() - received[row, side].item()))
    report = Step0Report(len(seq_gaps), len(token_gaps), sum(seq_gaps) / len(seq_gaps), max(seq_gaps),
                         sum(token_gaps) / len(token_gaps), max(token_gaps), max(anchor_gaps), cached_model)
    if not report.anchor_max <= ANCHOR_TOLERANCE:
        raise TrainError(
            f"{report.line()} — the loss would not receive the cached {', '.join(ANCHORS)} as stored: something "
            "between the cache and the loss rounds them (an input cast to the training dtype?). Nothing was trained")
    if not report.token_mean <= max_token_gap:  # also catches NaN
        raise TrainError(
            f"{report.line()} — above {limit}. The policy ({policy_name}) does not "
            f"reproduce the reference the cache was scored with ({cached_model}). Usual causes: the policy is not "
            "that reference (set train.init_model, or set `reference:` to the dSFT model and rescore), or the "
            "reference was scored with other numerics (dtype, engine). Rescore with: dadpo-offline precompute "
            "MANIFEST --stage score, or raise train.step0_max_token_gap if the gap is expected")
    return report


def rescore(model, features: list[dict], collate, micro_batch: int, prepare=None, autocast=None):
    """Yield (inputs, [(feature, chosen token log-probs, rejected token log-probs)]) per micro-batch: `model`'s
    response-token log-probs (float64, CPU), from batches collated (and prepared) as training forms them."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(features), micro_batch):
            chunk = features[start:start + micro_batch]
            inputs = collate(chunk) if prepare is None else prepare(collate(chunk))
            with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
                logps, _, first = token_logps(model, inputs["input_ids"], inputs["attention_mask"],
                                              inputs["prompt_lens"], inputs["seq_lens"])
            prompt_lens, seq_lens = inputs["prompt_lens"].tolist(), inputs["seq_lens"].tolist()
            response = lambda i: logps[i, prompt_lens[i] - first:seq_lens[i] - first].double().cpu()
            yield inputs, [(f, response(row), response(row + len(chunk))) for row, f in enumerate(chunk)]  # chosen rows first
    finally:
        model.train(was_training)


def likelihood_shift(model, rows, pad_id: int, micro_batch: int = 8) -> dict:
    """How far training moved the policy's log-probs of its own training answers from the reference's
    (the cached numbers): the mean over pairs of (policy − reference) per token, for the chosen (teacher)
    and the rejected (student) answers. A falling chosen likelihood while the margin grows is the
    likelihood displacement DPO is known for; the teacher anchor is meant to hold the chosen side up."""
    from .data import PairCollator, RowDataset

    dataset, anchors = RowDataset(rows), rows.anchors()
    shifts: dict[str, list[float]] = {"chosen": [], "rejected": []}
    for _, scored in rescore(model, [dataset[i] for i in range(len(dataset))], PairCollator(pad_id), micro_batch):
        for f, chosen, rejected in scored:
            shifts["chosen"].append((chosen.sum().item() - anchors[f["index"], 0].item()) / len(chosen))
            shifts["rejected"].append((rejected.sum().item() - anchors[f["index"], 1].item()) / len(rejected))
    return {f"{side}_logp_shift_per_token": sum(v) / len(v) for side, v in shifts.items()} | {"pairs": len(rows)}
