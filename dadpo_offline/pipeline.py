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

from .core.layout import RunLayout
from .core.steps import pipeline_steps
from .errors import InputError
from .manifest import Manifest, ModelConfig


@dataclass
class StepResult:
    name: str
    seconds: float
    detail: str


def with_reference(m: Manifest) -> Manifest:
    """The manifest as used after dSFT: the dSFT student is the reference and daDPO's start."""
    sft = ModelConfig(model=str(RunLayout.of(m).stage("sft")), dtype=m.student.dtype, end_of_turn=m.student.end_of_turn)
    return dataclasses.replace(m, reference=sft)


def describe_prune(r: dict) -> str:
    if r.get("method") == "width":
        return (f"{r['heads_before']} → {r['heads_after']} query heads, {r['intermediate_before']} → "
                f"{r['intermediate_after']} MLP channels per layer; {r['params_before']:,} → {r['params_after']:,} parameters")
    return f"{r['layers_before']} → {r['layers_after']} layers, removed {r['removed']}"


def run_pipeline(m: Manifest, through: str | None = None) -> list[StepResult]:
    """Every step of `pipeline_steps`, or those up to and including `through`."""
    from .eval.run import evaluate
    from .precompute.run import precompute
    from .prune import prune_model
    from .report import write_report
    from .train.dpo import train_dadpo
    from .train.sft import train_sft

    if m.reference is not None:
        raise InputError("run makes the reference itself (dSFT of the student): remove `reference:` from the manifest, "
                         "or run the steps one by one (precompute, train, eval)")
    scored = with_reference(m)
    work = {"prune": (lambda: prune_model(m.prune.source, m.prune.ratio, Path(m.student.model),
                                          m.prune.calibration_prompts, chat_template=m.student.chat_template,
                                          method=m.prune.method, head_ratio=m.prune.head_ratio), describe_prune),
            "generate": (lambda: precompute(m, stage="generate"), describe_precompute),
            "dsft": (lambda: train_sft(m), describe_training),
            "score": (lambda: precompute(scored, stage="score"), describe_precompute),
            "eval": (lambda: evaluate(scored), lambda r: f"results in {r.run_dir}"),
            "report": (lambda: write_report(RunLayout.of(m)), lambda r: f"{len(r['files'])} files")}
    steps = pipeline_steps(m)
    names = [step.name for step in steps]
    if through is not None:
        if through not in names:
            raise InputError(f"--through {through}: no such step (this manifest's steps: {', '.join(names)})")
        steps = steps[:names.index(through) + 1]
    results: list[StepResult] = []
    for step in steps:
        run, describe = work.get(step.name) or (train_loss(scored, step.name, train_dadpo), describe_training)
        print(f"\n== {step.name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        outcome = run()
        results.append(StepResult(step.name, round(time.perf_counter() - start, 1), describe(outcome)))
        print(f"== {step.name}: {results[-1].detail} ({results[-1].seconds} s)", file=sys.stderr, flush=True)
    return results


def train_loss(scored: Manifest, loss: str, train_dadpo):
    trained = dataclasses.replace(scored, train=dataclasses.replace(scored.train, loss=loss))
    return lambda: train_dadpo(trained)


def describe_precompute(summary) -> str:
    return ", ".join(f"{s.stage} built {s.built} skipped {s.skipped}" for s in summary.stages)


def describe_training(result: dict) -> str:
    if result.get("skipped"):
        return result["skipped"]
    resumed = f" (resumed from {Path(result['resumed_from']).name})" if result.get("resumed_from") else ""
    return f"{result['steps']} steps, train loss {result['train_loss']:.4f}{resumed}"


def format_steps(steps: list[StepResult]) -> str:
    width = max(len(s.name) for s in steps)
    lines = [f"{s.name:<{width}}  {s.seconds:>7.1f} s  {s.detail}" for s in steps]
    return "\n".join(lines + [f"{'total':<{width}}  {sum(s.seconds for s in steps):>7.1f} s"])
