"""Prompt sources → one validated, de-duplicated list of conversations, each keyed by its content hash.

Everything is checked before the cache is touched: a bad line stops the run with its file, line
and field named, and the cache stays exactly as it was.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..cache.shards import canonical_json
from ..errors import InputError
from ..jsonl import read_jsonl
from ..manifest import PromptsConfig, PromptSource
from ..package_data import MTBENCH_DATA, PackageDataMissing, installed_path

ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    source: str
    split: str
    category: str
    messages: tuple  # of (role, content) pairs; ends with a user turn

    def as_messages(self) -> list[dict]:
        return [{"role": role, "content": content} for role, content in self.messages]


def make_prompt(messages: list[dict], source: str, split: str = "train", category: str = "") -> Prompt:
    pairs = tuple((m["role"], m["content"]) for m in messages)
    prompt_id = hashlib.sha256(canonical_json([list(p) for p in pairs]).encode()).hexdigest()[:16]
    return Prompt(prompt_id, source, split, category, pairs)


def check_messages(value, where: str) -> list[dict]:
    """Validate a chat: list of {role, content}, non-empty contents, last turn from the user."""
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message \
                or "content" not in message:
            raise InputError(f"{where}: messages[{i}] must be an object with exactly 'role' and 'content'")
        if message["role"] not in ROLES:
            raise InputError(f"{where}: messages[{i}].role {message['role']!r} is not one of {sorted(ROLES)}")
        if not isinstance(message["content"], str):
            raise InputError(f"{where}: messages[{i}].content must be a string, got {type(message['content']).__name__}")
        if not message["content"].strip():
            raise InputError(f"{where}: messages[{i}].content is empty")
    if value[-1]["role"] != "user":
        raise InputError(f"{where}: the last message must come from the user (it is what gets answered)")
    return value


def record_to_prompt(record, where: str, source: str) -> Prompt:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if ("prompt" in record) == ("messages" in record):
        raise InputError(f"{where}: give exactly one of the fields 'prompt' or 'messages'")
    for key in ("split", "category", "id"):
        if key in record and not isinstance(record[key], str):
            raise InputError(f"{where}: field '{key}' must be a string")
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise InputError(f"{where}: field 'prompt' must be a string, got {type(record['prompt']).__name__}")
        if not record["prompt"].strip():
            raise InputError(f"{where}: field 'prompt' is empty")
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        messages = check_messages(record["messages"], where)
    return make_prompt(messages, source, record.get("split", "train"), record.get("category", ""))


def read_prompts(path: Path, source: str) -> list[Prompt]:
    prompts = [record_to_prompt(record, where, source) for where, record in read_jsonl(path, "prompt file")]
    if not prompts:
        raise InputError(f"{path}: no prompts in the file")
    return prompts


def builtin_prompts(split: str) -> list[Prompt]:
    """The project's own prompt set; `heldout` is reserved for in-domain evaluation."""
    text = resources.files("dadpo_offline.data").joinpath("builtin_prompts.jsonl").read_text(encoding="utf-8")
    prompts = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        prompt = record_to_prompt(json.loads(line), f"builtin_prompts.jsonl:{line_no}", f"builtin:{split}")
        if split == "all" or prompt.split == split:
            prompts.append(prompt)
    return prompts


def hub_conversation(row: dict, where: str) -> list[dict]:
    """UltraChat (`messages`), ShareGPT (`conversations` of from/value) or plain `prompt` rows."""
    for column in ("messages", "conversations"):
        if isinstance(row.get(column), list) and not all(isinstance(m, dict) for m in row[column]):
            raise InputError(f"{where}: every entry of '{column}' must be an object")
    if "messages" in row and isinstance(row["messages"], list):
        turns = [{"role": m.get("role"), "content": m.get("content")} for m in row["messages"]]
    elif "conversations" in row and isinstance(row["conversations"], list):
        turns = [{"role": SHAREGPT_ROLES.get(str(m.get("from", "")).lower(), m.get("from")), "content": m.get("value")}
                 for m in row["conversations"]]
    elif isinstance(row.get("prompt"), str):
        turns = [{"role": "user", "content": row["prompt"]}]
    else:
        raise InputError(f"{where}: no 'messages', 'conversations' or 'prompt' field (columns: {sorted(row)})")
    while turns and turns[-1]["role"] != "user":  # the data set's own answer is not part of the prompt
        turns.pop()
    return check_messages(turns, where)


def hub_prompts(source: PromptSource) -> list[Prompt]:
    import datasets

    try:
        data = datasets.load_dataset(source.hub, source.config, split=source.split)
    except Exception as exc:  # datasets raises many types for offline / missing / private sets
        raise InputError(f"hub data set {source.hub} ({source.split}) could not be loaded: "
                         f"{str(exc).splitlines()[0]} — check the id, or set HF_HUB_OFFLINE=0 and log in") from exc
    limit = source.limit or len(data)
    return [make_prompt(hub_conversation(data[i], f"{source.hub}[{source.split}][{i}]"), f"hub:{source.hub}")
            for i in range(min(limit, len(data)))]


def load_source(source: PromptSource) -> list[Prompt]:
    if source.builtin is not None:
        prompts = builtin_prompts(source.builtin)
    elif source.jsonl is not None:
        prompts = read_prompts(Path(source.jsonl), f"jsonl:{Path(source.jsonl).name}")
    else:
        prompts = hub_prompts(source)
    prompts = prompts[: source.limit] if source.limit else prompts
    return [with_system_prompt(p, source.system_prompt) for p in prompts] if source.system_prompt else prompts


def with_system_prompt(prompt: Prompt, text: str) -> Prompt:
    """The prompt with `text` as its system message, unless it has its own (a new content, so a new id)."""
    if prompt.messages[0][0] == "system":
        return prompt
    return make_prompt([{"role": "system", "content": text}, *prompt.as_messages()], prompt.source, prompt.split,
                       prompt.category)


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def benchmark_questions() -> dict[str, set[str]]:
    """Normalised first-turn questions of the eval benchmarks found on this machine, by benchmark."""
    found = {"builtin:heldout": {normalise(p.messages[-1][1]) for p in builtin_prompts("heldout")}}
    try:
        data = installed_path(*MTBENCH_DATA) / "mt_bench" / "question.jsonl"
        found["mt-bench"] = {normalise(json.loads(line)["turns"][0]) for line in data.read_text().splitlines() if line}
    except (PackageDataMissing, FileNotFoundError):
        pass
    return found


def overlapping_benchmark(prompt: Prompt, questions: dict[str, set[str]]) -> str | None:
    text = normalise(" ".join(content for role, content in prompt.messages if role == "user"))
    for name, known in questions.items():
        if name == "builtin:heldout" and prompt.split == "heldout":
            continue
        if any(q == text or (len(q) >= 40 and q in text) for q in known):
            return name
    return None


def collect_prompts(config: PromptsConfig) -> tuple[list[Prompt], Counter]:
    """All sources, de-duplicated by content, benchmark overlap dropped; counts say what was dropped."""
    counts: Counter = Counter()
    questions = benchmark_questions() if config.drop_benchmark_overlap else {}
    seen, kept = set(), []
    for source in config.sources:
        for prompt in load_source(source):
            counts["read"] += 1
            if prompt.prompt_id in seen:
                counts["duplicates"] += 1
                continue
            seen.add(prompt.prompt_id)
            overlap = overlapping_benchmark(prompt, questions) if questions else None
            if overlap:
                counts[f"overlap:{overlap}"] += 1
                continue
            kept.append(prompt)
    if config.limit is not None:
        counts["over_limit"] += max(0, len(kept) - config.limit)
        kept = kept[: config.limit]
    if not kept:
        raise InputError("no prompts left after de-duplication and benchmark-overlap filtering")
    return kept, counts
