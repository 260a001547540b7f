"""Structured layer pruning: the paper's "20%-pruned" student, made from its teacher family.

Recipe: score each decoder layer by how little it changes the hidden state on calibration
prompts, drop the k least useful ones, write a plain Hugging Face folder (weights, config,
tokenizer, chat template, generation config) plus `prune.json`, atomically.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from .errors import InputError, ModelError
from .files import staged_folder
from .core.models import resolve_model
from .core.chat import load_chat_format
from .core.engines import resolve_dtype, torch_device
from .core.prompts import builtin_prompts

REPORT = "prune.json"


def prune_model(source: str, ratio: float, out: Path, calibration_prompts: int = 32, revision: str | None = None,
                chat_template: str | None = None) -> dict:
    """Remove round(ratio * n_layers) decoder layers whose removal changes the hidden states least.

    Writes an HF model folder plus prune.json at `out` and returns that report; an earlier
    identical prune at `out` (same source, weights revision and ratio) is returned as it is.
    """
    if not 0 < ratio < 1:
        raise InputError(f"prune ratio must be in (0, 1), got {ratio}")
    if calibration_prompts < 1:
        raise InputError(f"calibration_prompts must be at least 1, got {calibration_prompts}")
    out = Path(out)
    model_ref = resolve_model(source, revision)
    done = finished_report(out, source, ratio, model_ref.revision)
    if done is not None:
        tqdm.write(f"{out} already holds {source} pruned at ratio {ratio}; nothing to do", file=sys.stderr)
        return done

    import torch
    from transformers import AutoModelForCausalLM

    chat = load_chat_format(model_ref, chat_template=chat_template)  # saved with the pruned model
    device = torch_device()
    tqdm.write(f"loading {source} ({device}) to rank its decoder layers", file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_ref.path, revision=model_ref.load_revision, dtype=getattr(torch, resolve_dtype("auto"))
        ).to(device).eval()
    except (OSError, ValueError) as exc:
        raise ModelError(f"transformers could not load {source}: {str(exc).splitlines()[0]}") from exc
    n = len(decoder_layers(model)[2])
    k = max(1, round(ratio * n))
    if k >= n:
        raise InputError(f"ratio {ratio} would remove all {n} decoder layers of {source}; choose a smaller --ratio")

    prompts = builtin_prompts("train")[:calibration_prompts]
    scores, tokens = layer_scores(model, [chat.prompt_ids(p.as_messages()) for p in prompts])
    removed = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:k])
    for i in range(n):
        tqdm.write(f"layer {i:3d}  1-cos {scores[i]:.6f}{'  removed' if i in removed else ''}", file=sys.stderr)
    drop_layers(model, removed)
    report = {"source": source, "revision": model_ref.revision, "ratio": ratio, "layers_before": n,
              "layers_after": n - k, "removed": removed, "scores": {str(i): s for i, s in enumerate(scores)},
              "calibration_prompts": len(prompts), "calibration_tokens": tokens}

    with staged_folder(out) as staging:
        model.save_pretrained(staging)
        chat.tokenizer.save_pretrained(staging)
        (staging / REPORT).write_text(json.dumps(report, indent=2), encoding="utf-8")
    tqdm.write(f"pruned {source}: {n} -> {n - k} layers, removed {removed}; wrote {out}", file=sys.stderr)
    return report


def finished_report(out: Path, source: str, ratio: float, revision: str) -> dict | None:
    """The report of an earlier identical prune at `out`, None for a missing or empty folder, else refuse."""
    if not out.exists() or out.is_dir() and not any(out.iterdir()):
        return None
    try:
        report = json.loads((out / REPORT).read_text(encoding="utf-8"))
        if (report["source"], report["ratio"], report["revision"]) == (source, ratio, revision):
            return report
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise InputError(f"{out} is not empty and is not {source} pruned at ratio {ratio}; "
                     "choose another --out or delete that folder")


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
