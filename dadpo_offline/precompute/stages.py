"""What one shard of each stage contains: prompts, generations of one role, scores of one scorer.

Pure functions of their inputs (prompt list, chat formats, an engine), so a shard rebuilt after a
crash, or by another `--shard i/N` job, holds exactly the same rows.
"""
from __future__ import annotations

import json
from typing import Callable

import duckdb
import pyarrow as pa

from ..cache.query import arrow_table
from ..cache.schema import GENERATIONS, PAIRS, PAIRS_JOIN_SQL, PROMPTS, SCORES
from ..errors import InputError, ModelError
from ..manifest import PairsConfig, SamplingConfig
from ..core.chat import ChatFormat
from ..core.engines import Request, request_seed
from ..core.prompts import Prompt, make_prompt


def fit_prompt(prompt: Prompt, formats: list[ChatFormat], max_tokens: int, mode: str) -> tuple[Prompt | None, list]:
    """Return the prompt (or its shortened form) that fits under every model's template, or None,
    with its ids under each format."""
    messages = prompt.as_messages()
    while True:
        try:
            rendered = [f.prompt_ids(messages) for f in formats]
        except ModelError as exc:
            raise InputError(f"prompt {prompt.prompt_id} from {prompt.source}: {exc}") from None
        if max(len(ids) for ids in rendered) <= max_tokens:
            if len(messages) == len(prompt.messages):
                return prompt, rendered
            return make_prompt(messages, prompt.source, prompt.split, prompt.category), rendered
        system = [m for m in messages[:1] if m["role"] == "system"]
        rest = messages[len(system):]
        if mode != "truncate" or len(rest) <= 1:
            return None, rendered
        rest = rest[1:]
        while rest and rest[0]["role"] != "user":  # a conversation restarts on a user turn
            rest = rest[1:]
        messages = system + rest


def prompts_table(prompts: list[Prompt], rendered: list[list[list[int]]], shard_size: int) -> pa.Table:
    """One row per prompt; `rendered[i]` = (student ids, teacher ids) of prompt i."""
    return pa.Table.from_pylist([{
        "prompt_id": p.prompt_id, "source": p.source, "split": p.split, "category": p.category,
        "messages": json.dumps(p.as_messages(), ensure_ascii=False), "n_turns": len(p.messages),
        "student_prompt_tokens": len(student), "teacher_prompt_tokens": len(teacher), "shard": i // shard_size,
        "student_prompt_ids": student, "teacher_prompt_ids": teacher,
    } for i, (p, (student, teacher)) in enumerate(zip(prompts, rendered))], schema=PROMPTS)


def generate_shard(prompt_ids: dict[str, list[int]], role: str, fmt: ChatFormat, engine, sampling: SamplingConfig,
                   samples: int) -> pa.Table:
    """`samples` answers by `role` to each prompt of `prompt_ids` (prompt id → its ids under `fmt`)."""
    keys, requests = [], []
    for prompt_id, ids in prompt_ids.items():
        for sample in range(samples):
            seed = request_seed(sampling.seed, prompt_id, sample, role)
            keys.append((prompt_id, sample, seed))
            requests.append(Request(ids, sampling.temperature, sampling.top_p, sampling.max_tokens, seed))
    completions = engine.generate(requests)
    return pa.Table.from_pylist([{
        "prompt_id": pid, "sample": sample, "role": role, "seed": seed, "prompt_token_ids": req.prompt_ids,
        "response_token_ids": out.token_ids, "text": fmt.decode(out.token_ids),
        "finish_reason": "stop" if out.finished else "length", "truncated": not out.finished,
        "n_tokens": len(out.token_ids),
    } for (pid, sample, seed), req, out in zip(keys, requests, completions)], schema=GENERATIONS)


def score_shard(stored: dict[str, list[int]], generations: pa.Table, writer: Callable[[dict], ChatFormat],
                scorer: str, fmt: ChatFormat, engine) -> pa.Table:
    """Log-probs of every response under `scorer`, in the scorer's own token ids.

    Same tokenizer as the generator: reuse the sampled ids exactly. Another tokenizer: the prompt
    as rendered for the scorer's template (`stored`: prompt id → ids) and the response text
    through the scorer's tokenizer (sentence-level, so no shared vocabulary). `writer`: the format
    of the model that wrote a generation row.
    """
    rows, sequences, prompt_lens = [], [], []
    for row in generations.to_pylist():
        prompt_ids, response_ids = fmt.sequence(row, stored[row["prompt_id"]], writer(row).identity)
        rows.append(row)
        sequences.append(prompt_ids + response_ids)
        prompt_lens.append(len(prompt_ids))
    token_logprobs = engine.score(sequences, prompt_lens)
    return pa.Table.from_pylist([{
        "prompt_id": row["prompt_id"], "sample": row["sample"], "role": row["role"], "scorer": scorer,
        "input_ids": seq, "prompt_len": start, "token_logprobs": lps, "logprob": float(sum(lps)),
        "n_tokens": len(seq) - start,
    } for row, seq, start, lps in zip(rows, sequences, prompt_lens, token_logprobs)], schema=SCORES)


def pairs_shard(prompts: pa.Table, generations: pa.Table, scores: pa.Table, config: PairsConfig,
                teachers: list[str] = ("teacher",), chosen_scorer: str = "teacher") -> pa.Table:
    """One row per pair that `config.policy` makes of a prompt's samples, with everything training reads,
    joined once, here, per shard; `dropped` names why a pair is not trained on (`pairs.require_finished`,
    a side with no tokens). `teachers`: every teacher's scorer name, in the order of the teachers_* lists;
    `chosen_scorer`: the one whose numbers fill the teacher_* columns (the chosen answers' teacher).

    best_vs_worst ranks finished answers (as `require_finished` asks) before cut ones: the best teacher
    answer that may be trained on is paired, rather than a cut better-scoring one whose pair would be dropped;
    a prompt with no such answer on a side keeps one pair, in `dropped_pairs`, saying why.
    """
    con = duckdb.connect()
    try:
        for name, table in (("prompts", prompts), ("generations", generations), ("scores", scores)):
            con.register(name, table)
        params = {"require_finished": config.require_finished, "policy": config.policy, "teachers": list(teachers),
                  "chosen_scorer": chosen_scorer}
        return arrow_table(con.sql(PAIRS_JOIN_SQL, params=params)).cast(PAIRS)
    finally:
        con.close()
