"""`dadpo-offline sweep`: train a grid (losses × β1 × β2 × seeds) from one cache and one reference, eval it once.

Every point is an ordinary `train --stage dadpo` output in <sweep>/points/<point>/, made by the same
code with the same identity, finished and resume rules: a rerun skips finished points, and a killed
sweep continues the point it was in from its newest checkpoint. A loss that ignores a beta (dDPO: β2,
rDPO: β1, as the loss registry records) trains once along that axis, with that beta at 0. One eval
over every point and the baselines shares the cache's answers and judgments (a rerun reuses them).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core.layout import RunLayout
from ..core.models import is_model_folder
from ..errors import DadpoError, InputError, ManifestError
from ..files import atomic_text
from ..losses import LOSSES
from ..manifest import Manifest, ModelConfig, write_resolved
from ..pipeline import with_reference
from .table import write_tables


@dataclass(frozen=True)
class Point:
    loss: str
    beta1: float  # 0 where the loss ignores it
    beta2: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.loss}-b1_{self.beta1:g}-b2_{self.beta2:g}-seed_{self.seed}"

    def manifest(self, m: Manifest) -> Manifest:
        """The manifest `train --stage dadpo --loss L --beta1 B1 --beta2 B2 --set train.seed=S` would read."""
        train = dataclasses.replace(m.train, loss=self.loss, beta1=self.beta1, beta2=self.beta2, seed=self.seed)
        return dataclasses.replace(m, train=train)


def grid(m: Manifest) -> tuple[list[Point], list[str]]:
    """Every distinct point of sweep.* (an empty axis takes train.*'s value; sweep.axes replaces an axis
    for one loss), and a note for each loss and
    beta pair left out because the loss would have no anchor there (rDPO at β2 = 0: no loss at all)."""
    s, t = m.sweep, m.train
    if m.teachers:  # its points, names and tables hold one β2 each
        raise ManifestError("sweep: a manifest with teachers: (several teachers) cannot be swept yet — train each "
                            "setting with: dadpo-offline train MANIFEST --stage dadpo")
    axes = {"beta1": s.beta1 or [t.beta1], "beta2": s.beta2 or [t.beta2]}
    points, dropped = {}, {}
    for loss in s.losses or [t.loss]:
        own = s.axes.get(loss, {})  # a loss's own axis, e.g. rDPO's β2 (its DPO temperature) held at one value
        along = lambda beta: (own.get(beta) or axes[beta]) if beta in LOSSES[loss].uses else [0.0]
        for b1 in along("beta1"):
            for b2 in along("beta2"):
                if b1 + b2 <= 0:
                    dropped[f"{loss} at β1={b1:g}, β2={b2:g}: no anchor (needs a positive "
                            f"{' or '.join(LOSSES[loss].uses)}), not trained"] = None
                    continue
                for seed in s.seeds or [t.seed]:
                    points.setdefault(Point(loss, float(b1), float(b2), seed), None)
    problems = list(dict.fromkeys(problem for p in points for problem in
                                  LOSSES[p.loss].problems(p.beta1, p.beta2, t.loss_params.get(p.loss, {}))))
    if not points:
        problems.append("every point lacks an anchor (" + "; ".join(dropped) + ")")
    if problems:
        raise ManifestError("sweep: " + "; ".join(problems) + " — check sweep.* (or --loss, --beta1, --beta2)")
    return list(points), list(dropped)


def sweep_dir(m: Manifest) -> Path:
    return Path(m.sweep.output_dir) if m.sweep.output_dir else RunLayout.of(m).root / "sweep"


def with_start(m: Manifest) -> Manifest:
    """The manifest every point trains from: its `reference:`, else the dSFT output (as `run` uses it)."""
    if m.reference is not None:
        return m
    sft = RunLayout.of(m).stage("sft")
    if not is_model_folder(sft):
        raise InputError(f"sweep trains every point from the dSFT reference and {sft} holds none — run: dadpo-offline "
                         f"run MANIFEST --through score (or: dadpo-offline train MANIFEST --stage sft, then: "
                         f"dadpo-offline precompute MANIFEST --stage score --set reference.model={sft})")
    return with_reference(m)


def point_status(m: Manifest, point: Point, folder: Path) -> str:
    """finished / started (checkpoint-N) / to train, read from the folder without changing it."""
    from ..train.dpo import dadpo_identity
    from ..train.runs import checkpoint_step, finished_state

    t, *_, identity = dadpo_identity(point.manifest(m))
    if finished_state(folder, identity, t) is not None:
        return "finished"
    steps = sorted(checkpoint_step(f) for f in folder.glob("checkpoint-*") if f.name[11:].isdigit() and f.is_dir())
    return f"started (checkpoint-{steps[-1]})" if steps else "to train"


def describe(m: Manifest) -> str:
    """`sweep --dry-run`: the points and which are finished; trains and loads nothing."""
    (points, dropped), out = grid(m), sweep_dir(m)
    try:
        start = with_start(m)
        status = {p: point_status(start, p, out / "points" / p.name) for p in points}
        note = f"reference {start.reference_model.model}"
    except DadpoError as exc:  # no dSFT or no scores yet: the points are all still to train
        status, note = {p: "to train" for p in points}, f"cannot start yet: {exc}"
    width = max(len(p.name) for p in points)
    lines = [f"sweep: {len(points)} points into {out / 'points'}; {note}"]
    lines += [f"  {p.name:<{width}}  {status[p]}" for p in points] + [f"  ({note})" for note in dropped]
    done, started = (sum(s.startswith(word) for s in status.values()) for word in ("finished", "started"))
    lines.append(f"{done} finished, {started} started, {len(points) - done - started} to train; eval: {', '.join(m.sweep.suites)} over the points "
                 f"and the baselines (teacher, student, reference)")
    return "\n".join(lines)


def run_sweep(m: Manifest, evaluate_points: bool = True, callbacks: list | None = None) -> dict:
    """Train every point (skipping finished ones), evaluate them together, write table and plots."""
    from ..train.dpo import train_dadpo

    (points, dropped), out = grid(m), sweep_dir(m)
    start = with_start(m)
    for note in dropped:
        log(f"sweep: {note}")
    write_resolved(m, out / "manifest.yaml")
    trained = {}
    for i, point in enumerate(points, 1):
        log(f"\n== sweep point {i}/{len(points)}: {point.name}")
        result = train_dadpo(point.manifest(start), callbacks=callbacks, output=out / "points" / point.name)
        if result.get("skipped"):
            log(f"== {point.name}: skipped ({result['skipped']})")
        else:
            resumed = f", resumed from {Path(result['resumed_from']).name}" if result["resumed_from"] else ""
            log(f"== {point.name}: {result['steps']} steps, train loss {result['train_loss']:.4f}{resumed}")
        trained[point] = result
    rows, eval_dir = displacement_rows(start, trained), None
    if evaluate_points:
        run = evaluate_sweep(start, {p.name: Path(r["output_dir"]) for p, r in trained.items()}, out)
        rows, eval_dir = run.rows + rows, run.run_dir
    files = write_tables(out, [(p, trained[p]) for p in points], rows, evaluate_points)
    return {"points": {p.name: r for p, r in trained.items()}, "eval_dir": eval_dir, "files": files}


def displacement_rows(m: Manifest, trained: dict[Point, dict]) -> list[dict]:
    """Each point's likelihood shift on its own training pairs (`likelihood_shift`), as rows of suite
    `displacement`. Kept beside the point's run.json, so a rerun loads no model; a retrained point
    (another run.json) is measured again."""
    import torch

    from ..train.check import likelihood_shift
    from ..train.data import load_pairs
    from ..train.runs import load_causal_lm

    rows, pairs = [], None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for point, result in trained.items():
        folder = Path(result["output_dir"])
        kept_at, run = folder / "likelihood_shift.json", json.loads((folder / "run.json").read_text())
        kept = json.loads(kept_at.read_text()) if kept_at.is_file() else {}
        if kept.get("run") != run:
            pairs = pairs or load_pairs(m.cache_dir)
            log(f"sweep: {point.name}: likelihood shift on its {len(pairs)} training pairs")
            model, tokenizer, _ = load_causal_lm(str(folder))
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            kept = {"run": run, "metrics": likelihood_shift(model.to(device), pairs, pad)}
            atomic_text(kept_at, json.dumps(kept, indent=2) + "\n")
        rows += [{"model": point.name, "suite": "displacement", "metric": name, "value": value}
                 for name, value in kept["metrics"].items() if name != "pairs"]
    return rows


def evaluate_sweep(m: Manifest, folders: dict[str, Path], out: Path):
    """One eval of the points (named by point) and the baselines, so answers and judgments come from one cache."""
    from ..eval.run import eval_models, evaluate

    points = {name: ModelConfig(model=str(folder), dtype=m.student.dtype, end_of_turn=m.student.end_of_turn)
              for name, folder in folders.items()}
    m = dataclasses.replace(m, eval=dataclasses.replace(m.eval, models=m.eval.models | points))
    known = eval_models(m, {}, None)
    baselines = ["teacher", "student", next((n for n in ("reference", "sft") if n in known), None)]
    return evaluate(m, list(m.sweep.suites), None, [n for n in baselines if n] + list(points), str(out / "eval"))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
