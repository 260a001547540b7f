"""Manifest checks across fields, run once every field has its type: each returns every problem it
finds, so loading reports them all in one error."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..losses import LOSSES

if TYPE_CHECKING:
    from . import Manifest, PeftConfig, SweepConfig, TrainConfig, TrainerConfig


def combination_problems(m: Manifest) -> list[str]:
    """Every problem no single field shows: exclusive keys, ranges, batch arithmetic, peft, losses."""
    problems = []
    for i, source in enumerate(m.prompts.sources):
        chosen = [k for k in ("builtin", "jsonl", "hub") if getattr(source, k) is not None]
        if len(chosen) != 1:
            problems.append(f"prompts.sources[{i}]: give exactly one of builtin, jsonl, hub (got {chosen or 'none'})")
    e = m.eval
    at_least_one = [("engine.shard_size", m.engine.shard_size), ("engine.batch_tokens", m.engine.batch_tokens),
                    ("engine.tensor_parallel_size", m.engine.tensor_parallel_size),
                    ("generate.samples_per_prompt", m.generate.samples_per_prompt),
                    ("prompts.max_prompt_tokens", m.prompts.max_prompt_tokens),
                    ("prune.calibration_prompts", m.prune.calibration_prompts),
                    ("eval.judge.max_tokens", e.judge.max_tokens), ("eval.judge.concurrency", e.judge.concurrency),
                    ("eval.mtbench.max_tokens", e.mtbench.max_tokens), ("eval.alpacaeval.max_tokens", e.alpacaeval.max_tokens),
                    ("eval.winrate.max_tokens", e.winrate.max_tokens), ("eval.lmeval.batch_size", e.lmeval.batch_size),
                    ("eval.likelihood.samples", e.likelihood.samples), ("eval.likelihood.max_tokens", e.likelihood.max_tokens)]
    at_least_one += [(f"generate.{role}.{key}", getattr(getattr(m.generate, role), key)) for role in ("teacher", "student")
                     for key in ("max_tokens", "samples") if getattr(getattr(m.generate, role), key) is not None]
    at_least_one += [(f"{key}.limit", limit) for key, limit in [("prompts", m.prompts.limit), ("eval.mtbench", e.mtbench.limit),
                     ("eval.alpacaeval", e.alpacaeval.limit), ("eval.winrate", e.winrate.limit), ("eval.lmeval", e.lmeval.limit)]
                     if limit is not None]
    problems += [f"{key}: must be >= 1, got {value}" for key, value in at_least_one if value < 1]
    for role in ("teacher", "student"):
        sampling = getattr(m.generate, role)
        if sampling.temperature < 0:
            problems.append(f"generate.{role}.temperature: must be >= 0, got {sampling.temperature}")
        if not 0 < sampling.top_p <= 1:
            problems.append(f"generate.{role}.top_p: must be in (0, 1], got {sampling.top_p}")
    teacher, student = m.generate.samples("teacher"), m.generate.samples("student")
    if m.pairs.policy == "index" and teacher != student:
        problems.append(f"pairs.policy: index pairs teacher sample k with student sample k, but the teacher gives "
                        f"{teacher} samples per prompt and the student {student} (generate.teacher.samples, "
                        "generate.student.samples, generate.samples_per_prompt): make them equal, or choose "
                        "pairs.policy all or best_vs_worst")
    if e.judge.max_retries < 0 or not e.judge.timeout_s > 0:
        problems.append(f"eval.judge: max_retries must be >= 0 and timeout_s > 0, got {e.judge.max_retries} and "
                        f"{e.judge.timeout_s}")
    problems += [f"eval.lmeval.data_files.{task}: {task} is not in eval.lmeval.tasks; add it there with its shot count"
                 for task in e.lmeval.data_files if task not in e.lmeval.tasks]
    if not 0 < m.prune.ratio < 1:
        problems.append(f"prune.ratio: must be in (0, 1), got {m.prune.ratio}")
    if m.prune.method not in ("depth", "width"):
        problems.append(f"prune.method: must be depth or width, got {m.prune.method!r}")
    if not 0 <= m.prune.head_ratio < 1:
        problems.append(f"prune.head_ratio: must be in [0, 1), got {m.prune.head_ratio}")
    elif m.prune.head_ratio and m.prune.method != "width":
        problems.append(f"prune.head_ratio: applies to prune.method width only, got {m.prune.head_ratio} with "
                        f"{m.prune.method!r}")
    if m.engine.gpu_memory_utilization is not None and not 0 < m.engine.gpu_memory_utilization <= 1:
        problems.append(f"engine.gpu_memory_utilization: must be in (0, 1], got {m.engine.gpu_memory_utilization}")
    return (problems + _teachers_problems(m) + _trainer_problems("sft", m.sft) + _trainer_problems("train", m.train)
            + _loss_problems(m.train, m.sweep, m.teacher_betas()))


def _teachers_problems(m: Manifest) -> list[str]:
    """`teachers:` entries: unique names that can name a cache stage, weights >= 0; `pairs.chosen_from` one of them."""
    names = [t.name for t in m.teachers]
    problems = [f"teachers[{i}].name: {name!r} must be lowercase letters, digits, - or _ (it names a cache stage), "
                "and not reference, student, teacher or each"
                for i, name in enumerate(names) if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name)
                or name in ("reference", "student", "teacher", "each")]
    problems += [f"teachers: the name {name!r} is given twice" for name in sorted(set(names)) if names.count(name) > 1]
    problems += [f"teachers[{i}].beta2 must be >= 0, got {t.beta2}" for i, t in enumerate(m.teachers) if t.beta2 < 0]
    chosen = m.pairs.chosen_from
    if chosen is not None and not m.teachers:
        problems.append(f"pairs.chosen_from={chosen}: applies with teachers: only")
    elif chosen is not None and chosen != "each" and chosen not in names:
        problems.append(f"pairs.chosen_from: {chosen!r} is not each or a teacher's name ({', '.join(names)})")
    if m.teachers and (m.sweep.beta2 or any("beta2" in axes for axes in m.sweep.axes.values())):
        problems.append("sweep.beta2: with teachers, each teacher's own beta2 weighs its anchor — remove the "
                        "beta2 axis and give each set of weights its own manifest")
    return problems


def _trainer_problems(section: str, t: TrainerConfig) -> list[str]:
    """Bad Trainer settings of one training stage, found at load rather than after phase one."""
    problems = [f"{section}.{key} must be >= 1, got {getattr(t, key)}"
                for key in ("batch_size", "micro_batch_size", "epochs", "save_steps", "logging_steps")
                if getattr(t, key) < 1]
    problems += [f"{section}.{key} must be >= 0, got {getattr(t, key)}" for key in ("weight_decay", "max_grad_norm")
                 if getattr(t, key) < 0]
    if not t.learning_rate > 0:
        problems.append(f"{section}.learning_rate must be > 0, got {t.learning_rate}")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"{section}.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.micro_batch_size >= 1 and t.batch_size % min(t.micro_batch_size, t.batch_size):
        problems.append(f"{section}.batch_size={t.batch_size} is not a multiple of {section}.micro_batch_size="
                        f"{t.micro_batch_size}")
    return problems + (_peft_problems(f"{section}.peft", t.peft) if t.peft else [])


def _peft_problems(key: str, p: PeftConfig) -> list[str]:
    problems = []
    if p.rank < 1:
        problems.append(f"{key}.rank must be >= 1, got {p.rank}")
    if not p.alpha > 0:
        problems.append(f"{key}.alpha must be > 0, got {p.alpha}")
    if not 0 <= p.dropout < 1:
        problems.append(f"{key}.dropout must be in [0, 1), got {p.dropout}")
    if isinstance(p.target_modules, str) and p.target_modules != "all-linear":
        problems.append(f"{key}.target_modules must be a list of module names or 'all-linear', got {p.target_modules!r}")
    if isinstance(p.target_modules, list) and not p.target_modules:
        problems.append(f"{key}.target_modules is empty: name at least one module, or 'all-linear'")
    if p.quantize is not None:
        import importlib.util

        import torch

        if not torch.cuda.is_available():
            problems.append(f"{key}.quantize={p.quantize} (QLoRA) needs a CUDA GPU and there is none: remove it "
                            "to train LoRA on the unquantized base")
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append(f"{key}.quantize={p.quantize} (QLoRA) needs bitsandbytes: pip install 'dadpo-offline[gpu]'")
    return problems


def _loss_problems(t: TrainConfig, s: SweepConfig, beta2) -> list[str]:
    """The loss registry checks its names, the betas each loss uses and each loss's own parameters."""
    known = ", ".join(map(repr, sorted(LOSSES)))
    problems = [f"{key}: {name!r} is not one of {known}"
                for key, names in (("train.loss", [t.loss]), ("train.compare", t.compare),
                                   ("train.loss_params", list(t.loss_params)), ("sweep.losses", s.losses))
                for name in names if name not in LOSSES]
    problems += [f"sweep.{key} must be >= 0, got {value}" for key in ("beta1", "beta2") for value in getattr(s, key)
                 if value < 0]
    for name, axes in s.axes.items():
        problems += [f"sweep.axes: {name!r} is not one of {known}"] if name not in LOSSES else []
        problems += [f"sweep.axes.{name}.{key}: only beta1 and beta2 have per-loss axes" for key in axes
                     if key not in ("beta1", "beta2")]
        problems += [f"sweep.axes.{name}.{key} must be >= 0, got {value}" for key, values in axes.items()
                     for value in values if value < 0]
    problems += [f"train.{key} must be >= 0, got {getattr(t, key)}"
                 for key in ("beta1", "beta2", "step0_pairs", "step0_max_token_gap")
                 if getattr(t, key) is not None and getattr(t, key) < 0]
    for name in dict.fromkeys([t.loss, *t.compare]):  # beta2: train.beta2, or each teacher's with teachers:
        if name in LOSSES and t.beta1 >= 0 and min(beta2 if isinstance(beta2, tuple) else (beta2,), default=0) >= 0:
            problems += LOSSES[name].problems(t.beta1, beta2, t.loss_params.get(name, {}))
    return problems
