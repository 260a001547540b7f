"""Width pruning (LLM-Pruner's kind of student): the same share of every decoder layer's MLP channels
and query heads goes, so the result is a plain Hugging Face config that transformers and vLLM load.

The rule (`width_shape`):
- MLP: every layer keeps intermediate x (1 - ratio) channels, rounded to the nearest multiple of 8
  (matrix kernels like multiples of 8; at least 8 kept). SmolLM2-135M at 0.2: 1536 -> 1232.
- Attention: every KV-head group (the query heads that share one key/value head) loses
  head_ratio x its query heads, which must be a whole number: SmolLM2 has 3 query heads per
  group, so head_ratio is 0, 1/3 or 2/3; 0.2 would remove 0.6 of a head and is refused. The key and
  value heads stay, so num_attention_heads stays a multiple of num_key_value_heads (vLLM needs it).
  Multi-head attention (one query head per KV head, e.g. Vicuna-7B) removes whole heads with their
  key and value heads: head_ratio x heads must be whole (Vicuna's 32: 0.1875 removes 6).
- Hidden size and head size never change; the config states head_dim, since hidden / heads no
  longer gives it.

Importance: LLM-Pruner's element-wise first-order Taylor criterion. A channel's or head's score is
the sum of |w x dL/dw| over every weight it owns (gate and up rows plus the down column; query rows
plus output-projection columns, and key/value rows under multi-head attention), L the next-token
loss on the calibration prompts: the first-order estimate of how much the loss changes when those
weights become zero. It needs one backward pass per prompt, no labels, and ranks by what the
model does on chat prompts rather than by weight size alone. The weights are cut with
torch-pruning's Linear pruning functions (torch_pruning.prune_linear_out_channels / _in_channels).
"""
from __future__ import annotations

import sys

from tqdm import tqdm

from ..errors import InputError, ModelError

MLP_MULTIPLE = 8  # kept MLP channels are a multiple of this
WHOLE = 0.01  # head_ratio x heads per group within this of a whole number counts as whole (1/3 typed 0.333)


def width_shape(heads: int, kv_heads: int, intermediate: int, ratio: float, head_ratio: float, source: str) -> dict:
    """Heads and channels after width pruning, or InputError naming the numbers that break head groups."""
    if heads % kv_heads:
        raise ModelError(f"{source} has {heads} query heads for {kv_heads} key/value heads (not a multiple)")
    group = heads // kv_heads
    per_group, unit = (head_ratio * heads, f"{heads} heads (multi-head attention: each goes with its key/value head)") \
        if group == 1 else (head_ratio * group, f"{group} query heads in each of {kv_heads} KV-head groups")
    removed = round(per_group)
    if abs(per_group - removed) > WHOLE:
        step = 1 / (heads if group == 1 else group)
        raise InputError(f"head_ratio {head_ratio} would remove {per_group:.3g} of the {unit} of {source}; "
                         f"use a multiple of 1/{round(1 / step)} ({step:.4g}) below 1, or 0")
    if removed >= (heads if group == 1 else group):
        raise InputError(f"head_ratio {head_ratio} would remove every query head of {source}; choose a smaller one")
    kept = max(MLP_MULTIPLE, round(intermediate * (1 - ratio) / MLP_MULTIPLE) * MLP_MULTIPLE)
    after_heads = heads - removed if group == 1 else heads - removed * kv_heads
    return {"heads": after_heads, "kv_heads": kv_heads - removed if group == 1 else kv_heads,
            "intermediate": min(kept, intermediate)}


def config_shape(config, ratio: float, head_ratio: float, source: str) -> dict:
    """width_shape of a transformers config: checked before any weights load."""
    config = config.get_text_config()
    if getattr(config, "intermediate_size", None) is None or getattr(config, "num_attention_heads", None) is None:
        raise ModelError(f"width pruning needs a config with intermediate_size and num_attention_heads; {source} "
                         f"({config.model_type}) has none: use --method depth")
    heads = config.num_attention_heads
    return {"heads_before": heads, "kv_heads_before": getattr(config, "num_key_value_heads", None) or heads,
            "intermediate_before": config.intermediate_size,
            **width_shape(heads, getattr(config, "num_key_value_heads", None) or heads, config.intermediate_size,
                          ratio, head_ratio, source)}


def attention_mlp(layer, source: str):
    """The (attention, mlp) modules of a Llama-style decoder layer (Llama, Mistral, Qwen2), else ModelError."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    needed = [(attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj"))]
    if any(part is None or not all(hasattr(part, n) for n in names) for part, names in needed):
        raise ModelError(f"width pruning needs Llama-style layers (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj); "
                         f"{source} has {type(layer).__name__}: use --method depth")
    return attn, mlp


def taylor_gradients(model, prompt_ids: list[list[int]]) -> int:
    """Accumulate dL/dw over the calibration prompts (one per backward, no padding); returns the token count."""
    import torch

    model.zero_grad(set_to_none=True)
    tokens = 0
    for ids in tqdm(prompt_ids, desc="calibration", unit="prompt", file=sys.stderr, dynamic_ncols=True):
        batch = torch.tensor([ids], device=model.device)
        model(batch, labels=batch, use_cache=False).loss.backward()
        tokens += len(ids)
    return tokens


def owned(linear, dim: int):
    """Per output row (dim=1) or input column (dim=0): sum of |w x dL/dw|."""
    return (linear.weight.detach().float() * linear.weight.grad.float()).abs().sum(dim)


def prune_width(model, ratio: float, head_ratio: float, prompt_ids: list[list[int]], source: str) -> dict:
    """Remove the lowest-scoring MLP channels and query heads of every layer, in place; the report's numbers."""
    import torch
    import torch_pruning as tp

    from . import count_params, decoder_layers

    shape = config_shape(model.config, ratio, head_ratio, source)
    config = model.config.get_text_config()
    heads, kv_heads = shape["heads_before"], shape["kv_heads_before"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    parts = [attention_mlp(layer, source) for layer in decoder_layers(model)[2]]
    group, mha = heads // kv_heads, heads == kv_heads
    cut_heads = (heads - shape["heads"]) // (1 if mha else kv_heads)  # per group; all heads under MHA
    params_before = count_params(model)

    tokens = taylor_gradients(model, prompt_ids)
    removed = {}
    with torch.no_grad():
        for i, (attn, mlp) in enumerate(parts):
            channel_score = owned(mlp.gate_proj, 1) + owned(mlp.up_proj, 1) + owned(mlp.down_proj, 0)
            channels = sorted(torch.argsort(channel_score, stable=True)[:config.intermediate_size - shape["intermediate"]]
                              .tolist())
            head_score = (owned(attn.q_proj, 1) + owned(attn.o_proj, 0)).view(heads, head_dim).sum(1)
            if mha:
                head_score += (owned(attn.k_proj, 1) + owned(attn.v_proj, 1)).view(heads, head_dim).sum(1)
            size = heads if mha else group  # heads are ranked within their KV-head group
            gone = sorted(g * size + h for g in range(heads // size)
                          for h in torch.argsort(head_score[g * size:(g + 1) * size], stable=True)[:cut_heads].tolist())
            removed[str(i)] = {"heads": gone, "channels": channels}
            cut(attn, mlp, gone, channels, head_dim, mha, tp)
            attn.num_key_value_groups = shape["heads"] // shape["kv_heads"]
    model.zero_grad(set_to_none=True)
    config.num_attention_heads, config.num_key_value_heads = shape["heads"], shape["kv_heads"]
    config.intermediate_size, config.head_dim = shape["intermediate"], head_dim
    tqdm.write(f"{source}: every layer {heads} -> {shape['heads']} query heads, {kv_heads} -> {shape['kv_heads']} "
               f"key/value heads, {len(channel_score)} -> {shape['intermediate']} MLP channels", file=sys.stderr)
    return {"heads_before": heads, "heads_after": shape["heads"], "kv_heads_before": kv_heads,
            "kv_heads_after": shape["kv_heads"], "intermediate_before": len(channel_score),
            "intermediate_after": shape["intermediate"], "head_dim": head_dim, "params_before": params_before,
            "params_after": count_params(model), "importance": "first-order Taylor |w x dL/dw|, summed per head/channel",
            "removed": removed, "calibration_tokens": tokens}


def cut(attn, mlp, heads: list[int], channels: list[int], head_dim: int, mha: bool, tp) -> None:
    """Remove query heads (with their key/value heads under MHA) and MLP channels with torch-pruning."""
    rows = [h * head_dim + j for h in heads for j in range(head_dim)]
    if channels:
        tp.prune_linear_out_channels(mlp.gate_proj, channels)
        tp.prune_linear_out_channels(mlp.up_proj, channels)
        tp.prune_linear_in_channels(mlp.down_proj, channels)
    if rows:
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj) if mha else (attn.q_proj,):
            tp.prune_linear_out_channels(linear, rows)
        tp.prune_linear_in_channels(attn.o_proj, rows)
