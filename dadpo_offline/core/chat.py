"""Token ids of prompts and responses under one model's own tokenizer and chat template.

Each model sees text through its own tokenizer: the teacher scores the student's words with
the teacher's vocabulary, so sequence log-probs need no shared vocabulary. When the generator
and the scorer share a tokenizer, the generator's exact ids are reused, never re-tokenised.

Prompts are rendered once, by the prompts stage, and their ids stored; later stages read those
ids. Templates that stamp the date (Llama 3.x: `strftime_now`) see a fixed clock, TEMPLATE_DATE,
so every job, rerun and day renders a prompt to the same ids.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2

from ..errors import ModelError
from .models import ResolvedModel


TEMPLATE_DATE = datetime(2026, 1, 1)


def template_clock(fmt: str) -> str:
    """`strftime_now` as chat templates see it: always TEMPLATE_DATE, never the wall clock."""
    return TEMPLATE_DATE.strftime(fmt)


@dataclass
class ChatFormat:
    tokenizer: object
    end_of_turn_id: int
    identity: str  # hash of vocabulary, chat template and end-of-turn id
    model: str = "the model"  # its reference, for messages

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Template with the assistant header appended: what the model continues from."""
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     strftime_now=template_clock)  # shadows the template's wall clock
        except (jinja2.TemplateError, OverflowError) as exc:  # raise_exception(...) in a template, sandbox limits
            raise ModelError(f"the chat template of {self.model} refuses this conversation: {exc}") from None
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def response_ids(self, text: str, finished: bool) -> list[int]:
        """Response text in this tokenizer, closed by the end-of-turn token unless it was cut short."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids + [self.end_of_turn_id] if finished else ids

    def sequence(self, generation: dict, prompt_ids: list[int], generator_identity: str) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of a cached generation as this model reads it.

        Same tokenizer and template as the generator: the sampled ids, unchanged. Otherwise the
        prompt as the prompts stage rendered it for this model (`prompt_ids`), and the response
        text through this model's tokenizer.
        """
        if generator_identity == self.identity:
            return list(generation["prompt_token_ids"]), list(generation["response_token_ids"])
        return list(prompt_ids), self.response_ids(generation["text"], finished=not generation["truncated"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_chat_format(model: ResolvedModel, end_of_turn: str | None = None, chat_template: str | None = None) -> ChatFormat:
    """The model's tokenizer and chat template; `chat_template` (a Jinja file) supplies or replaces the template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model.path, revision=model.load_revision)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {model.reference}: {str(exc).splitlines()[0]}") from exc
    if chat_template is not None:
        try:
            tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelError(f"chat_template {chat_template} of {model.reference}: {exc.strerror}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{model.reference} has no chat template; give a chat (instruct) model, or a Jinja file "
                         "as chat_template in the manifest")
    token = end_of_turn or tokenizer.eos_token
    eot = tokenizer.convert_tokens_to_ids(token) if token else None
    if eot is None or eot == tokenizer.unk_token_id:
        raise ModelError(f"{model.reference}: end-of-turn token {token!r} is not in the vocabulary; "
                         "set end_of_turn in the manifest")
    digest = hashlib.sha256()
    if hasattr(tokenizer, "backend_tokenizer"):
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
    else:
        digest.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(tokenizer.chat_template.encode() if isinstance(tokenizer.chat_template, str)
                  else repr(tokenizer.chat_template).encode())
    digest.update(str(eot).encode())
    return ChatFormat(tokenizer, int(eot), digest.hexdigest()[:16], model.reference)
