"""Preference losses: the one owner of every fact about a loss — its name, the betas it uses, its own
parameters and their checks, and its formula.

Every input is a tensor of shape [pairs]: sums over response tokens (end-of-turn included) of
the policy's, the reference's and the teacher's log-probs of the chosen (teacher) and rejected
(student) responses. Nothing here knows about models, tokens or the cache, so each formula can
be checked against its closed form by hand.

    z    = β1·[(πθ_w − ref_w) − (πθ_l − ref_l)] + β2·[(πθ_w − te_w) − (πθ_l − te_l)]
    loss = −log σ(z)

dDPO is the β2 = 0 member (plain sigmoid DPO against the reference), rDPO the β1 = 0 member
(the teacher is the only anchor). The manifest, the CLI's `--loss`, `run --dry-run`, training,
eval and the report all read `LOSSES`, so adding a variant is one registered function here and
one test, e.g. conservative daDPO with its own label-smoothing parameter:

    @register("cdadpo", uses=("beta1", "beta2"), summary="daDPO with label smoothing ε", params={"epsilon": 0.1},
              check=lambda epsilon: [] if 0 <= epsilon < 0.5 else [f"epsilon must be in [0, 0.5), got {epsilon}"])
    def smoothed(z, epsilon):
        return (1 - epsilon) * sigmoid(z) + epsilon * sigmoid(-z)

(tests/test_losses.py registers exactly this and follows it through the manifest, the CLI, the plan and a loss.)

Its parameters are set per loss in the manifest: `train.loss_params: {cdadpo: {epsilon: 0.2}}`.
torch is imported inside the formulas, so loading a manifest (which checks losses here) stays instant.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

BETAS = ("beta1", "beta2")  # β1 weighs the reference anchor, β2 the teacher anchor


@dataclass
class PreferenceOutput:
    """Per-pair tensors; the trainer averages them. `z` is also rewards/margins."""

    losses: torch.Tensor  # the loss's formula of z
    z: torch.Tensor
    ref_margin: torch.Tensor  # (πθ_w − ref_w) − (πθ_l − ref_l), unweighted
    teacher_margin: torch.Tensor  # (πθ_w − te_w) − (πθ_l − te_l), unweighted
    rewards_chosen: torch.Tensor  # β1·(πθ_w − ref_w) + β2·(πθ_w − te_w)
    rewards_rejected: torch.Tensor  # β1·(πθ_l − ref_l) + β2·(πθ_l − te_l)
    beta1: float
    beta2: float


@dataclass(frozen=True)
class Loss:
    name: str
    formula: Callable[..., torch.Tensor]  # per-pair loss from z and this loss's own parameters
    uses: tuple[str, ...]  # the betas it weighs its anchors with; the others are forced to 0
    summary: str
    params: dict[str, float] = field(default_factory=dict)  # its own parameters and their defaults
    check: Callable[..., list[str]] | None = None  # problems with a full set of its parameters

    def betas(self, beta1: float, beta2: float) -> tuple[float, float]:
        """The betas this loss really uses, for training, logs, plans and reports."""
        return (beta1 if "beta1" in self.uses else 0.0, beta2 if "beta2" in self.uses else 0.0)

    def problems(self, beta1: float, beta2: float, params: dict) -> list[str]:
        """Every bad setting for this loss, each naming its manifest key."""
        found = [f"train.loss={self.name} needs a positive {' or '.join(self.uses)}"] \
            if sum(self.betas(beta1, beta2)) <= 0 else []
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            known = ", ".join(self.params) or "none"
            found.append(f"train.loss_params.{self.name}: unknown {', '.join(unknown)} (its parameters: {known})")
        elif self.check is not None:
            found += [f"train.loss_params.{self.name}: {p}" for p in self.check(**{**self.params, **params})]
        return found

    def __call__(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected, teacher_chosen, teacher_rejected,
                 beta1: float, beta2: float, **params) -> PreferenceOutput:
        """Both anchors inside one z (not two losses summed outside it), in float64: the cached numbers are
        sums of hundreds of token log-probs, and a difference of two such sums loses digits in float32."""
        beta1, beta2 = self.betas(beta1, beta2)
        pc, pr = policy_chosen.double(), policy_rejected.double()
        rc, rr = ref_chosen.double().to(pc.device), ref_rejected.double().to(pc.device)
        tc, tr = teacher_chosen.double().to(pc.device), teacher_rejected.double().to(pc.device)
        ref_margin = (pc - rc) - (pr - rr)
        teacher_margin = (pc - tc) - (pr - tr)
        z = beta1 * ref_margin + beta2 * teacher_margin
        return PreferenceOutput(
            losses=self.formula(z, **{**self.params, **params}), z=z, ref_margin=ref_margin,
            teacher_margin=teacher_margin, rewards_chosen=beta1 * (pc - rc) + beta2 * (pc - tc),
            rewards_rejected=beta1 * (pr - rr) + beta2 * (pr - tr), beta1=beta1, beta2=beta2)


LOSSES: dict[str, Loss] = {}


def register(name: str, uses: tuple[str, ...], summary: str, params: dict[str, float] | None = None,
             check: Callable[..., list[str]] | None = None) -> Callable[[Callable], Loss]:
    """Add a loss to the registry under `name`; the decorated formula maps z (and params) to per-pair losses."""
    if not set(uses) <= set(BETAS) or not uses:
        raise ValueError(f"loss {name}: uses must name beta1 and/or beta2, got {uses}")

    def add(formula: Callable) -> Loss:
        LOSSES[name] = Loss(name, formula, tuple(uses), summary, dict(params or {}), check)
        return LOSSES[name]
    return add


def sigmoid(z: torch.Tensor) -> torch.Tensor:
    """−log σ(z): the DPO family's loss of the combined margin."""
    from torch.nn.functional import logsigmoid

    return -logsigmoid(z)


# In reading order (baseline, method, ablation): reports and eval tables list trained models so.
ddpo = register("ddpo", ("beta1",), "dDPO: sigmoid DPO against the dSFT reference (β2 = 0)")(sigmoid)
dadpo = register("dadpo", ("beta1", "beta2"), "daDPO: reference and teacher anchors inside one sigmoid")(sigmoid)
rdpo = register("rdpo", ("beta2",), "rDPO: the teacher as the only anchor (β1 = 0)")(sigmoid)


def effective_betas(loss: str, beta1: float, beta2: float) -> tuple[float, float]:
    """The betas a named loss really uses (dDPO drops β2, rDPO β1)."""
    return LOSSES[loss].betas(beta1, beta2)


def mixed_reference(ref_logp: torch.Tensor, teacher_logp: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """m = (β1·ref + β2·te)/(β1+β2): daDPO equals DPO with β = β1+β2 against this reference."""
    return (beta1 * ref_logp.double() + beta2 * teacher_logp.double()) / (beta1 + beta2)
