"""Structured pruning: the paper's "20%-pruned" student, made from its teacher family.

Two methods, one recipe: load the source, rank its parts on calibration prompts, remove the least
useful, write a plain Hugging Face folder (weights, config, tokenizer, chat template, generation
config) plus `prune.json`, atomically.

- depth (default): score each decoder layer by how little it changes the hidden state and drop
  round(ratio x layers) whole layers.
- width (LLM-Pruner's kind, the paper's student): in every layer remove the same share of MLP
  channels (`ratio`) and of query heads per KV-head group (`head_ratio`), ranked by first-order
  Taylor importance; hidden size and head size stay, so the folder is a plain config. See width.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from ..errors import InputError, ModelError
from ..files import staged_folder
from ..core.models import resolve_model
from ..core.chat import load_chat_format
from ..core.engines import resolve_dtype, torch_device
from ..core.prompts import builtin_prompts

REPORT = "prune.json"


METHODS = ("depth", "width")


def prune_model(source: str, ratio: float, out: Path, calibration_prompts: int = 32, revision: str | None = None,
                chat_template: str | None = None, method: str = "depth", head_ratio: float = 0.0) -> dict:
    """Prune `source` into `out` by `method`: depth removes round(ratio * n_layers) decoder layers
    whose removal changes the hidden states least; width removes `ratio` of every layer's MLP
    channels and `head_ratio` of the query heads of every KV-head group (width.py).

    Writes an HF model folder plus prune.json at `out` and returns that report; an earlier
    identical prune at `out` (same source, weights revision, method and ratios) is returned as it is.
    """
    if method not in METHODS:
        raise InputError(f"prune method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0 < ratio < 1:
        raise InputError(f"prune ratio must be in (0, 1), got {ratio}")
    if not 0 <= head_ratio < 1 or method == "depth" and head_ratio:
        raise InputError(f"head_ratio must be in [0, 1) and is for method width only, got {head_ratio} with {method}")
    if calibration_prompts < 1:
        raise InputError(f"calibration_prompts must be at least 1, got {calibration_prompts}")
    out = Path(out)
    model_ref = resolve_model(source, revision)
    identity = {"source": source, "revision": model_ref.revision, "method": method, "ratio": ratio}
    if method == "width":
        identity["head_ratio"] = head_ratio
    done = finished_report(out, identity)
    if done is not None:
        tqdm.write(f"{out} already holds {describe(identity)}; nothing to do", file=sys.stderr)
        return done

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if method == "width":  # a head_ratio that breaks head groups is refused before the weights load
        from .width import config_shape

        try:
            config = AutoConfig.from_pretrained(model_ref.path, revision=model_ref.load_revision)
        except (OSError, ValueError) as exc:
            raise ModelError(f"transformers could not read the config of {source}: {str(exc).splitlines()[0]}") from exc
        config_shape(config, ratio, head_ratio, source)
    chat = load_chat_format(model_ref, chat_template=chat_template)  # saved with the pruned model
    device = torch_device()
    tqdm.write(f"loading {source} ({device}) to rank its parts", file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_ref.path, revision=model_ref.load_revision, dtype=getattr(torch, resolve_dtype("auto"))
        ).to(device).eval()
    except (OSError, ValueError) as exc:
        raise ModelError(f"transformers could not load {source}: {str(exc).splitlines()[0]}") from exc
    prompts = builtin_prompts("train")[:calibration_prompts]
    prompt_ids = [chat.prompt_ids(p.as_messages()) for p in prompts]
    if method == "width":
        from .width import prune_width

        report = {**identity, **prune_width(model, ratio, head_ratio, prompt_ids, source)}
    else:
        report = {**identity, **prune_depth(model, ratio, prompt_ids, source)}
    report["calibration_prompts"] = len(prompts)

    with staged_folder(out) as staging:
        model.save_pretrained(staging)
        chat.tokenizer.save_pretrained(staging)
        (staging / REPORT).write_text(json.dumps(report, indent=2), encoding="utf-8")
    tqdm.write(f"pruned {source} ({method}); wrote {out}", file=sys.stderr)
    return report


def prune_depth(model, ratio: float, prompt_ids: list[list[int]], source: str) -> dict:
    """Drop the round(ratio * n) decoder layers with the lowest 1 - cos(input, output); the report's numbers."""
    n = len(decoder_layers(model)[2])
    k = max(1, round(ratio * n))
    if k >= n:
        raise InputError(f"ratio {ratio} would remove all {n} decoder layers of {source}; choose a smaller --ratio")

    params_before = count_params(model)
    scores, tokens = layer_scores(model, prompt_ids)
    removed = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:k])
    for i in range(n):
        tqdm.write(f"layer {i:3d}  1-cos {scores[i]:.6f}{'  removed' if i in removed else ''}", file=sys.stderr)
    drop_layers(model, removed)
    tqdm.write(f"{source}: {n} -> {n - k} layers, removed {removed}", file=sys.stderr)
    return {"layers_before": n, "layers_after": n - k, "removed": removed,
            "params_before": params_before, "params_after": count_params(model),
            "scores": {str(i): s for i, s in enumerate(scores)}, "calibration_tokens": tokens}


def count_params(model) -> int:
    """Distinct parameters (tied input and output embeddings count once), as the saved folder holds them."""
    return sum(p.numel() for p in model.parameters())


def describe(identity: dict) -> str:
    ratios = f"ratio {identity['ratio']}" + (f", head_ratio {identity['head_ratio']}" if "head_ratio" in identity else "")
    return f"{identity['source']} pruned at {ratios} ({identity['method']})"


def finished_report(out: Path, identity: dict) -> dict | None:
    """The report of an earlier identical prune at `out`, None for a missing or empty folder, else refuse.

    A report written before prune had methods holds no `method`: it was a depth prune."""
    if not out.exists() or out.is_dir() and not any(out.iterdir()):
        return None
    try:
        report = json.loads((out / REPORT).read_text(encoding="utf-8"))
        if {key: report.get(key, "depth" if key == "method" else None) for key in identity} == identity:
            return report
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    raise InputError(f"{out} is not empty and is not {describe(identity)}; choose another --out or delete that folder")


def decoder_layers(model) -> tuple[object, str, object]:
    """(parent module, attribute name, layer list): the nn.ModuleList with num_hidden_layers entries.

    `model.model.layers` for Llama, Qwen and Mistral; found by length so GPT-2 style `transformer.h` works too.
    """
    from torch import nn

    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    found = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) > 1:
        found = [name for name in found if name.endswith("layers")]
    if n is None or len(found) != 1:
        raise ModelError(f"cannot find the decoder layer list of {type(model).__name__} "
                         f"(an nn.ModuleList of num_hidden_layers={n} modules); layer pruning does not support it")
    parent, _, attribute = found[0].rpartition(".")
    return model.get_submodule(parent), attribute, model.get_submodule(found[0])


def layer_scores(model, prompt_ids: list[list[int]]) -> tuple[list[float], int]:
    """Mean over calibration tokens of 1 - cos(layer input, layer output), per decoder layer.

    Hooks capture each layer's own input and output: `output_hidden_states` would give the final
    norm's output as the last layer's "output", so the last layer would be scored against a
    rescaled vector. One prompt per forward pass: no padding, so every token counts.
    """
    import torch

    layers = decoder_layers(model)[2]
    totals = torch.zeros(len(layers), dtype=torch.float64)

    def hook(index):
        def record(module, args, kwargs, output):
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)
            totals[index] += (1 - cos).sum().double().cpu()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    tokens = 0
    try:
        with torch.no_grad():
            for ids in tqdm(prompt_ids, desc="calibration", unit="prompt", file=sys.stderr, dynamic_ncols=True):
                model(torch.tensor([ids], device=model.device), use_cache=False)
                tokens += len(ids)
    finally:
        for handle in handles:
            handle.remove()
    return (totals / tokens).tolist(), tokens


def drop_layers(model, removed: list[int]) -> None:
    """Delete decoder layers in place; keep config and per-layer indices consistent with what is left.

    Per-layer config lists (`layer_types`, …) are sliced, and every `layer_idx` (the KV cache slot
    of an attention module) renumbered, so the in-memory model still generates with a cache.
    """
    from torch import nn

    parent, attribute, layers = decoder_layers(model)
    n, gone = len(layers), set(removed)
    keep = [i for i in range(n) if i not in gone]
    setattr(parent, attribute, nn.ModuleList(layers[i] for i in keep))
    for new_index, layer in enumerate(getattr(parent, attribute)):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config.get_text_config()
    for key in config.to_dict():
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(config, key, type(value)(value[i] for i in keep))
    config.num_hidden_layers = len(keep)
