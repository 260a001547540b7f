"""Preference losses: the one owner of every fact about a loss — its name, the betas it uses, its own
parameters and their checks, and its formula.

Every input is a tensor of shape [pairs]: sums over response tokens (end-of-turn included) of
the policy's, the reference's and the teacher's log-probs of the chosen (teacher) and rejected
(student) responses. Nothing here knows about models, tokens or the cache, so each formula can
be checked against its closed form by hand.

    z    = β1·[(πθ_w − ref_w) − (πθ_l − ref_l)] + β2·[(πθ_w − te_w) − (πθ_l − te_l)]
    loss = −log σ(z)

Several teachers (manifest `teachers:`): the teacher tensors are [pairs, teachers] and β2 a sequence
of one weight per teacher, every anchor still inside the one z (docs/several-teachers.md derives it):

    z    = β1·ref_margin + Σ_i β2_i·[(πθ_w − te_i,w) − (πθ_l − te_i,l)]

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
    teacher_margin: torch.Tensor  # (πθ_w − te_w) − (πθ_l − te_l), unweighted; [pairs, teachers] with several
    teacher_term: torch.Tensor  # β2·teacher_margin, summed over teachers: z − β1·ref_margin
    rewards_chosen: torch.Tensor  # β1·(πθ_w − ref_w) + Σ β2·(πθ_w − te_w)
    rewards_rejected: torch.Tensor  # β1·(πθ_l − ref_l) + Σ β2·(πθ_l − te_l)
    beta1: float
    beta2: float | tuple[float, ...]  # a tuple, one per teacher, with several teachers


@dataclass(frozen=True)
class Loss:
    name: str
    formula: Callable[..., torch.Tensor]  # per-pair loss from z and this loss's own parameters
    uses: tuple[str, ...]  # the betas it weighs its anchors with; the others are forced to 0
    summary: str
    params: dict[str, float] = field(default_factory=dict)  # its own parameters and their defaults
    check: Callable[..., list[str]] | None = None  # problems with a full set of its parameters

    def betas(self, beta1: float, beta2):
        """The betas this loss really uses, for training, logs, plans and reports (β2 a tuple with several teachers)."""
        several = isinstance(beta2, (tuple, list))
        if "beta2" not in self.uses:
            beta2 = tuple(0.0 for _ in beta2) if several else 0.0
        return (beta1 if "beta1" in self.uses else 0.0, tuple(beta2) if several else beta2)

    def problems(self, beta1: float, beta2, params: dict) -> list[str]:
        """Every bad setting for this loss, each naming its manifest key."""
        used1, used2 = self.betas(beta1, beta2)
        found = [f"train.loss={self.name} needs a positive {' or '.join(self.uses)}"] \
            if used1 + (sum(used2) if isinstance(used2, tuple) else used2) <= 0 else []
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            known = ", ".join(self.params) or "none"
            found.append(f"train.loss_params.{self.name}: unknown {', '.join(unknown)} (its parameters: {known})")
        elif self.check is not None:
            found += [f"train.loss_params.{self.name}: {p}" for p in self.check(**{**self.params, **params})]
        return found

    def __call__(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected, teacher_chosen, teacher_rejected,
                 beta1: float, beta2, **params) -> PreferenceOutput:
        """Every anchor inside one z (not losses summed outside it), in float64: the cached numbers are
        sums of hundreds of token log-probs, and a difference of two such sums loses digits in float32.

        One teacher: teacher tensors [pairs] and a float β2. Several: [pairs, teachers] and one β2 each."""
        import torch

        beta1, beta2 = self.betas(beta1, beta2)
        pc, pr = policy_chosen.double(), policy_rejected.double()
        rc, rr = ref_chosen.double().to(pc.device), ref_rejected.double().to(pc.device)
        tc, tr = teacher_chosen.double().to(pc.device), teacher_rejected.double().to(pc.device)
        if isinstance(beta2, tuple):  # several teachers: a weight per column, summed over teachers
            if tc.dim() != 2 or tc.shape[1] != len(beta2):
                raise ValueError(f"{len(beta2)} teacher weights for teacher log-probs of shape {tuple(tc.shape)}")
            weights = torch.tensor(beta2, dtype=torch.float64, device=pc.device)
            weigh = lambda x: (x * weights).sum(-1)
            pc_, pr_ = pc.unsqueeze(-1), pr.unsqueeze(-1)
        else:
            weigh = lambda x: beta2 * x
            pc_, pr_ = pc, pr
        ref_margin = (pc - rc) - (pr - rr)
        teacher_margin = (pc_ - tc) - (pr_ - tr)
        teacher_term = weigh(teacher_margin)
        z = beta1 * ref_margin + teacher_term
        return PreferenceOutput(
            losses=self.formula(z, **{**self.params, **params}), z=z, ref_margin=ref_margin,
            teacher_margin=teacher_margin, teacher_term=teacher_term,
            rewards_chosen=beta1 * (pc - rc) + weigh(pc_ - tc), rewards_rejected=beta1 * (pr - rr) + weigh(pr_ - tr),
            beta1=beta1, beta2=beta2)


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


def effective_betas(loss: str, beta1: float, beta2):
    """The betas a named loss really uses (dDPO drops β2, rDPO β1)."""
    return LOSSES[loss].betas(beta1, beta2)


def mixed_reference(ref_logp: torch.Tensor, teacher_logp: torch.Tensor, beta1: float, beta2) -> torch.Tensor:
    """m = (β1·ref + Σ β2_i·te_i)/B, B = β1 + Σ β2_i: daDPO equals DPO with β = B against this reference
    (several teachers: teacher_logp [pairs, teachers], β2 one weight each)."""
    import torch

    if isinstance(beta2, (tuple, list)):
        weights = torch.tensor(beta2, dtype=torch.float64)
        return (beta1 * ref_logp.double() + (teacher_logp.double() * weights).sum(-1)) / (beta1 + float(weights.sum()))
    return (beta1 * ref_logp.double() + beta2 * teacher_logp.double()) / (beta1 + beta2)
