"""AlpacaEval through the real `alpaca_eval` package, judged by our OpenAI-compatible endpoint.

The annotator is the package's own AlpacaEval 2.0 one (`weighted_alpaca_eval_gpt4_turbo`: its
prompt file, read by path, and its logprob parser over the single tokens "m"/"M"), with the judge
model and base URL swapped for ours. Its config and its annotation cache live in one folder
(`eval` uses <cache_dir>/alpacaeval/annotator/), so a rerun reuses every judgment. alpaca_eval takes the API key
from a client-config file: we write one (0600, private temp dir) and delete it after the run.
A judgment that cannot be parsed is cached as such (alpaca_eval does not retry it): delete
annotator/annotations_*.json to judge again. When the annotator folder lies in a cache, its files
are registered there after each run (stage `alpacaeval`), so `cache status`, `verify` and `gc` see
them; an annotation cache that no longer reads as JSON is removed (and judged again) before a run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

import yaml

from ..cache.artefacts import register_files
from ..cache.index import CacheIndex
from ..errors import InputError, JudgeError
from ..jsonl import read_jsonl
from ..manifest import AlpacaEvalConfig, JudgeConfig
from .judge import Judge, judge_label

HUB_REPO = "tatsu-lab/alpaca_eval"
HUB_FILE = "alpaca_eval_gpt4_baseline.json"  # AlpacaEval 2.0's 805 instructions + its default reference (gpt4_turbo)
PACKAGE_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"


def load_instructions(config: AlpacaEvalConfig) -> list[dict]:
    """[{"instruction", "output" (or None), "dataset"}] from config.instructions, else the official set from the hub."""
    if config.instructions:
        rows = _read_jsonl(Path(config.instructions), need_output=config.reference == "file")
    else:
        rows = _read_hub()
    return rows[:config.limit] if config.limit is not None else rows


def _read_jsonl(path: Path, need_output: bool) -> list[dict]:
    rows = []
    for where, record in read_jsonl(path, "instructions file (eval.alpacaeval.instructions)"):
        text = record.get("instruction") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise InputError(f'{where}: expected {{"instruction": "non-empty text"[, "output": "text"]}}')
        output = record.get("output")
        if not isinstance(output, (str, type(None))):
            raise InputError(f"{where}: output: expected text, got {type(output).__name__}")
        if need_output and output is None:
            raise InputError(f"{where}: no `output` to compare against (eval.alpacaeval.reference is 'file') "
                             "— add one or set eval.alpacaeval.reference=teacher")
        rows.append({"instruction": text, "output": output, "dataset": str(record.get("dataset", path.stem))})
    if not rows:
        raise InputError(f"{path}: no instructions")
    return rows


def _read_hub() -> list[dict]:
    """The JSON file itself: `datasets.load_dataset` on this repo needs its loading script, gone in datasets>=4."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(HUB_REPO, HUB_FILE, repo_type="dataset")
    except OSError as exc:  # offline, no cached copy, or the hub unreachable
        raise InputError(f"cannot fetch AlpacaEval's instructions from hf://{HUB_REPO}/{HUB_FILE} "
                         f"({type(exc).__name__}) — go online once, or set eval.alpacaeval.instructions to a JSONL "
                         f"file of {{\"instruction\": ...}} lines") from exc
    with open(path, encoding="utf-8") as f:
        return [{"instruction": r["instruction"], "output": r["output"], "dataset": r["dataset"]} for r in json.load(f)]


def run_alpacaeval(config: AlpacaEvalConfig, judge: JudgeConfig, outputs: dict[str, list[dict]], reference: list[dict],
                   reference_name: str, out_dir: Path, cache: CacheIndex | None = None) -> list[dict]:
    """Judge each model's outputs against `reference` (same instructions, same order); one result row per metric.

    The annotator config and alpaca_eval's judgment cache live in `cache` (`eval` passes its cache,
    so later runs reuse the judgments, registered as stage `alpacaeval`), else in
    <out_dir>/alpacaeval/annotator.
    """
    for name, answers in outputs.items():
        _check_aligned(name, answers, reference)
    Judge(judge, "alpacaeval").check()  # unreachable, unauthorised or wrong model: one clear error, in seconds
    evaluate, metrics = _import_alpaca_eval()
    base = Path(out_dir) / "alpacaeval"
    annotator_dir = _write_annotator((cache.root if cache else base.parent) / "alpacaeval" / "annotator", judge)
    _drop_unreadable_judgments(annotator_dir)
    try:
        return _run(config, judge, outputs, reference, reference_name, base, annotator_dir, evaluate, metrics)
    finally:  # also after a judge error: what alpaca_eval cached so far is kept, and registered
        if cache is not None:
            register_annotator(cache, annotator_dir)


def register_annotator(cache: CacheIndex, annotator_dir: Path) -> None:
    """The annotator folder's files as stage `alpacaeval`, fingerprinted by the folder and annotator."""
    settings = {"annotator": PACKAGE_ANNOTATOR, "folder": annotator_dir.resolve().relative_to(cache.root).as_posix()}
    files = sorted(p.resolve() for p in annotator_dir.iterdir() if p.is_file() and ".tmp" not in p.name)
    register_files(cache, "alpacaeval", settings, files)


def _drop_unreadable_judgments(annotator_dir: Path) -> None:
    """alpaca_eval fails on a cut or corrupted annotation cache: remove it (its judgments are made again)."""
    for path in annotator_dir.glob("annotations_*.json"):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            print(f"alpacaeval: {path} is not readable JSON (cut or corrupted); removing it, its judgments are made "
                  "again", file=sys.stderr)
            path.unlink()


def _run(config: AlpacaEvalConfig, judge: JudgeConfig, outputs: dict[str, list[dict]], reference: list[dict],
         reference_name: str, base: Path, annotator_dir: Path, evaluate, metrics) -> list[dict]:
    """Each model judged by alpaca_eval.evaluate; the leaderboard of all of them in base/leaderboard.csv."""
    label = judge_label(judge)
    # Length control needs AlpacaEval's own instruction order (it indexes per-instruction difficulties by
    # position) and a helper file from the hub; on our own instructions it would be meaningless.
    official = config.instructions is None
    if not official:
        print("alpacaeval: length-controlled win rate needs the official instruction set; reporting plain win rate",
              file=sys.stderr)

    def metric_fn(annotations):
        if official:
            try:
                return metrics.get_length_controlled_winrate(annotations, save_weights_dir=None)
            except Exception as exc:  # offline (its hub helper file), or too few judgments to fit its GLM
                print(f"alpacaeval: no length-controlled win rate ({type(exc).__name__}: {_first_line(exc)}); "
                      "reporting plain win rate", file=sys.stderr)
        return metrics.get_winrate(annotations)

    rows, boards = [], []
    with tempfile.TemporaryDirectory(prefix="dadpo-judge-") as private:
        clients = Path(private) / "openai_configs.yaml"  # mkdtemp is 0700; the file is 0600 too
        clients.touch(mode=0o600)
        clients.write_text(yaml.safe_dump({"default": [{"api_key": os.environ.get(judge.api_key_env) or "EMPTY"}]}))
        for name, answers in outputs.items():
            board, annotations = _evaluate_one(evaluate, name, answers, reference, reference_name, annotator_dir,
                                               base / name, clients, metric_fn, judge)
            boards.append(board.loc[[name]])
            rows += _rows(name, board.loc[name], annotations, label)
    if boards:
        import pandas as pd

        pd.concat(boards).to_csv(base / "leaderboard.csv")
    return rows


def _check_aligned(name: str, answers: list[dict], reference: list[dict]) -> None:
    if len(answers) != len(reference):
        raise InputError(f"alpacaeval: {name} has {len(answers)} outputs, the reference {len(reference)}")
    for i, (a, r) in enumerate(zip(answers, reference)):
        if a.get("instruction") != r.get("instruction"):
            raise InputError(f"alpacaeval: {name} output {i} answers {str(a.get('instruction'))[:60]!r}, "
                             f"the reference {str(r.get('instruction'))[:60]!r}: outputs must follow the instruction order")
        for who, row in ((name, a), ("the reference", r)):
            if not isinstance(row.get("output"), str):
                raise InputError(f"alpacaeval: {who} output {i}: expected text, got {type(row.get('output')).__name__}")


def _import_alpaca_eval():
    """alpaca_eval sets the root logger to INFO when imported; put the level back."""
    level = logging.getLogger().level
    from alpaca_eval import evaluate, metrics

    logging.getLogger().setLevel(level)
    return evaluate, metrics


def _write_annotator(directory: Path, judge: JudgeConfig) -> Path:
    """The package's annotator config with our judge; its name carries the judge, so another judge is not cached over."""
    from alpaca_eval import constants

    package = constants.EVALUATORS_CONFIG_DIR
    (spec,) = yaml.safe_load((package / PACKAGE_ANNOTATOR / "configs.yaml").read_text()).values()
    spec["prompt_template"] = str(package / spec["prompt_template"])
    spec["completions_kwargs"].update(
        model_name=judge.model,
        requires_chatml=True,  # the chat endpoint always: alpaca_eval's name-based guess sends "*instruct*" to /completions
        num_procs=judge.concurrency,
        client_kwargs={"base_url": judge.base_url, "timeout": judge.timeout_s, "max_retries": judge.max_retries})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "configs.yaml").write_text(
        f"# written by dadpo-offline: alpaca_eval's {PACKAGE_ANNOTATOR} judged by {judge.model}; no API key here\n"
        + yaml.safe_dump({f"{PACKAGE_ANNOTATOR}[{judge_label(judge)}]": spec}, sort_keys=False))
    return directory


def _evaluate_one(evaluate, name, answers, reference, reference_name, annotator_dir, output_path, clients, metric_fn,
                  judge: JudgeConfig):
    """alpaca_eval.evaluate for one model: leaderboard.csv + annotations.json in output_path; the judge's errors as ours."""
    import openai

    model_outputs = [{"instruction": a["instruction"], "output": a["output"], "generator": name} for a in answers]
    reference_outputs = [{"instruction": r["instruction"], "output": r["output"], "generator": reference_name}
                         for r in reference]
    try:
        return evaluate(model_outputs=model_outputs, reference_outputs=reference_outputs,
                        annotators_config=str(annotator_dir), name=name, output_path=output_path,
                        precomputed_leaderboard=None, is_cache_leaderboard=False, is_return_instead_of_print=True,
                        fn_metric=metric_fn, sort_by="win_rate",
                        annotation_kwargs={"is_ordered": True, "client_config_path": str(clients)})
    except openai.OpenAIError as exc:
        raise JudgeError(f"judge {judge.model} at {judge.base_url} failed during AlpacaEval ({_first_line(exc)}); "
                         f"judgments so far are cached in {annotator_dir} — rerun to continue") from exc


def _rows(name: str, board, annotations: list[dict], label: str) -> list[dict]:
    """Result rows; judgments the parser could not read (no "m"/"M" among the top logprobs) are counted, not hidden."""
    failed = sum(1 for a in annotations if a.get("preference") is None or _isnan(a["preference"]))
    if failed:
        print(f"alpacaeval: {name}: {failed} of {len(annotations)} judgments could not be parsed", file=sys.stderr)
    judged = int(board["n_total"])

    def row(metric, value, stderr=None, n=judged):
        return {"model": name, "suite": "alpacaeval", "metric": metric, "value": float(value),
                "stderr": None if stderr is None or _isnan(stderr) else float(stderr), "n": n, "judge": label}

    rows = [row("win_rate", board["win_rate"], board["standard_error"])]
    if "length_controlled_winrate" in board and not _isnan(board["length_controlled_winrate"]):
        rows.append(row("length_controlled_winrate", board["length_controlled_winrate"], board.get("lc_standard_error")))
    return rows + [row("n_wins", board["n_wins"]), row("n_draws", board["n_draws"]),
                   row("avg_length", board["avg_length"], n=len(annotations)),
                   row("unparsed_judgments", failed, n=len(annotations))]


def _isnan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]
