"""Win rate vs the teacher on in-domain held-out prompts: pairwise judging in both orders.

A win or a loss counts only when both orders agree; disagreement (position bias) is a tie and
is reported as the position-inconsistency rate. Where the judge returns log-probabilities, each
verdict is also graded (P(model better), see verdicts.py) and `preference` averages those. Confidence intervals: percentile bootstrap over
prompts (fixed seed, so a rerun prints the same interval).
"""
from __future__ import annotations

import random
from collections import defaultdict

import pyarrow as pa

from ..manifest import WinRateConfig
from ..core.prompts import load_source
from . import verdicts
from .answers import Question

TEMPLATE = "pair-v2"
ORDERS = ("model-first", "opponent-first")
BOOTSTRAP_SAMPLES = 2000
POINTS = {"model": 1.0, "tie": 0.5, "opponent": 0.0}


def to_questions(config: WinRateConfig) -> list[Question]:
    seen, questions = set(), []
    for source in config.prompts:
        for prompt in load_source(source):
            if prompt.prompt_id not in seen:
                seen.add(prompt.prompt_id)
                questions.append(Question(prompt.prompt_id, prompt.category, tuple(prompt.as_messages()),
                                          (), 0.0, config.max_tokens))
    return questions[: config.limit] if config.limit is not None else questions


def question_text(messages: list[dict]) -> str:
    """The user's question; earlier turns of a conversation are shown before it."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def judge_requests(judge_prompts: dict[str, dict], questions: list[Question], answers: pa.Table,
                   opponent: str) -> list[dict]:
    """Two requests per (model, prompt): the model as assistant A, then as assistant B."""
    template = judge_prompts[TEMPLATE]
    text = {(a["model"], a["question_id"]): a["text"] for a in answers.to_pylist()}
    requests = []
    for model in sorted({m for m, _ in text} - {opponent}):
        for q in questions:
            if (model, q.question_id) not in text or (opponent, q.question_id) not in text:
                continue
            ours, theirs = text[(model, q.question_id)], text[(opponent, q.question_id)]
            for order, (a, b) in zip(ORDERS, ((ours, theirs), (theirs, ours))):
                requests.append({"suite": "winrate", "template": TEMPLATE, "model": model, "opponent": opponent,
                                 "question_id": q.question_id, "category": q.category, "turn": 1, "order": order,
                                 "system": template["system_prompt"],
                                 "prompt": template["prompt_template"].format(question=question_text(list(q.messages)),
                                                                              answer_a=a, answer_b=b)})
    return requests


PAIR_TOKENS = ("A", "B", "C")  # the letters inside "[[A]]" / "[[B]]" / "[[C]]"


def parse_verdict(reply: str, request: dict, tokens: list[dict] | None = None) -> dict:
    """The verdict as model / opponent / tie with its graded preference, read from the log-probs when it can be.

    By log-probs (verdicts.read: P(A), P(B), P(C) at the decision position): preference =
    P(model's letter) + 0.5 P(C), verdict the likeliest letter. Else by text: "[[A]]" / "[[B]]" /
    "[[C]]" (checked in that order), preference 1 / 0 / 0.5. Else none: verdict and preference null.
    """
    probs = verdicts.read(tokens, PAIR_TOKENS)
    if probs:
        return graded(probs, request) | {"method": "logprobs"}
    who = positions(request)
    for letter in PAIR_TOKENS:
        if f"[[{letter}]]" in reply:
            return {"verdict": who[letter], "preference": POINTS[who[letter]], "method": "text"}
    return {"verdict": None, "preference": None, "method": "none"}


def positions(request: dict) -> dict[str, str]:
    """Letter -> model / opponent / tie for the request's order."""
    ours, theirs = ("A", "B") if request["order"] == "model-first" else ("B", "A")
    return {ours: "model", theirs: "opponent", "C": "tie"}


def graded(probs: dict[str, float], request: dict, reply: str = "") -> dict:
    """P(A), P(B), P(C) as a verdict: the likeliest letter's, and preference P(model's letter) + 0.5 P(C)."""
    who = positions(request)
    ours = next(letter for letter, side in who.items() if side == "model")
    likeliest = max(PAIR_TOKENS, key=lambda c: probs.get(c, 0.0))
    return {"verdict": who[likeliest], "preference": probs.get(ours, 0.0) + 0.5 * probs.get("C", 0.0),
            "probs": verdicts.as_json(probs)}


FOLLOWUP = verdicts.Followup("Which assistant answered better? Reply with one letter: A, B, or C for a tie.",
                             PAIR_TOKENS, graded)


def outcome(first: str | None, second: str | None) -> str:
    """Both orders agree on a winner: that winner; anything else: a tie."""
    return first if first == second and first in ("model", "opponent") else "tie"


def method_of(judgment: dict) -> str:
    """How a judgment's verdict was read; rows cached before `method` existed: text, or none."""
    return judgment.get("method") or ("none" if judgment["verdict"] is None else "text")


def preference_of(judgment: dict) -> float:
    """P(model better) of one judgment; an unread verdict is a tie (0.5), as in the both-orders rule."""
    if judgment.get("preference") is not None:
        return judgment["preference"]
    return POINTS.get(judgment["verdict"], 0.5)


def aggregate(judgments: pa.Table, judge: str) -> list[dict]:
    """W/T/L from the verdicts (both orders must agree); `preference` from the graded verdicts.

    preference per prompt = the mean of its two orders' P(model better) (an order without a
    verdict counts 0.5); the metric is its mean over prompts with the same bootstrap interval.
    """
    found = defaultdict(dict)
    methods = defaultdict(lambda: dict.fromkeys(verdicts.METHODS, 0))
    for j in judgments.to_pylist():
        found[(j["model"], j["opponent"], j["question_id"])][j["order"]] = j
        methods[(j["model"], j["opponent"])][method_of(j)] += 1
    per_model, graded = defaultdict(list), defaultdict(list)
    for (model, opponent, _), v in sorted(found.items()):
        per_model[(model, opponent)].append(tuple(v[o]["verdict"] if o in v else None for o in ORDERS))
        graded[(model, opponent)].append(sum(preference_of(v[o]) if o in v else 0.5 for o in ORDERS) / len(ORDERS))
    rows = []
    for (model, opponent), pairs in sorted(per_model.items()):
        preference = graded[(model, opponent)]
        results = [outcome(a, b) for a, b in pairs]
        n = len(results)
        wins, losses = results.count("model"), results.count("opponent")
        ties = n - wins - losses
        parsed = [(a, b) for a, b in pairs if a is not None and b is not None]
        inconsistent = sum(a != b for a, b in parsed)
        points = [POINTS[r] for r in results]
        net = [{"model": 1.0, "tie": 0.0, "opponent": -1.0}[r] for r in results]
        metrics = {"wins": (wins, None), "ties": (ties, None), "losses": (losses, None), "win_rate": (wins / n, None),
                   "score": (sum(points) / n, bootstrap_ci(points)), "net": (sum(net) / n, bootstrap_ci(net)),
                   "inconsistency_rate": (inconsistent / len(parsed) if parsed else None, None),
                   "unparsed_judgments": (sum((a is None) + (b is None) for a, b in pairs), None),
                   "preference": (sum(preference) / n, bootstrap_ci(preference))}
        metrics |= {f"verdicts_{m}": (count, None) for m, count in methods[(model, opponent)].items()}
        for metric, (value, ci) in metrics.items():
            rows.append({"model": model, "suite": "winrate", "metric": f"{metric}_vs_{opponent}",
                         "value": None if value is None else float(value), "stderr": None,
                         "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None, "n": n, "judge": judge})
    return rows


def bootstrap_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap of the mean over prompts."""
    rng = random.Random(0)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(BOOTSTRAP_SAMPLES))
    tail = (1 - level) / 2
    return means[int(tail * BOOTSTRAP_SAMPLES)], means[min(BOOTSTRAP_SAMPLES - 1, int((1 - tail) * BOOTSTRAP_SAMPLES))]
