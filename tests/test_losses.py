"""The preference losses against their closed forms, worked by hand where the numbers are small."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dadpo_offline.losses import LOSSES, dadpo, effective_betas, mixed_reference

# policy, reference, teacher log-probs of chosen (w) and rejected (l) for one pair
ONE = dict(policy_chosen=torch.tensor([-10.0]), policy_rejected=torch.tensor([-12.0]),
           ref_chosen=torch.tensor([-11.0]), ref_rejected=torch.tensor([-11.0]),
           teacher_chosen=torch.tensor([-5.0]), teacher_rejected=torch.tensor([-20.0]))


def random_logps(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: -torch.rand(n, generator=g, dtype=torch.float64) * 100 for k in ONE}


def test_dadpo_loss_equals_hand_worked_closed_form():
    """ref margin     = (−10 − −11) − (−12 − −11) = 1 − (−1) = 2
    teacher margin = (−10 − −5) − (−12 − −20) = −5 − 8 = −13
    z = 0.1·2 + 0.01·(−13) = 0.07;  loss = −log σ(0.07) = log(1 + e^−0.07) = 0.65876
    rewards: chosen 0.1·1 + 0.01·(−5) = 0.05, rejected 0.1·(−1) + 0.01·8 = −0.02, margin 0.07 = z."""
    out = dadpo(**ONE, beta1=0.1, beta2=0.01)
    assert out.ref_margin.item() == pytest.approx(2.0)
    assert out.teacher_margin.item() == pytest.approx(-13.0)
    assert out.z.item() == pytest.approx(0.07)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.07)))
    assert out.losses.item() == pytest.approx(0.65876, abs=1e-5)
    assert out.rewards_chosen.item() == pytest.approx(0.05)
    assert out.rewards_rejected.item() == pytest.approx(-0.02)
    assert (out.rewards_chosen - out.rewards_rejected).item() == pytest.approx(out.z.item())


def test_starting_loss_is_above_log2_when_the_teacher_prefers_chosen_more_than_the_reference():
    """Policy = reference: the ref margin is 0 and z = β2·[(ref_w − te_w) − (ref_l − te_l)]
    = 0.01·[(−11 + 5) − (−11 + 20)] = 0.01·(−15) = −0.15, so loss = log(1 + e^0.15) = 0.77096 > log 2."""
    start = dict(ONE, policy_chosen=ONE["ref_chosen"], policy_rejected=ONE["ref_rejected"])
    out = dadpo(**start, beta1=0.1, beta2=0.01)
    assert out.ref_margin.item() == 0.0
    assert out.z.item() == pytest.approx(-0.15)
    assert out.losses.item() == pytest.approx(0.77096, abs=1e-5)
    assert out.losses.item() > math.log(2)


def test_beta2_zero_is_standard_sigmoid_dpo():
    """dDPO (and daDPO with β2 = 0) = −log σ(β·[(π_w − ref_w) − (π_l − ref_l)]), the teacher ignored."""
    x = random_logps()
    beta = 0.3
    standard = -F.logsigmoid(beta * ((x["policy_chosen"] - x["ref_chosen"]) - (x["policy_rejected"] - x["ref_rejected"])))
    torch.testing.assert_close(dadpo(**x, beta1=beta, beta2=0.0).losses, standard)
    torch.testing.assert_close(LOSSES["ddpo"](**x, beta1=beta, beta2=5.0).losses, standard)


def test_rdpo_is_dpo_against_the_teacher():
    x = random_logps(seed=1)
    beta = 0.05
    expected = -F.logsigmoid(beta * ((x["policy_chosen"] - x["teacher_chosen"])
                                     - (x["policy_rejected"] - x["teacher_rejected"])))
    torch.testing.assert_close(LOSSES["rdpo"](**x, beta1=9.0, beta2=beta).losses, expected)


def test_dadpo_equals_dpo_against_the_mixed_reference():
    """daDPO(β1, β2) = DPO with β = β1 + β2 against m = (β1·ref + β2·te)/(β1 + β2), per sequence."""
    x = random_logps(seed=2)
    b1, b2 = 0.1, 0.01
    m_w = mixed_reference(x["ref_chosen"], x["teacher_chosen"], b1, b2)
    m_l = mixed_reference(x["ref_rejected"], x["teacher_rejected"], b1, b2)
    dpo = -F.logsigmoid((b1 + b2) * ((x["policy_chosen"] - m_w) - (x["policy_rejected"] - m_l)))
    torch.testing.assert_close(dadpo(**x, beta1=b1, beta2=b2).losses, dpo)


def test_gradient_weight_is_sigmoid_of_teacher_gap_minus_policy_margin():
    """With h_θ = (π_w − ref_w) − (π_l − ref_l) and δ_te = (te_w − ref_w) − (te_l − ref_l),
    z = (β1+β2)·h_θ − β2·δ_te, so ∂loss/∂π_w = −(β1+β2)·σ(β2·δ_te − (β1+β2)·h_θ) = −∂loss/∂π_l."""
    x = random_logps(n=5, seed=3)
    b1, b2 = 0.1, 0.05
    pw = x["policy_chosen"].clone().requires_grad_(True)
    pl = x["policy_rejected"].clone().requires_grad_(True)
    dadpo(**dict(x, policy_chosen=pw, policy_rejected=pl), beta1=b1, beta2=b2).losses.sum().backward()
    h = (x["policy_chosen"] - x["ref_chosen"]) - (x["policy_rejected"] - x["ref_rejected"])
    delta_te = (x["teacher_chosen"] - x["ref_chosen"]) - (x["teacher_rejected"] - x["ref_rejected"])
    weight = torch.sigmoid(b2 * delta_te - (b1 + b2) * h)
    torch.testing.assert_close(pw.grad, -(b1 + b2) * weight)
    torch.testing.assert_close(pl.grad, (b1 + b2) * weight)


def test_registry_names_and_effective_betas():
    assert set(LOSSES) == {"dadpo", "ddpo", "rdpo"}
    assert effective_betas("ddpo", 0.1, 0.01) == (0.1, 0.0)
    assert effective_betas("rdpo", 0.1, 0.01) == (0.0, 0.01)
    assert LOSSES["rdpo"](**ONE, beta1=0.1, beta2=0.01).beta1 == 0.0


def test_float32_inputs_are_computed_in_float64():
    """Sums of hundreds of token log-probs differ in the 5th digit; the margin must keep them."""
    big = {k: torch.tensor([v.item() - 1000.0], dtype=torch.float32) for k, v in ONE.items()}
    assert dadpo(**big, beta1=0.1, beta2=0.01).z.dtype == torch.float64
    assert dadpo(**big, beta1=0.1, beta2=0.01).z.item() == pytest.approx(0.07, abs=1e-9)


VARIANT = '''
from dadpo_offline.losses import register, sigmoid

@register("cdadpo", uses=("beta1", "beta2"), summary="daDPO with label smoothing ε", params={"epsilon": 0.1},
          check=lambda epsilon: [] if 0 <= epsilon < 0.5 else [f"epsilon must be in [0, 0.5), got {epsilon}"])
def smoothed(z, epsilon):
    return (1 - epsilon) * sigmoid(z) + epsilon * sigmoid(-z)
'''


@pytest.fixture
def variant():
    """The README's example variant, registered for one test and removed after it."""
    exec(VARIANT, {})
    yield LOSSES["cdadpo"]
    LOSSES.pop("cdadpo")


def test_a_new_loss_is_one_registered_function(variant, tmp_path):
    """Registering is all it takes: the manifest checks its name and parameters, run trains it, the plan
    and eval list it, training computes it. By hand with ε = 0.2 and z = 0.07 (the pair above):
    0.8·log(1 + e^−0.07) + 0.2·log(1 + e^0.07) = 0.8·0.65876 + 0.2·0.72876 = 0.67276."""
    import subprocess
    import sys

    from dadpo_offline.core.steps import pipeline_steps, training_stages
    from dadpo_offline.errors import ManifestError
    from dadpo_offline.manifest import load_manifest

    m = load_manifest(None, ["train.compare=[cdadpo]", "train.loss_params={cdadpo: {epsilon: 0.2}}"])
    assert [s.name for s in pipeline_steps(m)][3:5] == ["dadpo", "cdadpo"] and "cdadpo" in training_stages()
    out = variant(**ONE, beta1=0.1, beta2=0.01, **m.train.loss_params["cdadpo"])
    assert out.losses.item() == pytest.approx(0.8 * math.log1p(math.exp(-0.07)) + 0.2 * math.log1p(math.exp(0.07)))
    assert out.losses.item() == pytest.approx(0.67276, abs=1e-5)
    assert variant(**ONE, beta1=0.1, beta2=0.01, epsilon=0.0).losses.item() == pytest.approx(0.65876, abs=1e-5)
    with pytest.raises(ManifestError) as error:
        load_manifest(None, ["train.loss=cdadpo", "train.loss_params={cdadpo: {epsilon: 0.7}, ddpo: {tau: 1}}"])
    assert "train.loss_params.cdadpo: epsilon must be in [0, 0.5), got 0.7" in str(error.value)
    assert "train.loss_params.ddpo: unknown tau (its parameters: none)" in str(error.value)
    shown = subprocess.run([sys.executable, "-c", VARIANT + "from dadpo_offline.cli import main\nmain(['train', '-h'])"],
                           capture_output=True, text=True)
    assert "cdadpo" in shown.stdout, shown.stderr[-2000:]


def test_a_runs_settings_carry_only_its_own_losss_parameters(variant):
    """A sweep of one loss's parameters must not make another loss's finished run look changed."""
    from dadpo_offline.manifest import load_manifest

    t = load_manifest(None, ["train.compare=[cdadpo]", "train.loss_params={cdadpo: {epsilon: 0.2}}"]).train
    assert t.this_run().loss_params == {} and t.this_run().loss == "dadpo"
    assert dataclasses.replace(t, loss="cdadpo").this_run().loss_params == {"cdadpo": {"epsilon": 0.2}}


def test_manifest_names_a_loss_the_registry_does_not_know():
    from dadpo_offline.errors import ManifestError
    from dadpo_offline.manifest import load_manifest

    with pytest.raises(ManifestError, match=r"train.compare: 'ipo' is not one of 'dadpo', 'ddpo', 'rdpo'"):
        load_manifest(None, ["train.compare=[ipo]"])


# -- several teachers: z = β1·ref_margin + Σ_i β2_i·teacher_margin_i inside one sigmoid --

TWO_TEACHERS = dict(ONE, teacher_chosen=torch.tensor([[-5.0, -8.0]]), teacher_rejected=torch.tensor([[-20.0, -14.0]]))


def test_several_teachers_loss_equals_hand_worked_closed_form():
    """ref margin = 2 (as above); teacher 1 margin = (−10 − −5) − (−12 − −20) = −13,
    teacher 2 margin = (−10 − −8) − (−12 − −14) = −2 − 2 = −4.
    z = 0.1·2 + 0.01·(−13) + 0.05·(−4) = 0.2 − 0.13 − 0.2 = −0.13;  loss = log(1 + e^0.13) = log 2.13883 = 0.76026
    rewards: chosen 0.1·1 + 0.01·(−5) + 0.05·(−2) = −0.05, rejected 0.1·(−1) + 0.01·8 + 0.05·2 = 0.08."""
    out = dadpo(**TWO_TEACHERS, beta1=0.1, beta2=(0.01, 0.05))
    assert out.teacher_margin.tolist() == [[-13.0, -4.0]]
    assert out.teacher_term.item() == pytest.approx(-0.33)
    assert out.z.item() == pytest.approx(-0.13)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(0.13)))
    assert out.losses.item() == pytest.approx(0.76026, abs=1e-5)
    assert out.rewards_chosen.item() == pytest.approx(-0.05)
    assert out.rewards_rejected.item() == pytest.approx(0.08)
    assert out.beta2 == (0.01, 0.05)


def test_several_teachers_with_one_weight_zero_is_dadpo_with_the_other_exactly():
    """β2 = (b, 0): the second teacher's column is multiplied by 0 and drops out of z, bit for bit."""
    x = random_logps(seed=3)
    other = -torch.rand(7, dtype=torch.float64) * 100
    both = dict(x, teacher_chosen=torch.stack([x["teacher_chosen"], other], -1),
                teacher_rejected=torch.stack([x["teacher_rejected"], other - 3], -1))
    several, single = dadpo(**both, beta1=0.1, beta2=(0.02, 0.0)), dadpo(**x, beta1=0.1, beta2=0.02)
    assert torch.equal(several.z, single.z)
    assert torch.equal(several.losses, single.losses)
    assert torch.equal(several.rewards_chosen, single.rewards_chosen)


def test_one_teacher_in_the_several_teachers_form_is_dadpo_exactly():
    x = random_logps(seed=4)
    as_list = dict(x, teacher_chosen=x["teacher_chosen"][:, None], teacher_rejected=x["teacher_rejected"][:, None])
    several, single = dadpo(**as_list, beta1=0.1, beta2=(0.03,)), dadpo(**x, beta1=0.1, beta2=0.03)
    assert torch.equal(several.z, single.z) and torch.equal(several.losses, single.losses)
    assert torch.equal(several.teacher_term, single.teacher_term)


def test_several_teachers_is_dpo_against_the_geometric_mix_of_all_anchors():
    """z = B·[(π_w − m_w) − (π_l − m_l)] with B = β1 + Σβ2_i and m = (β1·ref + Σβ2_i·te_i)/B."""
    x = random_logps(seed=5)
    g = torch.Generator().manual_seed(6)
    tc, tr = (-torch.rand(7, 3, generator=g, dtype=torch.float64) * 100 for _ in range(2))
    beta1, beta2 = 0.1, (0.01, 0.2, 0.05)
    out = dadpo(**dict(x, teacher_chosen=tc, teacher_rejected=tr), beta1=beta1, beta2=beta2)
    big_b = beta1 + sum(beta2)
    mw, ml = mixed_reference(x["ref_chosen"], tc, beta1, beta2), mixed_reference(x["ref_rejected"], tr, beta1, beta2)
    expected = big_b * ((x["policy_chosen"] - mw) - (x["policy_rejected"] - ml))
    torch.testing.assert_close(out.z, expected, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(out.losses, -F.logsigmoid(expected), rtol=1e-12, atol=1e-12)


def test_ddpo_with_several_teachers_ignores_them_all():
    out = LOSSES["ddpo"](**TWO_TEACHERS, beta1=0.1, beta2=(0.01, 0.05))
    assert out.beta2 == (0.0, 0.0)
    assert out.z.item() == pytest.approx(0.2)
    assert LOSSES["dadpo"].problems(0.0, (0.0, 0.0), {}) == ["train.loss=dadpo needs a positive beta1 or beta2"]
    assert LOSSES["rdpo"].problems(0.0, (0.0, 0.1), {}) == []
