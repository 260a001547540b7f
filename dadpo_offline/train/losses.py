"""Preference losses as pure functions of sequence log-prob tensors and betas, in a small registry.

Every input is a tensor of shape [pairs]: sums over response tokens (end-of-turn included) of
the policy's, the reference's and the teacher's log-probs of the chosen (teacher) and rejected
(student) responses. Nothing here knows about models, tokens or the cache, so each formula can
be checked against its closed form by hand.

    z    = β1·[(πθ_w − ref_w) − (πθ_l − ref_l)] + β2·[(πθ_w − te_w) − (πθ_l − te_l)]
    loss = −log σ(z)

dDPO is the β2 = 0 member (plain sigmoid DPO against the reference), rDPO the β1 = 0 member
(the teacher is the only anchor). Adding a variant means one function here and one test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class PreferenceOutput:
    """Per-pair tensors; the trainer averages them. `z` is also rewards/margins."""

    losses: torch.Tensor  # −log σ(z)
    z: torch.Tensor
    ref_margin: torch.Tensor  # (πθ_w − ref_w) − (πθ_l − ref_l), unweighted
    teacher_margin: torch.Tensor  # (πθ_w − te_w) − (πθ_l − te_l), unweighted
    rewards_chosen: torch.Tensor  # β1·(πθ_w − ref_w) + β2·(πθ_w − te_w)
    rewards_rejected: torch.Tensor  # β1·(πθ_l − ref_l) + β2·(πθ_l − te_l)
    beta1: float
    beta2: float


def dadpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
          ref_rejected: torch.Tensor, teacher_chosen: torch.Tensor, teacher_rejected: torch.Tensor,
          beta1: float, beta2: float) -> PreferenceOutput:
    """daDPO: two anchors inside one sigmoid (not two DPO losses summed outside it).

    Computed in float64: the cached numbers are sums of hundreds of token log-probs, and a
    difference of two such sums loses digits in float32.
    """
    pc, pr = policy_chosen.double(), policy_rejected.double()
    rc, rr = ref_chosen.double().to(pc.device), ref_rejected.double().to(pc.device)
    tc, tr = teacher_chosen.double().to(pc.device), teacher_rejected.double().to(pc.device)
    ref_margin = (pc - rc) - (pr - rr)
    teacher_margin = (pc - tc) - (pr - tr)
    z = beta1 * ref_margin + beta2 * teacher_margin
    return PreferenceOutput(
        losses=-F.logsigmoid(z), z=z, ref_margin=ref_margin, teacher_margin=teacher_margin,
        rewards_chosen=beta1 * (pc - rc) + beta2 * (pc - tc),
        rewards_rejected=beta1 * (pr - rr) + beta2 * (pr - tr), beta1=beta1, beta2=beta2)


def ddpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, teacher_chosen, teacher_rejected,
         beta1: float, beta2: float) -> PreferenceOutput:
    """dDPO: standard sigmoid DPO against the dSFT reference (β2 forced to 0)."""
    return dadpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, teacher_chosen, teacher_rejected,
                 beta1, 0.0)


def rdpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, teacher_chosen, teacher_rejected,
         beta1: float, beta2: float) -> PreferenceOutput:
    """rDPO: the teacher is the only anchor (β1 forced to 0)."""
    return dadpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, teacher_chosen, teacher_rejected,
                 0.0, beta2)


LOSSES: dict[str, Callable[..., PreferenceOutput]] = {"dadpo": dadpo, "ddpo": ddpo, "rdpo": rdpo}


def mixed_reference(ref_logp: torch.Tensor, teacher_logp: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """m = (β1·ref + β2·te)/(β1+β2): daDPO equals DPO with β = β1+β2 against this reference."""
    return (beta1 * ref_logp.double() + beta2 * teacher_logp.double()) / (beta1 + beta2)
