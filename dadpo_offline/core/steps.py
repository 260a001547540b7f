"""`run`'s steps, declared once: `run` executes them, `run --dry-run` describes them, the report and
eval find the training stages they leave. A step names the finer parts the plan describes (the
cache stages it fills, the training folder it writes) and the command that runs it alone."""
from __future__ import annotations

from dataclasses import dataclass

from ..losses import LOSSES
from ..manifest import Manifest
from .layout import RunLayout


@dataclass(frozen=True)
class Step:
    name: str  # as `run` prints it
    parts: tuple[str, ...]  # what `run --dry-run` describes, in order
    command: str  # the command that runs this step alone


def trained_losses(m: Manifest) -> list[str]:
    """train.loss, then train.compare: the preference stages `run` trains, same data and budget."""
    return list(dict.fromkeys([m.train.loss, *m.train.compare]))


def training_stages() -> list[str]:
    """Every training output folder a run can hold: dSFT, then the registered losses."""
    return ["sft", *LOSSES]


def pipeline_steps(m: Manifest) -> list[Step]:
    layout = RunLayout.of(m)
    use = f" --set reference.model={layout.stage('sft')}" if m.reference is None else ""
    steps = []
    if m.prune.source:
        template = f" --chat-template {m.student.chat_template}" if m.student.chat_template else ""
        heads = f" --head-ratio {m.prune.head_ratio}" if m.prune.head_ratio else ""
        steps.append(Step("prune", ("prune",), f"dadpo-offline prune {m.prune.source} --method {m.prune.method} "
                          f"--ratio {m.prune.ratio}{heads} --out {m.student.model} "
                          f"--calibration-prompts {m.prune.calibration_prompts}{template}"))
    steps += [Step("generate", ("prompts", "generate-student", "generate-teacher"),
                   "dadpo-offline precompute MANIFEST --stage generate   (prompts and both generations)"),
              Step("dsft", ("train-sft",), "dadpo-offline train MANIFEST --stage sft"),
              Step("score", (*m.teacher_scorers(), "score-reference", "pairs"),
                   f"dadpo-offline precompute MANIFEST --stage score{use}   (scores and pairs)")]
    steps += [Step(loss, (f"train-{loss}",), f"dadpo-offline train MANIFEST --stage dadpo --loss {loss}{use}")
              for loss in trained_losses(m)]
    return steps + [Step("eval", ("eval",), f"dadpo-offline eval MANIFEST{use}"),
                    Step("report", ("report",), "dadpo-offline report MANIFEST")]
