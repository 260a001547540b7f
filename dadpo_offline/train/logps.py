"""Per-token and per-sequence log-probs of response tokens, without a full-vocabulary log-softmax.

log p(token) = logit[token] − logsumexp(logits). Only positions that predict a response token
of some row get logits at all (`logits_to_keep` with the positions from the shortest prompt on),
and only the logsumexp is reduced over the vocabulary: no [batch, length, vocab] log-softmax
tensor is written out, and the prompt positions never reach the output layer.

The model is called through its own forward, so FSDP/DeepSpeed wrappers gather weights as usual.
"""
from __future__ import annotations

import torch


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: torch.Tensor,
                seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return (token log-probs [rows, T'], response mask [rows, T'], offset).

    Column j scores token position `offset + j`; the mask is 1 where that position is in the
    row's response (prompt_len <= position < seq_len). Padding is on the right.
    """
    width = input_ids.shape[1]
    first = int(prompt_lens.min())  # first position that is a response token in some row
    keep = torch.arange(first - 1, width - 1, device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False)
    logits = out.logits
    if logits.shape[1] != keep.numel():  # a model class without logits_to_keep support
        logits = logits[:, first - 1: width - 1]
    targets = input_ids[:, first:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    logps = picked - torch.logsumexp(logits.float(), dim=-1)
    positions = torch.arange(first, width, device=input_ids.device).unsqueeze(0)
    mask = (positions >= prompt_lens.to(positions.device).unsqueeze(1)) & (positions < seq_lens.to(positions.device).unsqueeze(1))
    return logps * mask, mask, first


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """Sums over response tokens; asserts that the counted tokens equal seq_len − prompt_len."""
    logps, mask, _ = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["prompt_lens"],
                                 batch["seq_lens"])
    counted = mask.sum(-1)
    expected = (batch["seq_lens"] - batch["prompt_lens"]).to(counted.device)
    if not torch.equal(counted, expected):
        raise AssertionError(f"response token counts {counted.tolist()} differ from the cache's {expected.tolist()}")
    return logps.sum(-1)
