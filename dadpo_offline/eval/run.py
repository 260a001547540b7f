"""`dadpo-offline eval`: for every model, answers (cached) → judgments (cached) → scores, per suite.

Recipe: resolve models and check the judge and the data sets first (seconds), then generate
what is missing, judge what is not judged yet, and write one results folder for this run.
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from ..cache.index import CacheIndex, open_cache
from ..cache.publish import build_index
from ..errors import CacheError, InputError
from ..manifest import EvalConfig, JudgeConfig, Manifest, ModelConfig, write_resolved
from ..core.models import is_model_folder, resolve_model
from ..core.engines import pick_backend
from ..core.layout import RunLayout
from ..core.roles import Engines, model_role
from ..core.steps import training_stages
from . import likelihood, mtbench, winrate
from .answers import Question, generate_answers
from .judge import Judge, judged
from .results import markdown_report, save_results
from .serve import served_judge

JUDGED = ("mtbench", "alpacaeval", "winrate")


@dataclass
class EvalRun:
    run_id: str
    run_dir: Path
    rows: list[dict]
    seconds: dict[str, float]


def eval_models(manifest: Manifest, extra: dict[str, str], only: list[str] | None) -> dict[str, ModelConfig]:
    """teacher, student, reference, trained outputs found on disk, eval.models, then --model flags."""
    models = {"teacher": manifest.chosen_teacher, "student": manifest.student}
    layout = RunLayout.of(manifest)
    if manifest.reference is not None and manifest.reference.model != str(layout.stage("sft")):
        models["reference"] = manifest.reference  # (the dSFT output is listed below as "sft")
    for stage in training_stages():  # evaluated when the folder holds a final model
        folder = layout.stage(stage)
        if is_model_folder(folder):  # a full model, or a LoRA adapter with its merged/ model
            models[stage] = ModelConfig(model=str(folder), dtype=manifest.student.dtype,
                                        end_of_turn=manifest.student.end_of_turn)
    models |= manifest.eval.models
    models |= {name: ModelConfig(model=ref, dtype=manifest.student.dtype) for name, ref in extra.items()}
    if only:
        unknown = [name for name in only if name not in models]
        if unknown:
            raise InputError(f"--only {','.join(unknown)}: no such model (known: {', '.join(models)})")
        models = {name: models[name] for name in only}
    return models


def evaluate(manifest: Manifest, suites: list[str] | None = None, extra: dict[str, str] | None = None,
             only: list[str] | None = None, output_dir: str | None = None) -> EvalRun:
    suites = suites or list(manifest.eval.suites)
    e = manifest.eval
    models = eval_models(manifest, extra or {}, only)
    # 1. Everything that can fail fast: judge reachable, data sets present.
    judged_suites = [s for s in suites if s in JUDGED]
    if judged_suites and not e.judge.serve:
        Judge(e.judge, judged_suites[0]).check()
    needs_teacher = [s for s in suites if s in ("winrate", "likelihood")
                     or (s == "alpacaeval" and e.alpacaeval.reference == "teacher")]
    if needs_teacher and "teacher" not in models:
        raise InputError(f"{needs_teacher[0]} compares with the teacher: keep it in --only")
    bench = mtbench.load_data(e.mtbench) if "mtbench" in suites or "winrate" in suites else None
    instructions = None
    if "alpacaeval" in suites:
        from .alpacaeval import load_instructions

        instructions = load_instructions(e.alpacaeval)
    # 2. One folder per run.
    base = Path(output_dir).expanduser().resolve() if output_dir else RunLayout.of(manifest).eval
    run_id, run_dir = new_run_dir(base)
    write_resolved(manifest, run_dir / "manifest.yaml")
    cache = open_cache(manifest.cache_dir, create=True)
    log(f"eval {run_id}: models {', '.join(models)}; suites {', '.join(suites)}; results {run_dir}")
    try:
        # 3. Answers, model by model (each loaded once for all suites), then judging, suite by suite.
        questions = {}
        if "mtbench" in suites:
            questions["mtbench"] = mtbench.to_questions(bench, e.mtbench.max_tokens)
        if "winrate" in suites or "likelihood" in suites:
            questions["winrate"] = winrate.to_questions(e.winrate)
        if "likelihood" in suites:
            questions["likelihood"] = likelihood.sampled_questions(questions["winrate"], e.likelihood)
        if "alpacaeval" in suites:
            questions["alpacaeval"] = [Question(f"{i:05d}", item.get("dataset") or "",
                                                ({"role": "user", "content": item["instruction"]},), (), 0.0,
                                                e.alpacaeval.max_tokens) for i, item in enumerate(instructions)]
        start = time.perf_counter()
        answers, rows, scores = {}, [], {}
        if questions:
            engines = Engines(manifest, pick_backend(manifest.engine.backend))
            try:
                roles = {name: model_role(name, config) for name, config in models.items()}
                if "likelihood" in suites:  # the teacher first: each other model scores its samples while loaded
                    roles = {"teacher": roles["teacher"]} | roles
                for role in roles.values():
                    for suite, asked in questions.items():
                        answers[(suite, role.name)] = generate_answers(cache, suite, role, asked, engines)
                    if "likelihood" in suites:
                        scores |= likelihood.score_while_loaded(cache, role, roles["teacher"], answers, engines)
                if "likelihood" in suites:
                    scores |= likelihood.score_by_teacher(cache, roles["teacher"], roles, answers, engines)
                    rows += likelihood.likelihood_rows([q.question_id for q in questions["winrate"]], scores, list(roles))
            finally:
                engines.close()
        answers = {suite: pa.concat_tables([t for (s, _), t in answers.items() if s == suite]) for suite in questions}
        seconds = {"answers": round(time.perf_counter() - start, 1)}
        judge = None
        # the judge (a local server takes the GPU the answer engine gave back) only while judging
        with served_judge(e.judge, run_dir / "judge-server.log") if judged_suites else nullcontext(e.judge) as judge_config:
            if judged_suites:
                judge = Judge(judge_config, judged_suites[0])
            for suite in judged_suites:
                start = time.perf_counter()
                if suite == "mtbench":
                    requests = mtbench.judge_requests(bench, answers["mtbench"])
                    judgments = judged(cache, judge, suite, requests, mtbench.parse_rating, "judge mtbench",
                                       mtbench.FOLLOWUP)
                    rows += mtbench.aggregate(judgments, judge.label)
                elif suite == "winrate":
                    requests = winrate.judge_requests(bench.judge_prompts, questions["winrate"], answers["winrate"], "teacher")
                    judgments = judged(cache, judge, suite, requests, winrate.parse_verdict, "judge winrate",
                                       winrate.FOLLOWUP)
                    rows += winrate.aggregate(judgments, judge.label)
                else:
                    rows += run_alpacaeval(e, judge_config, instructions, questions["alpacaeval"], answers["alpacaeval"],
                                           run_dir, cache)
                seconds[suite] = round(time.perf_counter() - start, 1)
        if "lmeval" in suites:
            from .lmeval import run_lmeval

            start = time.perf_counter()
            rows += run_lmeval(e.lmeval, {name: resolve_model(m.model, m.revision) for name, m in models.items()},
                               run_dir, cache.root)
            seconds["lmeval"] = round(time.perf_counter() - start, 1)
        # 4. Results: files in the run folder, rows in the cache's eval_results view.
        refs = {name: m.model for name, m in models.items()}
        report = markdown_report(run_id, refs, judge.label if judge else None, rows)
        summary = {"run_id": run_id, "models": refs, "suites": suites, "judge": judge.identity if judge else None,
                   "seconds": seconds, "results": rows}
        save_results(cache, run_dir, run_id, rows, summary, report)
    except BaseException:  # what was committed stays readable (the next run reuses it) unless indexing fails too
        with suppress(CacheError):
            build_index(cache)
        raise
    build_index(cache)  # eval is one job: it indexes what it committed, for `sql` and `report`
    return EvalRun(run_id, run_dir, rows, seconds)


def run_alpacaeval(e: EvalConfig, judge: JudgeConfig, instructions: list[dict], questions: list[Question],
                   answers: pa.Table, run_dir: Path, cache: CacheIndex) -> list[dict]:
    """Every model against the reference outputs: the teacher's answers, or the file's own outputs."""
    from .alpacaeval import run_alpacaeval as alpaca

    text = {(a["model"], a["question_id"]): a["text"] for a in answers.to_pylist()}
    outputs = {name: [{"instruction": item["instruction"], "output": text[(name, q.question_id)]}
                      for q, item in zip(questions, instructions)] for name in dict.fromkeys(answers["model"].to_pylist())}
    if e.alpacaeval.reference == "teacher":
        reference, reference_name = outputs.pop("teacher"), "teacher"
    else:
        missing = [i for i, item in enumerate(instructions) if not item.get("output")]
        if missing:
            raise InputError(f"{e.alpacaeval.instructions}:{missing[0] + 1}: eval.alpacaeval.reference=file needs an "
                             "output on every line")
        reference = [{"instruction": item["instruction"], "output": item["output"]} for item in instructions]
        reference_name = "reference_file"
    return alpaca(e.alpacaeval, judge, outputs, reference, reference_name, run_dir, cache)


def new_run_dir(base: Path) -> tuple[str, Path]:
    """<base>/<UTC time>, with a suffix when another run started in the same second."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        run_id = stamp if n == 1 else f"{stamp}-{n}"
        try:
            (base / run_id).mkdir()
            return run_id, base / run_id
        except FileExistsError:
            continue
    raise InputError(f"{base}: cannot create a run folder for {stamp}")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
