"""Verdicts read from the judge's token probabilities, as alpaca_eval's weighted annotators do.

The judge is asked for `top_logprobs` (TOP_LOGPROBS alternatives per generated token). The
decision position is the generated token right after the reply's LAST "[[" whose alternatives
include a candidate verdict token: a judge that reasons first and ends "[[A]]" is read where
it writes the verdict, and a "[[" that only quotes the format earlier in the reply is passed
over. The candidates' probabilities among the top alternatives are renormalised to sum to one
(a candidate outside the top counts as probability 0; alternatives that differ only by
surrounding spaces, " A" and "A", are added). No log-probs, no "[[", or no candidate among the
alternatives: None, and the caller parses the text instead.

A reply with no verdict at all (a small judge that never writes "[[") may get one follow-up
(Followup): the judge's reply is kept as the assistant turn, a short user turn asks for the
verdict token alone, and the candidates' probabilities at the first generated position decide.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

from ..core.results import VERDICT_METHODS

TOP_LOGPROBS = 20  # the most OpenAI accepts and vLLM's default --max-logprobs
MARKER = "[["
METHODS = VERDICT_METHODS  # how a verdict was read, stored per judgment (defined in core: the reports count them)
FOLLOWUP_MAX_TOKENS = 3  # the verdict token, and room to see "10" written as "1" "0"


def tokens_of(logprobs) -> list[dict] | None:
    """The chat completion's `choices[0].logprobs` as [{"token", "top": {token: logprob}}]; None without them."""
    content = getattr(logprobs, "content", None) if logprobs is not None else None
    if not content:
        return None
    tokens = []
    for t in content:
        top = {alt.token: alt.logprob for alt in (t.top_logprobs or [])}
        top.setdefault(t.token, t.logprob)  # the generated token itself, should it be outside the top
        tokens.append({"token": t.token, "top": top})
    return tokens


def distribution(top: dict[str, float], candidates: tuple[str, ...]) -> dict[str, float] | None:
    """The candidates' probabilities among `top` (token -> logprob), renormalised; None if none is there."""
    mass = {}
    for token, logprob in top.items():
        key = token.strip()
        if key in candidates and logprob is not None and logprob > -math.inf:
            mass[key] = mass.get(key, 0.0) + math.exp(logprob)
    total = sum(mass.values())
    if not total > 0:
        return None
    return {c: mass[c] / total for c in candidates if c in mass}


def read(tokens: list[dict] | None, candidates: tuple[str, ...]) -> dict[str, float] | None:
    """The renormalised candidate distribution at the decision position (see the module text), or None."""
    if not tokens:
        return None
    starts, text = [], ""
    for t in tokens:
        starts.append(len(text))
        text += t["token"]
    at = {start: i for i, start in enumerate(starts)}
    end = text.rfind(MARKER)
    while end >= 0:
        i = at.get(end + len(MARKER))
        found = distribution(tokens[i]["top"], candidates) if i is not None else None
        if found:
            return found
        end = text.rfind(MARKER, 0, end + len(MARKER) - 1)  # an earlier "[[" (overlaps too: "[[[")
    return None


def as_json(probs: dict[str, float]) -> str:
    """The distribution as stored in judgments.probs: readable in SQL with json_extract."""
    return json.dumps({k: round(v, 6) for k, v in probs.items()}, sort_keys=True)


@dataclass(frozen=True)
class Followup:
    """The question asked after a reply without a verdict, and how its answer's first token is graded."""
    question: str  # asks for the verdict token alone
    candidates: tuple[str, ...]
    grade: Callable[[dict[str, float], dict, str], dict]  # (probs, request, follow-up reply) -> judgment fields

    def turns(self, reply: str) -> list[dict]:
        """What follows the judged conversation: the judge's own reply as the assistant turn, then the question."""
        return [{"role": "assistant", "content": reply}, {"role": "user", "content": self.question}]

    def read(self, reply: str, request: dict, tokens: list[dict] | None) -> dict | None:
        """Judgment fields (method followup) from the first generated token's top alternatives; None without a candidate."""
        probs = distribution(tokens[0]["top"], self.candidates) if tokens else None
        return self.grade(probs, request, reply) | {"method": "followup"} if probs else None
