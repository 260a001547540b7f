"""`dadpo-offline run`: the whole pipeline, one resumable step after another.

prune → precompute (prompts, generations) → dSFT → score with the dSFT student as reference →
daDPO and the comparison losses (same budget) → eval → report. Each step skips what is done:
cache shards are kept, training resumes from checkpoints and skips a finished run with the same
settings, eval reuses cached answers and judgments, so rerunning after a crash continues.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .manifest import Manifest, ModelConfig
from .train.runs import stage_dir


@dataclass
class Step:
    name: str
    seconds: float
    detail: str


def with_reference(m: Manifest) -> Manifest:
    """The manifest as used after dSFT: the dSFT student is the reference and daDPO's start."""
    sft = ModelConfig(model=str(stage_dir(m, "sft")), dtype=m.student.dtype, end_of_turn=m.student.end_of_turn)
    return dataclasses.replace(m, reference=sft)


def losses(m: Manifest) -> list[str]:
    return list(dict.fromkeys([m.train.loss, *m.train.compare]))


def run_pipeline(m: Manifest) -> list[Step]:
    from .eval.run import evaluate
    from .precompute.run import precompute
    from .report import write_report
    from .train.dpo import train_dadpo
    from .train.sft import train_sft

    if m.reference is not None:
        raise InputError("run makes the reference itself (dSFT of the student): remove `reference:` from the manifest, "
                         "or run the steps one by one (precompute, train, eval)")
    steps: list[Step] = []

    def step(name: str, work, describe) -> None:
        print(f"\n== {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        result = work()
        steps.append(Step(name, round(time.perf_counter() - start, 1), describe(result)))
        print(f"== {name}: {steps[-1].detail} ({steps[-1].seconds} s)", file=sys.stderr, flush=True)

    if m.prune.source:
        from .prune import prune_model

        step("prune", lambda: prune_model(m.prune.source, m.prune.ratio, Path(m.student.model),
                                          m.prune.calibration_prompts, chat_template=m.student.chat_template),
             lambda r: f"{r['layers_before']} → {r['layers_after']} layers, removed {r['removed']}")
    step("generate", lambda: precompute(m, stage="generate"), describe_precompute)
    step("dsft", lambda: train_sft(m), describe_training)
    scored = with_reference(m)
    step("score", lambda: precompute(scored, stage="score"), describe_precompute)
    for loss in losses(m):
        trained = dataclasses.replace(scored, train=dataclasses.replace(scored.train, loss=loss))
        step(loss, lambda: train_dadpo(trained), describe_training)
    step("eval", lambda: evaluate(scored), lambda r: f"results in {r.run_dir}")
    step("report", lambda: write_report(Path(m.cache_dir).parent), lambda r: f"{len(r['files'])} files")
    return steps


def describe_precompute(summary) -> str:
    return ", ".join(f"{s.stage} built {s.built} skipped {s.skipped}" for s in summary.stages)


def describe_training(result: dict) -> str:
    if result.get("skipped"):
        return result["skipped"]
    resumed = f" (resumed from {Path(result['resumed_from']).name})" if result.get("resumed_from") else ""
    return f"{result['steps']} steps, train loss {result['train_loss']:.4f}{resumed}"


def format_steps(steps: list[Step]) -> str:
    width = max(len(s.name) for s in steps)
    lines = [f"{s.name:<{width}}  {s.seconds:>7.1f} s  {s.detail}" for s in steps]
    return "\n".join(lines + [f"{'total':<{width}}  {sum(s.seconds for s in steps):>7.1f} s"])
