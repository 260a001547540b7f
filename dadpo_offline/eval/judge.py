"""A judge is any OpenAI-compatible chat endpoint: OpenAI itself or a local `vllm serve`.

The `openai` client brings retries with exponential backoff (connection errors, 408, 429, 5xx).
The API key is read from the environment variable the manifest names and is never stored,
printed or put into a fingerprint: a judge's identity is its URL, model and decoding settings.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
from tqdm import tqdm

from ..cache.schema import JUDGMENTS
from ..cache.shards import fingerprint
from ..errors import JudgeError
from ..manifest import JudgeConfig
from .store import cached_shards
from .verdicts import FOLLOWUP_MAX_TOKENS, TOP_LOGPROBS, Followup, tokens_of

PARSER_VERSION = "3"  # bump when a verdict parser changes: judgments cached under the old one are redone


class Judge:
    def __init__(self, config: JudgeConfig, suite: str):
        if not config.base_url or not config.model:
            raise JudgeError(f"suite {suite} needs a judge: set eval.judge.base_url and eval.judge.model "
                             "(e.g. --set eval.judge.base_url=http://127.0.0.1:8000/v1 --set eval.judge.model=NAME)")
        import openai

        self.config = config
        key = os.environ.get(config.api_key_env) or "EMPTY"  # local servers accept any key
        self.client = openai.OpenAI(base_url=config.base_url, api_key=key, max_retries=config.max_retries,
                                    timeout=config.timeout_s)

    @property
    def identity(self) -> dict:
        """What judgments are cached under; a locally served judge is its model, not its (random) port."""
        c = self.config
        where = {"serve": c.serve} if c.serve else {"base_url": c.base_url, "model": c.model}
        return where | {"temperature": c.temperature, "max_tokens": c.max_tokens,
                        "logprobs": TOP_LOGPROBS if c.logprobs else 0,
                        "followup_max_tokens": FOLLOWUP_MAX_TOKENS if self.follows_up else 0}

    @property
    def follows_up(self) -> bool:
        """A reply without a verdict gets a follow-up question; read by log-probs, so only with them."""
        return self.config.followup and self.config.logprobs

    @property
    def label(self) -> str:
        return judge_label(self.config)

    def check(self) -> None:
        """One cheap request before any work: unreachable, unauthorised or wrong model fail here, in seconds."""
        import openai

        try:
            listing = self.client.with_options(max_retries=1, timeout=10).models.with_raw_response.list().http_response
        except openai.APIConnectionError as exc:
            raise JudgeError(f"judge at {self.config.base_url} is unreachable ({_reason(exc)}) — start it or fix "
                             "eval.judge.base_url") from exc
        except openai.AuthenticationError as exc:
            raise JudgeError(f"judge at {self.config.base_url} refused the API key from ${self.config.api_key_env} "
                             "(HTTP 401)") from exc
        except openai.APIError as exc:
            raise JudgeError(f"judge at {self.config.base_url} does not answer GET /models: {_reason(exc)}") from exc
        try:  # read here, not by the client: a proxy's HTML page or broken JSON is a judge problem, not a crash
            served = [model["id"] for model in listing.json()["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise JudgeError(f"judge at {self.config.base_url} answered GET /models with something other than an "
                             f"OpenAI model list: {listing.text[:120]!r} — is eval.judge.base_url the API root "
                             "(ending in /v1)?") from exc
        if served and self.config.model not in served and "api.openai.com" not in self.config.base_url:
            raise JudgeError(f"judge at {self.config.base_url} serves {', '.join(served)}, not {self.config.model} — "
                             "fix eval.judge.model")

    def complete(self, system: str | None, user: str) -> tuple[str, str | None, list[dict] | None]:
        """One judgment of a single question (see chat)."""
        return self.chat(opening(system, user))

    def chat(self, messages: list[dict], max_tokens: int | None = None) -> tuple[str, str | None, list[dict] | None]:
        """One judgment: (reply text, None, tokens), or ("", why, None) when the judge rejects this one request.

        `tokens` are the reply's tokens with their top log-probabilities (verdicts.tokens_of) when
        judge.logprobs asks for them and the endpoint returns them, else None.

        A request the judge refuses (HTTP 400/413/422: e.g. an answer too long for its context)
        is recorded and counted as unparsed; anything that breaks every request stops the run.
        """
        import openai

        ask = {"logprobs": True, "top_logprobs": TOP_LOGPROBS} if self.config.logprobs else {}
        try:
            reply = self.client.chat.completions.create(model=self.config.model, messages=messages,
                                                        temperature=self.config.temperature,
                                                        max_tokens=max_tokens or self.config.max_tokens, **ask)
        except openai.APIConnectionError as exc:
            raise JudgeError(f"judge at {self.config.base_url} became unreachable after "
                             f"{self.config.max_retries} retries ({_reason(exc)})") from exc
        except openai.APIStatusError as exc:
            if exc.status_code in (400, 413, 422):
                return "", f"HTTP {exc.status_code}: {_reason(exc)}", None
            raise JudgeError(f"judge at {self.config.base_url} answered HTTP {exc.status_code}: {_reason(exc)}") from exc
        except (openai.APIResponseValidationError, ValueError) as exc:  # not JSON / not a chat completion
            raise JudgeError(f"judge at {self.config.base_url} sent a malformed reply: {_reason(exc)}") from exc
        choices = getattr(reply, "choices", None)
        if not isinstance(choices, list) or not choices or not isinstance(choices[0].message.content, str):
            raise JudgeError(f"judge at {self.config.base_url} sent a malformed reply: no choices[0].message.content "
                             f"in {str(reply)[:200]!r}")
        return choices[0].message.content, None, tokens_of(getattr(choices[0], "logprobs", None))

    def chat_many(self, conversations: list[list[dict]], desc: str,
                  max_tokens: int | None = None) -> list[tuple[str, str | None, list | None]]:
        """Judge conversations in parallel (judge.concurrency in flight), in order, with a progress bar."""
        with ThreadPoolExecutor(max_workers=max(1, self.config.concurrency)) as pool:
            replies = pool.map(lambda messages: self.chat(messages, max_tokens), conversations)
            return list(tqdm(replies, total=len(conversations), desc=desc, unit="call", file=sys.stderr, dynamic_ncols=True))


def opening(system: str | None, user: str) -> list[dict]:
    """The judged conversation: the judge prompt's system message, if any, and its user turn."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def judge_label(config: JudgeConfig) -> str:
    """model@endpoint, in every result row: scores of different judges are not comparable."""
    return f"{config.serve}@local-vllm" if config.serve else f"{config.model}@{config.base_url}"


def _reason(exc: Exception) -> str:
    text = str(getattr(exc, "__cause__", None) or exc) or type(exc).__name__
    return text.splitlines()[0][:300]


JUDGE_SHARD = 32  # judge calls per cached shard: a crash re-pays at most this many


def judged(cache, judge: Judge, suite: str, requests: list[dict], parse, desc: str,
           followup: Followup | None = None) -> pa.Table:
    """JUDGMENTS rows for `requests` (rows without judge/reply/score/verdict), each judged once.

    `parse(reply, request, tokens)` reads the verdict: from the tokens' log-probabilities when
    there are any at the decision position, else from the text (its `method` says which). A reply
    with neither gets `followup`'s question where the judge follows up (method followup when
    its answer's first token has a candidate among its top log-probs; the answer is kept).

    Cached per model under the judge's identity, the exact request texts and the parser, so a
    rerun, or a later eval that adds a model, makes no new calls for what was judged before.
    """
    tables = []
    for model in dict.fromkeys(r["model"] for r in requests):
        mine = [r for r in requests if r["model"] == model]
        settings = {"suite": suite, "model": model, "judge": judge.identity, "requests": fingerprint({"requests": mine}),
                    "parser": f"{parse.__module__}.{parse.__name__}/{PARSER_VERSION}",
                    "followup": followup.question if followup and judge.follows_up else None}
        chunks = [mine[i:i + JUDGE_SHARD] for i in range(0, len(mine), JUDGE_SHARD)]

        def build(k: int, chunks=chunks, model=model) -> pa.Table:
            where = f"{desc}/{model} (shard {k + 1}/{len(chunks)})"
            replies = judge.chat_many([opening(r["system"], r["prompt"]) for r in chunks[k]], where)
            rows = [{**r, "judge": judge.label, "reply": reply, "error": error, "score": None, "verdict": None,
                     **parse(reply, r, tokens)} for r, (reply, error, tokens) in zip(chunks[k], replies)]
            unread = [row for row in rows if row["method"] == "none" and row["error"] is None]
            if followup and judge.follows_up and unread:
                ask_again(judge, followup, unread, where)
            return pa.Table.from_pylist(rows, schema=JUDGMENTS)

        tables.append(cached_shards(cache, "judgments", fingerprint(settings), settings, len(chunks), build, desc=None))
    return pa.concat_tables(tables) if tables else JUDGMENTS.empty_table()


def ask_again(judge: Judge, followup: Followup, rows: list[dict], desc: str) -> None:
    """One follow-up per row without a verdict: its answer and, where its first token decides, the verdict."""
    answers = judge.chat_many([opening(r["system"], r["prompt"]) + followup.turns(r["reply"]) for r in rows],
                              f"{desc} follow-ups", max_tokens=FOLLOWUP_MAX_TOKENS)
    for row, (text, error, tokens) in zip(rows, answers):
        row["followup"] = text if error is None else None
        row.update(followup.read(text, row, tokens) or {})
