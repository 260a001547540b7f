"""A model as a stage uses it (weights, chat format, engine numerics), and one loaded engine at a time.

precompute and eval both walk several roles in a row; `Engines` keeps the loaded engine while
consecutive work wants the same model, and frees it before loading the next.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from tqdm import tqdm

from ..manifest import Manifest
from .chat import ChatFormat, load_chat_format
from .engines import open_engine, resolve_dtype
from .models import ResolvedModel, resolve_model


@dataclass
class Role:
    """One model as a stage uses it: resolved weights, its own chat format, engine numerics."""
    name: str
    model: ResolvedModel
    fmt: ChatFormat
    dtype: str


class Engines:
    """Keeps one engine loaded at a time and reuses it while consecutive stages want the same model."""

    def __init__(self, manifest: Manifest, backend: str):
        self.manifest, self.backend, self.key, self.engine = manifest, backend, None, None

    def get(self, role: Role):
        key = (role.model.path, role.model.revision, role.dtype)
        if key != self.key:
            self.close()
            tqdm.write(f"loading {role.model.reference} ({self.backend}, {role.dtype}) for {role.name}", file=sys.stderr)
            self.engine = open_engine(role.model, self.backend, role.dtype, self.manifest.engine, role.fmt.end_of_turn_id)
            self.key = key
        return self.engine

    def close(self):
        if self.engine is not None:
            self.engine.close()
        self.engine, self.key = None, None


def model_role(name: str, config) -> Role:
    model = resolve_model(config.model, config.revision)
    return Role(name, model, load_chat_format(model, config.end_of_turn, config.chat_template), resolve_dtype(config.dtype))


def take_turns(prompt_ids: list[str], writers: list) -> dict:
    """pairs.chosen_from each: {prompt id: writer}, the writers in turn over the prompts in prompts-stage order."""
    return {p: writers[i % len(writers)] for i, p in enumerate(prompt_ids)}
